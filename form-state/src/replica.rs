//! One replica as a state machine, without I/O: local writes become signed deltas,
//! received deltas wait in a bounded buffer until their causal predecessors are
//! applied, applied deltas are kept in a bounded log for gossip, and every applied
//! change gets a local sequence number (`lsn`) for `Watch` and for durability.
//!
//! ```text
//! local write ─> DeltaBuilder ─> sign ─┐
//!                                      ├─> apply ─> log[lsn] ─> (WAL, fsync) ─> durable ─> gossip, watch
//! received ─> verify ─> buffer ─ready──┘
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;

use crate::crdt::{Delta, Space, State};
use crate::envelope::{self, Authorized, VerifiedDelta};
use crate::error::StateError;

/// Limits of a replica's memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deltas held while waiting for their predecessors.
    pub buffer: usize,
    /// Deltas kept for gossip; older ones are reached through full state.
    pub log: usize,
    /// Change events kept for `Watch` resumption.
    pub changes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            buffer: 10_000,
            log: 100_000,
            changes: 100_000,
        }
    }
}

/// One applied change: what it touched.
#[derive(Debug, Clone)]
pub struct Change {
    /// Local sequence number.
    pub lsn: u64,
    /// Clusters and operations it touched.
    pub touched: Vec<(Space, String)>,
}

/// What became of received deltas.
#[derive(Debug, Default)]
pub struct Received {
    /// Applied now (including buffered ones that became ready), in order; to be persisted.
    pub applied: Vec<Arc<VerifiedDelta>>,
    /// Deltas held in the buffer afterwards, waiting for their predecessors.
    pub buffered: u32,
    /// Already known.
    pub duplicates: u32,
    /// Refused because the buffer was full (anti-entropy will fetch them in order).
    pub overflow: u32,
}

/// What gossip should send a peer that has `known`.
#[derive(Debug)]
pub enum Missing {
    /// Nothing.
    Nothing,
    /// These deltas, in causal order.
    Deltas(Vec<Arc<VerifiedDelta>>),
    /// Deltas the peer needs were trimmed from the log: send the full state.
    FullState,
}

/// A replica's state and bookkeeping.
#[derive(Debug)]
pub struct Replica {
    actor: String,
    key: SigningKey,
    authorized: Authorized,
    state: State,
    limits: Limits,
    /// Retained deltas: origin -> first counter -> (lsn, delta).
    log: BTreeMap<String, BTreeMap<u64, (u64, Arc<VerifiedDelta>)>>,
    log_order: VecDeque<(String, u64)>,
    /// Per origin, the last counter of deltas trimmed from the log.
    trimmed: BTreeMap<String, u64>,
    /// Buffered deltas by origin and first dot: only each origin's first can be next.
    pending: BTreeMap<String, BTreeMap<u64, VerifiedDelta>>,
    pending_len: usize,
    changes: VecDeque<Change>,
    /// The operations by cluster, kept as changes touch them.
    operations: crate::model::index::Operations,
    lsn: u64,
    durable_lsn: u64,
    /// This replica's own writes not yet durable: each one's lsn and its version
    /// vector's own entry before it.
    own_undurable: VecDeque<(u64, u64)>,
}

impl Replica {
    /// A replica acting as `actor` (`replica-id@incarnation`) over `state`.
    pub fn new(
        actor: String,
        key: SigningKey,
        authorized: Authorized,
        state: State,
        limits: Limits,
    ) -> Self {
        Self {
            actor,
            key,
            authorized,
            operations: crate::model::index::Operations::of(&state),
            state,
            limits,
            log: BTreeMap::new(),
            log_order: VecDeque::new(),
            trimmed: BTreeMap::new(),
            pending: BTreeMap::new(),
            pending_len: 0,
            changes: VecDeque::new(),
            lsn: 0,
            durable_lsn: 0,
            own_undurable: VecDeque::new(),
        }
    }

    /// This replica's actor id.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The converged state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The operations by cluster, and the unfinished ones.
    pub fn operations(&self) -> &crate::model::index::Operations {
        &self.operations
    }

