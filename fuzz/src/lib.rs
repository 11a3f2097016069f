//! The one-input check of the Rust reader fuzz targets, driving the decoder without Python
//! (as src/tests.rs does). Input format, shared with fuzz/harness.py:
//!
//! * `mode % 3 == 0`: the body is a whole backup file;
//! * `mode % 3 == 1`: the body is a record-stream plaintext, sealed with the fuzz key (4 KiB
//!   segments) so that it reaches the record parser;
//! * `mode % 3 == 2`: like 1, with segment size `4096 + (u16 LE of the next two bytes) % 8192`.
//!
//! `check` panics on a bug: a panic inside datafold (index out of range, overflow, unwrap...), an
//! error kind a file must never cause (InvalidArgument, Poisoned, Crypto), a full read that
//! succeeds while the summary read (the last segments alone) fails or disagrees, or a decoded
//! plaintext that does not re-encode to the same trailer.

use datafold::error::Error;
use datafold::format::{Preamble, Trailer};
use datafold::keys::{derive_backup_key, derive_key_id};
use datafold::reader::{
    parse_tail_trailer, trailer_record_length, BackupDecoder, Layout, SegmentFeeder, Step,
};
use datafold::stream::{encrypt, StreamParams};

/// The tests' fixed master seed (tests/helpers.py SEED, fuzz/harness.py MASTER_SEED).
pub const MASTER_SEED: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];
pub const SALT: [u8; 32] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
    27, 28, 29, 30, 31, 32,
];
pub const PREFIX: [u8; 7] = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6];

pub fn key() -> [u8; 32] {
    *derive_backup_key(&MASTER_SEED).expect("hkdf").as_bytes()
}

/// A backup file holding `plaintext`, encrypted exactly as a writer would.
pub fn seal(key: &[u8], plaintext: &[u8], segment_size: u32) -> Vec<u8> {
    let preamble = Preamble::encode(segment_size, &derive_key_id(key), 0, b"").expect("preamble");
    let mut file = preamble.raw.clone();
    let stream = encrypt(
        StreamParams::backup(segment_size),
        key,
        plaintext,
        &preamble.raw,
        Some(&SALT),
        Some(&PREFIX),
    )
    .expect("encrypt");
    file.extend_from_slice(&stream);
    file
}

pub fn build_file(key: &[u8], data: &[u8]) -> Vec<u8> {
    let Some((&mode, body)) = data.split_first() else {
        return Vec::new();
    };
    match mode % 3 {
        0 => body.to_vec(),
        1 => seal(key, body, 4096),
        _ => {
            if body.len() >= 2 {
                let css = 4096 + u32::from(u16::from_le_bytes([body[0], body[1]])) % 8192;
                seal(key, &body[2..], css)
            } else {
                seal(key, body, 4096)
            }
        }
    }
}

pub use datafold::reader::Tree;

/// Preamble, unlock, every tree and item, the trailer: what BackupReader does over a file.
pub fn read_full(file: &[u8], key: &[u8]) -> Result<(Vec<u8>, Vec<Tree>, Trailer), Error> {
    datafold::reader::read_all(file, key)
}

/// What BackupReader.read_summary() does: unlock, then the last segment(s) alone (FORMAT.md §6).
pub fn read_summary(file: &[u8], key: &[u8]) -> Result<(Vec<u8>, Trailer), Error> {
    let preamble = Preamble::parse(file)?;
    let start = preamble.raw.len();
    let stream = &file[start..];
    let header = &stream[..stream.len().min(40)];
    let mut dec = BackupDecoder::new(&preamble, key, header)?;
    // unlock(): segment 0 (and more while the HEADER is incomplete)
    let mut feeder = SegmentFeeder::default();
    let mut pos = header.len();
    let meta = loop {
        match dec.read_header()? {
            Step::Done(h) => break h,
            Step::NeedMore => {
                let now = dec.next_segment_length();
                let next = dec.params().segment_size;
                let (segment, last) = feeder.next(now, next, |n| -> Result<Vec<u8>, Error> {
                    let end = pos.saturating_add(n).min(stream.len());
                    let v = stream[pos..end].to_vec();
                    pos = end;
                    Ok(v)
                })?;
                dec.push_segment(&segment, last)?;
            }
        }
    };
    let layout = Layout::new(dec.params(), stream.len() as u64)?;
    let mut tail: Vec<u8> = Vec::new();
    let mut index = layout.segments;
    loop {
        if index == 0 {
            return Err(Error::Integrity("truncated".into()));
        }
        index -= 1;
        let (offset, len) = layout.segment(index);
        let mut segment = stream[offset as usize..offset as usize + len].to_vec();
        let n = dec.open_detached(index, index + 1 == layout.segments, &mut segment)?;
        segment.truncate(n);
        segment.extend_from_slice(&tail);
        tail = segment;
        if let Some(need) = trailer_record_length(&tail) {
            if tail.len() >= need {
                return Ok((meta, parse_tail_trailer(&tail)?));
            }
        }
    }
}

fn allowed(e: &Error) -> bool {
    matches!(
        e,
        Error::Format(_) | Error::VersionMismatch { .. } | Error::Integrity(_) | Error::EncryptionKey(_)
    )
}

