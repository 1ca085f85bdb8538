//! What the clients of the simulated platform did and were told: every write with the
//! replica that took it, and whether it was acknowledged (durable on that replica).
//! The invariants are checked against it after the run.

use form_state::crdt::{Field, Key, State};

/// A write a client made.
#[derive(Debug, Clone)]
pub struct Write {
    /// The replica that took it.
    pub node: usize,
    /// The cluster id it created or deleted.
    pub id: String,
    /// A create (`false`: a delete of a cluster the replica had seen).
    pub put: bool,
    /// The dot it consumed: its origin actor and last counter.
    pub dot: (String, u64),
    /// Acknowledged: durable on its replica.
    pub acked: bool,
}

/// Every write of a run.
#[derive(Debug, Default)]
pub struct History {
    /// In the order they were made.
    pub writes: Vec<Write>,
}

impl History {
    /// Violations of "no acknowledged write is lost and no delete comes back" in a
    /// replica's final `state` (`name` says which replica).
    pub fn check_final(&self, name: &str, state: &State) -> Vec<String> {
        let mut out = Vec::new();
        for w in self.writes.iter().filter(|w| w.acked) {
            let present = state.get(&Key::cluster(&w.id, Field::Domain)).is_some();
            let deleted = self
                .writes
                .iter()
                .any(|d| !d.put && d.id == w.id && d.acked);
            let delete_tried = self.writes.iter().any(|d| !d.put && d.id == w.id);
            if w.put && !delete_tried && !present {
                out.push(format!(
                    "{name}: acknowledged create of {} (by node {} as {}:{}) is lost",
                    w.id, w.node, w.dot.0, w.dot.1
                ));
            }
            if !w.put && deleted && present {
                out.push(format!(
                    "{name}: {} came back after its acknowledged delete (by node {} as {}:{})",
                    w.id, w.node, w.dot.0, w.dot.1
                ));
            }
        }
        out
    }

    /// Violations of durability at a restart of `node`: an acknowledged write of its
    /// own that its recovered version vector does not cover.
    pub fn check_recovered(
        &self,
        node: usize,
        version: &std::collections::BTreeMap<String, u64>,
    ) -> Vec<String> {
        self.writes
            .iter()
            .filter(|w| w.acked && w.node == node)
            .filter(|w| version.get(&w.dot.0).copied().unwrap_or(0) < w.dot.1)
            .map(|w| {
                format!(
                    "node {node} restarted without its acknowledged write {} ({}:{})",
                    w.id, w.dot.0, w.dot.1
                )
            })
            .collect()
    }
}
