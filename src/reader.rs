//! The backup decoder: opens Tink segments fed to it, parses and checks the record grammar,
//! counts and digests. Like the encoder it does no I/O; `SegmentFeeder` cuts a byte source into
//! segments and decides which one is last by the end of the input.

use std::collections::HashSet;

use crate::aead::TAG_LENGTH;
use crate::compress::{parse_block_header, BlockDecoder};
use crate::digest::{Digests, Tally};
use crate::error::{Error, Result};
use crate::format::{
    record_extent, u32_le, u64_le, Preamble, Trailer, TreeSummary, BLOCK_HEADER_LENGTH,
    DIGEST_LENGTH, MAX_TREE_NAME_LENGTH, REC_BLOCK, REC_DELETE, REC_HEADER, REC_PUT, REC_TRAILER,
    REC_TREE_BEGIN, REC_TREE_END, TREE_END_LENGTH,
};
use crate::keys::{derive_digest_key, derive_key_id, SecretKey};
use crate::placement::{file_aligned, FILE_ALIGN};
use crate::stream::{SegmentCipher, StreamParams};

/// Result of a parse step that may need another segment first.
pub enum Step<T> {
    Done(T),
    NeedMore,
}

/// One record of a tree as the reader hands it out; borrows the decoder's buffer.
pub enum Item<'a> {
    Put(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Ready,
    InTree,
    TreeDone,
    Done,
    Poisoned,
}

/// Checks the key against the preamble's key id (before any decryption).
pub fn check_key(preamble: &Preamble, backup_key: &[u8]) -> Result<SecretKey> {
    let key = SecretKey::from_slice(backup_key, "backup key")?;
    if derive_key_id(key.as_bytes()) != preamble.key_id {
        return Err(Error::EncryptionKey(
            "this backup was made with a different key: use the master key (or passphrase) it was created with"
                .into(),
        ));
    }
    Ok(key)
}

pub fn truncated() -> Error {
    Error::integrity("backup is truncated: the stream ends before its trailer")
}

pub struct BackupDecoder {
    cipher: SegmentCipher,
    /// The plaintext read so far ends at `plain[end]`; the buffer is the last batch's (see
    /// `push_batch_beside`) and keeps its length: no zeroing per batch.
    plain: Vec<u8>,
    end: usize,
    /// Parse cursor into `plain`; `plain[hashed..pos]` is parsed but not yet digested.
    pos: usize,
    hashed: usize,
    next_segment: u64,
    ended: bool,
    digests: Digests,
    state: State,
    tree: Option<(String, Tally)>,
    trees: Vec<TreeSummary>,
    names: HashSet<String>,
    trailer: Option<Trailer>,
    /// The records of the BLOCK being read (already digested), and the parse cursor into them.
    block: Vec<u8>,
    block_pos: usize,
    blocks: BlockDecoder,
}

/// Where a parsed record lies: in the stream's plaintext or in the current block.
#[derive(Clone, Copy)]
enum Src {
    Plain,
    Block,
}

impl BackupDecoder {
    /// `stream_header` is the first bytes of the stream (the Tink header, 40 bytes).
    pub fn new(preamble: &Preamble, backup_key: &[u8], stream_header: &[u8]) -> Result<Self> {
        let key = check_key(preamble, backup_key)?;
        let params = StreamParams::backup(preamble.segment_size);
        let cipher =
            SegmentCipher::from_header(params, key.as_bytes(), &preamble.raw, stream_header)?;
        Ok(BackupDecoder {
            cipher,
            plain: Vec::new(),
            end: 0,
            pos: 0,
            hashed: 0,
            next_segment: 0,
            ended: false,
            digests: Digests::new(derive_digest_key(key.as_bytes()).as_bytes()),
            state: State::Header,
            tree: None,
            trees: Vec::new(),
            names: HashSet::new(),
            trailer: None,
            block: Vec::new(),
            block_pos: 0,
            blocks: BlockDecoder::default(),
        })
    }

    pub fn params(&self) -> StreamParams {
        self.cipher.params
    }

    /// Ciphertext length of the next full segment.
    pub fn next_segment_length(&self) -> usize {
        self.cipher.params.ciphertext_length(self.next_segment)
    }

    /// Index of the next segment to push.
    pub fn next_segment_index(&self) -> u64 {
        self.next_segment
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn poison(&mut self) {
        self.state = State::Poisoned;
    }

    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.state == State::Poisoned {
            return Err(Error::Poisoned("backup reader"));
        }
        let r = f(self);
        if r.is_err() {
            self.state = State::Poisoned;
        }
        r
    }

    fn absorb_parsed(&mut self) {
        self.digests.absorb(&self.plain[self.hashed..self.pos]);
        self.hashed = self.pos;
    }

    /// Decrypts the next segment (ciphertext || tag) straight onto the end of the plaintext.
    pub fn push_segment(&mut self, segment: &[u8], last: bool) -> Result<()> {
        self.push_segments(&[(segment, last)], 1)
    }

