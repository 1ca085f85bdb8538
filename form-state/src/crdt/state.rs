//! The state: a dot store keyed by [`Key`] plus its causal context, with the join
//! (merge) and the read resolution of concurrent entries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::context::{CausalContext, Dot};
use super::delta::Delta;
use super::key::{Key, Resolve, Space};

/// A stored value. Structured values are kept encoded (the service layer owns their
/// schema), so this module knows nothing of the wire types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// A marker (presence).
    Unit,
    /// A number.
    U64(u64),
    /// A string.
    Text(String),
    /// A list of strings.
    Texts(Vec<String>),
    /// An encoded message.
    Bytes(Vec<u8>),
}

/// One write of a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Wall-clock time of the write on its replica, ms since the Unix epoch.
    pub at_ms: u64,
    /// Order of the value for [`Resolve::Max`] and [`Resolve::History`] fields.
    pub rank: u64,
    /// The value.
    pub value: Value,
}

/// Entries of one field by dot.
pub type DotFun = BTreeMap<Dot, Entry>;

/// The replicated state. Invariant: the dot of every stored entry is in `ctx`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    ctx: CausalContext,
    store: BTreeMap<Key, DotFun>,
}

impl State {
    /// Every dot this state has seen.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// Number of stored entries.
    pub fn entry_count(&self) -> usize {
        self.store.values().map(BTreeMap::len).sum()
    }

    /// Joins `other` into `self`: keeps an entry present on both sides or unseen by
    /// the other side; adds the context. Commutative, associative, idempotent.
    pub fn join(&mut self, other: &State) {
        self.store.retain(|k, fun| {
            let theirs = other.store.get(k);
            fun.retain(|d, _| theirs.is_some_and(|t| t.contains_key(d)) || !other.ctx.contains(d));
            !fun.is_empty()
        });
        for (k, fun) in &other.store {
            for (d, e) in fun {
                if !self.ctx.contains(d) {
                    self.store
                        .entry(k.clone())
                        .or_default()
                        .insert(d.clone(), e.clone());
                }
            }
        }
        self.ctx.join(&other.ctx);
    }

    /// Applies a delta; the same result as `join(&delta.to_state())`, without building it.
    pub fn apply(&mut self, delta: &Delta) {
        for (dot, (key, entry)) in delta.dots().zip(&delta.writes) {
            if !self.ctx.contains(&dot) {
                self.store
                    .entry(key.clone())
                    .or_default()
                    .insert(dot, entry.clone());
            }
        }
        for (key, dot) in &delta.removes {
            if let Some(fun) = self.store.get_mut(key) {
                fun.remove(dot);
                if fun.is_empty() {
                    self.store.remove(key);
                }
            }
        }
        self.ctx.insert_range(&delta.actor, delta.first, delta.len);
        for (_, dot) in &delta.removes {
            self.ctx.insert(dot.clone());
        }
    }

    /// The entries of a field.
    pub fn entries(&self, key: &Key) -> Option<&DotFun> {
        self.store.get(key)
    }

    /// The value of a field as its resolution rule reads it (`History` fields: the newest).
    pub fn get(&self, key: &Key) -> Option<&Entry> {
        let fun = self.store.get(key)?;
        match key.field.resolve() {
            Resolve::LastWriterWins => fun
                .iter()
                .max_by(|a, b| (a.1.at_ms, a.0).cmp(&(b.1.at_ms, b.0))),
            Resolve::Max | Resolve::History => fun
                .iter()
                .max_by(|a, b| (a.1.rank, a.1.at_ms, a.0).cmp(&(b.1.rank, b.1.at_ms, b.0))),
        }
        .map(|(_, e)| e)
    }

    /// Every entry of a field, oldest first by `(rank, dot)`.
    pub fn history(&self, key: &Key) -> Vec<&Entry> {
        let mut v: Vec<(&Dot, &Entry)> = self
            .store
            .get(key)
            .map(|f| f.iter().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| (a.1.rank, a.0).cmp(&(b.1.rank, b.0)));
        v.into_iter().map(|(_, e)| e).collect()
    }

    /// Every key (with its entries) of `(space, id, sub)`, or of `(space, id)` with every
    /// `sub` when `sub` is `None`.
    pub fn scope<'a>(
        &'a self,
        space: Space,
        id: &'a str,
        sub: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a DotFun)> + 'a {
        let start = Key::prefix_start(space, id, sub.unwrap_or(""));
        self.store.range(start..).take_while(move |(k, _)| {
            k.space == space && k.id == id && sub.is_none_or(|s| k.sub == s)
        })
    }

    /// The ids present in `space` (each once, in order).
    pub fn ids(&self, space: Space) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let start = Key::prefix_start(space, "", "");
        for (k, _) in self
            .store
            .range(start..)
            .take_while(|(k, _)| k.space == space)
        {
            if out.last() != Some(&k.id.as_str()) {
                out.push(&k.id);
            }
        }
        out
    }

    /// The member ids of cluster `id` that have any entry (each once, in order).
    pub fn subs<'a>(&'a self, id: &'a str) -> Vec<&'a str> {
        let mut out: Vec<&str> = Vec::new();
        for (k, _) in self.scope(Space::Cluster, id, None) {
            if !k.sub.is_empty() && out.last() != Some(&k.sub.as_str()) {
                out.push(&k.sub);
            }
        }
        out
    }
}
