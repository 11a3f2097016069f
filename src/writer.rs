//! The backup encoder: frames records, digests them and seals Tink segments. It does no I/O:
//! ciphertext accumulates in an output buffer that the caller drains (`output`, `clear_output`), so the
//! binding can write it with the GIL held and seal with the GIL released.
//!
//! With more than one thread, `seal_ready` hands the full segments to a sealer thread (digest and
//! AES-GCM, itself spread over the pool) and returns: the caller frames the next batch and writes
//! the one before while this one is sealed. Its output joins the output buffer at the next
//! `seal_ready`, or as soon as the digests are needed (trees, blocks, the trailer).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::aead::TAG_LENGTH;
use crate::compress::{compress_block, frame_block, BLOCK_TARGET};
use crate::digest::{Digests, Tally};
use crate::error::{Error, Result};
use crate::format::{
    check_tree_name, frame_blob, frame_delete, frame_put, frame_put_header, frame_tree_end,
    Preamble, PutBatch, Trailer, TreeSummary, DELETE_HEADER_LENGTH, PUT_HEADER_LENGTH, REC_HEADER,
    REC_TREE_BEGIN,
};
use crate::keys::{derive_digest_key, derive_key_id, SecretKey};
use crate::parallel;
use crate::placement::{file_aligned, FILE_ALIGN};
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
    cipher: Arc<SegmentCipher>,
    /// Plaintext not yet sealed; `plain[..hashed]` is already in the digests.
    plain: Vec<u8>,
    hashed: usize,
    next_segment: u64,
    /// The output is `out[out_start..][..out_len]`; the buffer keeps its length from batch to
    /// batch, so it is not zeroed again for every one.
    out: Vec<u8>,
    out_start: usize,
    out_len: usize,
    bytes_written: u64,
    /// None while a batch is with the sealer (which digests it first).
    digests: Option<Digests>,
    sealer: Option<Sealer>,
    /// Buffers back from the sealer, for the next batch.
    spare_plain: Vec<u8>,
    spare_out: Vec<u8>,
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

/// A batch of whole segments to seal: `plain[hash]` goes into the digests, and the pieces of
/// `plain` are sealed into `out[out_start..][..out_len]`, back to back (`out_start` aligns them
/// as they will be in the file: `placement`). Run on the caller's thread or on the sealer's.
struct SealJob {
    plain: Vec<u8>,
    pieces: Vec<(u64, bool, Range<usize>)>,
    hash: Range<usize>,
    out: Vec<u8>,
    out_start: usize,
    out_len: usize,
    digests: Digests,
    result: Result<()>,
}

impl SealJob {
    /// Digests on a helper while the segments are sealed, in parallel, on `threads` threads
    /// (`parallel::run_beside`).
    fn run(&mut self, cipher: &SegmentCipher, threads: usize) {
        let SealJob {
            plain,
            pieces,
            hash,
            out,
            out_start,
            out_len,
            digests,
            result,
        } = self;
        let sealed = *out_len - pieces.len() * TAG_LENGTH;
        let mut jobs = Vec::with_capacity(pieces.len());
        let mut dst = &mut out[*out_start..*out_start + *out_len];
        for (index, last, range) in pieces.iter() {
            let (seg, rest) = dst.split_at_mut(range.len() + TAG_LENGTH);
            jobs.push((*index, *last, &plain[range.clone()], seg));
            dst = rest;
        }
        let unhashed = &plain[hash.clone()];
        *result = parallel::run_beside(
            jobs,
            sealed,
            threads,
            || digests.absorb(unhashed),
            || {},
            |(i, last, src, dst)| cipher.seal_to(i, last, src, dst),
        );
    }
}

/// A thread of the encoder's own that seals one batch at a time while the caller goes on.
struct Sealer {
    jobs: Option<SyncSender<SealJob>>,
    /// (In a mutex only so that the encoder is Sync, as a Python class must be.)
    done: Mutex<Receiver<SealJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// A batch was handed over and not yet taken back.
    busy: bool,
    pid: u32,
}