    /// Decrypts the next segments, in order, onto the end of the plaintext, spread over
    /// `threads` threads. Only the final one may be flagged last.
    pub fn push_segments(&mut self, segments: &[(&[u8], bool)], threads: usize) -> Result<()> {
        self.push_segments_beside(segments, threads, || {})
    }

    /// `push_segments`, running `own` (reading the next segments, say) on the calling thread
    /// meanwhile, before it turns to the segments (`parallel::run_beside`).
    pub fn push_segments_beside(
        &mut self,
        segments: &[(&[u8], bool)],
        threads: usize,
        own: impl FnOnce(),
    ) -> Result<()> {
        let mut batch = Batch::default();
        batch.hold_segments(segments);
        self.push_batch_beside(&mut batch, threads, own)
    }

    /// Opens the segments of `batch` in place, in parallel, and takes its buffer as the
    /// plaintext (the batch gets the old buffer back, for a later read), after what is not
    /// parsed yet: that is copied into the room the batch leaves in front. What is parsed but
    /// not digested is digested meanwhile, and `own` runs on the calling thread.
    pub fn push_batch_beside(
        &mut self,
        batch: &mut Batch,
        threads: usize,
        own: impl FnOnce(),
    ) -> Result<()> {
        self.guarded(|s| {
            let mut index = s.next_segment;
            let mut ended = s.ended;
            let mut total = 0;
            // A segment of a wrong length fails the read, but only after the segments before it
            // are opened: the first damage in file order is the one reported, as by the pure core.
            let mut bad_length = None;
            for cut in &batch.cuts {
                let full = s.cipher.params.ciphertext_length(index);
                bad_length = if ended {
                    Some(Error::integrity(
                        "data follows the last segment of the backup",
                    ))
                } else if cut.len > full || (!cut.last && cut.len != full) {
                    Some(Error::integrity(
                        "backup segment has the wrong length (corrupted file)",
                    ))
                } else if cut.len < TAG_LENGTH {
                    Some(Error::integrity(format!(
                        "backup is truncated or corrupted (segment {index} is shorter than its tag)"
                    )))
                } else {
                    None
                };
                if bad_length.is_some() {
                    break;
                }
                total += cut.body();
                index += 1;
                ended = cut.last;
            }
            let count = (index - s.next_segment) as usize;
            // The ciphertexts lie back to back from `origin` on. What is not parsed yet (the
            // start of a record the batch ends) goes just before them, and the batch's buffer
            // becomes the plaintext. A tail longer than that room stays where it is and the
            // opened batch is appended to it: a record of many batches is copied once per
            // batch, not once per batch for all that came before it.
            let (rest, origin) = (s.end - s.pos, batch.origin);
            let in_place = rest <= origin;
            if in_place {
                batch.buf[origin - rest..origin].copy_from_slice(&s.plain[s.pos..s.end]);
            }
            let mut jobs = Vec::with_capacity(count);
            let mut dst = &mut batch.buf[origin..origin + total];
            for (i, (cut, tag)) in batch.cuts[..count].iter().zip(&batch.tags).enumerate() {
                debug_assert_eq!(cut.start, origin + (total - dst.len()));
                let (body, after) = dst.split_at_mut(cut.body());
                jobs.push((s.next_segment + i as u64, cut.last, body, tag));
                dst = after;
            }
            let (cipher, digests) = (&s.cipher, &mut s.digests);
            let parsed = &s.plain[s.hashed..s.pos];
            crate::parallel::run_beside(
                jobs,
                total,
                threads,
                || digests.absorb(parsed),
                own,
                |(i, last, body, tag)| cipher.open_in_place_tagged(i, last, body, tag),
            )?;
            if let Some(e) = bad_length {
                return Err(e);
            }
            if in_place {
                std::mem::swap(&mut s.plain, &mut batch.buf);
                s.pos = origin - rest;
                s.end = origin + total;
            } else {
                // Everything before `pos` is digested now: move the tail to the front (once:
                // nothing is parsed until the record is whole), then append.
                if s.pos > 0 {
                    s.plain.copy_within(s.pos..s.end, 0);
                }
                let end = rest + total;
                if s.plain.len() < end {
                    s.plain.resize(end, 0);
                }
                s.plain[rest..end].copy_from_slice(&batch.buf[origin..origin + total]);
                s.pos = 0;
                s.end = end;
            }
            s.hashed = s.pos;
            s.next_segment = index;
            s.ended = ended;
            Ok(())
        })
    }

    fn available(&self) -> &[u8] {
        &self.plain[self.pos..self.end]
    }

    /// A length-prefixed record body at the cursor (after its type byte), or NeedMore.
    fn blob_len(&self) -> Step<usize> {
        let a = self.available();
        if a.len() < 5 {
            return Step::NeedMore;
        }
        let n = u32_le(&a[1..5]) as usize;
        if a.len() < 5 + n {
            Step::NeedMore
        } else {
            Step::Done(n)
        }
    }

