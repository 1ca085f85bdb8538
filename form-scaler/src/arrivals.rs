//! Heartbeats judged by when this controller saw them, not by the clock that stamped
//! them. A node stamps its heartbeats (and its instances') with its own clock; a
//! controller that compared those stamps with its own clock would find a node whose
//! clock runs behind silent, lost, and its instances unhealthy, while it heartbeats
//! every second. So a heartbeat counts from the moment this controller first saw its
//! stamp grow, on the controller's clock: only a stamp that stops growing makes a
//! node or an instance silent. A lower stamp than one seen (a lagging replica read)
//! is not a heartbeat.
//!
//! The first stamp seen of an id says nothing of its age (its clock may be off by any
//! amount), so it counts from what the caller knows: a node's from now (a node that
//! died before this controller started is found lost one node timeout after the
//! controller first read its record), a member's from the heartbeats the previous
//! judge recorded it had skipped (`Member.heartbeats_skipped`, counted on a
//! controller's clock), so a member found silent before a restart or a handover stays
//! silent. The stamps are seen when they are read: node records once per evaluation
//! round (or an operation's read), members at every evaluation round, so silence is
//! measured up to one round short.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Per id, the latest stamp seen and when it was first seen (controller's clock, ms).
#[derive(Debug, Default)]
pub struct Arrivals(Mutex<HashMap<String, (u64, u64)>>);

/// The arrivals, locked for a batch of lookups.
#[derive(Debug)]
pub struct Seen<'a>(MutexGuard<'a, HashMap<String, (u64, u64)>>);

impl Arrivals {
    /// Locks the arrivals for a batch of [`Seen::heard`] lookups.
    pub fn lock(&self) -> Seen<'_> {
        Seen(self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forgets the ids `keep` does not keep (ids gone from form-state).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().0.retain(|id, _| keep(id));
    }
}

impl Seen<'_> {
    /// When, on this controller's clock (`now_ms`), the heartbeat of `id` stamped
    /// `stamp` counts as heard: when this controller first saw a stamp this high; for
    /// the first stamp seen of `id`, `first_ms` (no later than now). A stamp of 0
    /// (never heard from) stays 0.
    pub fn heard(&mut self, id: &str, stamp: u64, now_ms: u64, first_ms: u64) -> u64 {
        if stamp == 0 {
            return 0;
        }
        match self.0.get_mut(id) {
            Some((seen, at)) => {
                if stamp > *seen {
                    *seen = stamp;
                    *at = now_ms;
                }
                *at
            }
            None => {
                let at = first_ms.min(now_ms);
                self.0.insert(id.to_owned(), (stamp, at));
                at
            }
        }
    }

    /// When the latest heartbeat of `id` counted as heard, as [`Self::heard`] last
    /// set it; 0 for an id not seen (or never heard from).
    pub fn at(&self, id: &str) -> u64 {
        self.0.get(id).map_or(0, |(_, at)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_behind_does_not_make_a_heartbeating_node_silent() {
        let a = Arrivals::default();
        // The node's clock is 60 s behind the controller's; it heartbeats every second.
        let behind = 60_000;
        let mut now = 1_000_000;
        // First sight: from what the caller says (here now), whatever the stamp says.
        assert_eq!(a.lock().heard("n1", now - behind, now, now), now);
        for _ in 0..5 {
            now += 1000;
            let heard = a.lock().heard("n1", now - behind, now, now);
            assert_eq!(heard, now, "a grown stamp counts from when it was seen");
        }
        // It stops: silence grows on the controller's clock from the last change.
        let last = now - behind;
        now += 20_000;
        assert_eq!(now - a.lock().heard("n1", last, now, now), 20_000);
        // A lower stamp (a lagging replica's) is no heartbeat.
        assert_eq!(now - a.lock().heard("n1", last - 5000, now, now), 20_000);
    }

    #[test]
    fn first_sight_counts_from_what_the_caller_knows_and_zero_is_never_heard() {
        let a = Arrivals::default();
        let mut seen = a.lock();
        assert_eq!(
            seen.heard("old", 10_000, 50_000, 50_000),
            50_000,
            "a clock behind"
        );
        assert_eq!(
            seen.heard("ahead", 90_000, 50_000, 50_000),
            50_000,
            "a clock ahead"
        );
        // A member recorded as silent for 7 intervals by the judge before.
        assert_eq!(seen.heard("silent", 10_000, 50_000, 43_000), 43_000);
        assert_eq!(
            seen.heard("future", 10_000, 50_000, 60_000),
            50_000,
            "no later than now"
        );
        assert_eq!(seen.heard("new", 0, 50_000, 50_000), 0);
        assert_eq!((seen.at("new"), seen.at("silent")), (0, 43_000));
        assert_eq!(
            seen.heard("old", 10_000, 70_000, 70_000),
            50_000,
            "unchanged: as first seen"
        );
        drop(seen);
        a.retain(|id| id != "old");
        assert_eq!(
            a.lock().heard("old", 10_000, 80_000, 80_000),
            80_000,
            "forgotten: first sight again"
        );
    }
}
