//! One tree across a backup chain (a full backup, then incrementals, oldest first): the merged
//! state the chain describes, and the difference between that state and a database's items.
//!
//! Every member of a chain lists a tree's records in ascending key order, so merging is one
//! streaming pass with one record per member in memory; the newest member holding a key wins.
//! No I/O: records come from a `RecordSource` per member.

use crate::error::Error;

/// A tree record as a member holds it: `value` None is a DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The next record of one member's tree, `None` after its last one.
pub trait RecordSource<E> {
    fn next_record(&mut self) -> Result<Option<Record>, E>;
}

enum Head {
    Unread,
    At(Record),
    End,
}

/// The merge state of one tree: the current record of each member.
pub struct ChainMerge {
    heads: Vec<Head>,
    /// The key each member gave last, to check that its keys ascend.
    last_keys: Vec<Option<Vec<u8>>>,
    /// Members `0..stale` are older than the tree's latest whole-tree delete: what they hold
    /// no longer exists, so their keys merge as deletes.
    stale: usize,
    /// The last database key given to `diff_item`.
    last_db_key: Option<Vec<u8>>,
}

impl ChainMerge {
    pub fn new(members: usize, stale: usize) -> Self {
        ChainMerge {
            heads: (0..members).map(|_| Head::Unread).collect(),
            last_keys: vec![None; members],
            stale: stale.min(members),
            last_db_key: None,
        }
    }

    fn fill<E: From<Error>, S: RecordSource<E>>(&mut self, sources: &mut [S]) -> Result<(), E> {
        if sources.len() != self.heads.len() {
            return Err(Error::invalid("the chain's members changed during the merge").into());
        }
        for (i, head) in self.heads.iter_mut().enumerate() {
            if let Head::Unread = head {
                *head = match sources[i].next_record()? {
                    None => Head::End,
                    Some(r) => {
                        if self.last_keys[i]
                            .as_deref()
                            .is_some_and(|k| k >= &r.key[..])
                        {
                            return Err(Error::integrity(
                                "a backup of the chain does not list its keys in ascending order, \
                                 so it cannot be merged; make a new full backup",
                            )
                            .into());
                        }
                        Head::At(r)
                    }
                };
            }
        }
        Ok(())
    }

    /// The smallest key any member holds next.
    fn peek_key<E: From<Error>, S: RecordSource<E>>(
        &mut self,
        sources: &mut [S],
    ) -> Result<Option<&[u8]>, E> {
        self.fill(sources)?;
        Ok(self
            .heads
            .iter()
            .filter_map(|h| match h {
                Head::At(r) => Some(&r.key[..]),
                _ => None,
            })
            .min())
    }

    /// The next key of the merged state and its value there (None: deleted), newest member winning.
    pub fn next<E: From<Error>, S: RecordSource<E>>(
        &mut self,
        sources: &mut [S],
    ) -> Result<Option<Record>, E> {
        let Some(min) = self.peek_key(sources)?.map(<[u8]>::to_vec) else {
            return Ok(None);
        };
        let mut winner: Option<(usize, Record)> = None;
        for (i, head) in self.heads.iter_mut().enumerate() {
            if matches!(head, Head::At(r) if r.key == min) {
                let Head::At(r) = std::mem::replace(head, Head::Unread) else {
                    unreachable!()
                };
                self.last_keys[i] = Some(r.key.clone());
                winner = Some((i, r)); // members are oldest first: the last match is the newest
            }
        }
        let (member, mut record) = winner.expect("a member holds the smallest key");
        if member < self.stale {
            record.value = None;
        }
        Ok(Some(record))
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
            let ordering = match self.peek_key(sources)? {
                None => std::cmp::Ordering::Greater,
                Some(k) => k.cmp(key),
            };
            match ordering {
                std::cmp::Ordering::Greater => return emit(key, Some(value)),
                std::cmp::Ordering::Less => {
                    let r = self.next(sources)?.expect("peeked");
                    if r.value.is_some() {
                        emit(&r.key, None)?;
                    }
                }
                std::cmp::Ordering::Equal => {
                    let r = self.next(sources)?.expect("peeked");
                    if r.value.as_deref() != Some(value) {
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
        while let Some(r) = self.next(sources)? {
            if r.value.is_none() {
                continue;
            }
            emit(&r.key, None)?;
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
        fn next_record(&mut self) -> Result<Option<Record>> {
            Ok(self.0.next())
        }
    }

    fn put(k: &str, v: &str) -> Record {
        Record {
            key: k.as_bytes().to_vec(),
            value: Some(v.as_bytes().to_vec()),
        }
    }

    fn del(k: &str) -> Record {
        Record {
            key: k.as_bytes().to_vec(),
            value: None,
        }
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
        while let Some(r) = m.next(&mut src)? {
            out.push(r);
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
            out.push(Record {
                key: k.to_vec(),
                value: v.map(<[u8]>::to_vec),
            });
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