    fn need_more<T>(&self) -> Result<Step<T>> {
        if self.ended {
            Err(truncated())
        } else {
            Ok(Step::NeedMore)
        }
    }

    /// The HEADER payload (metadata JSON).
    pub fn read_header(&mut self) -> Result<Step<Vec<u8>>> {
        self.guarded(|s| {
            if s.state != State::Header {
                return Err(Error::invalid("the header was already read"));
            }
            match s.available().first() {
                None => return s.need_more(),
                Some(&REC_HEADER) => {}
                Some(&other) => return Err(unexpected(other, "the HEADER record")),
            }
            let Step::Done(n) = s.blob_len() else {
                return s.need_more();
            };
            let payload = s.available()[5..5 + n].to_vec();
            s.pos += 5 + n;
            s.state = State::Ready;
            Ok(Step::Done(payload))
        })
    }

    /// Moves to the next tree, consuming (and checking) what is left of the current one.
    /// `Done(None)` after the TRAILER was read and checked and the stream ended with it.
    pub fn next_tree(&mut self) -> Result<Step<Option<String>>> {
        self.guarded(|s| loop {
            match s.state {
                State::Header => return Err(Error::invalid("call unlock() before reading trees")),
                State::Done => return Ok(Step::Done(None)),
                State::InTree => match s.step_item()? {
                    Step::NeedMore => return Ok(Step::NeedMore),
                    Step::Done(_) => continue,
                },
                State::TreeDone => s.state = State::Ready,
                State::Ready => return s.step_tree_begin_or_trailer(),
                State::Poisoned => unreachable!("guarded"),
            }
        })
    }

    fn step_tree_begin_or_trailer(&mut self) -> Result<Step<Option<String>>> {
        let kind = match self.available().first() {
            None => return self.need_more(),
            Some(&k) => k,
        };
        match kind {
            REC_TREE_BEGIN => {
                // The length is checked before the name is waited for (and buffered).
                let a = self.available();
                if a.len() >= 5
                    && !(1..=MAX_TREE_NAME_LENGTH).contains(&(u32_le(&a[1..5]) as usize))
                {
                    return Err(Error::integrity(
                        "backup holds a tree with an invalid name length",
                    ));
                }
                let Step::Done(n) = self.blob_len() else {
                    return self.need_more();
                };
                let name = std::str::from_utf8(&self.available()[5..5 + n])
                    .map_err(|_| Error::integrity("backup holds a tree name that is not UTF-8"))?
                    .to_owned();
                if !self.names.insert(name.clone()) {
                    return Err(Error::integrity(format!(
                        "backup holds tree {name:?} twice"
                    )));
                }
                self.pos += 5 + n;
                self.absorb_parsed();
                self.digests.open_tree();
                self.tree = Some((name.clone(), Tally::default()));
                self.state = State::InTree;
                Ok(Step::Done(Some(name)))
            }
            REC_TRAILER => {
                let Step::Done(n) = self.blob_len() else {
                    return self.need_more();
                };
                self.absorb_parsed();
                let trailer = Trailer::decode(&self.available()[5..5 + n])?;
                if trailer.trees != self.trees {
                    return Err(Error::integrity(
                        "backup trailer disagrees with the trees read",
                    ));
                }
                if trailer.digest != self.digests.stream_digest() {
                    return Err(Error::integrity(
                        "backup stream digest does not match its content",
                    ));
                }
                self.pos += 5 + n;
                if self.pos != self.end || !self.ended {
                    return Err(Error::integrity("backup has data after its trailer"));
                }
                self.trailer = Some(trailer);
                self.state = State::Done;
                Ok(Step::Done(None))
            }
            other => Err(unexpected(other, "a TREE_BEGIN or TRAILER")),
        }
    }

