//! Format constants, the plaintext preamble and record framing (docs/FORMAT.md §1, §3).

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DFBACKUP";
pub const FORMAT_VERSION: u32 = 1;
/// Fixed part of the preamble; KDF parameters follow it.
pub const PREAMBLE_FIXED_LENGTH: usize = 44;
pub const MAX_PREAMBLE_LENGTH: usize = 4096;
pub const KEY_ID_LENGTH: usize = 16;
pub const DEFAULT_SEGMENT_SIZE: u32 = 1 << 20;
pub const MIN_SEGMENT_SIZE: u32 = 4096;
pub const MAX_SEGMENT_SIZE: u32 = 64 << 20;
pub const MAX_TREE_NAME_LENGTH: usize = 4096;
pub const KDF_NONE: u16 = 0;
pub const KDF_ARGON2ID: u16 = 1;
pub const DIGEST_LENGTH: usize = 32;

pub const REC_HEADER: u8 = 0x01;
pub const REC_TREE_BEGIN: u8 = 0x02;
pub const REC_PUT: u8 = 0x03;
pub const REC_DELETE: u8 = 0x04;
pub const REC_TREE_END: u8 = 0x05;
pub const REC_TRAILER: u8 = 0x06;
/// A PUT record's bytes before its key: type, u32 key length, u32 value length.
pub const PUT_HEADER_LENGTH: usize = 1 + 4 + 4;
/// A DELETE record's bytes before its key: type, u32 key length.
pub const DELETE_HEADER_LENGTH: usize = 1 + 4;
/// A run of PUT / DELETE records of the current tree, stored raw or compressed (FORMAT.md §3, §7).
pub const REC_BLOCK: u8 = 0x07;

/// BLOCK codecs.
pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;
/// A BLOCK record's fixed part: type, codec, u32 raw_len, u32 data_len.
pub const BLOCK_HEADER_LENGTH: usize = 1 + 1 + 4 + 4;
/// Readers refuse a BLOCK whose raw_len or data_len is larger than this (16 MiB).
pub const MAX_BLOCK_RAW_LENGTH: usize = 16 << 20;
/// `compression_level` is 0 (off) or a zstd level 1..=22.
pub const MAX_COMPRESSION_LEVEL: i32 = 22;

/// Length of a TREE_END record including its type byte.
pub const TREE_END_LENGTH: usize = 1 + 8 + 8 + DIGEST_LENGTH;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub format_version: u32,
    pub flags: u32,
    pub segment_size: u32,
    pub key_id: [u8; KEY_ID_LENGTH],
    pub kdf_id: u16,
    pub kdf_params: Vec<u8>,
    /// The exact bytes: the stream's associated data.
    pub raw: Vec<u8>,
}

pub fn check_segment_size(segment_size: u64) -> Result<u32> {
    if (MIN_SEGMENT_SIZE as u64..=MAX_SEGMENT_SIZE as u64).contains(&segment_size) {
        Ok(segment_size as u32)
    } else {
        Err(segment_size_error(segment_size))
    }
}

/// The error for a segment size out of range; `got` may be any integer (also one beyond u64).
pub fn segment_size_error(got: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes, got {got}"
    ))
}

/// The error for a KDF id this format does not know; `got` may be any integer.
pub fn unknown_kdf_id(got: impl std::fmt::Display) -> Error {
    Error::invalid(format!("unknown kdf_id {got}"))
}

fn check_kdf_id(kdf_id: u16) -> bool {
    kdf_id == KDF_NONE || kdf_id == KDF_ARGON2ID
}