    /// The authorized keys.
    pub fn authorized(&self) -> &Authorized {
        &self.authorized
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// The version vector.
    pub fn version(&self) -> BTreeMap<String, u64> {
        self.state.context().version_vector().clone()
    }

    /// Sequence number of the last applied change.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Sequence number of the last change known durable.
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    /// Marks every change up to `lsn` durable.
    pub fn mark_durable(&mut self, lsn: u64) {
        self.durable_lsn = self.durable_lsn.max(lsn.min(self.lsn));
        while self
            .own_undurable
            .front()
            .is_some_and(|(l, _)| *l <= self.durable_lsn)
        {
            self.own_undurable.pop_front();
        }
    }

    /// How much of this replica's own writing is durable: its version vector's own
    /// entry (dots), less the writes the log has not kept yet. A crash may lose
    /// nothing counted here, since each of these writes may have been acknowledged.
    pub fn durable_own_writes(&self) -> u64 {
        self.own_undurable
            .front()
            .map_or_else(|| self.version_of(&self.actor), |(_, before)| *before)
    }

    fn version_of(&self, actor: &str) -> u64 {
        self.state
            .context()
            .version_vector()
            .get(actor)
            .copied()
            .unwrap_or(0)
    }

    /// Deltas waiting for predecessors.
    pub fn pending_len(&self) -> usize {
        self.pending_len
    }

    /// Makes a local write: `make` builds the delta from the current state; the delta
    /// is signed, applied and logged. `Ok(None)` when nothing changes.
    pub fn write(
        &mut self,
        now_ms: u64,
        make: impl FnOnce(&State, &str) -> Result<Option<Delta>, StateError>,
    ) -> Result<Option<Arc<VerifiedDelta>>, StateError> {
        let Some(delta) = make(&self.state, &self.actor)? else {
            return Ok(None);
        };
        let deps = self.version();
        let before = deps.get(&self.actor).copied().unwrap_or(0);
        let v = Arc::new(envelope::sign(&self.key, delta, deps, now_ms));
        self.apply_verified(v.clone());
        self.own_undurable.push_back((self.lsn, before));
        Ok(Some(v))
    }

    /// Receives verified deltas (from a peer or from the write-ahead log).
    pub fn receive(&mut self, deltas: Vec<VerifiedDelta>) -> Received {
        let mut out = Received::default();
        for d in deltas {
            let held = self
                .pending
                .get(&d.delta.actor)
                .is_some_and(|m| m.contains_key(&d.delta.first));
            if self.covers(&d) || held {
                out.duplicates += 1;
            } else if self.is_ready(&d) {
                let d = Arc::new(d);
                self.apply_verified(d.clone());
                out.applied.push(d);
                self.drain_ready(&mut out.applied);
            } else if self.pending_len >= self.limits.buffer {
                out.overflow += 1;
            } else {
                self.pending
                    .entry(d.delta.actor.clone())
                    .or_default()
                    .insert(d.delta.first, d);
                self.pending_len += 1;
            }
        }
        out.buffered = self.pending_len as u32;
        out
    }

    /// Applies every buffered delta whose predecessors are now applied.
    /// Each round looks only at the first buffered delta of every origin (the next one
    /// in that origin's order): a round costs the number of origins, not the buffer.
    fn drain_ready(&mut self, applied: &mut Vec<Arc<VerifiedDelta>>) {
        loop {
            let mut progress = false;
            let origins: Vec<String> = self.pending.keys().cloned().collect();
            for origin in origins {
                while let Some(first) = self
                    .pending
                    .get(&origin)
                    .and_then(|m| m.keys().next().copied())
                {
                    let (covered, ready) =
                        match self.pending.get(&origin).and_then(|m| m.get(&first)) {
                            Some(d) => (self.covers(d), self.is_ready(d)),
                            None => break,
                        };
                    if !covered && !ready {
                        break;
                    }
                    let Some(d) = self.take_pending(&origin, first) else {
                        break;
                    };
                    if !covered {
                        let d = Arc::new(d);
                        self.apply_verified(d.clone());
                        applied.push(d);
                        progress = true;
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn take_pending(&mut self, origin: &str, first: u64) -> Option<VerifiedDelta> {
        let m = self.pending.get_mut(origin)?;
        let d = m.remove(&first)?;
        if m.is_empty() {
            self.pending.remove(origin);
        }
        self.pending_len -= 1;
        Some(d)
    }

    /// Joins a peer's whole state (anti-entropy fallback). Says whether the state
    /// changed (then the join is one change, with an lsn) and returns the buffered
    /// deltas that became ready and were applied after it.
    pub fn merge_state(&mut self, other: &State) -> (bool, Vec<Arc<VerifiedDelta>>) {
        // A clone shares every shard: the comparison below looks only at the shards
        // the join copied.
        let before = self.state.clone();
        self.state.join(other);
        let changed = before != self.state;
        let mut touched: Vec<(Space, String)> = Vec::new();
        for space in [Space::Cluster, Space::Operation, Space::Controller] {
            touched.extend(
                self.state
                    .changed_scopes(&before, space)
                    .into_iter()
                    .map(|id| (space, id)),
            );
        }
        if changed {
            self.record_change(touched);
        }
        let mut applied = Vec::new();
        self.drain_ready(&mut applied);
        (changed, applied)
    }

    /// What a peer that has `known` lacks, at most `limit` deltas, durable ones only.
    /// `exclude` is the peer's own actor: its deltas are never sent back to it.
    pub fn missing_for(
        &self,
        known: &BTreeMap<String, u64>,
        limit: usize,
        exclude: Option<&str>,
    ) -> Missing {
        let mine = self.state.context().version_vector();
        let mut candidates: Vec<(u64, Arc<VerifiedDelta>)> = Vec::new();
        for (origin, have) in mine {
            let theirs = known.get(origin).copied().unwrap_or(0);
            if *have <= theirs || Some(origin.as_str()) == exclude {
                continue;
            }
            if self.trimmed.get(origin).is_some_and(|t| *t > theirs) {
                return Missing::FullState;
            }
            let Some(retained) = self.log.get(origin) else {
                return Missing::FullState;
            };
            // The deltas must follow each other from `theirs + 1`: a gap means dots that
            // arrived here inside a full state, which only a full state carries on.
            let mut next = theirs + 1;
            let mut undurable = false;
            for (first, (lsn, d)) in retained.range(theirs + 1..) {
                if *first != next {
                    return Missing::FullState;
                }
                if *lsn > self.durable_lsn {
                    undurable = true;
                    break;
                }
                candidates.push((*lsn, d.clone()));
                next = d.delta.last() + 1;
            }
            if !undurable && next <= *have {
                return Missing::FullState;
            }
        }
        // The lsn order is a causal order here: taking the first `limit` of every
        // origin's candidates together never starves one origin behind another.
        candidates.sort_by_key(|(lsn, _)| *lsn);
        candidates.truncate(limit);
        if candidates.is_empty() {
            Missing::Nothing
        } else {
            Missing::Deltas(candidates.into_iter().map(|(_, d)| d).collect())
        }
    }

    /// Changes after `lsn` that are durable, oldest first; `None` when some were
    /// trimmed (the subscriber must start over from a full snapshot).
    pub fn changes_since(&self, lsn: u64) -> Option<Vec<Change>> {
        if let Some(first) = self.changes.front()
            && first.lsn > lsn + 1
        {
            return None;
        }
        if self.changes.is_empty() && lsn < self.durable_lsn {
            return None;
        }
        // The changes are in lsn order: start at the first after `lsn` rather than
        // look at every change kept.
        let from = self.changes.partition_point(|c| c.lsn <= lsn);
        Some(
            self.changes
                .range(from..)
                .take_while(|c| c.lsn <= self.durable_lsn)
                .cloned()
                .collect(),
        )
    }

    fn covers(&self, d: &VerifiedDelta) -> bool {
        d.delta.last() <= self.state.context().max_contiguous(&d.delta.actor)
    }

    fn is_ready(&self, d: &VerifiedDelta) -> bool {
        let ctx = self.state.context();
        ctx.max_contiguous(&d.delta.actor) + 1 == d.delta.first
            && d.deps
                .iter()
                .all(|(a, n)| a == &d.delta.actor || ctx.max_contiguous(a) >= *n)
    }

    fn apply_verified(&mut self, d: Arc<VerifiedDelta>) {
        self.state.apply(&d.delta);
        let touched = d
            .delta
            .touches()
            .into_iter()
            .map(|(s, id)| (s, id.to_owned()))
            .collect();
        self.record_change(touched);
        let origin = d.delta.actor.clone();
        let first = d.delta.first;
        self.log
            .entry(origin.clone())
            .or_default()
            .insert(first, (self.lsn, d));
        self.log_order.push_back((origin, first));
        while self.log_order.len() > self.limits.log {
            if let Some((o, f)) = self.log_order.pop_front()
                && let Some(m) = self.log.get_mut(&o)
                && let Some((_, d)) = m.remove(&f)
            {
                let t = self.trimmed.entry(o).or_insert(0);
                *t = (*t).max(d.delta.last());
            }
        }
    }

    fn record_change(&mut self, touched: Vec<(Space, String)>) {
        for (space, id) in &touched {
            if *space == Space::Operation {
                self.operations.update(&self.state, id);
            }
        }
        self.lsn += 1;
        self.changes.push_back(Change {
            lsn: self.lsn,
            touched,
        });
        while self.changes.len() > self.limits.changes {
            self.changes.pop_front();
        }
    }
}

#[cfg(test)]
mod tests;
