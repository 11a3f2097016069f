//! The backup encoder: frames records, digests them and seals Tink segments. It does no I/O:
//! ciphertext accumulates in an output buffer that the caller drains (`output`, `clear_output`), so the
//! binding can write it with the GIL held and seal with the GIL released.

use std::collections::HashSet;

use crate::aead::TAG_LENGTH;
use crate::compress::{compress_block, frame_block, BLOCK_TARGET};
use crate::digest::{Digests, Tally};
use crate::error::{Error, Result};
use crate::format::{
    check_tree_name, frame_blob, frame_delete, frame_put, frame_put_header, frame_tree_end,
    Preamble, Trailer, TreeSummary, REC_HEADER, REC_TREE_BEGIN,
};
use crate::keys::{derive_digest_key, derive_key_id, SecretKey};
use crate::parallel;
use crate::stream::{new_cipher, SegmentCipher, StreamParams};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    InTree,
    Finished,
    Poisoned,
}

pub struct EncoderOptions<'a> {
    pub segment_size: u32,
    pub kdf_id: u16,
    pub kdf_params: &'a [u8],
    pub salt: Option<&'a [u8]>,
    pub nonce_prefix: Option<&'a [u8]>,
    /// Threads that seal segments and compress blocks; 0 means all cores.
    pub threads: usize,
    /// 0: no compression; 1..=22: PUT / DELETE records go into zstd BLOCKs at this level.
    pub compression_level: i32,
}

pub struct BackupEncoder {
    preamble: Preamble,
    cipher: SegmentCipher,
    /// Plaintext not yet sealed; `plain[..hashed]` is already in the digests.
    plain: Vec<u8>,
    hashed: usize,
    next_segment: u64,
    /// The output is `out[..out_len]`; the buffer keeps its length from batch to batch, so it is
    /// not zeroed again for every one.
    out: Vec<u8>,
    out_len: usize,
    bytes_written: u64,
    digests: Digests,
    state: State,
    tree: Option<(String, Tally)>,
    trees: Vec<TreeSummary>,
    names: HashSet<String>,
    /// Value bytes still owed by a PUT started with `begin_put`.
    value_remaining: u64,
    threads: usize,
    blocks: Blocks,
}

/// The compression side of the encoder: the open block, the closed blocks waiting to be
/// compressed (in parallel, by `seal_ready` / `end_tree`), and buffers kept for reuse.
#[derive(Default)]
struct Blocks {
    level: i32,
    open: Vec<u8>,
    full: Vec<Vec<u8>>,
    /// Raw bytes in `full`.
    queued: usize,
    packed: Vec<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

impl Blocks {
    /// Whether a record of `len` framed bytes goes into a block (else it goes out as a plain
    /// record: compression is off, or the record is longer than a block).
    fn is_blocked(&self, len: usize) -> bool {
        self.level > 0 && len <= BLOCK_TARGET
    }

    /// Moves the open block (if any) to the queue; the caller has digested everything before it.
    fn close(&mut self, digests: &mut Digests) {
        if self.open.is_empty() {
            return;
        }
        digests.absorb(&self.open);
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BLOCK_TARGET));
        self.queued += self.open.len();
        self.full.push(std::mem::replace(&mut self.open, fresh));
    }

    /// Compresses the queued blocks on `threads` threads and appends their BLOCK records to `plain`.
    fn flush(&mut self, plain: &mut Vec<u8>, threads: usize) -> Result<()> {
        if self.full.is_empty() {
            return Ok(());
        }
        self.packed.resize_with(self.full.len(), Vec::new);
        let mut codecs = vec![0u8; self.full.len()];
        let jobs: Vec<_> = self
            .full
            .iter()
            .zip(self.packed.iter_mut())
            .zip(codecs.iter_mut())
            .collect();
        let level = self.level;
        parallel::run(jobs, self.queued, threads, |((raw, out), codec)| {
            *codec = compress_block(raw, level, out);
            Ok(())
        })?;
        for ((raw, out), codec) in self.full.iter().zip(&self.packed).zip(codecs) {
            let data = if codec == crate::format::CODEC_RAW {
                raw
            } else {
                out
            };
            frame_block(plain, codec, raw.len(), data);
        }
        for mut raw in self.full.drain(..) {
            raw.clear();
            self.spare.push(raw);
        }
        self.queued = 0;
        Ok(())
    }
}

