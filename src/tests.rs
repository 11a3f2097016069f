//! Whole-backup tests of the encoder and decoder together (no Python).

use crate::error::Error;
use crate::format::{Preamble, Trailer, PUT_HEADER_LENGTH};
use crate::reader::{parse_tail_trailer, BackupDecoder, Layout, Tree};
use crate::writer::{BackupEncoder, EncoderOptions};

const KEY: [u8; 32] = [0x42; 32];

fn encode(trees: &[Tree], segment_size: u32) -> (Vec<u8>, Trailer) {
    encode_at(trees, segment_size, 0)
}

fn encode_at(trees: &[Tree], segment_size: u32, compression_level: i32) -> (Vec<u8>, Trailer) {
    let opts = EncoderOptions {
        segment_size,
        kdf_id: 0,
        kdf_params: b"",
        salt: None,
        nonce_prefix: None,
        threads: 2,
        compression_level,
    };
    encode_with(trees, b"{\"m\":1}", &opts, 0)
}

/// A backup of `trees`, sealed whenever `seal_at` or more plaintext bytes are pending (0: after
/// every record).
fn encode_with(
    trees: &[Tree],
    header: &[u8],
    opts: &EncoderOptions<'_>,
    seal_at: usize,
) -> (Vec<u8>, Trailer) {
    let mut enc = BackupEncoder::new(&KEY, header, opts).unwrap();
    let mut file = enc.output().to_vec();
    enc.clear_output();
    for (name, items) in trees {
        enc.begin_tree(name).unwrap();
        for (k, v) in items {
            match v {
                Some(v) => enc.put(k, v).unwrap(),
                None => enc.delete(k).unwrap(),
            }
            if enc.pending() >= seal_at {
                enc.seal_ready().unwrap();
                file.extend_from_slice(enc.output());
                enc.clear_output();
            }
        }
        enc.end_tree().unwrap();
    }
    let trailer = enc.finish().unwrap();
    file.extend_from_slice(enc.output());
    enc.clear_output();
    (file, trailer)
}

fn decode(file: &[u8], key: &[u8]) -> Result<(Vec<u8>, Vec<Tree>, Trailer), Error> {
    crate::reader::read_all(file, key)
}

fn sample() -> Vec<Tree> {
    vec![
        (
            "alpha".into(),
            (0..300u32)
                .map(|i| {
                    (
                        i.to_be_bytes().to_vec(),
                        Some(vec![i as u8; (i % 97) as usize]),
                    )
                })
                .collect(),
        ),
        ("empty".into(), vec![]),
        (
            "mixed".into(),
            vec![
                (b"".to_vec(), Some(b"".to_vec())),
                (b"gone".to_vec(), None),
                (vec![0xff; 5000], Some(vec![7; 9000])),
            ],
        ),
    ]
}

#[test]
fn roundtrip_many_segment_sizes() {
    for css in [4096, 5000, 65536, 1 << 20] {
        let trees = sample();
        let (file, trailer) = encode(&trees, css);
        let (meta, got, t2) = decode(&file, &KEY).unwrap();
        assert_eq!(meta, b"{\"m\":1}");
        assert_eq!(got, trees);
        assert_eq!(t2, trailer);
        assert_eq!(trailer.total_items, 303);
    }
}

#[test]
fn tail_trailer_matches_full_read() {
    let (file, trailer) = encode(&sample(), 4096);
    let preamble = Preamble::parse(&file).unwrap();
    let stream = &file[preamble.raw.len()..];
    let dec = BackupDecoder::new(&preamble, &KEY, &stream[..40]).unwrap();
    let layout = Layout::new(dec.params(), stream.len() as u64).unwrap();
    let (off, len) = layout.segment(layout.segments - 1);
    let mut seg = stream[off as usize..off as usize + len].to_vec();
    let n = dec
        .open_detached(layout.segments - 1, true, &mut seg)
        .unwrap();
    assert_eq!(parse_tail_trailer(&seg[..n]).unwrap(), trailer);
}

