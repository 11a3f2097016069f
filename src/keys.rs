//! Key derivation (docs/FORMAT.md §4) and the zeroizing key type. The Python twin is
//! python/datafold/keys.py; cross-core tests keep the two equal.

use hkdf::Hkdf;
use sha1::Sha1;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::format::{DIGEST_LENGTH, KEY_ID_LENGTH};

pub const BACKUP_KEY_CONTEXT: &[u8] = b"backup_data";
pub const KEY_ID_LABEL: &[u8] = b"datafold key id v1";
pub const DIGEST_KEY_LABEL: &[u8] = b"datafold digest v1";
pub const BACKUP_KEY_LENGTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HkdfHash {
    Sha1,
    Sha256,
}

impl HkdfHash {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().replace('-', "").as_str() {
            "sha256" => Ok(HkdfHash::Sha256),
            "sha1" => Ok(HkdfHash::Sha1),
            _ => Err(Error::invalid(format!(
                "hkdf_hash must be \"sha256\" or \"sha1\", got {name:?}"
            ))),
        }
    }
}

/// HKDF (RFC 5869) into `out`; an empty salt is the RFC's default salt.
pub fn hkdf(hash: HkdfHash, ikm: &[u8], salt: &[u8], info: &[u8], out: &mut [u8]) -> Result<()> {
    let too_long = |_| Error::invalid("HKDF output longer than 255 hash lengths");
    match hash {
        HkdfHash::Sha256 => Hkdf::<Sha256>::new(Some(salt), ikm)
            .expand(info, out)
            .map_err(too_long),
        HkdfHash::Sha1 => Hkdf::<Sha1>::new(Some(salt), ikm)
            .expand(info, out)
            .map_err(too_long),
    }
}

/// A 32-byte key that is wiped from memory when dropped; its Debug output hides the bytes.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    pub fn from_slice(bytes: &[u8], what: &str) -> Result<Self> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::invalid(format!("{what} must be 32 bytes, got {}", bytes.len())))?;
        Ok(SecretKey(Zeroizing::new(arr)))
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// The 32-byte backup key from an Ed25519 master seed.
pub fn derive_backup_key(master_seed: &[u8]) -> Result<SecretKey> {
    let mut out = Zeroizing::new([0u8; BACKUP_KEY_LENGTH]);
    hkdf(
        HkdfHash::Sha256,
        master_seed,
        b"",
        BACKUP_KEY_CONTEXT,
        &mut out[..],
    )?;
    Ok(SecretKey(out))
}

pub fn derive_key_id(backup_key: &[u8]) -> [u8; KEY_ID_LENGTH] {
    let mut out = [0u8; KEY_ID_LENGTH];
    hkdf(HkdfHash::Sha256, backup_key, b"", KEY_ID_LABEL, &mut out).expect("16 <= 255*32");
    out
}

pub fn derive_digest_key(backup_key: &[u8]) -> SecretKey {
    let mut out = Zeroizing::new([0u8; DIGEST_LENGTH]);
    hkdf(
        HkdfHash::Sha256,
        backup_key,
        b"",
        DIGEST_KEY_LABEL,
        &mut out[..],
    )
    .expect("32 <= 255*32");
    SecretKey(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors(name: &str) -> Value {
        crate::test_support::load_vectors(name)
    }

    #[test]
    fn rfc5869_case1() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0u8..=12).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let mut okm = [0u8; 42];
        hkdf(HkdfHash::Sha256, &ikm, &salt, &info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn wycheproof_hkdf_sha256() {
        let v = vectors("wycheproof_hkdf_sha256_test.json");
        let mut checked = 0;
        for group in v["testGroups"].as_array().unwrap() {
            for t in group["tests"].as_array().unwrap() {
                let h = |k: &str| hex::decode(t[k].as_str().unwrap()).unwrap();
                let size = t["size"].as_u64().unwrap() as usize;
                let mut out = vec![0u8; size];
                let r = hkdf(
                    HkdfHash::Sha256,
                    &h("ikm"),
                    &h("salt"),
                    &h("info"),
                    &mut out,
                );
                match t["result"].as_str().unwrap() {
                    "valid" | "acceptable" => {
                        r.unwrap();
                        assert_eq!(out, h("okm"), "tcId {}", t["tcId"]);
                    }
                    _ => assert!(r.is_err(), "tcId {} should fail", t["tcId"]),
                }
                checked += 1;
            }
        }
        assert!(checked > 50);
    }

    #[test]
    fn derivations_are_distinct_and_stable() {
        let bk = derive_backup_key(&[1u8; 32]).unwrap();
        let id = derive_key_id(bk.as_bytes());
        let dk = derive_digest_key(bk.as_bytes());
        assert_ne!(&id[..], &dk.as_bytes()[..16]);
        assert_eq!(id, derive_key_id(bk.as_bytes()));
        assert_eq!(format!("{bk:?}"), "SecretKey(<redacted>)");
    }
}