impl BackupEncoder {
    /// Starts a backup: the preamble and the stream header go to the output, the HEADER record
    /// (metadata JSON) is the first plaintext.
    pub fn new(backup_key: &[u8], header: &[u8], opts: &EncoderOptions<'_>) -> Result<Self> {
        let key = SecretKey::from_slice(backup_key, "backup key")?;
        crate::format::check_segment_size(opts.segment_size as u64)?;
        let preamble = Preamble::encode(
            opts.segment_size,
            &derive_key_id(key.as_bytes()),
            opts.kdf_id,
            opts.kdf_params,
        )?;
        let params = StreamParams::backup(opts.segment_size);
        let cipher = new_cipher(
            params,
            key.as_bytes(),
            &preamble.raw,
            opts.salt,
            opts.nonce_prefix,
        )?;
        let mut out = Vec::with_capacity(2 * opts.segment_size as usize);
        out.extend_from_slice(&preamble.raw);
        out.extend_from_slice(cipher.header());
        let mut plain = Vec::with_capacity(2 * opts.segment_size as usize);
        frame_blob(&mut plain, REC_HEADER, header, "header")?;
        Ok(BackupEncoder {
            digests: Digests::new(derive_digest_key(key.as_bytes()).as_bytes()),
            preamble,
            cipher,
            plain,
            hashed: 0,
            next_segment: 0,
            out_len: out.len(),
            out,
            bytes_written: 0,
            state: State::Open,
            tree: None,
            trees: Vec::new(),
            names: HashSet::new(),
            value_remaining: 0,
            threads: if opts.threads == 0 {
                parallel::default_threads()
            } else {
                opts.threads
            },
            blocks: Blocks {
                level: crate::compress::check_level(opts.compression_level as i64)?,
                ..Blocks::default()
            },
        })
    }

    pub fn preamble(&self) -> &Preamble {
        &self.preamble
    }

