//! Idle upstream connections by backend, as both paths' pools keep them: the newest
//! is reused first, none is kept longer than [`IDLE`], and every backend's list (those
//! of backends no longer in any route too) is swept at most once an [`IDLE`], by the
//! pool's next use or by its data-plane thread's timer, so nothing is left behind for
//! a backend that is gone, even on a thread that gets no more requests.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use http::uri::Authority;

use crate::balance::KeyHash;

/// Idle connections are kept this long: less than the shortest keep-alive timeout
/// backends commonly have (Node.js closes after 5 s), so the balancer rarely picks one
/// the backend is closing.
pub const IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per backend.
const MAX_IDLE: usize = 512;

/// Idle connections `C` by backend, with when each became idle.
#[derive(Debug)]
pub struct IdleLists<C> {
    by_backend: HashMap<Authority, VecDeque<(C, Instant)>, KeyHash>,
    swept: Option<Instant>,
}

impl<C> Default for IdleLists<C> {
    fn default() -> Self {
        Self {
            by_backend: HashMap::default(),
            swept: None,
        }
    }
}

impl<C> IdleLists<C> {
    /// The newest connection to `to` idle for less than [`IDLE`] that `usable` accepts
    /// (`Some(true)`); those it rejects (`None`) are dropped, those it skips for now
    /// (`Some(false)`) stay, in their order.
    pub fn pop(&mut self, to: &Authority, mut usable: impl FnMut(&C) -> Option<bool>) -> Option<C> {
        let now = Instant::now();
        self.sweep(now);
        let list = self.by_backend.get_mut(to)?;
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some((c, since)) = list.pop_back() {
            if now - since >= IDLE {
                continue;
            }
            match usable(&c) {
                Some(true) => {
                    found = Some(c);
                    break;
                }
                Some(false) => skipped.push((c, since)),
                None => {}
            }
        }
        list.extend(skipped.into_iter().rev());
        found
    }

    /// Keeps `c` for the next request to `to` (unless `MAX_IDLE` are kept already).
    pub fn put(&mut self, to: &Authority, c: C) {
        let now = Instant::now();
        self.sweep(now);
        let list = self.by_backend.entry(to.clone()).or_default();
        expire(list, now);
        if list.len() < MAX_IDLE {
            list.push_back((c, now));
        }
    }

    /// Drops every list's expired connections, and the lists left empty, now.
    pub fn sweep_expired(&mut self) {
        self.sweep_now(Instant::now());
    }

    /// Drops every list's expired connections, and the lists left empty, once an
    /// [`IDLE`] at most.
    fn sweep(&mut self, now: Instant) {
        if self.swept.is_none_or(|t| now - t >= IDLE) {
            self.sweep_now(now);
        }
    }

    fn sweep_now(&mut self, now: Instant) {
        self.swept = Some(now);
        self.by_backend.retain(|_, list| {
            expire(list, now);
            !list.is_empty()
        });
    }

    /// Backends with idle connections kept.
    #[cfg(test)]
    pub fn backends(&self) -> usize {
        self.by_backend.len()
    }
}

/// Drops the connections idle for too long (the oldest are in front).
fn expire<C>(list: &mut VecDeque<(C, Instant)>, now: Instant) {
    while list.front().is_some_and(|(_, since)| now - *since >= IDLE) {
        list.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(s: &str) -> Authority {
        s.parse().expect("authority")
    }

    #[test]
    fn newest_first_skipped_ones_stay_rejected_ones_go() {
        let mut idle = IdleLists::default();
        let a = authority("10.0.0.1:80");
        for n in 1..=4 {
            idle.put(&a, n);
        }
        // 4 is busy for now, 3 is closed: 2 is the one.
        let got = idle.pop(&a, |n| match n {
            4 => Some(false),
            3 => None,
            _ => Some(true),
        });
        assert_eq!(got, Some(2));
        assert_eq!(idle.pop(&a, |_| Some(true)), Some(4), "the busy one stayed");
        assert_eq!(idle.pop(&a, |_| Some(true)), Some(1));
        assert_eq!(idle.pop(&a, |_| Some(true)), None);
        assert_eq!(idle.pop(&authority("10.0.0.2:80"), |_| Some(true)), None);
    }

    #[test]
    fn expired_connections_and_gone_backends_are_swept() {
        let mut idle = IdleLists::default();
        let (gone, used) = (authority("10.0.0.1:80"), authority("10.0.0.2:80"));
        idle.put(&gone, 1);
        assert_eq!(idle.backends(), 1);
        // Age every entry and the last sweep past IDLE.
        let old = Instant::now() - IDLE - Duration::from_millis(1);
        for list in idle.by_backend.values_mut() {
            for (_, since) in list.iter_mut() {
                *since = old;
            }
        }
        assert_eq!(idle.pop(&gone, |_| Some(true)), None, "expired");
        idle.put(&gone, 2);
        idle.by_backend
            .values_mut()
            .for_each(|l| l.iter_mut().for_each(|e| e.1 = old));
        idle.swept = Some(old);
        idle.put(&used, 3);
        assert_eq!(idle.backends(), 1, "the backend no longer used left");
        assert_eq!(idle.pop(&used, |_| Some(true)), Some(3));
        // Taking connections sweeps too.
        idle.put(&gone, 4);
        idle.by_backend
            .values_mut()
            .for_each(|l| l.iter_mut().for_each(|e| e.1 = old));
        idle.swept = Some(old);
        assert_eq!(idle.pop(&used, |_| Some(true)), None);
        assert_eq!(idle.backends(), 0, "swept by a pop");
    }
}
