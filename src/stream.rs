//! Tink's AES-GCM-HKDF streaming AEAD, first-segment offset 0 (docs/FORMAT.md §2).
//!
//! `SegmentCipher` seals and opens single segments; the one-shot `encrypt`/`decrypt` and the
//! backup encoder/decoder are built on it.

use zeroize::Zeroizing;

use crate::aead::{AesGcm, NONCE_LENGTH, TAG_LENGTH};
use crate::error::{Error, Result};
use crate::keys::{hkdf, HkdfHash};

pub const NONCE_PREFIX_LENGTH: usize = 7;

/// The derived key size (AES-128 or AES-256).
pub fn check_key_size(key_size: usize) -> Result<usize> {
    match key_size {
        16 | 32 => Ok(key_size),
        _ => Err(key_size_error(key_size)),
    }
}

/// The error for a derived key size other than 16 or 32; `got` may be any integer.
pub fn key_size_error(got: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "derived_key_size must be 16 (AES-128) or 32 (AES-256), got {got}"
    ))
}

/// The error for a ciphertext segment size out of range for a (valid) `key_size`; `got` may be
/// any integer.
pub fn segment_size_error(key_size: usize, got: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "segment_size must leave room for at least one plaintext byte in the first segment \
         (more than {} bytes) and fit in 32 bits, got {got}",
        1 + key_size + NONCE_PREFIX_LENGTH + TAG_LENGTH
    ))
}

/// The fixed parameters of one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamParams {
    pub hash: HkdfHash,
    pub key_size: usize,
    pub segment_size: usize,
}

impl StreamParams {
    pub fn new(hash: HkdfHash, key_size: usize, segment_size: u64) -> Result<Self> {
        let key_size = check_key_size(key_size)?;
        let header = 1 + key_size + NONCE_PREFIX_LENGTH;
        if segment_size <= (header + TAG_LENGTH) as u64 || segment_size > u32::MAX as u64 {
            return Err(segment_size_error(key_size, segment_size));
        }
        Ok(StreamParams {
            hash,
            key_size,
            segment_size: segment_size as usize,
        })
    }

    /// The backup format's parameters: HKDF-SHA256, AES-256.
    pub fn backup(segment_size: u32) -> Self {
        StreamParams {
            hash: HkdfHash::Sha256,
            key_size: 32,
            segment_size: segment_size as usize,
        }
    }

    pub fn header_length(&self) -> usize {
        1 + self.key_size + NONCE_PREFIX_LENGTH
    }

    /// Plaintext bytes in a full segment `index`.
    pub fn plaintext_length(&self, index: u64) -> usize {
        let first = if index == 0 { self.header_length() } else { 0 };
        self.segment_size - TAG_LENGTH - first
    }

    /// Ciphertext bytes in a full segment `index`.
    pub fn ciphertext_length(&self, index: u64) -> usize {
        self.plaintext_length(index) + TAG_LENGTH
    }

    /// Where ciphertext segment `index` starts in the stream (segment 0 after the header).
    pub fn segment_offset(&self, index: u64) -> u64 {
        if index == 0 {
            self.header_length() as u64
        } else {
            index * self.segment_size as u64
        }
    }
}

pub struct SegmentCipher {
    aead: AesGcm,
    nonce_prefix: [u8; NONCE_PREFIX_LENGTH],
    header: Vec<u8>,
    pub params: StreamParams,
}

impl SegmentCipher {
    pub fn new(
        params: StreamParams,
        ikm: &[u8],
        aad: &[u8],
        salt: &[u8],
        nonce_prefix: &[u8],
    ) -> Result<Self> {
        if salt.len() != params.key_size {
            return Err(Error::invalid(format!(
                "salt must be {} bytes, got {}",
                params.key_size,
                salt.len()
            )));
        }
        let nonce_prefix: [u8; NONCE_PREFIX_LENGTH] = nonce_prefix.try_into().map_err(|_| {
            Error::invalid(format!(
                "nonce_prefix must be {NONCE_PREFIX_LENGTH} bytes, got {}",
                nonce_prefix.len()
            ))
        })?;
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf(params.hash, ikm, salt, aad, &mut key[..params.key_size])?;
        let aead = AesGcm::new(&key[..params.key_size])?;
        let mut header = Vec::with_capacity(params.header_length());
        header.push(params.header_length() as u8);
        header.extend_from_slice(salt);
        header.extend_from_slice(&nonce_prefix);
        Ok(SegmentCipher {
            aead,
            nonce_prefix,
            header,
            params,
        })
    }

