//! The operations by cluster, and the unfinished ones: an index the replica keeps as
//! it changes (every change names the operations it touched, and each is looked at
//! again), so listing one cluster's operations, finding what an ending operation
//! takes along, or the unfinished ones a controller resumes, reads those operations
//! only and not every operation of the fleet.
//!
//! It is exact for the state it was updated with: an operation is filed under the
//! cluster its body (as the state resolves it) names, and is unfinished while its
//! status has not ended. Readers still check each candidate.

use std::collections::{BTreeSet, HashMap};

use crate::crdt::{Space, State};
use crate::model::read;

/// See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operations {
    cluster_of: HashMap<String, String>,
    by_cluster: HashMap<String, BTreeSet<String>>,
    unfinished: BTreeSet<String>,
}

impl Operations {
    /// The index of every operation of `state`.
    pub fn of(state: &State) -> Self {
        let mut out = Self::default();
        for id in state.ids(Space::Operation) {
            out.update(state, id);
        }
        out
    }

    /// Files operation `id` again as `state` now has it (or drops it, if it is gone).
    pub fn update(&mut self, state: &State, id: &str) {
        if let Some(old) = self.cluster_of.remove(id)
            && let Some(ids) = self.by_cluster.get_mut(&old)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.by_cluster.remove(&old);
            }
        }
        self.unfinished.remove(id);
        let Some(cluster) = read::operation_cluster(state, id) else {
            return;
        };
        if read::operation_unfinished(state, id) {
            self.unfinished.insert(id.to_owned());
        }
        self.by_cluster
            .entry(cluster.clone())
            .or_default()
            .insert(id.to_owned());
        self.cluster_of.insert(id.to_owned(), cluster);
    }

    /// The operations of `cluster`.
    pub fn of_cluster(&self, cluster: &str) -> impl Iterator<Item = &str> {
        self.by_cluster
            .get(cluster)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// The operations that have not ended.
    pub fn unfinished(&self) -> impl Iterator<Item = &str> {
        self.unfinished.iter().map(String::as_str)
    }

    /// The operations of `cluster` (every operation for ""), and of them only the
    /// unfinished ones with `unfinished_only`; `None` when that is every operation
    /// (the caller walks the state).
    pub fn candidates(&self, cluster: &str, unfinished_only: bool) -> Option<Vec<&str>> {
        match (cluster.is_empty(), unfinished_only) {
            (false, _) => Some(self.of_cluster(cluster).collect()),
            (true, true) => Some(self.unfinished().collect()),
            (true, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use form_proto::types::v1 as types;
    use types::operation_status::State as S;

    use super::*;
    use crate::crdt::{DeltaBuilder, Field, Key, Value};

    fn put(s: &mut State, id: &str, cluster: &str, done: bool) {
        use prost::Message;
        let body = types::Operation {
            operation_id: id.into(),
            cluster_id: cluster.into(),
            kind: types::OperationKind::ScaleOut as i32,
            ..Default::default()
        };
        let state = if done {
            S::Completed(types::Completed {})
        } else {
            S::InProgress(types::InProgress {
                step_index: 0,
                step: "clone".into(),
            })
        };
        let status = types::OperationStatus { state: Some(state) };
        let mut b = DeltaBuilder::new(s, "a");
        b.set(
            Key::operation(id, Field::OperationBody),
            Value::Bytes(body.encode_to_vec()),
            0,
            1,
        );
        b.set(
            Key::operation(id, Field::OperationStatus),
            Value::Bytes(status.encode_to_vec()),
            u64::from(done),
            1,
        );
        if let Some(d) = b.build() {
            s.apply(&d);
        }
    }

    #[test]
    fn follows_operations_as_they_are_written_and_removed() {
        let mut s = State::default();
        put(&mut s, "o1", "web", false);
        put(&mut s, "o2", "web", true);
        put(&mut s, "o3", "db", false);
        let mut ix = Operations::of(&s);
        assert_eq!(ix.of_cluster("web").collect::<Vec<_>>(), ["o1", "o2"]);
        assert_eq!(ix.unfinished().collect::<Vec<_>>(), ["o1", "o3"]);
        assert_eq!(ix.candidates("", false), None, "all: the caller walks");

        put(&mut s, "o1", "web", true);
        ix.update(&s, "o1");
        assert_eq!(ix.unfinished().collect::<Vec<_>>(), ["o3"], "o1 ended");

        let mut b = DeltaBuilder::new(&s, "a");
        b.remove_scope(Space::Operation, "o1", None);
        b.remove_scope(Space::Operation, "o2", None);
        if let Some(d) = b.build() {
            s.apply(&d);
        }
        for id in ["o1", "o2"] {
            ix.update(&s, id);
        }
        assert_eq!(
            ix.of_cluster("web").count(),
            0,
            "removed with their cluster"
        );
        assert_eq!(ix, Operations::of(&s), "updated equals rebuilt");
        assert_eq!(ix.candidates("db", true), Some(vec!["o3"]));
    }
}
