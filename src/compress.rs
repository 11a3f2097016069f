//! Per-block compression (docs/FORMAT.md §3, §7): packing a run of framed PUT/DELETE records into a
//! BLOCK record and unpacking it again, with every length checked before it is trusted.

use crate::error::{Error, Result};
use crate::format::{
    record_extent, u32_le, BLOCK_HEADER_LENGTH, CODEC_RAW, CODEC_ZSTD, MAX_BLOCK_RAW_LENGTH,
    MAX_COMPRESSION_LEVEL, REC_BLOCK, REC_DELETE, REC_PUT,
};

/// The writer closes a block before a record that would take it past this many raw bytes; a
/// record longer than this goes out as a plain record. 1 MiB: on small text-like records it
/// compresses ~3% better than 256 KiB at the same speed (docs/FORMAT.md §7).
pub const BLOCK_TARGET: usize = 1 << 20;

/// A block is stored compressed only if that saves at least 1/32 (~3%) of its raw length.
pub const fn compressed_limit(raw_len: usize) -> usize {
    raw_len - raw_len / 32
}

/// Checks a `compression_level` argument: 0 (off) or a zstd level 1..=22.
pub fn check_level(level: i64) -> Result<i32> {
    if (0..=MAX_COMPRESSION_LEVEL as i64).contains(&level) {
        Ok(level as i32)
    } else {
        Err(Error::invalid(format!(
            "compression_level must be between 0 and {MAX_COMPRESSION_LEVEL}, got {level}"
        )))
    }
}

/// Compresses one raw block at `level` (1..=22) into `out` and returns the codec to store it with:
/// `CODEC_ZSTD` (the frame is in `out`) or `CODEC_RAW` (`out` is empty; store `raw` as it is)
/// when compression would not save enough.
pub fn compress_block(raw: &[u8], level: i32, out: &mut Vec<u8>) -> u8 {
    out.clear();
    let limit = compressed_limit(raw.len());
    // The capacity bounds zstd's output: a block that does not shrink enough fails fast here.
    out.reserve_exact(limit);
    let packed =
        zstd::bulk::Compressor::new(level).and_then(|mut c| c.compress_to_buffer(raw, out));
    match packed {
        Ok(n) if n <= limit && n > 0 => CODEC_ZSTD,
        _ => {
            out.clear();
            CODEC_RAW
        }
    }
}

/// Appends a whole BLOCK record: type, codec, raw_len, data_len, data.
pub fn frame_block(buf: &mut Vec<u8>, codec: u8, raw_len: usize, data: &[u8]) {
    debug_assert!(raw_len <= MAX_BLOCK_RAW_LENGTH && data.len() <= MAX_BLOCK_RAW_LENGTH);
    buf.reserve(BLOCK_HEADER_LENGTH + data.len());
    buf.push(REC_BLOCK);
    buf.push(codec);
    buf.extend_from_slice(&(raw_len as u32).to_le_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
}

/// The fields of a BLOCK record header (the first `BLOCK_HEADER_LENGTH` bytes of `rec`), checked
/// so that nothing is allocated from an unchecked length: (codec, raw_len, data_len).
pub fn parse_block_header(rec: &[u8]) -> Result<(u8, usize, usize)> {
    let codec = rec[1];
    let (raw_len, data_len) = (u32_le(&rec[2..6]) as usize, u32_le(&rec[6..10]) as usize);
    if codec != CODEC_RAW && codec != CODEC_ZSTD {
        return Err(Error::format(format!(
            "backup holds a block with an unknown codec {codec} (written by a newer datafold?)"
        )));
    }
    if raw_len == 0 || raw_len > MAX_BLOCK_RAW_LENGTH || data_len > MAX_BLOCK_RAW_LENGTH {
        return Err(Error::integrity(format!(
            "backup holds a block with invalid lengths (raw {raw_len}, stored {data_len}; the limit is {MAX_BLOCK_RAW_LENGTH})"
        )));
    }
    if codec == CODEC_RAW && data_len != raw_len {
        return Err(Error::integrity(
            "backup holds a stored block whose lengths disagree",
        ));
    }
    Ok((codec, raw_len, data_len))
}

fn corrupt_frame() -> Error {
    Error::integrity(
        "backup holds a compressed block that does not decompress to its stated length",
    )
}

/// Unpacks BLOCK data into `out` (replacing its content) and checks that it holds only complete
/// PUT and DELETE records. `codec` and `raw_len` come from `parse_block_header`.
#[derive(Default)]
pub struct BlockDecoder {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl BlockDecoder {
    pub fn decode(
        &mut self,
        codec: u8,
        raw_len: usize,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        if codec == CODEC_RAW {
            out.extend_from_slice(data);
        } else {
            // Exactly one frame, whose declared content size (if any) is raw_len.
            if zstd::zstd_safe::find_frame_compressed_size(data) != Ok(data.len()) {
                return Err(corrupt_frame());
            }
            match zstd::zstd_safe::get_frame_content_size(data) {
                Ok(Some(n)) if n == raw_len as u64 => {}
                Ok(None) => {}
                _ => return Err(corrupt_frame()),
            }
            let dctx = match self.dctx.as_mut() {
                Some(d) => d,
                None => self.dctx.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| Error::integrity(format!("zstd: {e}")))?,
                ),
            };
            out.reserve_exact(raw_len);
            match dctx.decompress_to_buffer(data, out) {
                Ok(n) if n == raw_len => {}
                _ => return Err(corrupt_frame()),
            }
        }
        check_block_records(out)
    }
}

