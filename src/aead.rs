//! AES-GCM through `aws-lc-rs` (AWS-LC: AES-NI/VAES/AVX-512 chosen at run time; picked over
//! `ring` and RustCrypto `aes-gcm` by measurement, see docs/BENCHMARKS.md), except for opening
//! in place (`open_detached`: the reader's hot path), which goes through `ring`: its
//! VAES + AVX2 code opens ~1.8x faster where there is no AVX-512.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};

use crate::error::{Error, Result};

pub const NONCE_LENGTH: usize = 12;
pub const TAG_LENGTH: usize = 16;

pub struct AesGcm(LessSafeKey, ring::aead::LessSafeKey);

impl AesGcm {
    /// A 16-byte key selects AES-128-GCM, a 32-byte key AES-256-GCM.
    pub fn new(key: &[u8]) -> Result<Self> {
        let alg = match key.len() {
            16 => &AES_128_GCM,
            32 => &AES_256_GCM,
            n => {
                return Err(Error::invalid(format!(
                    "AES-GCM key must be 16 or 32 bytes, got {n}"
                )))
            }
        };
        let ring_alg = if key.len() == 16 {
            &ring::aead::AES_128_GCM
        } else {
            &ring::aead::AES_256_GCM
        };
        let setup_failed = || Error::Crypto("AES-GCM key setup failed".into());
        let opener = ring::aead::UnboundKey::new(ring_alg, key).map_err(|_| setup_failed())?;
        let key = UnboundKey::new(alg, key).map_err(|_| setup_failed())?;
        Ok(AesGcm(
            LessSafeKey::new(key),
            ring::aead::LessSafeKey::new(opener),
        ))
    }

    /// Encrypts `buf` in place and returns the tag.
    pub fn seal(
        &self,
        nonce: &[u8; NONCE_LENGTH],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LENGTH]> {
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Crypto("AES-GCM encryption failed (input too long?)".into()))?;
        Ok(tag.as_ref().try_into().expect("16-byte tag"))
    }

    /// Encrypts `plaintext` into `out` (of the same length) and writes the tag to `tag`: no
    /// copy of the plaintext first.
    pub fn seal_to(
        &self,
        nonce: &[u8; NONCE_LENGTH],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
        tag: &mut [u8; TAG_LENGTH],
    ) -> Result<()> {
        self.0
            .seal_out_of_place_scatter(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                plaintext,
                out,
                &[],
                tag,
            )
            .map_err(|_| Error::Crypto("AES-GCM encryption failed (input too long?)".into()))
    }

    /// Decrypts `ciphertext` into `out` (of the same length), checking `tag`. `false` means it
    /// did not authenticate (`out` then holds garbage that must not be used).
    pub fn open_to(
        &self,
        nonce: &[u8; NONCE_LENGTH],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LENGTH],
        out: &mut [u8],
    ) -> bool {
        // The same EVP_AEAD_CTX_open_gather path as `open_detached`, with separate buffers.
        self.0
            .open_separate_gather(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                ciphertext,
                tag,
                out,
            )
            .is_ok()
    }

    /// Decrypts `ciphertext` in place, checking `tag`. `false` means it did not authenticate
    /// (the buffer then holds garbage that must not be used). Through ring: its VAES + AVX2
    /// code opens ~1.8x faster than AWS-LC's where there is no AVX-512.
    pub fn open_detached(
        &self,
        nonce: &[u8; NONCE_LENGTH],
        aad: &[u8],
        ciphertext: &mut [u8],
        tag: &[u8; TAG_LENGTH],
    ) -> bool {
        self.1
            .open_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(*nonce),
                ring::aead::Aad::from(aad),
                ring::aead::Tag::from(*tag),
                ciphertext,
                0..,
            )
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wycheproof AES-GCM: every 96-bit-IV, 128-bit-tag case with a 128- or 256-bit key.
    /// The out-of-place forms give what the in-place ones give, and refuse a bad tag.
    #[test]
    fn seal_to_and_open_to_match_in_place() {
        let aead = AesGcm::new(&[3; 32]).unwrap();
        let nonce = [5; NONCE_LENGTH];
        for len in [0usize, 1, 15, 16, 17, 1000, 70_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let mut in_place = plain.clone();
            let tag = aead.seal(&nonce, b"ad", &mut in_place).unwrap();
            let (mut out, mut tag2) = (vec![0; len], [0; TAG_LENGTH]);
            aead.seal_to(&nonce, b"ad", &plain, &mut out, &mut tag2)
                .unwrap();
            assert_eq!((out.clone(), tag2), (in_place, tag));
            let mut back = vec![0; len];
            assert!(aead.open_to(&nonce, b"ad", &out, &tag, &mut back));
            assert_eq!(back, plain);
            tag2[0] ^= 1;
            assert!(!aead.open_to(&nonce, b"ad", &out, &tag2, &mut back));
        }
    }

    #[test]
    fn wycheproof_aes_gcm() {
        let v = crate::test_support::load_vectors("wycheproof_aes_gcm_test.json");
        let mut checked = [0usize; 2];
        for group in v["testGroups"].as_array().unwrap() {
            let key_size = group["keySize"].as_u64().unwrap();
            if group["ivSize"].as_u64() != Some(96) || group["tagSize"].as_u64() != Some(128) {
                continue;
            }
            if key_size != 256 && key_size != 128 {
                continue;
            }
            for t in group["tests"].as_array().unwrap() {
                let h = |k: &str| hex::decode(t[k].as_str().unwrap()).unwrap();
                let cipher = AesGcm::new(&h("key")).unwrap();
                let nonce: [u8; 12] = h("iv").try_into().unwrap();
                let valid = t["result"].as_str() != Some("invalid");
                // Opening out of place goes through AWS-LC, in place through ring: both checked.
                let tag: [u8; TAG_LENGTH] = h("tag").try_into().unwrap();
                let mut out = vec![0; h("ct").len()];
                let by_aws_lc = cipher.open_to(&nonce, &h("aad"), &h("ct"), &tag, &mut out);
                assert_eq!(by_aws_lc, valid, "tcId {} out of place", t["tcId"]);
                if valid {
                    assert_eq!(out, h("msg"));
                }
                let mut buf = h("ct");
                let opened = cipher.open_detached(&nonce, &h("aad"), &mut buf, &tag);
                if valid {
                    assert!(opened, "tcId {} should open", t["tcId"]);
                    assert_eq!(buf, h("msg"));
                    let mut enc = h("msg");
                    let tag = cipher.seal(&nonce, &h("aad"), &mut enc).unwrap();
                    assert_eq!(enc, h("ct"));
                    assert_eq!(tag.to_vec(), h("tag"));
                } else {
                    assert!(!opened, "tcId {} should fail", t["tcId"]);
                }
                checked[(key_size == 256) as usize] += 1;
            }
        }
        assert!(checked[1] > 40, "256-bit cases checked: {checked:?}");
    }
}