    /// The next record of the current tree; `Done(None)` once its TREE_END was read and checked.
    pub fn next_item(&mut self) -> Result<Step<Option<Item<'_>>>> {
        if self.state == State::Poisoned {
            return Err(Error::Poisoned("backup reader"));
        }
        match self.state {
            State::TreeDone => return Ok(Step::Done(None)),
            State::InTree => {}
            _ => {
                self.state = State::Poisoned;
                return Err(Error::invalid("no tree is open; call next_tree() first"));
            }
        }
        let r = self.step_item();
        match r {
            Err(e) => {
                self.state = State::Poisoned;
                Err(e)
            }
            Ok(Step::NeedMore) => Ok(Step::NeedMore),
            Ok(Step::Done(None)) => Ok(Step::Done(None)),
            Ok(Step::Done(Some((src, kind, start, klen, vlen)))) => {
                let buf = match src {
                    Src::Plain => &self.plain,
                    Src::Block => &self.block,
                };
                let k = &buf[start..start + klen];
                Ok(Step::Done(Some(if kind == REC_PUT {
                    Item::Put(k, &buf[start + klen..start + klen + vlen])
                } else {
                    Item::Delete(k)
                })))
            }
        }
    }

    /// Parses one record of the open tree: Some((where, kind, key offset, key len, value len)) or
    /// None at TREE_END. Records inside a BLOCK come from the decoded block, transparently.
    #[allow(clippy::type_complexity)]
    fn step_item(&mut self) -> Result<Step<Option<(Src, u8, usize, usize, usize)>>> {
        if self.block_pos < self.block.len() {
            // The block was checked to hold only complete PUT / DELETE records.
            let rec = &self.block[self.block_pos..];
            let (kind, len) = (rec[0], record_extent(rec).expect("checked block"));
            let (head, klen, vlen) = record_fields(rec, len);
            let start = self.block_pos + head;
            self.block_pos += len;
            self.tree.as_mut().expect("in tree").1.add(klen, vlen)?;
            return Ok(Step::Done(Some((Src::Block, kind, start, klen, vlen))));
        }
        let a = self.available();
        let Some(&kind) = a.first() else {
            return self.need_more();
        };
        match kind {
            REC_PUT | REC_DELETE => {
                let Some(len) = record_extent(a) else {
                    return self.need_more();
                };
                let (head, klen, vlen) = record_fields(a, len);
                let start = self.pos + head;
                self.pos += len;
                self.tree.as_mut().expect("in tree").1.add(klen, vlen)?;
                Ok(Step::Done(Some((Src::Plain, kind, start, klen, vlen))))
            }
            REC_BLOCK => {
                if a.len() < BLOCK_HEADER_LENGTH {
                    return self.need_more();
                }
                let (codec, raw_len, data_len) = parse_block_header(a)?;
                let end = BLOCK_HEADER_LENGTH + data_len;
                if a.len() < end {
                    return self.need_more();
                }
                self.absorb_parsed(); // the records before the block
                let data = &self.plain[self.pos + BLOCK_HEADER_LENGTH..self.pos + end];
                self.blocks.decode(codec, raw_len, data, &mut self.block)?;
                // The tree digest covers the records, not the BLOCK that carries them.
                self.digests.absorb(&self.block);
                self.block_pos = 0;
                self.pos += end;
                self.hashed = self.pos;
                self.step_item()
            }
            REC_TREE_END => {
                if a.len() < TREE_END_LENGTH {
                    return self.need_more();
                }
                let items = u64_le(&a[1..9]);
                let bytes = u64_le(&a[9..17]);
                let digest: [u8; DIGEST_LENGTH] = a[17..49].try_into().expect("32");
                self.absorb_parsed();
                let computed = self.digests.close_tree();
                let (name, tally) = self.tree.take().expect("in tree");
                if items != tally.items || bytes != tally.bytes {
                    return Err(Error::integrity(format!(
                        "tree {name:?}: the backup says {items} items / {bytes} bytes but holds {} / {}",
                        tally.items, tally.bytes
                    )));
                }
                if digest != computed {
                    return Err(Error::integrity(format!(
                        "tree {name:?}: digest does not match its records"
                    )));
                }
                self.pos += TREE_END_LENGTH;
                self.trees.push(tally.summary(name, digest));
                self.state = State::TreeDone;
                Ok(Step::Done(None))
            }
            other => Err(unexpected(other, "a PUT, DELETE, BLOCK or TREE_END")),
        }
    }

    pub fn last_tree(&self) -> Option<&TreeSummary> {
        self.trees.last()
    }

    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// Opens one segment without touching the parse state (for reading the trailer alone).
    pub fn open_detached(&self, index: u64, last: bool, segment: &mut [u8]) -> Result<usize> {
        self.cipher.open_in_place(index, last, segment)
    }
}

/// (header length, key length, value length) of the complete PUT / DELETE record of `len` bytes
/// at the start of `rec`.
fn record_fields(rec: &[u8], len: usize) -> (usize, usize, usize) {
    let head = if rec[0] == REC_PUT { 9 } else { 5 };
    let klen = u32_le(&rec[1..5]) as usize;
    (head, klen, len - head - klen)
}

fn unexpected(kind: u8, wanted: &str) -> Error {
    match kind {
        REC_HEADER | REC_TREE_BEGIN | REC_PUT | REC_DELETE | REC_TREE_END | REC_TRAILER
        | REC_BLOCK => Error::integrity(format!(
            "backup record order is invalid: found record type {kind:#04x}, expected {wanted}"
        )),
        _ => Error::format(format!(
            "backup holds an unknown record type {kind:#04x} (written by a newer datafold?)"
        )),
    }
}

/// Where the segments of a stream of `stream_len` bytes lie (FORMAT.md §6).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub params: StreamParams,
    pub stream_len: u64,
    pub segments: u64,
}

