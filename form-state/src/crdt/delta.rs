//! Deltas: the small states that one write produces, and the builder (δ-mutators) that
//! makes them from what the writing replica has observed.
//!
//! A delta made by replica `actor` consumes the dots `actor:first .. first+len` (at
//! least one, so every delta has an identity in the version vector). Its i-th write gets
//! the i-th dot; `removes` lists the observed `(key, dot)` entries it replaces or deletes.

use serde::{Deserialize, Serialize};

use super::context::{CausalContext, Dot};
use super::key::{Key, Space};
use super::state::{Entry, State, Value};

/// One write's change of the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Replica that made it.
    pub actor: String,
    /// Its first dot counter.
    pub first: u64,
    /// Dots it consumes (`>= writes.len()`, `>= 1`).
    pub len: u64,
    /// New entries; the i-th has dot `(actor, first + i)`.
    pub writes: Vec<(Key, Entry)>,
    /// Observed entries this delta removes.
    pub removes: Vec<(Key, Dot)>,
}

impl Delta {
    /// The dots of its writes, in order.
    pub fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        (0..self.writes.len() as u64).map(|i| Dot::new(self.actor.clone(), self.first + i))
    }

    /// The last dot it consumes.
    pub fn last(&self) -> u64 {
        self.first + self.len - 1
    }

    /// The delta as a state (its writes, and a context of its dots and removed dots).
    pub fn to_state(&self) -> State {
        let mut s = State::default();
        s.apply(self);
        s
    }

    /// The clusters and operations whose entries it writes or removes.
    pub fn touches(&self) -> Vec<(Space, &str)> {
        let mut out: Vec<(Space, &str)> = Vec::new();
        for k in self
            .writes
            .iter()
            .map(|(k, _)| k)
            .chain(self.removes.iter().map(|(k, _)| k))
        {
            let item = (k.space, k.id.as_str());
            if !out.contains(&item) {
                out.push(item);
            }
        }
        out
    }
}

/// Builds one delta from the state its replica has observed.
#[derive(Debug)]
pub struct DeltaBuilder<'a> {
    state: &'a State,
    actor: String,
    first: u64,
    writes: Vec<(Key, Entry)>,
    removes: Vec<(Key, Dot)>,
}

impl<'a> DeltaBuilder<'a> {
    /// A builder for replica `actor`, whose next dot is the one after the state's last.
    pub fn new(state: &'a State, actor: &str) -> Self {
        let first = next_counter(state.context(), actor);
        Self {
            state,
            actor: actor.to_owned(),
            first,
            writes: Vec::new(),
            removes: Vec::new(),
        }
    }

    /// Sets a field: removes every entry of it this replica observed, adds the new one.
    pub fn set(&mut self, key: Key, value: Value, rank: u64, at_ms: u64) -> &mut Self {
        if let Some(fun) = self.state.entries(&key) {
            self.removes
                .extend(fun.keys().map(|d| (key.clone(), d.clone())));
        }
        self.writes.push((key, Entry { at_ms, rank, value }));
        self
    }

    /// Appends to a history field, keeping at most `keep` entries (the newest by rank).
    pub fn append(
        &mut self,
        key: Key,
        value: Value,
        rank: u64,
        at_ms: u64,
        keep: usize,
    ) -> &mut Self {
        if let Some(fun) = self.state.entries(&key) {
            let mut dots: Vec<(&Dot, &Entry)> = fun.iter().collect();
            dots.sort_by(|a, b| (a.1.rank, a.0).cmp(&(b.1.rank, b.0)));
            let excess = dots.len().saturating_sub(keep.saturating_sub(1));
            self.removes.extend(
                dots[..excess]
                    .iter()
                    .map(|(d, _)| (key.clone(), (*d).clone())),
            );
        }
        self.writes.push((key, Entry { at_ms, rank, value }));
        self
    }

    /// Removes every observed entry of `(space, id)` (with `sub: None`, including every
    /// member of a cluster) or of `(space, id, sub)`.
    pub fn remove_scope(&mut self, space: Space, id: &str, sub: Option<&str>) -> &mut Self {
        for (k, fun) in self.state.scope(space, id, sub) {
            self.removes
                .extend(fun.keys().map(|d| (k.clone(), d.clone())));
        }
        self
    }

    /// The delta, or `None` when it would change nothing.
    pub fn build(self) -> Option<Delta> {
        if self.writes.is_empty() && self.removes.is_empty() {
            return None;
        }
        Some(Delta {
            len: (self.writes.len() as u64).max(1),
            actor: self.actor,
            first: self.first,
            writes: self.writes,
            removes: self.removes,
        })
    }
}

/// The next dot counter of `actor` in a state.
pub fn next_counter(ctx: &CausalContext, actor: &str) -> u64 {
    ctx.max_contiguous(actor) + 1
}
