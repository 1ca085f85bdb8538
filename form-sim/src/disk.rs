//! A replica's disk in the simulation: the write-ahead log's records in order, of
//! which a prefix is synced. A sync takes the disk's latency and covers every record
//! appended before it started (group commit, as the real log writer does). A crash
//! keeps the synced prefix and a random part of the rest (the kernel may have written
//! some of it), never a record without the ones before it.

use std::sync::Arc;

use form_state::crdt::State;
use form_state::envelope::VerifiedDelta;
use form_state::replica::Replica;

/// One record of the log.
#[derive(Debug, Clone)]
pub enum Record {
    /// An applied delta (a local write or a peer's).
    Delta(Arc<VerifiedDelta>),
    /// A joined full state.
    Full(Arc<State>),
}

/// The disk of one replica.
#[derive(Debug, Default)]
pub struct Disk {
    /// Records with the replica's lsn after each.
    records: Vec<(Record, u64)>,
    synced: usize,
    /// Records a sync in progress covers.
    syncing: Option<usize>,
}

impl Disk {
    /// Appends a record written at `lsn`.
    pub fn append(&mut self, record: Record, lsn: u64) {
        self.records.push((record, lsn));
    }

    /// Starts a sync of everything appended so far, unless one runs or nothing is new;
    /// returns the record count it covers.
    pub fn start_sync(&mut self) -> Option<usize> {
        if self.syncing.is_some() || self.synced == self.records.len() {
            return None;
        }
        self.syncing = Some(self.records.len());
        self.syncing
    }

    /// The sync of `upto` records finished: the lsn now durable.
    pub fn finish_sync(&mut self, upto: usize) -> u64 {
        self.syncing = None;
        self.synced = self.synced.max(upto.min(self.records.len()));
        self.durable_lsn()
    }

    /// The lsn of the last synced record.
    pub fn durable_lsn(&self) -> u64 {
        self.synced.checked_sub(1).map_or(0, |i| self.records[i].1)
    }

    /// A crash: keeps the synced records and `extra` more of the unsynced ones.
    pub fn crash(&mut self, extra: usize) {
        let keep = (self.synced + extra).min(self.records.len());
        self.records.truncate(keep);
        self.synced = keep;
        self.syncing = None;
    }

    /// Records not yet synced.
    pub fn unsynced(&self) -> usize {
        self.records.len() - self.synced
    }

    /// The replica as a restart recovers it: its records replayed in order, all durable.
    /// The lsns of the records are those of the new run.
    pub fn recover(&mut self, mut replica: Replica) -> Replica {
        for (record, lsn) in &mut self.records {
            match record {
                Record::Delta(d) => {
                    replica.receive(vec![(**d).clone()]);
                }
                Record::Full(s) => {
                    replica.merge_state(s);
                }
            }
            *lsn = replica.lsn();
        }
        let lsn = replica.lsn();
        replica.mark_durable(lsn);
        replica
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_the_synced_prefix_and_some_of_the_rest() {
        let mut d = Disk::default();
        let s = Arc::new(State::default());
        for lsn in 1..=5 {
            d.append(Record::Full(s.clone()), lsn);
        }
        assert_eq!(d.start_sync(), Some(5));
        assert_eq!(d.start_sync(), None, "one sync at a time");
        d.append(Record::Full(s.clone()), 6);
        assert_eq!(d.finish_sync(5), 5);
        assert_eq!(d.unsynced(), 1);
        d.append(Record::Full(s), 7);
        d.crash(1);
        assert_eq!(d.unsynced(), 0);
        assert_eq!(d.durable_lsn(), 6);
    }
}