/// Panics on a bug (see the module doc).
pub fn check(data: &[u8]) {
    let key = key();
    let file = build_file(&key, data);
    let full = read_full(&file, &key);
    let summary = read_summary(&file, &key);
    for (what, err) in [("full read", full.as_ref().err()), ("summary read", summary.as_ref().err())] {
        if let Some(e) = err {
            assert!(allowed(e), "{what}: a file must not cause {e:?}");
        }
    }
    if let Ok((meta, _, trailer)) = &full {
        match &summary {
            Ok((m2, t2)) => {
                assert_eq!(meta, m2, "summary read returned another HEADER");
                assert_eq!(trailer, t2, "summary read returned another trailer");
            }
            Err(e) => panic!("full read accepted the file but the summary read failed: {e:?}"),
        }
        // The accepted trailer re-encodes to the bytes at the end of the file's plaintext.
        let encoded = trailer.encode();
        assert_eq!(Trailer::decode(&encoded[5..]).expect("re-decode"), *trailer);
    }
    // The plaintext-level parsers on the raw body too: they must never panic.
    if data.len() > 1 {
        let _ = Trailer::decode(&data[1..]);
        // parse_tail_trailer's contract: the tail holds the whole record (read_summary checks
        // that first). Called without the check it panics (subtract with overflow, reader.rs
        // `tail.len() - n`): a latent hazard noted in fuzz/README.md, not reachable from a file.
        if trailer_record_length(&data[1..]).is_some_and(|n| n <= data.len() - 1) {
            let _ = parse_tail_trailer(&data[1..]);
        }
        let _ = Preamble::parse(&data[1..]);
    }
}

/// A structure-blind mutator (the same edits as fuzz/harness.py `mutate`) on xorshift64*.
pub struct Mutator {
    state: u64,
}

const INTERESTING: [u32; 15] = [
    0, 1, 0x7f, 0x80, 0xff, 0xffff, 0xffff_ffff, 0x7fff_ffff, 4096, 4095, 40, 44, 16, 32, 49,
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn mutate(&mut self, data: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = data.to_vec();
        for _ in 0..1 + self.below(4) {
            let n = buf.len();
            match self.below(9) {
                0 if n > 0 => {
                    let i = self.below(n);
                    buf[i] ^= 1 << self.below(8);
                }
                1 if n > 0 => {
                    let i = self.below(n);
                    buf[i] = self.next_u64() as u8;
                }
                2 if n >= 5 => {
                    let i = 1 + self.below(n - 4);
                    let v = INTERESTING[self.below(INTERESTING.len())];
                    buf[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
                3 => {
                    let i = self.below(n + 1);
                    let k = 1 + self.below(8);
                    let bytes: Vec<u8> = (0..k).map(|_| self.next_u64() as u8).collect();
                    buf.splice(i..i, bytes);
                }
                4 if n > 1 => {
                    let i = 1 + self.below(n - 1);
                    let j = (i + 1 + self.below(64)).min(n);
                    buf.drain(i..j);
                }
                5 if n > 1 => {
                    let i = 1 + self.below(n - 1);
                    buf.truncate(i);
                }
                6 if n > 2 => {
                    let i = 1 + self.below(n - 1);
                    let j = (i + 1 + self.below(256)).min(n);
                    let chunk = buf[i..j].to_vec();
                    let k = 1 + self.below(n - 1);
                    buf.splice(k..k, chunk);
                }
                7 if !corpus.is_empty() && n > 2 => {
                    let other = &corpus[self.below(corpus.len())];
                    if other.len() > 2 {
                        let i = 1 + self.below(n - 1);
                        let j = 1 + self.below(other.len() - 1);
                        let e = (j + 1 + self.below(4096)).min(other.len());
                        buf.truncate(i);
                        buf.extend_from_slice(&other[j..e]);
                    }
                }
                8 if n > 0 => buf[0] = self.below(3) as u8,
                _ => {}
            }
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_empty_backup_reads_back() {
        // HEADER "{}", no trees, TRAILER: built by hand.
        let key = key();
        let mut pt = vec![1u8];
        pt.extend_from_slice(&2u32.to_le_bytes());
        pt.extend_from_slice(b"{}");
        let digest = {
            let dk = datafold::keys::derive_digest_key(&key);
            *blake3_keyed(dk.as_bytes(), &pt)
        };
        let trailer = Trailer {
            total_items: 0,
            total_bytes: 0,
            trees: vec![],
            digest,
        };
        pt.extend_from_slice(&trailer.encode());
        let file = seal(&key, &pt, 4096);
        let (meta, trees, t) = read_full(&file, &key).unwrap();
        assert_eq!((meta.as_slice(), trees.len(), t), (&b"{}"[..], 0, trailer));
        let mut data = vec![1u8];
        data.extend_from_slice(&pt);
        check(&data);
    }

    fn blake3_keyed(key: &[u8; 32], data: &[u8]) -> Box<[u8; 32]> {
        let mut d = datafold::digest::Digests::new(key);
        d.absorb(data);
        Box::new(d.stream_digest())
    }
}