    /// A cipher with a fresh random salt and nonce prefix.
    pub fn random(params: StreamParams, ikm: &[u8], aad: &[u8]) -> Result<Self> {
        let mut salt = [0u8; 32];
        let mut prefix = [0u8; NONCE_PREFIX_LENGTH];
        fill_random(&mut salt[..params.key_size])?;
        fill_random(&mut prefix)?;
        Self::new(params, ikm, aad, &salt[..params.key_size], &prefix)
    }

    /// Parses a stream header and builds the cipher it describes.
    pub fn from_header(
        params: StreamParams,
        ikm: &[u8],
        aad: &[u8],
        header: &[u8],
    ) -> Result<Self> {
        let n = params.header_length();
        if header.len() < n {
            return Err(Error::integrity(
                "backup stream is truncated inside its header",
            ));
        }
        if header[0] as usize != n {
            return Err(Error::integrity(
                "backup stream header is corrupted (wrong header length byte)",
            ));
        }
        Self::new(
            params,
            ikm,
            aad,
            &header[1..1 + params.key_size],
            &header[1 + params.key_size..n],
        )
    }

    pub fn header(&self) -> &[u8] {
        &self.header
    }

    fn nonce(&self, index: u64, last: bool) -> Result<[u8; NONCE_LENGTH]> {
        let index: u32 = index
            .try_into()
            .map_err(|_| Error::invalid("stream too long: more than 2^32 segments"))?;
        let mut n = [0u8; NONCE_LENGTH];
        n[..NONCE_PREFIX_LENGTH].copy_from_slice(&self.nonce_prefix);
        n[7..11].copy_from_slice(&index.to_be_bytes());
        n[11] = last as u8;
        Ok(n)
    }

    /// Appends segment `index` (ciphertext || tag) for `plaintext` to `out`.
    pub fn seal_into(
        &self,
        index: u64,
        last: bool,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let nonce = self.nonce(index, last)?;
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self.aead.seal(&nonce, &[], &mut out[start..])?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypts `plaintext` as segment `index` into `out`, which must be exactly
    /// `plaintext.len() + 16` bytes.
    pub fn seal_to(&self, index: u64, last: bool, plaintext: &[u8], out: &mut [u8]) -> Result<()> {
        let nonce = self.nonce(index, last)?;
        let (body, tag_out) = out.split_at_mut(plaintext.len());
        let tag: &mut [u8; TAG_LENGTH] = tag_out
            .try_into()
            .map_err(|_| Error::invalid("segment output has the wrong length"))?;
        self.aead.seal_to(&nonce, &[], plaintext, body, tag)
    }

    /// Decrypts segment `index` (ciphertext || tag) into `out`, which must be exactly
    /// `segment.len() - 16` bytes: straight from one to the other, no copy first.
    pub fn open_to(&self, index: u64, last: bool, segment: &[u8], out: &mut [u8]) -> Result<()> {
        let n = segment
            .len()
            .checked_sub(TAG_LENGTH)
            .ok_or_else(|| short_segment(index))?;
        let nonce = self.nonce(index, last)?;
        let tag: [u8; TAG_LENGTH] = segment[n..].try_into().expect("16-byte tag");
        if self.aead.open_to(&nonce, &[], &segment[..n], &tag, out) {
            Ok(())
        } else {
            Err(auth_failed(index))
        }
    }

    /// Decrypts segment `index` in place: `body` is its ciphertext without the tag, `tag` the
    /// tag that followed it.
    pub fn open_in_place_tagged(
        &self,
        index: u64,
        last: bool,
        body: &mut [u8],
        tag: &[u8; TAG_LENGTH],
    ) -> Result<()> {
        let nonce = self.nonce(index, last)?;
        if self.aead.open_detached(&nonce, &[], body, tag) {
            Ok(())
        } else {
            Err(auth_failed(index))
        }
    }

    /// Decrypts segment `index` in place; returns the plaintext length (a prefix of `segment`).
    pub fn open_in_place(&self, index: u64, last: bool, segment: &mut [u8]) -> Result<usize> {
        let n = segment
            .len()
            .checked_sub(TAG_LENGTH)
            .ok_or_else(|| short_segment(index))?;
        let (body, tag) = segment.split_at_mut(n);
        let tag: [u8; TAG_LENGTH] = (&*tag).try_into().expect("16-byte tag");
        self.open_in_place_tagged(index, last, body, &tag)?;
        Ok(n)
    }
}

fn short_segment(index: u64) -> Error {
    Error::integrity(format!(
        "backup is truncated or corrupted (segment {index} is shorter than its tag)"
    ))
}

fn auth_failed(index: u64) -> Error {
    Error::integrity(format!(
        "backup is corrupted, truncated or was tampered with (segment {index} failed authentication)"
    ))
}

pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf)
        .map_err(|e| Error::Crypto(format!("the system random generator failed: {e}")))
}

