//! Smoothing of per-instance metrics: the mean of the samples of the last `span`,
//! and nothing when the newest sample is older than `stale` (a stale metric must not
//! drive a decision) or when the samples cover less than half the span (a controller
//! that just started, or an instance just seen, has too few to be a mean). Heartbeats bring a CPU sample every few seconds; deciding on the
//! mean of a minute keeps a noisy but steady load from moving the cluster.

use std::collections::VecDeque;

/// Samples of one metric of one instance.
#[derive(Debug, Clone, Default)]
pub struct MetricWindow {
    samples: VecDeque<(u64, f64)>,
}

impl MetricWindow {
    /// Adds a sample taken at `at_ms`; forgets samples older than `span_ms` before it.
    pub fn push(&mut self, at_ms: u64, value: f64, span_ms: u64) {
        if !value.is_finite() {
            return;
        }
        if self.samples.back().is_some_and(|(t, _)| *t >= at_ms) {
            return;
        }
        self.samples.push_back((at_ms, value));
        let from = at_ms.saturating_sub(span_ms);
        while self.samples.front().is_some_and(|(t, _)| *t < from) {
            self.samples.pop_front();
        }
    }

    /// The mean over the last `span_ms` at `now_ms`, if the newest sample is at most
    /// `stale_ms` old and the samples span at least half of `span_ms`.
    pub fn mean(&self, now_ms: u64, span_ms: u64, stale_ms: u64) -> Option<f64> {
        let (newest, _) = self.samples.back()?;
        let (oldest, _) = self.samples.front()?;
        if now_ms.saturating_sub(*newest) > stale_ms || newest - oldest < span_ms / 2 {
            return None;
        }
        let from = now_ms.saturating_sub(span_ms);
        let (sum, n) = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= from)
            .fold((0.0, 0u32), |(s, n), (_, v)| (s + v, n + 1));
        (n > 0).then(|| sum / f64::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_covers_the_span_and_stale_windows_say_nothing() {
        let mut w = MetricWindow::default();
        for s in 0..120u64 {
            w.push(s * 1000, if s < 60 { 0.2 } else { 0.8 }, 60_000);
        }
        let m = w.mean(119_000, 60_000, 10_000).expect("fresh");
        assert!((m - 0.8).abs() < 0.02, "{m}");
        assert_eq!(w.mean(200_000, 60_000, 10_000), None, "stale");
        let mut young = MetricWindow::default();
        young.push(1000, 0.9, 60_000);
        young.push(2000, 0.9, 60_000);
        assert_eq!(
            young.mean(2000, 60_000, 10_000),
            None,
            "2 s of a 60 s window"
        );
        w.push(119_000, 5.0, 60_000);
        assert!(
            (w.mean(119_000, 60_000, 10_000).expect("fresh") - m).abs() < 1e-9,
            "out-of-order sample ignored"
        );
    }
}