#[test]
fn wrong_key_truncation_and_flips_fail() {
    let trees = vec![(
        "t".to_string(),
        (0..40u8).map(|i| (vec![i], Some(vec![i; 200]))).collect(),
    )];
    let (file, _) = encode(&trees, 4096);
    assert!(file.len() > 8192, "several segments: {}", file.len());
    assert!(matches!(
        decode(&file, &[0x43; 32]),
        Err(Error::EncryptionKey(_))
    ));
    for cut in (0..file.len()).step_by(7) {
        assert!(decode(&file[..cut], &KEY).is_err(), "cut at {cut}");
    }
    for i in (0..file.len()).step_by(5) {
        let mut bad = file.clone();
        bad[i] ^= 0x04;
        assert!(decode(&bad, &KEY).is_err(), "flip at {i}");
    }
    let mut longer = file.clone();
    longer.push(1);
    assert!(matches!(decode(&longer, &KEY), Err(Error::Integrity(_))));
}

#[test]
fn writer_state_machine() {
    let opts = EncoderOptions {
        segment_size: 4096,
        kdf_id: 0,
        kdf_params: b"",
        salt: None,
        nonce_prefix: None,
        threads: 2,
        compression_level: 0,
    };
    let mut enc = BackupEncoder::new(&KEY, b"{}", &opts).unwrap();
    assert!(matches!(
        enc.put(b"k", b"v"),
        Err(Error::InvalidArgument(_))
    ));
    // The failed call poisoned it.
    assert!(matches!(enc.begin_tree("a"), Err(Error::Poisoned(_))));
    let mut enc = BackupEncoder::new(&KEY, b"{}", &opts).unwrap();
    enc.begin_tree("a").unwrap();
    enc.end_tree().unwrap();
    assert!(matches!(
        enc.begin_tree("a"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(BackupEncoder::new(
        &KEY,
        b"{}",
        &EncoderOptions {
            segment_size: 100,
            ..opts
        }
    )
    .is_err());
    assert!(BackupEncoder::new(
        &KEY,
        b"{}",
        &EncoderOptions {
            compression_level: 23,
            ..opts
        }
    )
    .is_err());
}

/// Options with a fixed salt and nonce prefix: the same input gives the same file.
fn deterministic(segment_size: u32) -> EncoderOptions<'static> {
    EncoderOptions {
        segment_size,
        kdf_id: 0,
        kdf_params: b"",
        salt: Some(&[1; 32]),
        nonce_prefix: Some(&[2; 7]),
        threads: 2,
        compression_level: 0,
    }
}

/// An encoder with tree "t" begun, and the file so far (its preamble and stream header).
fn begun(opts: &EncoderOptions<'_>) -> (BackupEncoder, Vec<u8>) {
    let mut enc = BackupEncoder::new(&KEY, b"{}", opts).unwrap();
    let file = enc.output().to_vec();
    enc.clear_output();
    enc.begin_tree("t").unwrap();
    (enc, file)
}

#[test]
fn streamed_value_equals_buffered_put() {
    let opts = deterministic(4096);
    let value: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
    let mut files = Vec::new();
    for streamed in [false, true] {
        let (mut enc, mut file) = begun(&opts);
        if streamed {
            enc.begin_put(b"k", value.len()).unwrap();
            assert!(matches!(enc.end_tree(), Err(Error::InvalidArgument(_))));
            let mut enc2 = BackupEncoder::new(&KEY, b"{}", &opts).unwrap();
            enc2.begin_tree("t").unwrap();
            enc2.begin_put(b"k", value.len()).unwrap();
            for piece in value.chunks(3000) {
                enc2.extend_value(piece).unwrap();
                enc2.seal_ready().unwrap();
            }
            enc = enc2;
            file.clear();
        } else {
            enc.put(b"k", &value).unwrap();
        }
        enc.end_tree().unwrap();
        enc.finish().unwrap();
        file.extend_from_slice(enc.output());
        files.push(file);
    }
    // Both hold the whole file (the streamed encoder's output was never cleared).
    assert_eq!(files[0], files[1]);
}

/// Runs of framed records give the file of puts record by record (segments are cut at fixed
/// plaintext offsets, so this checks the framing and the tallies), and a run never leaves more
/// pending than record by record would: at most the seal threshold plus one record.
#[test]
fn put_batch_runs_give_the_file_of_puts_record_by_record() {
    let opts = deterministic(4096);
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..3000u32)
        .map(|i| {
            (
                i.to_be_bytes().to_vec(),
                vec![i as u8; (i as usize * 37) % 700],
            )
        })
        .collect();
    let mut batch = crate::format::PutBatch::default();
    for (k, v) in &records {
        batch.push(k, v).unwrap();
    }
    let seal_at: usize = 20_000;
    let mut files = Vec::new();
    for runs in [false, true] {
        let (mut enc, mut file) = begun(&opts);
        let mut next = 0;
        while next < batch.len() {
            if runs {
                let room = seal_at.saturating_sub(enc.pending());
                let end = batch.fitting(next, room).max(next + 1);
                enc.put_batch(&batch, next, end).unwrap();
                next = end;
                assert!(enc.pending() < seal_at + PUT_HEADER_LENGTH + 4 + 700);
            } else {
                let (k, v) = batch.get(next).unwrap();
                enc.put(k, v).unwrap();
                next += 1;
            }
            if enc.pending() >= seal_at {
                enc.seal_ready().unwrap();
                file.extend_from_slice(enc.output());
                enc.clear_output();
            }
        }
        let summary = enc.end_tree().unwrap();
        assert_eq!(summary.item_count, 3000);
        enc.finish().unwrap();
        file.extend_from_slice(enc.output());
        files.push(file);
    }
    assert_eq!(files[0], files[1]);
    let (_, trees, _) = decode(&files[1], &KEY).unwrap();
    let want: Vec<_> = records.into_iter().map(|(k, v)| (k, Some(v))).collect();
    assert_eq!(trees, vec![("t".to_string(), want)]);

    // A range outside the batch is an error (and poisons the encoder), not a panic.
    let (mut enc, _) = begun(&opts);
    assert!(matches!(
        enc.put_batch(&batch, 5, 3001),
        Err(Error::InvalidArgument(_))
    ));
    let (mut enc, _) = begun(&opts);
    assert!(matches!(
        enc.put_batch(&batch, 6, 5),
        Err(Error::InvalidArgument(_))
    ));

    // With compression the records go into blocks one by one: a run is refused.
    let opts = EncoderOptions {
        compression_level: 3,
        ..opts
    };
    let mut enc = BackupEncoder::new(&KEY, b"{}", &opts).unwrap();
    enc.begin_tree("t").unwrap();
    assert!(matches!(
        enc.put_batch(&batch, 0, 1),
        Err(Error::InvalidArgument(_))
    ));
}

/// Text-like records (as the "small" dataset): ~17-byte keys, ~100-byte values.
fn text_tree(name: &str, n: u32) -> Tree {
    let words = [
        "alpha", "bravo", "paris", "shipped", "pending", "tokyo", "order", "paid",
    ];
    let items = (0..n)
        .map(|i| {
            let w = |j: u32| words[((i * 7 + j * 13) % 8) as usize];
            let key = format!("user:{i:012}").into_bytes();
            let value = format!(
                "{{\"name\":\"{} {}\",\"city\":\"{}\",\"n\":{},\"note\":\"{} {}\"}}",
                w(1),
                w(2),
                w(3),
                i * 31 % 9973,
                w(4),
                w(5)
            );
            (key, Some(value.into_bytes()))
        })
        .collect();
    (name.into(), items)
}

fn compressible_sample() -> Vec<Tree> {
    let mut trees = sample();
    let (_, mut big) = text_tree("text", 40_000); // several blocks
                                                  // a record longer than a block goes out plain, between blocks; then a DELETE in a block
    big.insert(
        20_000,
        (b"huge".to_vec(), Some(vec![b'x'; (1 << 20) + 100])),
    );
    big.insert(20_001, (b"zz-gone".to_vec(), None));
    trees.push(("text".into(), big));
    trees
}

#[test]
fn compressed_roundtrip_same_digests_smaller_file() {
    let trees = compressible_sample();
    let (plain_file, plain_trailer) = encode_at(&trees, 1 << 20, 0);
    for (level, css) in [(1, 4096), (3, 65536), (3, 1 << 20), (19, 1 << 20)] {
        let (file, trailer) = encode_at(&trees, css, level);
        // Digests and counts are over the records, whatever carries them.
        assert_eq!(trailer, plain_trailer, "level {level}");
        let (meta, got, t2) = decode(&file, &KEY).unwrap();
        assert_eq!(meta, b"{\"m\":1}");
        assert_eq!(got, trees, "level {level} css {css}");
        assert_eq!(t2, trailer);
        assert!(
            file.len() * 2 < plain_file.len(),
            "level {level}: {} vs {}",
            file.len(),
            plain_file.len()
        );
    }
}

#[test]
fn incompressible_blocks_are_stored_raw() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state.to_le_bytes()
    };
    let items = (0..20_000u32)
        .map(|i| {
            let v: Vec<u8> = (0..13).flat_map(|_| noise()).collect();
            (i.to_be_bytes().to_vec(), Some(v))
        })
        .collect();
    let trees = vec![("noise".to_string(), items)];
    let (plain, _) = encode_at(&trees, 1 << 20, 0);
    let (packed, _) = encode_at(&trees, 1 << 20, 3);
    assert!(
        packed.len() <= plain.len() + plain.len() / 1000,
        "{} vs {}",
        packed.len(),
        plain.len()
    );
    assert_eq!(decode(&packed, &KEY).unwrap().1, trees);
}