impl Layout {
    pub fn new(params: StreamParams, stream_len: u64) -> Result<Self> {
        let css = params.segment_size as u64;
        let header = params.header_length() as u64;
        if stream_len < header + 16 {
            return Err(Error::integrity(
                "backup is truncated (the stream is shorter than one segment)",
            ));
        }
        let segments = stream_len.div_ceil(css).max(1);
        let last_len = stream_len - (segments - 1) * css - if segments == 1 { header } else { 0 };
        if last_len < 16 {
            return Err(Error::integrity(
                "backup is truncated or has extra bytes (its size does not fit the segment size)",
            ));
        }
        Ok(Layout {
            params,
            stream_len,
            segments,
        })
    }

    /// (offset in the stream, length) of ciphertext segment `i`.
    pub fn segment(&self, i: u64) -> (u64, usize) {
        let start = self.params.segment_offset(i);
        let end = ((i + 1) * self.params.segment_size as u64).min(self.stream_len);
        (start, (end - start) as usize)
    }
}

/// Trailer length from the end of the plaintext: Some(record length) once enough bytes are known.
pub fn trailer_record_length(tail: &[u8]) -> Option<usize> {
    if tail.len() < 4 {
        return None;
    }
    Some(u32_le(&tail[tail.len() - 4..]) as usize + 5)
}

/// Parses the TRAILER record at the end of `tail`. A tail shorter than the record it declares
/// (a stream too short to hold it, or a forged length) is an integrity error, never a panic.
pub fn parse_tail_trailer(tail: &[u8]) -> Result<Trailer> {
    let n = trailer_record_length(tail).ok_or_else(truncated)?;
    let start = tail.len().checked_sub(n).ok_or_else(truncated)?;
    let rec = &tail[start..];
    if rec[0] != REC_TRAILER || u32_le(&rec[1..5]) as usize != n - 5 {
        return Err(Error::integrity("backup does not end with a valid trailer"));
    }
    Trailer::decode(&rec[5..])
}

/// Cuts a byte source into ciphertext segments, reading one segment ahead so that the segment
/// that ends the input is the one flagged last.
#[derive(Default)]
pub struct SegmentFeeder {
    ahead: Option<Vec<u8>>,
}

impl SegmentFeeder {
    /// The next segment and whether it is the last. `read(n)` returns up to n bytes, fewer only at
    /// the end of the input. `len_now` / `len_next` are the full lengths of this and the next segment.
    pub fn next<E>(
        &mut self,
        len_now: usize,
        len_next: usize,
        mut read: impl FnMut(usize) -> std::result::Result<Vec<u8>, E>,
    ) -> std::result::Result<(Vec<u8>, bool), E> {
        let current = match self.ahead.take() {
            Some(c) => c,
            None => read(len_now)?,
        };
        if current.len() < len_now {
            return Ok((current, true));
        }
        let next = read(len_next)?;
        if next.is_empty() {
            Ok((current, true))
        } else {
            self.ahead = Some(next);
            Ok((current, false))
        }
    }
}

/// Room left in front of a batch's plaintext for the part of a record that the batch before
/// ends in: that part is copied there, rather than the batch moved after it.
const HEADROOM: usize = (1 << 20) + 4096;

/// Reads batches of ciphertext segments into buffers reused from batch to batch (no fresh
/// memory per segment): while one batch is opened, the next can be read into another
/// (`split`). Each segment's ciphertext goes right after the one before and its tag to a table
/// of its own, so that, opened in place, a batch is the plaintext in order: the batch's buffer
/// then becomes the decoder's (`BackupDecoder::push_batch_beside`). It reads one byte past each
/// batch, so that, as with `SegmentFeeder`, a segment is last only when no byte follows it;
/// that byte is carried to the next batch.
#[derive(Default)]
pub struct SegmentReader {
    /// The batch handed out last.
    current: Batch,
    /// The batch after it, once read (`ready`); else a spare buffer.
    next: Batch,
    ready: bool,
}

/// One segment of a batch as read.
#[derive(Clone, Copy, Debug)]
struct Cut {
    /// Where its ciphertext (without the tag) starts in `Batch::buf`.
    start: usize,
    /// Its length as read, tag included: the full length, except for the segment the input
    /// ends in.
    len: usize,
    last: bool,
}

impl Cut {
    fn body(&self) -> usize {
        self.len.saturating_sub(TAG_LENGTH)
    }
}

#[derive(Default)]
pub struct Batch {
    /// From `origin` on: the segments' ciphertexts without their tags, back to back.
    buf: Vec<u8>,
    /// Where the first ciphertext starts: `HEADROOM`, and up to `FILE_ALIGN - 1` bytes more
    /// to keep it aligned as in the file (`placement`).
    origin: usize,
    tags: Vec<[u8; TAG_LENGTH]>,
    cuts: Vec<Cut>,
    /// The byte read past the batch: the first of the next one.
    carry: Option<u8>,
    /// The full segment lengths this batch was read for.
    lens: Vec<usize>,
}