impl Preamble {
    pub fn encode(
        segment_size: u32,
        key_id: &[u8],
        kdf_id: u16,
        kdf_params: &[u8],
    ) -> Result<Self> {
        check_segment_size(segment_size as u64)?;
        let key_id: [u8; KEY_ID_LENGTH] = key_id
            .try_into()
            .map_err(|_| Error::invalid(format!("key_id must be {KEY_ID_LENGTH} bytes")))?;
        if !check_kdf_id(kdf_id) {
            return Err(unknown_kdf_id(kdf_id));
        }
        let total = PREAMBLE_FIXED_LENGTH + kdf_params.len();
        if total > MAX_PREAMBLE_LENGTH {
            return Err(Error::invalid(format!(
                "kdf_params too long ({} bytes); the preamble is limited to {MAX_PREAMBLE_LENGTH} bytes",
                kdf_params.len()
            )));
        }
        let mut raw = Vec::with_capacity(total);
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        raw.extend_from_slice(&(total as u32).to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        raw.extend_from_slice(&segment_size.to_le_bytes());
        raw.extend_from_slice(&key_id);
        raw.extend_from_slice(&kdf_id.to_le_bytes());
        raw.extend_from_slice(&(kdf_params.len() as u16).to_le_bytes());
        raw.extend_from_slice(kdf_params);
        Ok(Preamble {
            format_version: FORMAT_VERSION,
            flags: 0,
            segment_size,
            key_id,
            kdf_id,
            kdf_params: kdf_params.to_vec(),
            raw,
        })
    }

    /// How many bytes the preamble starting at `data` claims (needs the first 16 bytes).
    /// Checks magic and version first, as FORMAT.md §1 orders.
    pub fn declared_length(data: &[u8]) -> Result<usize> {
        if data.len() < 16 || &data[..8] != MAGIC {
            return Err(Error::format(
                "not a datafold backup (the file does not start with DFBACKUP)",
            ));
        }
        let version = u32_le(&data[8..12]);
        if version != FORMAT_VERSION {
            return Err(Error::VersionMismatch {
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        let length = u32_le(&data[12..16]) as usize;
        if !(PREAMBLE_FIXED_LENGTH..=MAX_PREAMBLE_LENGTH).contains(&length) {
            return Err(Error::format(format!(
                "corrupt backup preamble: length {length} is outside {PREAMBLE_FIXED_LENGTH}..={MAX_PREAMBLE_LENGTH}"
            )));
        }
        Ok(length)
    }

    /// Parses a preamble from the start of `data` (extra bytes are ignored).
    pub fn parse(data: &[u8]) -> Result<Self> {
        let length = Self::declared_length(data)?;
        if data.len() < length {
            return Err(Error::format(
                "truncated backup: the file ends inside its preamble",
            ));
        }
        let raw = &data[..length];
        let flags = u32_le(&raw[16..20]);
        if flags != 0 {
            return Err(Error::format(format!(
                "corrupt backup preamble: unknown flags {flags:#x} (written by a newer datafold?)"
            )));
        }
        let segment_size = u32_le(&raw[20..24]);
        if check_segment_size(segment_size as u64).is_err() {
            return Err(Error::format(format!(
                "corrupt backup preamble: segment size {segment_size} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}"
            )));
        }
        let kdf_id = u16::from_le_bytes([raw[40], raw[41]]);
        if !check_kdf_id(kdf_id) {
            return Err(Error::format(format!(
                "corrupt backup preamble: unknown KDF id {kdf_id}"
            )));
        }
        let kdf_len = u16::from_le_bytes([raw[42], raw[43]]) as usize;
        if PREAMBLE_FIXED_LENGTH + kdf_len != length {
            return Err(Error::format(
                "corrupt backup preamble: KDF parameter length disagrees with the preamble length",
            ));
        }
        Ok(Preamble {
            format_version: FORMAT_VERSION,
            flags,
            segment_size,
            key_id: raw[24..40].try_into().expect("16 bytes"),
            kdf_id,
            kdf_params: raw[PREAMBLE_FIXED_LENGTH..].to_vec(),
            raw: raw.to_vec(),
        })
    }
}

#[inline]
pub fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

#[inline]
pub fn u64_le(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn len_u32(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len).map_err(|_| {
        Error::invalid(format!(
            "{what} is too long ({len} bytes; the limit is 4 GiB - 1)"
        ))
    })
}

/// Appends a PUT record.
#[inline]
pub fn frame_put(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) -> Result<()> {
    buf.reserve(PUT_HEADER_LENGTH + key.len() + value.len());
    frame_put_header(buf, key, value.len())?;
    buf.extend_from_slice(value);
    Ok(())
}

/// Whether `key` starts with `prefix` (key_prefix_filter; an empty prefix takes every key).
/// Not `starts_with` alone: an empty prefix (an empty Vec) points nowhere, and glibc's AVX-512
/// memcmp reads 0 bytes from there with a masked load whose suppressed fault costs a microcode
/// assist, ~60 ns per record: ~15% of a restore of small records (perf).
#[inline]
pub fn has_prefix(key: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty() || key.starts_with(prefix)
}

/// Appends a PUT record up to (not including) its value bytes.
#[inline]
pub fn frame_put_header(buf: &mut Vec<u8>, key: &[u8], value_len: usize) -> Result<()> {
    let (k, v) = (len_u32(key.len(), "key")?, len_u32(value_len, "value")?);
    buf.push(REC_PUT);
    buf.extend_from_slice(&k.to_le_bytes());
    buf.extend_from_slice(&v.to_le_bytes());
    buf.extend_from_slice(key);
    Ok(())
}

/// The length of the PUT or DELETE record at the start of `rec` (whose type byte the caller has
/// checked), or None if `rec` does not hold all of it.
#[inline]
pub fn record_extent(rec: &[u8]) -> Option<usize> {
    let n = if rec.first() == Some(&REC_PUT) {
        PUT_HEADER_LENGTH + u32_le(rec.get(1..9)?) as usize + u32_le(rec.get(5..9)?) as usize
    } else {
        DELETE_HEADER_LENGTH + u32_le(rec.get(1..5)?) as usize
    };
    (rec.len() >= n).then_some(n)
}

/// Appends a DELETE record.
#[inline]
pub fn frame_delete(buf: &mut Vec<u8>, key: &[u8]) -> Result<()> {
    let k = len_u32(key.len(), "key")?;
    buf.push(REC_DELETE);
    buf.extend_from_slice(&k.to_le_bytes());
    buf.extend_from_slice(key);
    Ok(())
}

/// Appends a record made of a type byte, a u32 length and that many bytes (HEADER, TREE_BEGIN).
pub fn frame_blob(buf: &mut Vec<u8>, kind: u8, payload: &[u8], what: &str) -> Result<()> {
    let n = len_u32(payload.len(), what)?;
    buf.push(kind);
    buf.extend_from_slice(&n.to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

pub fn frame_tree_end(buf: &mut Vec<u8>, s: &TreeSummary) {
    buf.push(REC_TREE_END);
    buf.extend_from_slice(&s.item_count.to_le_bytes());
    buf.extend_from_slice(&s.byte_count.to_le_bytes());
    buf.extend_from_slice(&s.digest);
}

pub fn check_tree_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_TREE_NAME_LENGTH {
        return Err(Error::invalid(format!(
            "tree name must be 1 to {MAX_TREE_NAME_LENGTH} bytes of UTF-8, got {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// Per-tree figures as TREE_END and the TRAILER carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeSummary {
    pub name: String,
    pub item_count: u64,
    pub byte_count: u64,
    pub digest: [u8; DIGEST_LENGTH],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub total_items: u64,
    pub total_bytes: u64,
    pub trees: Vec<TreeSummary>,
    pub digest: [u8; DIGEST_LENGTH],
}

impl Trailer {
    /// The whole TRAILER record, type byte included.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&self.total_items.to_le_bytes());
        payload.extend_from_slice(&self.total_bytes.to_le_bytes());
        payload.extend_from_slice(&(self.trees.len() as u32).to_le_bytes());
        for t in &self.trees {
            payload.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
            payload.extend_from_slice(t.name.as_bytes());
            payload.extend_from_slice(&t.item_count.to_le_bytes());
            payload.extend_from_slice(&t.byte_count.to_le_bytes());
            payload.extend_from_slice(&t.digest);
        }
        payload.extend_from_slice(&self.digest);
        let len = (payload.len() + 4) as u32;
        payload.extend_from_slice(&len.to_le_bytes());
        let mut rec = Vec::with_capacity(payload.len() + 5);
        rec.push(REC_TRAILER);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&payload);
        rec
    }

    /// Parses a TRAILER payload (without type byte and leading length) and checks its sums.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        let bad = || Error::integrity("backup trailer is malformed");
        let mut r = Cursor {
            buf: payload,
            pos: 0,
        };
        let total_items = r.u64().ok_or_else(bad)?;
        let total_bytes = r.u64().ok_or_else(bad)?;
        let count = r.u32().ok_or_else(bad)? as usize;
        let mut trees = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            let name_len = r.u32().ok_or_else(bad)? as usize;
            let name = r.take(name_len).ok_or_else(bad)?;
            let name = std::str::from_utf8(name).map_err(|_| bad())?.to_owned();
            let item_count = r.u64().ok_or_else(bad)?;
            let byte_count = r.u64().ok_or_else(bad)?;
            let digest = r
                .take(DIGEST_LENGTH)
                .ok_or_else(bad)?
                .try_into()
                .expect("32");
            trees.push(TreeSummary {
                name,
                item_count,
                byte_count,
                digest,
            });
        }
        let digest = r
            .take(DIGEST_LENGTH)
            .ok_or_else(bad)?
            .try_into()
            .expect("32");
        let len = r.u32().ok_or_else(bad)? as usize;
        if len != payload.len() || r.pos != payload.len() {
            return Err(bad());
        }
        let items: Option<u64> = trees
            .iter()
            .try_fold(0u64, |a, t| a.checked_add(t.item_count));
        let bytes: Option<u64> = trees
            .iter()
            .try_fold(0u64, |a, t| a.checked_add(t.byte_count));
        if items != Some(total_items) || bytes != Some(total_bytes) {
            return Err(Error::integrity("backup trailer totals do not add up"));
        }
        Ok(Trailer {
            total_items,
            total_bytes,
            trees,
            digest,
        })
    }
}

/// A bounds-checked little-endian reader over a byte slice.
pub struct Cursor<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(u32_le)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(u64_le)
    }
}

/// PUT records framed as in the stream (`frame_put`), one after the other in one buffer: what
/// a batch of a store's snapshot hands over. A backup appends a run of them with one copy
/// (`BackupEncoder::put_batch`); everyone else reads the records through `get` / `records`.
#[derive(Default)]
pub struct PutBatch {
    framed: Vec<u8>,
    /// (end of the key, end of the record) in `framed`, per record.
    ends: Vec<(usize, usize)>,
    /// Bytes of keys and values (`framed` less the record headers).
    nbytes: usize,
}

impl PutBatch {
    /// Room for `records` records of `bytes` bytes of keys and values in all, and their headers
    /// (capped: the limits may be huge, and a few large values need few record ends).
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        let headers = records.min(bytes).saturating_mul(PUT_HEADER_LENGTH);
        PutBatch {
            framed: Vec::with_capacity(bytes.saturating_add(headers).min(16 << 20)),
            ends: Vec::with_capacity(records.min(4096)),
            nbytes: 0,
        }
    }

    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        frame_put(&mut self.framed, key, value)?;
        let end = self.framed.len();
        self.ends.push((end - value.len(), end));
        self.nbytes += key.len() + value.len();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of keys and values.
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// Bytes its buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.framed.capacity()
    }

    /// Empty, keeping its buffers.
    pub fn clear(&mut self) {
        self.framed.clear();
        self.ends.clear();
        self.nbytes = 0;
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1].1
        }
    }

    pub fn get(&self, i: usize) -> Option<(&[u8], &[u8])> {
        let &(key_end, end) = self.ends.get(i)?;
        let key_start = self.start(i) + PUT_HEADER_LENGTH;
        Some((&self.framed[key_start..key_end], &self.framed[key_end..end]))
    }

    pub fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    /// The framed records `first..end`: (bytes, bytes of keys and values).
    pub fn framed(&self, first: usize, end: usize) -> (&[u8], u64) {
        let (from, to) = (self.start(first), self.start(end));
        let headers = (end - first) * PUT_HEADER_LENGTH;
        (&self.framed[from..to], (to - from - headers) as u64)
    }

    /// The end of the longest run of records from `first` whose framed bytes fit in `room`
    /// (`first` itself if its record does not).
    pub fn fitting(&self, first: usize, room: usize) -> usize {
        let limit = self.start(first).saturating_add(room);
        first + self.ends[first..].partition_point(|&(_, end)| end <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_prefix_takes_every_key() {
        let none: Vec<u8> = Vec::new(); // the dangling pointer of an empty Vec
        assert!(has_prefix(b"key", &none) && has_prefix(b"", &none));
        assert!(has_prefix(b"key", b"ke") && has_prefix(b"key", b"key"));
        assert!(
            !has_prefix(b"key", b"kex") && !has_prefix(b"ke", b"key") && !has_prefix(b"", b"k")
        );
    }

    #[test]
    fn a_put_batch_holds_its_records_framed_as_the_stream_frames_them() {
        let records: Vec<(Vec<u8>, Vec<u8>)> = (0..50u8)
            .map(|i| (vec![i; 1 + i as usize % 7], vec![i ^ 0x5a; i as usize * 3]))
            .collect();
        let mut batch = PutBatch::with_capacity(50, 4096);
        let mut framed = Vec::new();
        for (k, v) in &records {
            batch.push(k, v).unwrap();
            frame_put(&mut framed, k, v).unwrap();
        }
        let got: Vec<_> = batch
            .records()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(got, records);
        let kv: usize = records.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(batch.nbytes(), kv);
        assert_eq!(batch.framed(0, 50), (&framed[..], kv as u64));
        // A run from record 10: bytes from its start, keys and values without the headers.
        let start: usize = records[..10]
            .iter()
            .map(|(k, v)| PUT_HEADER_LENGTH + k.len() + v.len())
            .sum();
        let (run, bytes) = batch.framed(10, 20);
        let run_kv: usize = records[10..20].iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(
            (run, bytes),
            (&framed[start..start + run.len()], run_kv as u64)
        );
        assert_eq!(run.len(), run_kv + 10 * PUT_HEADER_LENGTH);
        assert_eq!(batch.framed(7, 7), (&[][..], 0));
    }

    #[test]
    fn fitting_takes_the_whole_records_that_fit_in_the_room() {
        let mut batch = PutBatch::default();
        for len in [10usize, 20, 30] {
            batch.push(b"k", &vec![0; len]).unwrap(); // 10 + len framed bytes each
        }
        assert_eq!(batch.fitting(0, 0), 0);
        assert_eq!(batch.fitting(0, 19), 0);
        assert_eq!(batch.fitting(0, 20), 1);
        assert_eq!(batch.fitting(0, 49), 1);
        assert_eq!(batch.fitting(0, 50), 2);
        assert_eq!(batch.fitting(1, 70), 3);
        assert_eq!(batch.fitting(2, usize::MAX), 3);
        assert_eq!(batch.fitting(3, 100), 3);
    }

    #[test]
    fn preamble_roundtrip() {
        let p = Preamble::encode(4096, &[7u8; 16], 0, b"").unwrap();
        assert_eq!(p.raw.len(), 44);
        assert_eq!(&p.raw[..8], MAGIC);
        assert_eq!(Preamble::parse(&p.raw).unwrap(), p);
        let k = Preamble::encode(1 << 20, &[1u8; 16], KDF_ARGON2ID, b"params").unwrap();
        assert_eq!(k.raw.len(), 50);
        assert_eq!(Preamble::parse(&k.raw).unwrap().kdf_params, b"params");
    }

    #[test]
    fn preamble_rejections() {
        let p = Preamble::encode(4096, &[7u8; 16], 0, b"").unwrap().raw;
        let mut bad = p.clone();
        bad[0] ^= 1;
        assert!(matches!(Preamble::parse(&bad), Err(Error::Format(_))));
        let mut v2 = p.clone();
        v2[8] = 2;
        assert!(matches!(
            Preamble::parse(&v2),
            Err(Error::VersionMismatch {
                found: 2,
                expected: 1
            })
        ));
        let mut flags = p.clone();
        flags[16] = 1;
        assert!(matches!(Preamble::parse(&flags), Err(Error::Format(_))));
        let mut seg = p.clone();
        seg[20..24].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(Preamble::parse(&seg), Err(Error::Format(_))));
        assert!(matches!(Preamble::parse(&p[..30]), Err(Error::Format(_))));
        assert!(Preamble::encode(100, &[0; 16], 0, b"").is_err());
    }

    #[test]
    fn trailer_roundtrip_and_sums() {
        let t = Trailer {
            total_items: 3,
            total_bytes: 10,
            trees: vec![
                TreeSummary {
                    name: "a".into(),
                    item_count: 1,
                    byte_count: 4,
                    digest: [1; 32],
                },
                TreeSummary {
                    name: "bé".into(),
                    item_count: 2,
                    byte_count: 6,
                    digest: [2; 32],
                },
            ],
            digest: [9; 32],
        };
        let rec = t.encode();
        assert_eq!(rec[0], REC_TRAILER);
        let len = u32_le(&rec[1..5]) as usize;
        assert_eq!(len, rec.len() - 5);
        assert_eq!(u32_le(&rec[rec.len() - 4..]) as usize, len);
        assert_eq!(Trailer::decode(&rec[5..]).unwrap(), t);
        let mut wrong = t.clone();
        wrong.total_items = 4;
        assert!(Trailer::decode(&wrong.encode()[5..]).is_err());
    }
}