/// A backup whose plaintext is given by hand: HEADER, one tree "t" made of `body` (records and
/// BLOCKs), its TREE_END over `records` (the records as they decode), and the TRAILER.
fn handmade(body: &[u8], records: &[u8], items: u64, bytes: u64) -> Vec<u8> {
    use crate::digest::Digests;
    use crate::format::{frame_blob, frame_tree_end, TreeSummary, REC_HEADER, REC_TREE_BEGIN};
    use crate::keys::{derive_digest_key, derive_key_id};
    let mut digests = Digests::new(derive_digest_key(&KEY).as_bytes());
    let mut plain = Vec::new();
    frame_blob(&mut plain, REC_HEADER, b"{}", "h").unwrap();
    frame_blob(&mut plain, REC_TREE_BEGIN, b"t", "n").unwrap();
    digests.absorb(&plain);
    digests.open_tree();
    digests.absorb(records);
    plain.extend_from_slice(body);
    let summary = TreeSummary {
        name: "t".into(),
        item_count: items,
        byte_count: bytes,
        digest: digests.close_tree(),
    };
    let start = plain.len();
    frame_tree_end(&mut plain, &summary);
    digests.absorb(&plain[start..]);
    plain.extend_from_slice(
        &Trailer {
            total_items: items,
            total_bytes: bytes,
            trees: vec![summary],
            digest: digests.stream_digest(),
        }
        .encode(),
    );
    let preamble = Preamble::encode(4096, &derive_key_id(&KEY), 0, b"").unwrap();
    let params = crate::stream::StreamParams::backup(4096);
    let mut file = preamble.raw.clone();
    file.extend(crate::stream::encrypt(params, &KEY, &plain, &preamble.raw, None, None).unwrap());
    file
}