impl Batch {
    pub fn segment_count(&self) -> usize {
        self.cuts.len()
    }

    fn ends_input(&self) -> bool {
        self.cuts.last().is_some_and(|c| c.last)
    }

    /// Each segment as it was in the input (ciphertext || tag), and whether it is the last.
    #[cfg(test)]
    fn joined(&self) -> Vec<(Vec<u8>, bool)> {
        self.cuts
            .iter()
            .zip(&self.tags)
            .map(|(c, tag)| {
                let mut seg = self.buf[c.start..c.start + c.body()].to_vec();
                seg.extend_from_slice(&tag[..c.len.min(TAG_LENGTH)]);
                (seg, c.last)
            })
            .collect()
    }

    /// A batch holding `segments` (ciphertext || tag), as `fill` would have read them.
    fn hold_segments(&mut self, segments: &[(&[u8], bool)]) {
        let bodies: usize = segments
            .iter()
            .map(|(s, _)| s.len().saturating_sub(TAG_LENGTH))
            .sum();
        self.buf.resize(self.buf.len().max(HEADROOM + bodies), 0);
        self.origin = HEADROOM;
        self.tags.clear();
        self.cuts.clear();
        let mut start = HEADROOM;
        for &(segment, last) in segments {
            let body = segment.len().saturating_sub(TAG_LENGTH);
            self.buf[start..start + body].copy_from_slice(&segment[..body]);
            let mut tag = [0; TAG_LENGTH];
            let rest = &segment[body..];
            tag[..rest.len()].copy_from_slice(rest);
            self.tags.push(tag);
            self.cuts.push(Cut {
                start,
                len: segment.len(),
                last,
            });
            start += body;
        }
        self.carry = None;
    }

    /// Reads the segments of full lengths `lens` (each at least a tag long), starting with
    /// `carry` (the byte read past the batch before); fewer when the input ends earlier (the one
    /// it ends in is flagged last, and may be short or empty). `offset`: where the batch starts
    /// in the source (the carried byte included), for the alignment alone.
    fn fill<E>(
        &mut self,
        carry: Option<u8>,
        lens: &[usize],
        offset: u64,
        mut read_into: impl FnMut(&mut [u8]) -> std::result::Result<usize, E>,
    ) -> std::result::Result<(), E> {
        let bodies: usize = lens.iter().map(|l| l.saturating_sub(TAG_LENGTH)).sum();
        if self.buf.len() < HEADROOM + FILE_ALIGN + bodies {
            self.buf.resize(HEADROOM + FILE_ALIGN + bodies, 0);
        }
        self.origin = file_aligned(self.buf.as_ptr(), HEADROOM, offset);
        // One more slot for the byte past the batch: what a source is lent must be heap memory
        // that `SegmentReader::leak_buffers` can give up.
        self.tags.clear();
        self.tags.resize(lens.len() + 1, [0; TAG_LENGTH]);
        self.lens.clear();
        self.lens.extend_from_slice(lens);
        let want = lens.iter().sum::<usize>() + 1;
        // The input is laid out as: segment k's ciphertext at `body_at`, its tag in tags[k],
        // ..., then the byte past the batch. `(k, at)`: the next byte goes to segment k, `at`
        // bytes into it.
        let (mut k, mut at, mut body_at, mut placed) = (0usize, 0usize, self.origin, 0usize);
        loop {
            let dst: &mut [u8] = match lens.get(k) {
                Some(&len) => {
                    let body = len.saturating_sub(TAG_LENGTH);
                    if at < body {
                        &mut self.buf[body_at + at..body_at + body]
                    } else {
                        &mut self.tags[k][at - body..]
                    }
                }
                None => &mut self.tags[k][..1],
            };
            let n = match (placed, carry) {
                (0, Some(byte)) => {
                    dst[0] = byte;
                    1
                }
                _ => read_into(dst)?.min(dst.len()),
            };
            if n == 0 {
                break;
            }
            placed += n;
            at += n;
            if let Some(&len) = lens.get(k) {
                if at == len {
                    body_at += len.saturating_sub(TAG_LENGTH);
                    (k, at) = (k + 1, 0);
                }
            }
            if placed == want {
                break;
            }
        }
        self.cuts.clear();
        let (mut pos, mut start) = (0, self.origin);
        for (k, &len) in lens.iter().enumerate() {
            let stop = (pos + len).min(placed);
            let last = stop == placed;
            let got = stop - pos;
            let body = len.saturating_sub(TAG_LENGTH);
            if got < len {
                // The input ends in this segment: its tag is the last bytes read (all of them
                // if fewer than a tag), which may have gone to its ciphertext's place.
                let kept = got.min(TAG_LENGTH);
                let mut tag = [0; TAG_LENGTH];
                for (i, t) in tag[..kept].iter_mut().enumerate() {
                    let p = got - kept + i;
                    *t = if p < body {
                        self.buf[start + p]
                    } else {
                        self.tags[k][p - body]
                    };
                }
                self.tags[k] = tag;
            }
            self.cuts.push(Cut {
                start,
                len: got,
                last,
            });
            pos = stop;
            start += body;
            if last {
                break;
            }
        }
        self.carry = (placed == want).then_some(self.tags[lens.len()][0]);
        self.tags.truncate(self.cuts.len());
        Ok(())
    }
}

