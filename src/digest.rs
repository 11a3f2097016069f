//! Keyed BLAKE3 tree and stream digests, and the per-tree tallies (docs/FORMAT.md §3-4).
//!
//! Writer and reader both hash plaintext lazily in large ranges (`Digests::absorb`) rather than
//! record by record, so BLAKE3's SIMD paths see big inputs.

use crate::error::{Error, Result};
use crate::format::{frame_delete, frame_put, PutBatch, TreeSummary, DIGEST_LENGTH};

pub struct Digests {
    key: [u8; DIGEST_LENGTH],
    stream: blake3::Hasher,
    tree: Option<blake3::Hasher>,
}

impl Digests {
    pub fn new(digest_key: &[u8; DIGEST_LENGTH]) -> Self {
        Digests {
            key: *digest_key,
            stream: blake3::Hasher::new_keyed(digest_key),
            tree: None,
        }
    }

    /// Hashes bytes of the current region: a tree's records into its tree digest, everything
    /// else (HEADER, TREE_BEGIN, TREE_END) into the stream digest. Each byte is hashed once; the
    /// stream digest covers the records through the tree digests in the TREE_END records.
    pub fn absorb(&mut self, bytes: &[u8]) {
        match self.tree.as_mut() {
            Some(t) => t.update(bytes),
            None => self.stream.update(bytes),
        };
    }

    pub fn open_tree(&mut self) {
        self.tree = Some(blake3::Hasher::new_keyed(&self.key));
    }

    pub fn close_tree(&mut self) -> [u8; DIGEST_LENGTH] {
        self.tree
            .take()
            .map(|t| *t.finalize().as_bytes())
            .unwrap_or_default()
    }

    pub fn stream_digest(&self) -> [u8; DIGEST_LENGTH] {
        *self.stream.finalize().as_bytes()
    }
}

impl Drop for Digests {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// Item and byte counts of one tree, overflow-checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub items: u64,
    pub bytes: u64,
}

impl Tally {
    pub fn add(&mut self, key_len: usize, value_len: usize) -> Result<()> {
        // Each length is a slice's (at most isize::MAX) or a framed one (a u32, checked before
        // this is called): their sum fits in 64 bits.
        self.add_many(1, key_len as u64 + value_len as u64)
    }

    /// `items` records of `bytes` bytes of keys and values in all.
    pub fn add_many(&mut self, items: u64, bytes: u64) -> Result<()> {
        let overflow = || Error::integrity("item or byte count overflows 64 bits");
        self.items = self.items.checked_add(items).ok_or_else(overflow)?;
        self.bytes = self.bytes.checked_add(bytes).ok_or_else(overflow)?;
        Ok(())
    }

    pub fn summary(&self, name: String, digest: [u8; DIGEST_LENGTH]) -> TreeSummary {
        TreeSummary {
            name,
            item_count: self.items,
            byte_count: self.bytes,
            digest,
        }
    }
}

/// Digest of records given one by one, as a TREE_END of a tree holding them would carry.
/// Used after a restore to compare the database with the backup.
pub struct ItemDigester {
    digests: Digests,
    buf: Vec<u8>,
    tally: Tally,
}

const DIGESTER_BUFFER: usize = 256 * 1024;

impl ItemDigester {
    pub fn new(digest_key: &[u8; DIGEST_LENGTH]) -> Self {
        let mut digests = Digests::new(digest_key);
        digests.open_tree();
        ItemDigester {
            digests,
            buf: Vec::with_capacity(DIGESTER_BUFFER),
            tally: Tally::default(),
        }
    }

    /// `value = None` is a DELETE record.
    pub fn add(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        match value {
            Some(v) => {
                frame_put(&mut self.buf, key, v)?;
                self.tally.add(key.len(), v.len())?;
            }
            None => {
                frame_delete(&mut self.buf, key)?;
                self.tally.add(key.len(), 0)?;
            }
        }
        if self.buf.len() >= DIGESTER_BUFFER {
            self.digests.absorb(&self.buf);
            self.buf.clear();
        }
        Ok(())
    }

    /// The batch's records, as `add` of each would: its framed bytes are hashed as they are.
    pub fn add_batch(&mut self, batch: &PutBatch) -> Result<()> {
        let (framed, bytes) = batch.framed(0, batch.len());
        self.tally.add_many(batch.len() as u64, bytes)?;
        self.digests.absorb(&self.buf);
        self.buf.clear();
        self.digests.absorb(framed);
        Ok(())
    }

    pub fn finish(mut self) -> (Tally, [u8; DIGEST_LENGTH]) {
        self.digests.absorb(&self.buf);
        (self.tally, self.digests.close_tree())
    }
}