#[test]
fn handmade_blocks_decode_and_lies_fail() {
    use crate::compress::{compress_block, frame_block};
    use crate::format::{frame_delete, frame_put, CODEC_ZSTD};
    let mut records = Vec::new();
    for i in 0..200u32 {
        frame_put(&mut records, &i.to_be_bytes(), b"some text, some text").unwrap();
    }
    frame_delete(&mut records, b"old").unwrap();
    let value_len = b"some text, some text".len() as u64;
    let (items, bytes) = (201, 200 * (4 + value_len) + 3);
    let mut packed = Vec::new();
    assert_eq!(compress_block(&records, 3, &mut packed), CODEC_ZSTD);
    // A plain record, a zstd block, a raw block: all decode to the same records.
    let (first, rest) = records.split_at(2 * (9 + 4 + value_len as usize)); // two PUTs
    let mut body = first.to_vec();
    let (mid, tail) = rest.split_at(rest.len() - 8);
    let mut zpart = Vec::new();
    assert_eq!(compress_block(mid, 3, &mut zpart), CODEC_ZSTD);
    frame_block(&mut body, CODEC_ZSTD, mid.len(), &zpart);
    frame_block(&mut body, 0, tail.len(), tail);
    let (_, trees, _) = decode(&handmade(&body, &records, items, bytes), &KEY).unwrap();
    assert_eq!(trees[0].1.len(), 201);
    assert_eq!(trees[0].1[200], (b"old".to_vec(), None));

    let bad = |body: Vec<u8>| decode(&handmade(&body, &records, items, bytes), &KEY).unwrap_err();
    let mut block = Vec::new();
    frame_block(&mut block, CODEC_ZSTD, records.len(), &packed);
    let mut codec = block.clone();
    codec[1] = 9;
    assert!(matches!(bad(codec), Error::Format(_)));
    let mut lie = block.clone();
    lie[2..6].copy_from_slice(&(records.len() as u32 - 1).to_le_bytes());
    assert!(matches!(bad(lie), Error::Integrity(_)));
    let mut short = Vec::new();
    frame_block(
        &mut short,
        CODEC_ZSTD,
        records.len(),
        &packed[..packed.len() - 5],
    );
    assert!(matches!(bad(short), Error::Integrity(_)));
    // a TREE_BEGIN inside a block
    let mut inner = records.clone();
    inner.extend_from_slice(&[0x02, 1, 0, 0, 0, b'u']);
    let mut nested = Vec::new();
    frame_block(&mut nested, 0, inner.len(), &inner);
    assert!(matches!(bad(nested), Error::Integrity(_)));
    // a record cut by the end of the block
    let mut cut = Vec::new();
    frame_block(
        &mut cut,
        0,
        records.len() - 2,
        &records[..records.len() - 2],
    );
    cut.extend_from_slice(&records[records.len() - 2..]);
    assert!(matches!(bad(cut), Error::Integrity(_)));
}

