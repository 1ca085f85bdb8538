//! Per-backend request statistics: totals as atomics, and latency percentiles and
//! request rate over a recent window (two alternating halves of [`HALF`] each, so the
//! window always covers between one and two halves).
//!
//! Latencies go into log-linear buckets (8 per power of two of microseconds: at most
//! 12.5% error), so recording is a short critical section with no allocation.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Length of one half of the window.
pub const HALF: Duration = Duration::from_secs(10);
/// Sub-buckets per power of two.
const SUB: u64 = 8;
/// Buckets: exact below 16 us, then 8 per power of two up to 2^40 us.
const BUCKETS: usize = 16 + 37 * SUB as usize;

fn bucket(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let e = 63 - u64::from(us.leading_zeros());
    let m = (us >> (e - 3)) & (SUB - 1);
    (16 + (e - 4) * SUB + m).min(BUCKETS as u64 - 1) as usize
}

/// Upper bound of a bucket, in microseconds.
fn bucket_top(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let i = i as u64 - 16;
    let e = i / SUB + 4;
    let m = i % SUB;
    ((SUB + m + 1) << (e - 3)) - 1
}

#[derive(Debug)]
struct Half {
    start: Instant,
    counts: [u32; BUCKETS],
    total: u64,
}

impl Half {
    fn new(start: Instant) -> Self {
        Self {
            start,
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

#[derive(Debug)]
struct Window {
    current: Half,
    previous: Half,
}

impl Window {
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.current.start) < HALF {
            return;
        }
        let fresh = Half::new(now);
        if now.duration_since(self.current.start) < 2 * HALF {
            self.previous = std::mem::replace(&mut self.current, fresh);
        } else {
            self.previous = Half::new(now.checked_sub(HALF).unwrap_or(now));
            self.current = fresh;
        }
    }
}

/// Statistics of one backend.
#[derive(Debug)]
pub struct Stats {
    /// Requests forwarded.
    pub requests: AtomicU64,
    /// Requests that failed (connect errors, timeouts, 5xx).
    pub errors: AtomicU64,
    window: Mutex<Window>,
}

/// A reading of the statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Requests forwarded since start.
    pub requests: u64,
    /// Failed requests since start.
    pub errors: u64,
    /// Median latency over the window, ms.
    pub p50_ms: f64,
    /// 99th percentile latency over the window, ms.
    pub p99_ms: f64,
    /// Requests per second over the window.
    pub rps: f64,
}

impl Stats {
    /// Empty statistics starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            window: Mutex::new(Window {
                current: Half::new(now),
                previous: Half::new(now.checked_sub(HALF).unwrap_or(now)),
            }),
        }
    }

    /// Records one finished request (latency to the response head).
    pub fn record(&self, latency: Duration, ok: bool, now: Instant) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let b = bucket(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.roll(now);
        w.current.counts[b] = w.current.counts[b].saturating_add(1);
        w.current.total += 1;
    }

    /// Reads totals, percentiles and rate at `now`.
    pub fn read(&self, now: Instant) -> Reading {
        let (counts, total, span) = {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            w.roll(now);
            let mut counts = [0u64; BUCKETS];
            for (i, c) in counts.iter_mut().enumerate() {
                *c = u64::from(w.current.counts[i]) + u64::from(w.previous.counts[i]);
            }
            let total = w.current.total + w.previous.total;
            (counts, total, now.duration_since(w.previous.start))
        };
        let pct = |q: f64| {
            if total == 0 {
                return 0.0;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_top(i) as f64 / 1000.0;
                }
            }
            0.0
        };
        Reading {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            rps: total as f64 / span.as_secs_f64().max(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_within_an_eighth() {
        for us in [0u64, 1, 15, 16, 17, 100, 999, 12_345, 1_000_000, 60_000_000] {
            let top = bucket_top(bucket(us));
            assert!(top >= us, "{us} -> top {top}");
            assert!(top as f64 <= us as f64 * 1.125 + 1.0, "{us} -> top {top}");
        }
    }

    #[test]
    fn percentiles_and_rate_cover_the_recent_window_only() {
        let t0 = Instant::now();
        let s = Stats::new(t0);
        for i in 0..100u64 {
            s.record(
                Duration::from_millis(if i < 98 { 1 } else { 50 }),
                i != 0,
                t0,
            );
        }
        let r = s.read(t0 + Duration::from_secs(1));
        assert_eq!((r.requests, r.errors), (100, 1));
        assert!((r.p50_ms - 1.0).abs() < 0.13, "{r:?}");
        assert!((r.p99_ms - 50.0).abs() < 6.3, "{r:?}");
        // Two halves later, the old samples are gone; totals stay.
        let r = s.read(t0 + 3 * HALF);
        assert_eq!((r.requests, r.p50_ms, r.rps), (100, 0.0, 0.0));
    }
}