/// Builds the cipher for a new stream: given salt and nonce prefix, random ones where missing.
pub fn new_cipher(
    params: StreamParams,
    ikm: &[u8],
    aad: &[u8],
    salt: Option<&[u8]>,
    nonce_prefix: Option<&[u8]>,
) -> Result<SegmentCipher> {
    let mut s = [0u8; 32];
    let mut p = [0u8; NONCE_PREFIX_LENGTH];
    if salt.is_none() {
        fill_random(&mut s[..params.key_size])?;
    }
    if nonce_prefix.is_none() {
        fill_random(&mut p)?;
    }
    SegmentCipher::new(
        params,
        ikm,
        aad,
        salt.unwrap_or(&s[..params.key_size]),
        nonce_prefix.unwrap_or(&p),
    )
}

/// Number of segments a writer emits for `len` plaintext bytes (never an empty trailing one).
pub fn segment_count_for_plaintext(params: &StreamParams, len: u64) -> u64 {
    let first = params.plaintext_length(0) as u64;
    if len <= first {
        1
    } else {
        1 + (len - first).div_ceil(params.plaintext_length(1) as u64)
    }
}

/// Length of the whole stream (header included) for `len` plaintext bytes.
pub fn ciphertext_length_for(params: &StreamParams, len: u64) -> u64 {
    params.header_length() as u64
        + len
        + TAG_LENGTH as u64 * segment_count_for_plaintext(params, len)
}

/// Plaintext length of a whole stream of `len` bytes, or an error if no stream has that length.
pub fn plaintext_length_for(params: &StreamParams, len: u64) -> Result<u64> {
    let header = params.header_length() as u64;
    let tag = TAG_LENGTH as u64;
    let body = len.checked_sub(header + tag).ok_or_else(|| {
        Error::integrity("stream is truncated (shorter than its header and one tag)")
    })?;
    let first = params.ciphertext_length(0) as u64;
    if body + tag <= first {
        return Ok(body);
    }
    let css = params.segment_size as u64;
    let segments = 1 + (body + tag - first).div_ceil(css);
    let last = body + tag - first - (segments - 2) * css;
    if last < tag {
        return Err(Error::integrity(
            "stream is truncated or has extra bytes (its last segment is shorter than a tag)",
        ));
    }
    Ok(body + tag - tag * segments)
}

/// Encrypts a whole plaintext into `out` (exactly `ciphertext_length_for` bytes), header
/// included, sealing segments on up to `threads` threads.
pub fn encrypt_to(
    cipher: &SegmentCipher,
    plaintext: &[u8],
    out: &mut [u8],
    threads: usize,
) -> Result<()> {
    let params = cipher.params;
    let segments = segment_count_for_plaintext(&params, plaintext.len() as u64);
    let (header, mut rest_out) = out.split_at_mut(params.header_length());
    header.copy_from_slice(cipher.header());
    let mut rest = plaintext;
    let mut jobs = Vec::with_capacity(segments as usize);
    for i in 0..segments {
        let take = rest.len().min(params.plaintext_length(i));
        let (seg, tail) = rest_out.split_at_mut(take + TAG_LENGTH);
        jobs.push((i, i + 1 == segments, &rest[..take], seg));
        rest = &rest[take..];
        rest_out = tail;
    }
    crate::parallel::run(jobs, plaintext.len(), threads, |(i, last, src, dst)| {
        cipher.seal_to(i, last, src, dst)
    })
}

/// Encrypts a whole plaintext into a Tink stream (header included).
pub fn encrypt(
    params: StreamParams,
    ikm: &[u8],
    plaintext: &[u8],
    aad: &[u8],
    salt: Option<&[u8]>,
    nonce_prefix: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let cipher = new_cipher(params, ikm, aad, salt, nonce_prefix)?;
    let mut out = vec![0u8; ciphertext_length_for(&params, plaintext.len() as u64) as usize];
    encrypt_to(&cipher, plaintext, &mut out, 1)?;
    Ok(out)
}