/// A block holds a whole number of complete PUT / DELETE records and nothing else.
fn check_block_records(raw: &[u8]) -> Result<()> {
    let mut pos = 0;
    while pos < raw.len() {
        let kind = raw[pos];
        if kind != REC_PUT && kind != REC_DELETE {
            return Err(Error::integrity(format!(
                "backup holds a block with a record of type {kind:#04x}; blocks hold only PUT and DELETE records"
            )));
        }
        match record_extent(&raw[pos..]) {
            Some(n) => pos += n,
            None => {
                return Err(Error::integrity(
                    "backup holds a block that ends inside a record",
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{frame_delete, frame_put};

    fn records(n: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for i in 0..n {
            let key = format!("user:{i:012}");
            let value = format!("{{\"name\":\"n{i}\",\"city\":\"paris\",\"status\":\"shipped\"}}");
            frame_put(&mut raw, key.as_bytes(), value.as_bytes()).unwrap();
        }
        frame_delete(&mut raw, b"gone").unwrap();
        raw
    }

    fn roundtrip(raw: &[u8], level: i32) -> (u8, Vec<u8>) {
        let mut packed = Vec::new();
        let codec = compress_block(raw, level, &mut packed);
        let data = if codec == CODEC_RAW { raw } else { &packed[..] };
        let mut rec = Vec::new();
        frame_block(&mut rec, codec, raw.len(), data);
        let (c, raw_len, data_len) = parse_block_header(&rec).unwrap();
        assert_eq!((c, raw_len, data_len), (codec, raw.len(), data.len()));
        let mut out = Vec::new();
        BlockDecoder::default()
            .decode(c, raw_len, &rec[BLOCK_HEADER_LENGTH..], &mut out)
            .unwrap();
        assert_eq!(out, raw);
        (codec, rec)
    }

    #[test]
    fn text_compresses_and_roundtrips_at_every_level() {
        let raw = records(2000);
        for level in [1, 3, 9, 19, 22] {
            let (codec, rec) = roundtrip(&raw, level);
            assert_eq!(codec, CODEC_ZSTD);
            assert!(rec.len() * 2 < raw.len(), "level {level}: {}", rec.len());
        }
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut value = vec![0u8; 50_000];
        getrandom::getrandom(&mut value).unwrap();
        let mut raw = Vec::new();
        frame_put(&mut raw, b"k", &value).unwrap();
        let (codec, rec) = roundtrip(&raw, 3);
        assert_eq!(codec, CODEC_RAW);
        assert_eq!(rec.len(), raw.len() + BLOCK_HEADER_LENGTH);
    }

    #[test]
    fn header_checks() {
        let header = |codec: u8, raw: u32, data: u32| {
            let mut h = vec![REC_BLOCK, codec];
            h.extend_from_slice(&raw.to_le_bytes());
            h.extend_from_slice(&data.to_le_bytes());
            parse_block_header(&h)
        };
        assert!(matches!(header(2, 10, 10), Err(Error::Format(_))));
        assert!(matches!(header(0, 10, 9), Err(Error::Integrity(_))));
        assert!(matches!(header(1, 0, 9), Err(Error::Integrity(_))));
        let too_big = MAX_BLOCK_RAW_LENGTH as u32 + 1;
        assert!(matches!(header(1, too_big, 9), Err(Error::Integrity(_))));
        assert!(matches!(header(1, 10, too_big), Err(Error::Integrity(_))));
        assert_eq!(header(1, 100, 9).unwrap(), (1, 100, 9));
    }

    #[test]
    fn decode_rejects_lies_and_damage() {
        let raw = records(500);
        let mut packed = Vec::new();
        assert_eq!(compress_block(&raw, 3, &mut packed), CODEC_ZSTD);
        let mut dec = BlockDecoder::default();
        let mut out = Vec::new();
        let integrity = |r: Result<()>| assert!(matches!(r, Err(Error::Integrity(_))), "{r:?}");
        // raw_len that disagrees with the frame, either way
        integrity(dec.decode(CODEC_ZSTD, raw.len() + 1, &packed, &mut out));
        integrity(dec.decode(CODEC_ZSTD, raw.len() - 1, &packed, &mut out));
        // truncated frame, trailing bytes, a second frame
        integrity(dec.decode(CODEC_ZSTD, raw.len(), &packed[..packed.len() - 3], &mut out));
        let mut extra = packed.clone();
        extra.push(0);
        integrity(dec.decode(CODEC_ZSTD, raw.len(), &extra, &mut out));
        let mut two = packed.clone();
        two.extend_from_slice(&packed);
        integrity(dec.decode(CODEC_ZSTD, 2 * raw.len(), &two, &mut out));
        // garbage
        integrity(dec.decode(CODEC_ZSTD, 100, &[0x55; 40], &mut out));
        // a partial record, a record that is not PUT / DELETE
        integrity(dec.decode(CODEC_RAW, raw.len() - 1, &raw[..raw.len() - 1], &mut out));
        let mut tb = raw.clone();
        tb.extend_from_slice(&[0x02, 1, 0, 0, 0, b'x']);
        integrity(dec.decode(CODEC_RAW, tb.len(), &tb, &mut out));
        // and the decoder still works afterwards
        dec.decode(CODEC_ZSTD, raw.len(), &packed, &mut out)
            .unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn levels_are_range_checked() {
        assert_eq!(check_level(0).unwrap(), 0);
        assert_eq!(check_level(22).unwrap(), 22);
        assert!(check_level(23).is_err());
        assert!(check_level(-1).is_err());
    }
}
