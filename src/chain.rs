//! One tree across a backup chain (a full backup, then incrementals, oldest first): the merged
//! state the chain describes, and the difference between that state and a database's items.
//!
//! Every member of a chain lists a tree's records in ascending key order, so merging is one
//! streaming pass with one record per member in memory; the newest member holding a key wins.
//! No I/O: records come from a `RecordSource` per member.

use crate::error::Error;

/// A tree record as a member holds it: `put` false is a DELETE (and `value` is empty). The
/// merge reuses these buffers, so reading a chain allocates nothing per record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub put: bool,
}

impl Record {
    /// Replaces the contents, keeping the buffers.
    pub fn set(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.key.clear();
        self.key.extend_from_slice(key);
        self.value.clear();
        if let Some(v) = value {
            self.value.extend_from_slice(v);
        }
        self.put = value.is_some();
    }
}

/// A key of the merged state and its value there (None: deleted), borrowed from the merge.
pub type Merged<'a> = (&'a [u8], Option<&'a [u8]>);

/// The records of one member's tree, in order.
pub trait RecordSource<E> {
    /// Fills `into` with the next record; false after the last one.
    fn next_record(&mut self, into: &mut Record) -> Result<bool, E>;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    Unread,
    At,
    End,
}

/// The merge state of one tree: the current record of each member.
pub struct ChainMerge {
    heads: Vec<Head>,
    records: Vec<Record>,
    /// The key each member gave last, to check that its keys ascend; `started` once it gave one.
    last_keys: Vec<Vec<u8>>,
    started: Vec<bool>,
    /// Members `0..stale` are older than the tree's latest whole-tree delete: what they hold
    /// no longer exists, so their keys merge as deletes.
    stale: usize,
    /// The last database key given to `diff_item`.
    last_db_key: Option<Vec<u8>>,
}

impl ChainMerge {
    pub fn new(members: usize, stale: usize) -> Self {
        ChainMerge {
            heads: vec![Head::Unread; members],
            records: vec![Record::default(); members],
            last_keys: vec![Vec::new(); members],
            started: vec![false; members],
            stale: stale.min(members),
            last_db_key: None,
        }
    }

    /// Reads the next record of every member whose record was taken, then returns the member
    /// holding the smallest key (the newest one where several do), if any.
    fn fill<E: From<Error>, S: RecordSource<E>>(
        &mut self,
        sources: &mut [S],
    ) -> Result<Option<usize>, E> {
        if sources.len() != self.heads.len() {
            return Err(Error::invalid("the chain's members changed during the merge").into());
        }
        let mut min: Option<usize> = None;
        for (i, source) in sources.iter_mut().enumerate() {
            if self.heads[i] == Head::Unread {
                let record = &mut self.records[i];
                // The taken key becomes the member's last key (its buffer is swapped, not copied).
                let last = &mut self.last_keys[i];
                std::mem::swap(last, &mut record.key);
                self.heads[i] = if source.next_record(record)? {
                    if self.started[i] && last[..] >= record.key[..] {
                        return Err(Error::integrity(
                            "a backup of the chain does not list its keys in ascending order, \
                             so it cannot be merged; make a new full backup",
                        )
                        .into());
                    }
                    self.started[i] = true;
                    Head::At
                } else {
                    Head::End
                };
            }
            if self.heads[i] == Head::At
                && min.map_or(true, |m| self.records[i].key <= self.records[m].key)
            {
                min = Some(i); // members are oldest first: on a tie the later one wins
            }
        }
        Ok(min)
    }

    /// Takes the record of `winner` and every member at the same key; true if the key exists in
    /// the merged state (the newest member holds a PUT and is not stale).
    fn take(&mut self, winner: usize) -> bool {
        for i in 0..self.heads.len() {
            if self.heads[i] == Head::At && self.records[i].key == self.records[winner].key {
                self.heads[i] = Head::Unread;
            }
        }
        self.records[winner].put && winner >= self.stale
    }