    /// Bytes of output cleared (written) so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn poison(&mut self) {
        self.state = State::Poisoned;
    }

    fn expect(&mut self, want: State, action: &str) -> Result<()> {
        if self.value_remaining != 0 && self.state != State::Poisoned {
            return Err(Error::invalid(format!(
                "cannot {action}: {} bytes of the current value are still missing",
                self.value_remaining
            )));
        }
        match self.state {
            s if s == want => Ok(()),
            State::Poisoned => Err(Error::Poisoned("backup writer")),
            State::Finished => Err(Error::invalid(format!(
                "cannot {action}: the backup is already finished"
            ))),
            State::InTree => Err(Error::invalid(format!(
                "cannot {action}: a tree is open; call end_tree() first"
            ))),
            State::Open => Err(Error::invalid(format!(
                "cannot {action}: no tree is open; call begin_tree() first"
            ))),
        }
    }

    /// Runs `f`, poisoning the encoder if it fails.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.state = State::Poisoned;
        }
        r
    }

    fn absorb_pending(&mut self) {
        self.digests.absorb(&self.plain[self.hashed..]);
        self.hashed = self.plain.len();
    }

    /// The buffer the next PUT / DELETE record of `len` bytes goes into: the open block (closed
    /// first if the record would not fit), or the plaintext after every block before it.
    fn record_buffer(&mut self, len: usize) -> Result<&mut Vec<u8>> {
        if self.blocks.is_blocked(len) {
            if self.blocks.open.len() + len > BLOCK_TARGET {
                self.close_block();
            }
            Ok(&mut self.blocks.open)
        } else {
            self.flush_blocks()?;
            Ok(&mut self.plain)
        }
    }

    fn close_block(&mut self) {
        self.absorb_pending();
        self.blocks.close(&mut self.digests);
    }

    /// Closes the open block and compresses every queued one, so plain records can follow.
    fn flush_blocks(&mut self) -> Result<()> {
        if self.blocks.open.is_empty() && self.blocks.full.is_empty() {
            // Nothing to flush (always so without compression): digesting the pending bytes here
            // would hash record by record, through BLAKE3's slow one-block path.
            return Ok(());
        }
        self.close_block();
        self.emit_queued()
    }

    /// Compresses the queued blocks and appends their BLOCK records to the plaintext.
    fn emit_queued(&mut self) -> Result<()> {
        self.absorb_pending();
        self.blocks.flush(&mut self.plain, self.threads)?;
        self.hashed = self.plain.len(); // BLOCK records are not digested: their content was
        Ok(())
    }

    pub fn begin_tree(&mut self, name: &str) -> Result<()> {
        self.guarded(|s| {
            s.expect(State::Open, "begin a tree")?;
            check_tree_name(name)?;
            if !s.names.insert(name.to_owned()) {
                return Err(Error::invalid(format!(
                    "tree {name:?} is already in this backup"
                )));
            }
            frame_blob(&mut s.plain, REC_TREE_BEGIN, name.as_bytes(), "tree name")?;
            s.absorb_pending();
            s.digests.open_tree();
            s.tree = Some((name.to_owned(), Tally::default()));
            s.state = State::InTree;
            Ok(())
        })
    }

    #[inline]
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.guarded(|s| {
            s.expect(State::InTree, "add items")?;
            frame_put(s.record_buffer(9 + key.len() + value.len())?, key, value)?;
            s.tree
                .as_mut()
                .expect("in tree")
                .1
                .add(key.len(), value.len())
        })
    }

    /// Starts a PUT whose value arrives in pieces through `extend_value` (for large values, so
    /// they are sealed and written out as they come instead of being buffered whole).
    pub fn begin_put(&mut self, key: &[u8], value_len: usize) -> Result<()> {
        self.guarded(|s| {
            s.expect(State::InTree, "add items")?;
            s.flush_blocks()?;
            frame_put_header(&mut s.plain, key, value_len)?;
            s.value_remaining = value_len as u64;
            s.tree
                .as_mut()
                .expect("in tree")
                .1
                .add(key.len(), value_len)
        })
    }

    pub fn extend_value(&mut self, chunk: &[u8]) -> Result<()> {
        self.guarded(|s| {
            if s.state != State::InTree || chunk.len() as u64 > s.value_remaining {
                return Err(Error::invalid(
                    "extend_value() without a matching begin_put()",
                ));
            }
            s.plain.extend_from_slice(chunk);
            s.value_remaining -= chunk.len() as u64;
            Ok(())
        })
    }

    pub fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.guarded(|s| {
            s.expect(State::InTree, "add deletes")?;
            frame_delete(s.record_buffer(5 + key.len())?, key)?;
            s.tree.as_mut().expect("in tree").1.add(key.len(), 0)
        })
    }

    pub fn end_tree(&mut self) -> Result<TreeSummary> {
        self.guarded(|s| {
            s.expect(State::InTree, "end a tree")?;
            s.flush_blocks()?;
            s.absorb_pending();
            let digest = s.digests.close_tree();
            let (name, tally) = s.tree.take().expect("in tree");
            let summary = tally.summary(name, digest);
            frame_tree_end(&mut s.plain, &summary);
            s.trees.push(summary.clone());
            s.state = State::Open;
            Ok(summary)
        })
    }

    /// Whether a PUT of `record_len` framed bytes would first compress the blocks waiting before
    /// it (it goes out as a plain record): the binding then calls `compress_blocks` without the GIL.
    pub fn flushes_blocks_before(&self, record_len: usize) -> bool {
        self.state == State::InTree
            && !self.blocks.is_blocked(record_len)
            && !(self.blocks.open.is_empty() && self.blocks.full.is_empty())
    }

    /// Closes the open block and compresses every waiting one into the plaintext.
    pub fn compress_blocks(&mut self) -> Result<()> {
        self.guarded(|s| s.flush_blocks())
    }

    /// Unsealed plaintext bytes; the binding seals once this exceeds a few segments.
    pub fn pending(&self) -> usize {
        self.plain.len() + self.blocks.queued
    }

    /// Seals every segment that is certainly not the last one (more plaintext follows it).
    pub fn seal_ready(&mut self) -> Result<()> {
        self.guarded(|s| s.seal(false))
    }

    /// Seals the segments that can be sealed now. The plaintext not yet digested is digested
    /// meanwhile, on a thread of its own (`parallel::run_beside`): it is all before the blocks
    /// still open, in the region (stream or tree) the digests are in.
    fn seal(&mut self, finishing: bool) -> Result<()> {
        if !self.blocks.full.is_empty() {
            self.emit_queued()?;
        }
        let params = self.cipher.params;
        // Cut the plaintext into the segments that can be sealed now.
        let mut pieces: Vec<(u64, bool, std::ops::Range<usize>)> = Vec::new();
        let (mut start, mut index) = (0, self.next_segment);
        loop {
            let full = params.plaintext_length(index);
            let rest = self.plain.len() - start;
            let last = finishing && rest <= full;
            if !last && rest <= full {
                break;
            }
            let end = start + rest.min(full);
            pieces.push((index, last, start..end));
            index += 1;
            start = end;
            if last {
                break;
            }
        }
        if pieces.is_empty() {
            return Ok(());
        }
        // Each segment gets its own slice of the output, so they can be sealed in parallel.
        let out_start = self.out_len;
        self.out_len += start + pieces.len() * TAG_LENGTH;
        if self.out.len() < self.out_len {
            self.out.resize(self.out_len, 0);
        }
        let mut jobs = Vec::with_capacity(pieces.len());
        let mut dst = &mut self.out[out_start..self.out_len];
        for (index, last, range) in pieces {
            let (seg, rest) = dst.split_at_mut(range.len() + TAG_LENGTH);
            jobs.push((index, last, &self.plain[range], seg));
            dst = rest;
        }
        let (cipher, digests) = (&self.cipher, &mut self.digests);
        let unhashed = &self.plain[self.hashed..];
        parallel::run_beside(
            jobs,
            start,
            self.threads,
            || digests.absorb(unhashed),
            || {},
            |(i, last, src, dst)| cipher.seal_to(i, last, src, dst),
        )?;
        self.hashed = self.plain.len();
        self.next_segment = index;
        self.plain.drain(..start);
        self.hashed -= start;
        Ok(())
    }

    /// Writes the TRAILER and seals the rest, the final segment flagged last.
    pub fn finish(&mut self) -> Result<Trailer> {
        self.guarded(|s| {
            s.expect(State::Open, "finish")?;
            s.absorb_pending();
            let mut totals = Tally::default();
            for t in &s.trees {
                totals.items = totals
                    .items
                    .checked_add(t.item_count)
                    .ok_or_else(|| Error::invalid("too many items"))?;
                totals.bytes = totals
                    .bytes
                    .checked_add(t.byte_count)
                    .ok_or_else(|| Error::invalid("too many bytes"))?;
            }
            let trailer = Trailer {
                total_items: totals.items,
                total_bytes: totals.bytes,
                trees: s.trees.clone(),
                digest: s.digests.stream_digest(),
            };
            s.plain.extend_from_slice(&trailer.encode());
            s.hashed = s.plain.len(); // the TRAILER is not part of the stream digest
            s.seal(true)?;
            s.state = State::Finished;
            Ok(trailer)
        })
    }

    /// The ciphertext produced since the last `clear_output`.
    pub fn output(&self) -> &[u8] {
        &self.out[..self.out_len]
    }

    /// Marks the output as written; its buffer is kept for reuse (fresh memory is costly here).
    pub fn clear_output(&mut self) {
        self.bytes_written += self.out_len as u64;
        self.out_len = 0;
    }

    /// Gives up the output buffer without freeing it: for when Python code may still read it.
    pub fn leak_output(&mut self) {
        self.bytes_written += self.out_len as u64;
        self.out_len = 0;
        let cap = self.out.capacity();
        std::mem::forget(std::mem::replace(&mut self.out, Vec::with_capacity(cap)));
    }

    pub fn output_len(&self) -> usize {
        self.out_len
    }
}