/// Reads the batch after the current one (from `SegmentReader::split`), on any thread.
pub struct ReadAhead<'a> {
    carry: Option<u8>,
    next: &'a mut Batch,
    ready: &'a mut bool,
}

impl ReadAhead<'_> {
    /// Reads the segments of full lengths `lens` that follow the current batch, from `offset`
    /// in the source on (as `advance`); the next `advance` must ask for the same lengths.
    pub fn read<E>(
        self,
        lens: &[usize],
        offset: u64,
        read_into: impl FnMut(&mut [u8]) -> std::result::Result<usize, E>,
    ) -> std::result::Result<(), E> {
        self.next.fill(self.carry, lens, offset, read_into)?;
        *self.ready = true;
        Ok(())
    }
}

impl SegmentReader {
    /// Makes the next batch the current one, reading it unless it was read ahead: the segments
    /// of full lengths `lens` (fewer when the input ends earlier; the one it ends in is flagged
    /// last, and may be short or empty). `read_into(dst)` reads up to `dst.len()` bytes into
    /// `dst` and returns how many, 0 only at the end of the input. `offset`: where in the source
    /// the batch starts (it only decides where the bytes land in memory).
    pub fn advance<E>(
        &mut self,
        lens: &[usize],
        offset: u64,
        read_into: impl FnMut(&mut [u8]) -> std::result::Result<usize, E>,
    ) -> std::result::Result<(), E> {
        if self.ready {
            assert_eq!(
                self.next.lens, lens,
                "the batch read ahead has other segments"
            );
        } else {
            self.next
                .fill(self.current.carry, lens, offset, read_into)?;
        }
        std::mem::swap(&mut self.current, &mut self.next);
        self.ready = false;
        Ok(())
    }

    /// The current batch, and a reader for the batch after it to run meanwhile (None once the
    /// current batch ends the input).
    pub fn split(&mut self) -> (&mut Batch, Option<ReadAhead<'_>>) {
        let ahead = (!self.current.ends_input()).then_some(ReadAhead {
            carry: self.current.carry,
            next: &mut self.next,
            ready: &mut self.ready,
        });
        (&mut self.current, ahead)
    }

    /// Gives up both buffers for good (something outside may still write to them) and starts
    /// afresh.
    pub fn leak_buffers(&mut self) {
        std::mem::forget(std::mem::take(&mut self.current));
        std::mem::forget(std::mem::take(&mut self.next));
        self.ready = false;
    }
}

/// A tree as read back: its name and its records (value `None` for a DELETE).
pub type Tree = (String, Vec<(Vec<u8>, Option<Vec<u8>>)>);

/// A whole backup held in memory, read and checked the way `BackupReader` reads a file: preamble,
/// key check, every tree and item, trailer. For tests and fuzzing; the binding streams instead.
pub fn read_all(file: &[u8], key: &[u8]) -> Result<(Vec<u8>, Vec<Tree>, Trailer)> {
    read_all_batched(file, key, 1, 1)
}

