//! How long each write takes to reach every replica (simulated ms), measured where it
//! is applied: per origin actor, the writes in counter order; per (replica, origin) a
//! cursor that moves past the writes the replica's version vector covers.

use std::collections::BTreeMap;

/// Convergence latencies of the writes of a run.
#[derive(Debug, Default)]
pub struct Track {
    replicas: usize,
    /// Origin actor -> (counter, made at, replicas reached).
    writes: BTreeMap<String, Vec<(u64, u64, usize)>>,
    cursor: BTreeMap<(usize, String), usize>,
    /// Write-to-everywhere latencies, ms.
    pub latencies: Vec<u64>,
}

impl Track {
    /// A tracker for `replicas` replicas.
    pub fn new(replicas: usize) -> Self {
        Self {
            replicas,
            ..Self::default()
        }
    }

    /// A write with dot `(origin, counter)` made at `now`.
    pub fn made(&mut self, origin: &str, counter: u64, now: u64) {
        self.writes
            .entry(origin.to_owned())
            .or_default()
            .push((counter, now, 0));
    }

    /// Replica `node` now has `version`.
    pub fn reached(&mut self, node: usize, version: &BTreeMap<String, u64>, now: u64) {
        for (origin, have) in version {
            let Some(list) = self.writes.get_mut(origin) else {
                continue;
            };
            let c = self.cursor.entry((node, origin.clone())).or_insert(0);
            while *c < list.len() && list[*c].0 <= *have {
                list[*c].2 += 1;
                if list[*c].2 == self.replicas {
                    self.latencies.push(now - list[*c].1);
                }
                *c += 1;
            }
        }
    }

    /// `origin` restarted with `version`: its writes past it were never durable and
    /// their counters will be used again.
    pub fn forget_after(&mut self, origin: &str, counter: u64) {
        if let Some(list) = self.writes.get_mut(origin) {
            list.retain(|w| w.0 <= counter);
            let n = list.len();
            for ((_, o), c) in self.cursor.iter_mut() {
                if o == origin {
                    *c = (*c).min(n);
                }
            }
        }
    }

    /// The `q` quantile of the latencies (0 when none).
    pub fn quantile(&self, q: f64) -> u64 {
        quantile(&self.latencies, q)
    }
}

/// The `q` quantile of `v` (0 when empty).
pub fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    s[((s.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_counts_once_every_replica_has_it() {
        let mut t = Track::new(2);
        t.made("a", 1, 10);
        t.made("a", 2, 20);
        let v = |n| BTreeMap::from([("a".to_owned(), n)]);
        t.reached(0, &v(2), 20);
        t.reached(1, &v(1), 50);
        assert_eq!(t.latencies, vec![40]);
        t.reached(1, &v(2), 70);
        assert_eq!(t.latencies, vec![40, 50]);
        assert_eq!(quantile(&t.latencies, 0.99), 50);
    }
}