    /// The next key of the merged state and its value there (None: deleted), newest member
    /// winning. The slices are valid until the next call.
    pub fn next<E: From<Error>, S: RecordSource<E>>(
        &mut self,
        sources: &mut [S],
    ) -> Result<Option<Merged<'_>>, E> {
        let Some(w) = self.fill(sources)? else {
            return Ok(None);
        };
        let live = self.take(w);
        let r = &self.records[w];
        Ok(Some((&r.key, live.then_some(&r.value[..]))))
    }

    /// Compares the database's next item with the chain's state and emits the records that turn
    /// the state into the database: DELETE for keys the chain holds below `key` that the
    /// database lacks, PUT for `key` unless the chain holds the same value. Items must come in
    /// strictly ascending key order.
    pub fn diff_item<E: From<Error>, S: RecordSource<E>>(
        &mut self,
        sources: &mut [S],
        key: &[u8],
        value: &[u8],
        emit: &mut impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(last) = &mut self.last_db_key {
            if &last[..] >= key {
                return Err(Error::invalid(
                    "database items must come in strictly ascending key order",
                )
                .into());
            }
            last.clear();
            last.extend_from_slice(key);
        } else {
            self.last_db_key = Some(key.to_vec());
        }
        loop {
            let Some(w) = self.fill(sources)? else {
                return emit(key, Some(value));
            };
            match self.records[w].key[..].cmp(key) {
                std::cmp::Ordering::Greater => return emit(key, Some(value)),
                std::cmp::Ordering::Less => {
                    if self.take(w) {
                        emit(&self.records[w].key, None)?;
                    }
                }
                std::cmp::Ordering::Equal => {
                    if !(self.take(w) && self.records[w].value == value) {
                        emit(key, Some(value))?;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// After the database's last item: DELETE for every key the chain still holds.
    pub fn finish_diff<E: From<Error>, S: RecordSource<E>>(
        &mut self,
        sources: &mut [S],
        emit: &mut impl FnMut(&[u8], Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some((key, value)) = self.next(sources)? {
            if value.is_some() {
                emit(key, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;

    struct VecSource(std::vec::IntoIter<Record>);

    impl RecordSource<Error> for VecSource {
        fn next_record(&mut self, into: &mut Record) -> Result<bool> {
            Ok(self.0.next().map(|r| *into = r).is_some())
        }
    }

    fn put(k: &str, v: &str) -> Record {
        let mut r = Record::default();
        r.set(k.as_bytes(), Some(v.as_bytes()));
        r
    }

    fn del(k: &str) -> Record {
        let mut r = Record::default();
        r.set(k.as_bytes(), None);
        r
    }

    fn owned(key: &[u8], value: Option<&[u8]>) -> Record {
        let mut r = Record::default();
        r.set(key, value);
        r
    }

    fn sources(members: Vec<Vec<Record>>) -> Vec<VecSource> {
        members
            .into_iter()
            .map(|m| VecSource(m.into_iter()))
            .collect()
    }

    fn merged(members: Vec<Vec<Record>>, stale: usize) -> Result<Vec<Record>> {
        let mut src = sources(members);
        let mut m = ChainMerge::new(src.len(), stale);
        let mut out = Vec::new();
        while let Some((k, v)) = m.next(&mut src)? {
            out.push(owned(k, v));
        }
        Ok(out)
    }

    #[test]
    fn newest_member_wins() {
        let full = vec![put("a", "1"), put("b", "1"), put("c", "1")];
        let incr = vec![del("a"), put("b", "2"), put("d", "2")];
        assert_eq!(
            merged(vec![full, incr], 0).unwrap(),
            vec![del("a"), put("b", "2"), put("c", "1"), put("d", "2")]
        );
    }

    #[test]
    fn stale_members_merge_as_deletes() {
        let old = vec![put("a", "1"), put("b", "1")];
        let recreated = vec![put("b", "2")];
        assert_eq!(
            merged(vec![old, recreated], 1).unwrap(),
            vec![del("a"), put("b", "2")]
        );
    }

    #[test]
    fn keys_out_of_order_are_an_integrity_error() {
        let bad = vec![put("b", "1"), put("a", "1")];
        assert!(matches!(merged(vec![bad], 0), Err(Error::Integrity(_))));
    }

    fn diff(members: Vec<Vec<Record>>, db: &[(&str, &str)]) -> Result<Vec<Record>> {
        let mut src = sources(members);
        let mut m = ChainMerge::new(src.len(), 0);
        let mut out = Vec::new();
        let mut emit = |k: &[u8], v: Option<&[u8]>| -> Result<()> {
            out.push(owned(k, v));
            Ok(())
        };
        for (k, v) in db {
            m.diff_item(&mut src, k.as_bytes(), v.as_bytes(), &mut emit)?;
        }
        m.finish_diff(&mut src, &mut emit)?;
        Ok(out)
    }

    #[test]
    fn diff_emits_only_changes_in_key_order() {
        let full = vec![put("a", "1"), put("b", "1"), put("c", "1"), put("e", "1")];
        let incr = vec![del("c")];
        let db = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")];
        assert_eq!(
            diff(vec![full, incr], &db).unwrap(),
            vec![put("b", "2"), put("c", "3"), put("d", "4"), del("e")]
        );
    }

    #[test]
    fn diff_of_an_unchanged_database_is_empty() {
        let full = vec![put("a", "1"), put("b", "1")];
        assert!(diff(vec![full], &[("a", "1"), ("b", "1")])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn diff_refuses_unsorted_database_items() {
        assert!(matches!(
            diff(vec![vec![]], &[("b", "1"), ("a", "1")]),
            Err(Error::InvalidArgument(_))
        ));
    }
}