/// `read_all` pushing `batch` segments at a time (after the first) on `threads` threads, as the
/// binding does.
pub fn read_all_batched(
    file: &[u8],
    key: &[u8],
    batch: usize,
    threads: usize,
) -> Result<(Vec<u8>, Vec<Tree>, Trailer)> {
    let preamble = Preamble::parse(file)?;
    let mut pos = preamble.raw.len();
    let mut read = |n: usize| -> Result<Vec<u8>> {
        let end = pos.saturating_add(n).min(file.len());
        let v = file[pos..end].to_vec();
        pos = end;
        Ok(v)
    };
    let header = read(40)?;
    let mut dec = BackupDecoder::new(&preamble, key, &header)?;
    let mut feeder = SegmentFeeder::default();
    let mut feed = |dec: &mut BackupDecoder, read: &mut dyn FnMut(usize) -> Result<Vec<u8>>| {
        let want = if dec.next_segment_index() == 0 {
            1
        } else {
            batch
        };
        let mut segments = Vec::with_capacity(want);
        while segments.len() < want {
            let index = dec.next_segment_index() + segments.len() as u64;
            let now = dec.params().ciphertext_length(index);
            let next = dec.params().segment_size;
            let (segment, last) = feeder.next(now, next, &mut *read)?;
            segments.push((segment, last));
            if last {
                break;
            }
        }
        let refs: Vec<(&[u8], bool)> = segments.iter().map(|(s, l)| (&s[..], *l)).collect();
        dec.push_segments(&refs, threads)
    };
    let meta = loop {
        match dec.read_header()? {
            Step::Done(h) => break h,
            Step::NeedMore => feed(&mut dec, &mut read)?,
        }
    };
    let mut trees = Vec::new();
    loop {
        let name = match dec.next_tree()? {
            Step::NeedMore => {
                feed(&mut dec, &mut read)?;
                continue;
            }
            Step::Done(None) => break,
            Step::Done(Some(n)) => n,
        };
        let mut items = Vec::new();
        loop {
            match dec.next_item()? {
                Step::NeedMore => feed(&mut dec, &mut read)?,
                Step::Done(None) => break,
                Step::Done(Some(Item::Put(k, v))) => items.push((k.to_vec(), Some(v.to_vec()))),
                Step::Done(Some(Item::Delete(k))) => items.push((k.to_vec(), None)),
            }
        }
        trees.push((name, items));
    }
    let trailer = dec
        .trailer()
        .cloned()
        .expect("next_tree returned None: trailer is set");
    Ok((meta, trees, trailer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SegmentReader cuts and flags segments exactly like SegmentFeeder, whatever the read sizes.
    #[test]
    fn segment_reader_matches_segment_feeder() {
        let lens = |i: u64| if i == 0 { 23 } else { 30 };
        // Where segment i starts in the source (after a preamble of 5 bytes, say): it moves the
        // batches in their buffers, never what they hold.
        let offset = |i: u64| 5 + (0..i).map(lens).sum::<usize>() as u64;
        for total in 0..130usize {
            let data: Vec<u8> = (0..total as u32).map(|i| i as u8).collect();
            // Reference: SegmentFeeder, one segment at a time.
            let mut expected = Vec::new();
            let (mut feeder, mut pos, mut i) = (SegmentFeeder::default(), 0usize, 0u64);
            loop {
                let (seg, last) = feeder
                    .next(lens(i), 30, |n| -> Result<Vec<u8>> {
                        let end = (pos + n).min(data.len());
                        let v = data[pos..end].to_vec();
                        pos = end;
                        Ok(v)
                    })
                    .unwrap();
                expected.push((seg, last));
                i += 1;
                if last {
                    break;
                }
            }
            for (batch, chunk) in [(1usize, 1usize), (2, 3), (3, 100), (1, 17), (2, 40)] {
                // Every batch read when asked for, or every batch after the first read ahead
                // while the one before is handed out (as the binding does).
                for read_ahead in [false, true] {
                    let mut reader = SegmentReader::default();
                    let (mut got, mut pos, mut i) = (Vec::new(), 0usize, 0u64);
                    let mut read = |dst: &mut [u8]| -> Result<usize> {
                        let n = dst.len().min(chunk).min(data.len() - pos);
                        dst[..n].copy_from_slice(&data[pos..pos + n]);
                        pos += n;
                        Ok(n)
                    };
                    loop {
                        let want: Vec<usize> = (i..i + batch as u64).map(lens).collect();
                        reader.advance(&want, offset(i), &mut read).unwrap();
                        let (current, ahead) = reader.split();
                        let segs = current.joined();
                        assert!(!segs.is_empty());
                        let ends = segs.last().unwrap().1;
                        assert_eq!(ahead.is_none(), ends);
                        i += segs.len() as u64;
                        got.extend(segs);
                        if ends {
                            break;
                        }
                        if read_ahead {
                            let want: Vec<usize> = (i..i + batch as u64).map(lens).collect();
                            ahead.unwrap().read(&want, offset(i), &mut read).unwrap();
                        }
                    }
                    assert_eq!(
                        got, expected,
                        "total {total} batch {batch} chunk {chunk} read ahead {read_ahead}"
                    );
                }
            }
        }
    }

    #[test]
    fn parse_tail_trailer_refuses_a_tail_shorter_than_its_record() {
        // Under 4 bytes: no length to read.
        for tail in [&b""[..], b"\x00", b"\x01\x02\x03"] {
            assert!(matches!(parse_tail_trailer(tail), Err(Error::Integrity(_))));
        }
        // A declared record (length + 5) longer than the whole tail, up to the largest length.
        for declared in [0u32, 1, 100, u32::MAX - 5, u32::MAX] {
            let tail = declared.to_le_bytes();
            assert!(matches!(
                parse_tail_trailer(&tail),
                Err(Error::Integrity(_))
            ));
            let mut longer = vec![REC_TRAILER; 7];
            longer.extend_from_slice(&declared.to_le_bytes());
            if declared as usize + 5 > longer.len() {
                assert!(matches!(
                    parse_tail_trailer(&longer),
                    Err(Error::Integrity(_))
                ));
            }
        }
    }
}
