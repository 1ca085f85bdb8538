//! Heartbeats judged by when this controller saw them, not by the clock that stamped
//! them. A node stamps its heartbeats (and its instances') with its own clock; a
//! controller that compared those stamps with its own clock would find a node whose
//! clock runs behind silent, lost, and its instances unhealthy, while it heartbeats
//! every second. So a heartbeat counts from the moment this controller first saw its
//! stamp change, on the controller's clock: only a stamp that stops changing makes
//! a node or an instance silent.
//!
//! The first stamp seen of an id (at the controller's start, or when the id appears)
//! counts as heard then: its clock may be off by any amount, so its age says nothing.
//! A node that died before this controller started is therefore found lost one node
//! timeout after the controller first saw its record, not earlier. A stamp is seen
//! when it is read (an evaluation round, a read of the node records), so silence is
//! measured up to one read interval short.

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
    /// `stamp` counts as heard: when this controller first saw that stamp (the first
    /// stamp seen of `id` included). A stamp of 0 (never heard from) stays 0.
    pub fn heard(&mut self, id: &str, stamp: u64, now_ms: u64) -> u64 {
        if stamp == 0 {
            return 0;
        }
        match self.0.get_mut(id) {
            Some((seen, at)) => {
                if *seen != stamp {
                    *seen = stamp;
                    *at = now_ms;
                }
                *at
            }
            None => {
                self.0.insert(id.to_owned(), (stamp, now_ms));
                now_ms
            }
        }
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
        // First sight: heard now, whatever the stamp says.
        assert_eq!(a.lock().heard("n1", now - behind, now), now);
        for _ in 0..5 {
            now += 1000;
            let heard = a.lock().heard("n1", now - behind, now);
            assert_eq!(heard, now, "a changed stamp counts from when it was seen");
        }
        // It stops: silence grows on the controller's clock from the last change.
        let last = now - behind;
        now += 20_000;
        assert_eq!(now - a.lock().heard("n1", last, now), 20_000);
    }

    #[test]
    fn first_sight_counts_from_now_and_zero_is_never_heard() {
        let a = Arrivals::default();
        let mut seen = a.lock();
        assert_eq!(seen.heard("old", 10_000, 50_000), 50_000, "a clock behind");
        assert_eq!(seen.heard("ahead", 90_000, 50_000), 50_000, "a clock ahead");
        assert_eq!(seen.heard("new", 0, 50_000), 0);
        assert_eq!(
            seen.heard("old", 10_000, 70_000),
            50_000,
            "unchanged: as first seen"
        );
        drop(seen);
        a.retain(|id| id != "old");
        assert_eq!(
            a.lock().heard("old", 10_000, 80_000),
            80_000,
            "forgotten: first sight again"
        );
    }
}
