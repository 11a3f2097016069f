//! Whole-backup tests of the encoder and decoder together (no Python).

use crate::error::Error;
use crate::format::{Preamble, Trailer};
use crate::reader::{parse_tail_trailer, BackupDecoder, Layout, Tree};
use crate::writer::{BackupEncoder, EncoderOptions};

const KEY: [u8; 32] = [0x42; 32];

fn encode(trees: &[Tree], segment_size: u32) -> (Vec<u8>, Trailer) {
    let opts = EncoderOptions {
        segment_size,
        kdf_id: 0,
        kdf_params: b"",
        salt: None,
        nonce_prefix: None,
        threads: 2,
    };
    let mut enc = BackupEncoder::new(&KEY, b"{\"m\":1}", &opts).unwrap();
    let mut file = enc.output().to_vec();
    enc.clear_output();
    for (name, items) in trees {
        enc.begin_tree(name).unwrap();
        for (k, v) in items {
            match v {
                Some(v) => enc.put(k, v).unwrap(),
                None => enc.delete(k).unwrap(),
            }
            enc.seal_ready().unwrap();
            file.extend_from_slice(enc.output());
            enc.clear_output();
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
}

#[test]
fn streamed_value_equals_buffered_put() {
    let opts = EncoderOptions {
        segment_size: 4096,
        kdf_id: 0,
        kdf_params: b"",
        salt: Some(&[1; 32]),
        nonce_prefix: Some(&[2; 7]),
        threads: 2,
    };
    let value: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
    let mut files = Vec::new();
    for streamed in [false, true] {
        let mut enc = BackupEncoder::new(&KEY, b"{}", &opts).unwrap();
        let mut file = enc.output().to_vec();
        enc.clear_output();
        enc.begin_tree("t").unwrap();
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
