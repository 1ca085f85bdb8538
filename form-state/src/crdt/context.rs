//! Causal contexts: which dots a replica has seen, as a version vector (every counter
//! up to `vv[replica]`, a `crdts::VClock`) plus a cloud of dots seen out of order.

use std::collections::{BTreeMap, BTreeSet};

use crdts::{CmRDT, CvRDT, VClock};
use serde::{Deserialize, Serialize};

/// A write's unique identity: the replica that made it and that replica's counter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// Replica id.
    pub actor: String,
    /// Per-replica counter, from 1.
    pub counter: u64,
}

impl Dot {
    /// The dot `(actor, counter)`.
    pub fn new(actor: impl Into<String>, counter: u64) -> Self {
        Self {
            actor: actor.into(),
            counter,
        }
    }
}

/// The set of dots a state has seen. Laws: `join` is commutative, associative and
/// idempotent; `contains` is monotone under `join`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalContext {
    vv: VClock<String>,
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// Whether `dot` has been seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.vv.get(&dot.actor) || self.cloud.contains(dot)
    }

    /// The highest counter of `actor` below which every dot has been seen.
    pub fn max_contiguous(&self, actor: &str) -> u64 {
        self.vv.get(&actor.to_owned())
    }

    /// The version vector (contiguous part): replica -> counter.
    pub fn version_vector(&self) -> &BTreeMap<String, u64> {
        &self.vv.dots
    }

    /// Dots seen out of order (not yet contiguous).
    pub fn cloud(&self) -> &BTreeSet<Dot> {
        &self.cloud
    }

    /// Adds one dot.
    pub fn insert(&mut self, dot: Dot) {
        let n = self.vv.get(&dot.actor);
        if dot.counter <= n {
            return;
        }
        if dot.counter == n + 1 {
            self.vv
                .apply(crdts::Dot::new(dot.actor.clone(), dot.counter));
            self.compact_actor(&dot.actor);
        } else {
            self.cloud.insert(dot);
        }
    }

    /// Adds the dots `(actor, first..first + len)`.
    pub fn insert_range(&mut self, actor: &str, first: u64, len: u64) {
        let n = self.vv.get(&actor.to_owned());
        if first <= n + 1 {
            let end = first + len - 1;
            if end > n {
                self.vv.apply(crdts::Dot::new(actor.to_owned(), end));
                self.compact_actor(actor);
            }
        } else {
            for c in first..first + len {
                self.cloud.insert(Dot::new(actor, c));
            }
        }
    }

    /// Adds every dot of `other`.
    pub fn join(&mut self, other: &CausalContext) {
        self.vv.merge(other.vv.clone());
        for d in &other.cloud {
            if !self.contains(d) {
                self.cloud.insert(d.clone());
            }
        }
        let actors: Vec<String> = self.vv.dots.keys().cloned().collect();
        for a in actors {
            self.compact_actor(&a);
        }
    }

    /// Folds cloud dots of `actor` that became contiguous into the version vector, and
    /// drops cloud dots the version vector covers.
    fn compact_actor(&mut self, actor: &str) {
        let start = self.vv.get(&actor.to_owned());
        let mut n = start;
        let lo = Dot::new(actor, 0);
        let hi = Dot::new(actor, u64::MAX);
        let covered: Vec<Dot> = self.cloud.range(lo..=hi).cloned().collect();
        for d in covered {
            if d.counter <= n {
                self.cloud.remove(&d);
            } else if d.counter == n + 1 {
                n += 1;
                self.cloud.remove(&d);
            } else {
                break;
            }
        }
        if n > start {
            self.vv.apply(crdts::Dot::new(actor.to_owned(), n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_dots_become_contiguous() {
        let mut c = CausalContext::default();
        c.insert(Dot::new("a", 3));
        c.insert(Dot::new("a", 2));
        assert_eq!(c.max_contiguous("a"), 0);
        assert!(c.contains(&Dot::new("a", 3)));
        c.insert(Dot::new("a", 1));
        assert_eq!(c.max_contiguous("a"), 3);
        assert!(c.cloud().is_empty());
        c.insert_range("a", 4, 3);
        assert_eq!(c.max_contiguous("a"), 6);
        c.insert_range("b", 5, 2);
        assert!(c.contains(&Dot::new("b", 6)) && !c.contains(&Dot::new("b", 4)));
    }

    #[test]
    fn join_merges_vectors_and_clouds() {
        let mut a = CausalContext::default();
        a.insert_range("x", 1, 2);
        a.insert(Dot::new("y", 2));
        let mut b = CausalContext::default();
        b.insert(Dot::new("y", 1));
        b.insert(Dot::new("x", 3));
        a.join(&b);
        assert_eq!(a.max_contiguous("x"), 3);
        assert_eq!(a.max_contiguous("y"), 2);
        assert!(a.cloud().is_empty());
    }
}
