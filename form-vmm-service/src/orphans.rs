//! Instances this node runs whose member is gone: a node that was cut off long enough
//! to be judged lost comes back to find its instances replaced on other nodes, and
//! must stop them rather than serve them. An instance is an orphan when it was a
//! member once (a heartbeat of it was taken), its cluster still exists, and the
//! cluster's record has not had it as a member for [`CONFIRM_ROUNDS`] rounds in a row
//! spanning [`CONFIRM_FOR`] at least: a replica that lags, or one that restarted empty
//! (which has no cluster at all), does not get instances deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

/// Rounds in a row an instance must be found missing from its cluster.
pub const CONFIRM_ROUNDS: u32 = 3;
/// Time over which it must be found missing.
pub const CONFIRM_FOR: Duration = Duration::from_secs(5);

/// What a round learnt of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Its heartbeat was taken: it is a member.
    Member,
    /// Its cluster exists and does not have it as a member.
    NotMember,
    /// Nothing certain (no answer, no cluster, a heartbeat refused otherwise).
    Unknown,
}

/// The instances that were members, and those found missing since when.
#[derive(Debug, Default)]
pub struct Orphans {
    members: BTreeSet<String>,
    missing: BTreeMap<String, (Instant, u32)>,
}

impl Orphans {
    /// Records what a round at `now` saw of `id`; true when it is now an orphan, to be
    /// deleted.
    pub fn saw(&mut self, id: &str, seen: Seen, now: Instant) -> bool {
        match seen {
            Seen::Member => {
                self.members.insert(id.to_owned());
                self.missing.remove(id);
                false
            }
            Seen::NotMember if self.members.contains(id) => {
                let e = self.missing.entry(id.to_owned()).or_insert((now, 0));
                e.1 += 1;
                e.1 >= CONFIRM_ROUNDS && now.duration_since(e.0) >= CONFIRM_FOR
            }
            Seen::NotMember | Seen::Unknown => false,
        }
    }

    /// Whether a missing member is being confirmed (the caller asks the cluster).
    pub fn was_member(&self, id: &str) -> bool {
        self.members.contains(id)
    }

    /// Forgets `id` (deleted, or gone on its own).
    pub fn forget(&mut self, id: &str) {
        self.members.remove(id);
        self.missing.remove(id);
    }

    /// Forgets every instance but those of `live`.
    pub fn keep(&mut self, live: &BTreeSet<String>) {
        self.members.retain(|id| live.contains(id));
        self.missing.retain(|id, _| live.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_former_member_missing_long_enough_is_an_orphan() {
        let t0 = Instant::now();
        let mut o = Orphans::default();
        // Never a member (a clone not added yet): never an orphan.
        for k in 0..10 {
            assert!(!o.saw("new", Seen::NotMember, t0 + Duration::from_secs(k)));
        }
        assert!(!o.saw("a", Seen::Member, t0));
        // Missing three rounds, but within CONFIRM_FOR: not yet.
        for k in 1..=3 {
            assert!(!o.saw("a", Seen::NotMember, t0 + Duration::from_millis(200 * k)));
        }
        // Back as a member (a lagging replica): the count starts again.
        assert!(!o.saw("a", Seen::Member, t0 + Duration::from_secs(1)));
        let start = t0 + Duration::from_secs(2);
        assert!(!o.saw("a", Seen::NotMember, start));
        assert!(!o.saw("a", Seen::Unknown, start + Duration::from_secs(3)));
        assert!(!o.saw("a", Seen::NotMember, start + Duration::from_secs(4)));
        assert!(o.saw("a", Seen::NotMember, start + CONFIRM_FOR));
        o.forget("a");
        assert!(!o.was_member("a"));
    }
}