/// Decrypts a whole stream into `out` (exactly `plaintext_length_for` bytes) on up to `threads`
/// threads; the last segment is the one that ends the input.
pub fn decrypt_to(
    params: StreamParams,
    ikm: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
    out: &mut [u8],
    threads: usize,
) -> Result<()> {
    let cipher = SegmentCipher::from_header(params, ikm, aad, ciphertext)?;
    let expected = plaintext_length_for(&params, ciphertext.len() as u64)?;
    if expected != out.len() as u64 {
        return Err(Error::invalid("output buffer has the wrong length"));
    }
    let mut rest = &ciphertext[params.header_length()..];
    let mut rest_out = out;
    let mut jobs = Vec::new();
    for index in 0u64.. {
        let full = params.ciphertext_length(index);
        let last = rest.len() <= full;
        let take = rest.len().min(full);
        let (seg_out, tail) = rest_out.split_at_mut(take - TAG_LENGTH);
        jobs.push((index, last, &rest[..take], seg_out));
        rest = &rest[take..];
        rest_out = tail;
        if last {
            break;
        }
    }
    let cipher = &cipher;
    crate::parallel::run(jobs, ciphertext.len(), threads, |(i, last, seg, out)| {
        cipher.open_to(i, last, seg, out)
    })
}

/// Decrypts a whole Tink stream.
pub fn decrypt(params: StreamParams, ikm: &[u8], ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
    if ciphertext.len() < params.header_length() {
        return Err(Error::integrity("stream is truncated inside its header"));
    }
    let n = plaintext_length_for(&params, ciphertext.len() as u64)?;
    let mut out = vec![0u8; n as usize];
    decrypt_to(params, ikm, ciphertext, aad, &mut out, 1)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{load_vectors, unhex};

    #[test]
    fn tink_vectors_decrypt_and_reencrypt() {
        let v = load_vectors("tink_aes_gcm_hkdf_streaming.json");
        let mut n = 0;
        for t in v["vectors"].as_array().unwrap() {
            let hash = HkdfHash::parse(t["hash"].as_str().unwrap()).unwrap();
            let ks = t["derived_key_size"].as_u64().unwrap() as usize;
            let params = StreamParams::new(hash, ks, t["segment_size"].as_u64().unwrap()).unwrap();
            let (ikm, aad, pt, ct) = (
                unhex(t, "ikm"),
                unhex(t, "aad"),
                unhex(t, "plaintext"),
                unhex(t, "ciphertext"),
            );
            assert_eq!(decrypt(params, &ikm, &ct, &aad).unwrap(), pt);
            let salt = &ct[1..1 + ks];
            let prefix = &ct[1 + ks..1 + ks + NONCE_PREFIX_LENGTH];
            assert_eq!(
                encrypt(params, &ikm, &pt, &aad, Some(salt), Some(prefix)).unwrap(),
                ct
            );
            n += 1;
        }
        assert_eq!(n, 17);
    }

    #[test]
    fn tampering_fails() {
        let params = StreamParams::new(HkdfHash::Sha256, 32, 100).unwrap();
        let key = [3u8; 32];
        let pt: Vec<u8> = (0..500u32).map(|i| i as u8).collect();
        let ct = encrypt(params, &key, &pt, b"ad", None, None).unwrap();
        assert_eq!(decrypt(params, &key, &ct, b"ad").unwrap(), pt);
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x10;
            assert!(decrypt(params, &key, &bad, b"ad").is_err(), "flip at {i}");
        }
        for cut in 0..ct.len() {
            assert!(
                decrypt(params, &key, &ct[..cut], b"ad").is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = ct.clone();
        longer.push(0);
        assert!(decrypt(params, &key, &longer, b"ad").is_err());
        assert!(decrypt(params, &key, &ct, b"other").is_err());
        // Swap segments 1 and 2 (both full, 100 bytes each, starting at 100 and 200).
        let mut swapped = ct.clone();
        swapped[100..200].copy_from_slice(&ct[200..300]);
        swapped[200..300].copy_from_slice(&ct[100..200]);
        assert!(decrypt(params, &key, &swapped, b"ad").is_err());
    }

    #[test]
    fn empty_and_exact_multiple_plaintexts() {
        let params = StreamParams::new(HkdfHash::Sha256, 32, 100).unwrap();
        let key = [5u8; 32];
        let empty = encrypt(params, &key, b"", b"", None, None).unwrap();
        assert_eq!(empty.len(), 40 + 16);
        assert_eq!(decrypt(params, &key, &empty, b"").unwrap(), b"");
        // 44 bytes fill segment 0 exactly, 84 more fill segment 1 exactly: no empty third segment.
        let pt = vec![1u8; 44 + 84];
        let ct = encrypt(params, &key, &pt, b"", None, None).unwrap();
        assert_eq!(ct.len(), 200);
        assert_eq!(decrypt(params, &key, &ct, b"").unwrap(), pt);
    }
}