impl Sealer {
    /// None if no thread can be started (the batches are then sealed on the caller's).
    fn new(cipher: Arc<SegmentCipher>, threads: usize) -> Option<Self> {
        let (jobs, inbox) = sync_channel::<SealJob>(1);
        let (outbox, done) = sync_channel::<SealJob>(1);
        let thread = std::thread::Builder::new()
            .name("datafold-sealer".into())
            .spawn(move || {
                for mut job in inbox {
                    job.run(&cipher, threads);
                    if outbox.send(job).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Sealer {
            jobs: Some(jobs),
            done: Mutex::new(done),
            thread: Some(thread),
            busy: false,
            pid: std::process::id(),
        })
    }

    /// Whether the thread is this process's (a forked child has only the parent's handle).
    fn is_ours(&self) -> bool {
        self.pid == std::process::id()
    }

    fn submit(&mut self, job: SealJob) {
        debug_assert!(!self.busy && self.is_ours());
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            self.pass_on_panic();
        }
        self.busy = true;
    }

    /// The thread is gone, so it panicked: the panic goes on in the caller, as the pool's do.
    fn pass_on_panic(&mut self) -> ! {
        self.jobs = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Err(payload)) => std::panic::resume_unwind(payload),
            _ => panic!("the sealer thread ended"),
        }
    }

    /// The batch handed over last, once sealed (None if there is none).
    fn wait(&mut self) -> Result<Option<SealJob>> {
        if !self.busy {
            return Ok(None);
        }
        if !self.is_ours() {
            return Err(Error::invalid(
                "a backup writer cannot go on in a process forked while it was sealing",
            ));
        }
        self.busy = false;
        let received = self.done.lock().map(|done| done.recv().ok());
        match received.ok().flatten() {
            Some(job) => Ok(Some(job)),
            None => self.pass_on_panic(),
        }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.jobs = None; // the thread ends after the batch it has, if any
        if let Some(thread) = self.thread.take() {
            if self.is_ours() {
                let _ = thread.join();
            }
        }
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
            digests: Some(Digests::new(derive_digest_key(key.as_bytes()).as_bytes())),
            sealer: None,
            spare_plain: Vec::new(),
            spare_out: Vec::new(),
            preamble,
            cipher: Arc::new(cipher),
            plain,
            hashed: 0,
            next_segment: 0,
            out_start: 0,
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

    /// Digests the plaintext not digested yet, once the batch with the sealer (if any) is taken
    /// back; the digests, up to date.
    fn absorb_pending(&mut self) -> Result<&mut Digests> {
        self.collect()?;
        let digests = self.digests.as_mut().expect("collected");
        digests.absorb(&self.plain[self.hashed..]);
        self.hashed = self.plain.len();
        Ok(digests)
    }

    /// Waits for the batch with the sealer, if any: takes the digests back and appends its
    /// output to the output buffer (by a swap when that is empty, as it is after each write).
    fn collect(&mut self) -> Result<()> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Ok(());
        };
        match sealer.wait()? {
            Some(done) => self.take_back(done),
            None => Ok(()),
        }
    }

    /// A sealed batch: the digests come back, its output goes after the output there is.
    fn take_back(&mut self, done: SealJob) -> Result<()> {
        let SealJob {
            plain,
            mut out,
            out_start,
            out_len,
            digests,
            result,
            ..
        } = done;
        self.digests = Some(digests);
        self.spare_plain = plain;
        if self.out_len == 0 {
            std::mem::swap(&mut self.out, &mut out);
            (self.out_start, self.out_len) = (out_start, out_len);
        } else {
            let at = self.out_start + self.out_len;
            let end = at + out_len;
            if self.out.len() < end {
                self.out.resize(end, 0);
            }
            self.out[at..end].copy_from_slice(&out[out_start..out_start + out_len]);
            self.out_len += out_len;
        }
        self.spare_out = out;
        result
    }

    /// The buffer the next PUT / DELETE record of `len` bytes goes into: the open block (closed
    /// first if the record would not fit), or the plaintext after every block before it.
    fn record_buffer(&mut self, len: usize) -> Result<&mut Vec<u8>> {
        if self.blocks.is_blocked(len) {
            if self.blocks.open.len() + len > BLOCK_TARGET {
                self.close_block()?;
            }
            Ok(&mut self.blocks.open)
        } else {
            self.flush_blocks()?;
            Ok(&mut self.plain)
        }
    }

    fn close_block(&mut self) -> Result<()> {
        self.absorb_pending()?;
        let digests = self.digests.as_mut().expect("collected");
        self.blocks.close(digests);
        Ok(())
    }

    /// Closes the open block and compresses every queued one, so plain records can follow.
    fn flush_blocks(&mut self) -> Result<()> {
        if self.blocks.open.is_empty() && self.blocks.full.is_empty() {
            // Nothing to flush (always so without compression): digesting the pending bytes here
            // would hash record by record, through BLAKE3's slow one-block path.
            return Ok(());
        }
        self.close_block()?;
        self.emit_queued()
    }

    /// Compresses the queued blocks and appends their BLOCK records to the plaintext.
    fn emit_queued(&mut self) -> Result<()> {
        self.absorb_pending()?;
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
            s.absorb_pending()?.open_tree();
            s.tree = Some((name.to_owned(), Tally::default()));
            s.state = State::InTree;
            Ok(())
        })
    }

    #[inline]
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.guarded(|s| {
            s.expect(State::InTree, "add items")?;
            frame_put(
                s.record_buffer(PUT_HEADER_LENGTH + key.len() + value.len())?,
                key,
                value,
            )?;
            s.tree
                .as_mut()
                .expect("in tree")
                .1
                .add(key.len(), value.len())
        })
    }

    /// PUT records `first..end` of `batch`, appended as they are framed there (one copy, no
    /// work per record). Without compression only: with it, records go into blocks one by one
    /// (`put`).
    pub fn put_batch(&mut self, batch: &PutBatch, first: usize, end: usize) -> Result<()> {
        self.guarded(|s| {
            s.expect(State::InTree, "add items")?;
            if s.compresses() {
                return Err(Error::invalid("put_batch() with compression on; use put()"));
            }
            if first > end || end > batch.len() {
                return Err(Error::invalid(format!(
                    "put_batch(): records {first}..{end} of a batch of {}",
                    batch.len()
                )));
            }
            let (framed, bytes) = batch.framed(first, end);
            s.plain.extend_from_slice(framed);
            let tally = &mut s.tree.as_mut().expect("in tree").1;
            tally.add_many((end - first) as u64, bytes)
        })
    }

    /// Whether records go into compressed blocks (`compression_level` > 0).
    pub fn compresses(&self) -> bool {
        self.blocks.level > 0
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
            frame_delete(s.record_buffer(DELETE_HEADER_LENGTH + key.len())?, key)?;
            s.tree.as_mut().expect("in tree").1.add(key.len(), 0)
        })
    }

    pub fn end_tree(&mut self) -> Result<TreeSummary> {
        self.guarded(|s| {
            s.expect(State::InTree, "end a tree")?;
            s.flush_blocks()?;
            let digest = s.absorb_pending()?.close_tree();
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

    /// Seals the segments that can be sealed now (all when `finishing`, the last one flagged;
    /// else every one that more plaintext follows). The plaintext not yet digested before them
    /// is digested meanwhile. With more than one thread and more to come, the sealer thread
    /// does both and this returns at once (after collecting the batch before).
    fn seal(&mut self, finishing: bool) -> Result<()> {
        if self.state == State::Poisoned {
            return Err(Error::Poisoned("backup writer"));
        }
        if !self.blocks.full.is_empty() {
            self.emit_queued()?;
        }
        self.collect()?;
        let params = self.cipher.params;
        // Cut the plaintext into the segments that can be sealed now.
        let mut pieces: Vec<(u64, bool, Range<usize>)> = Vec::new();
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
        // The batch leaves with the buffer; what follows it stays, in a spare one.
        let mut next = std::mem::take(&mut self.spare_plain);
        next.clear();
        next.extend_from_slice(&self.plain[start..]);
        let out_len = pieces.iter().map(|p| p.2.len() + TAG_LENGTH).sum();
        let mut out = std::mem::take(&mut self.spare_out);
        if out.len() < out_len + FILE_ALIGN {
            out.resize(out_len + FILE_ALIGN, 0);
        }
        // Its output follows what is not written yet.
        let out_start = file_aligned(out.as_ptr(), 0, self.bytes_written + self.out_len as u64);
        let mut job = SealJob {
            plain: std::mem::replace(&mut self.plain, next),
            pieces,
            hash: self.hashed.min(start)..start,
            out,
            out_start,
            out_len,
            digests: self.digests.take().expect("collected"),
            result: Ok(()),
        };
        self.hashed = self.hashed.saturating_sub(start);
        self.next_segment = index;
        if !finishing && self.threads > 1 {
            if let Some(sealer) = self.sealer() {
                sealer.submit(job);
                return Ok(());
            }
        }
        job.run(&self.cipher, self.threads);
        self.take_back(job)
    }

    /// The sealer thread, started on first use (again in a forked child, which has none).
    fn sealer(&mut self) -> Option<&mut Sealer> {
        if self.sealer.as_ref().is_some_and(|s| !s.is_ours()) {
            self.sealer = None; // the parent's: nothing is with it (collected before a batch goes)
        }
        if self.sealer.is_none() {
            self.sealer = Sealer::new(Arc::clone(&self.cipher), self.threads);
        }
        self.sealer.as_mut()
    }

    /// Writes the TRAILER and seals the rest, the final segment flagged last.
    pub fn finish(&mut self) -> Result<Trailer> {
        self.guarded(|s| {
            s.expect(State::Open, "finish")?;
            let stream_digest = s.absorb_pending()?.stream_digest();
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
                digest: stream_digest,
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
        &self.out[self.out_start..self.out_start + self.out_len]
    }

    /// Marks the output as written; its buffer is kept for reuse (fresh memory is costly here).
    pub fn clear_output(&mut self) {
        self.bytes_written += self.out_len as u64;
        self.out_len = 0;
    }

    /// Gives up the output buffer without freeing it: for when Python code may still read it.
    pub fn leak_output(&mut self) {
        self.bytes_written += self.out_len as u64;
        (self.out_start, self.out_len) = (0, 0);
        let cap = self.out.capacity();
        std::mem::forget(std::mem::replace(&mut self.out, Vec::with_capacity(cap)));
    }

    pub fn output_len(&self) -> usize {
        self.out_len
    }
}