/// The digest runs beside the sealing / opening threads (`parallel::run_beside`) on batches over
/// 1 MiB: the file is byte for byte the one a single thread makes, its digests are those of the
/// records, and it reads back the same on one thread or several, with or without compression.
#[test]
fn digest_beside_sealing_and_opening_matches_the_sequential_one() {
    use crate::digest::ItemDigester;
    use crate::keys::derive_digest_key;
    let mut next = crate::test_support::xorshift(0x2545_f491_4f6c_dd1d);
    // Small records (into blocks when compressing), values larger than a block, and deletes.
    let mut trees: Vec<Tree> = Vec::new();
    for t in 0..3u32 {
        let items = (0..600u32)
            .map(|i| {
                let len = match next() % 10 {
                    0 => 300_000 + (next() % 200_000) as usize,
                    1 => return (i.to_be_bytes().to_vec(), None),
                    _ => (next() % 3000) as usize,
                };
                let v: Vec<u8> = (0..len.div_ceil(8))
                    .flat_map(|_| next().to_le_bytes())
                    .take(len)
                    .collect();
                (i.to_be_bytes().to_vec(), Some(v))
            })
            .collect();
        trees.push((format!("t{t}"), items));
    }
    let encode_on = |threads: usize, level: i32| {
        let opts = EncoderOptions {
            segment_size: 1 << 20,
            kdf_id: 0,
            kdf_params: b"",
            salt: Some(&[7; 32]),
            nonce_prefix: Some(&[9; 7]),
            threads,
            compression_level: level,
        };
        encode_with(&trees, b"{}", &opts, 3 << 20)
    };
    for level in [0, 3] {
        let (one, trailer) = encode_on(1, level);
        for threads in [2, 3] {
            assert!(encode_on(threads, level).0 == one, "level {level}");
        }
        for (summary, (_, items)) in trailer.trees.iter().zip(&trees) {
            let mut d = ItemDigester::new(derive_digest_key(&KEY).as_bytes());
            for (k, v) in items {
                d.add(k, v.as_deref()).unwrap();
            }
            assert_eq!(d.finish().1, summary.digest);
        }
        for (batch, threads) in [(1, 1), (4, 1), (4, 2), (5, 3)] {
            let (_, read, t) = crate::reader::read_all_batched(&one, &KEY, batch, threads).unwrap();
            assert!(
                read == trees,
                "level {level} batch {batch} threads {threads}"
            );
            assert_eq!(t.digest, trailer.digest);
        }
    }
}

/// Records longer than the room the reader leaves in front of a batch (1 MiB + 4 KiB) span many
/// batches: their start stays put and each opened batch is appended to it. Mixed with small
/// records on both sides, at segment sizes that put the boundaries anywhere.
#[test]
fn records_longer_than_a_batch_and_its_headroom_read_back() {
    let mut next = crate::test_support::xorshift(0x9e37_79b9_7f4a_7c15);
    let mut items = Vec::new();
    for (i, len) in [
        10,
        3 << 20,
        7,
        (1 << 20) + 4095,
        (1 << 20) + 4097,
        5,
        5 << 20,
        0,
    ]
    .into_iter()
    .enumerate()
    {
        let v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        items.push(((i as u32).to_be_bytes().to_vec(), Some(v)));
    }
    let trees: Vec<Tree> = vec![("t".into(), items)];
    for segment_size in [4096u32, 5000, 1 << 20] {
        let (file, trailer) = encode(&trees, segment_size);
        for (batch, threads) in [(1, 1), (4, 2), (3, 3)] {
            let (_, read, t) =
                crate::reader::read_all_batched(&file, &KEY, batch, threads).unwrap();
            assert!(read == trees, "segment {segment_size} batch {batch}");
            assert_eq!(t.digest, trailer.digest);
        }
    }
}
