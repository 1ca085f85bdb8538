//! The state: a dot store keyed by [`Key`] plus its causal context, with the join
//! (merge) and the read resolution of concurrent entries.

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

pub use super::shards::DotFun;
use super::shards::Shards;

/// The replicated state. Invariant: the dot of every stored entry is in `ctx`.
/// Cloning it is cheap (its store is in copy-on-write shards, `shards.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    ctx: CausalContext,
    store: Shards,
}

impl State {
    /// Every dot this state has seen.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// Number of stored entries.
    pub fn entry_count(&self) -> usize {
        self.store.entry_count()
    }

    /// Joins `other` into `self`: keeps an entry present on both sides or unseen by
    /// the other side; adds the context. Commutative, associative, idempotent.
    pub fn join(&mut self, other: &State) {
        self.store.retain(|k, d| {
            other.store.get(k).is_some_and(|t| t.contains_key(d)) || !other.ctx.contains(d)
        });
        for (k, fun) in other.store.iter() {
            for (d, e) in fun {
                if !self.ctx.contains(d) {
                    self.store.insert(k, d.clone(), e.clone());
                }
            }
        }
        self.ctx.join(&other.ctx);
    }

    /// Applies a delta; the same result as `join(&delta.to_state())`, without building it.
    pub fn apply(&mut self, delta: &Delta) {
        for (dot, (key, entry)) in delta.dots().zip(&delta.writes) {
            if !self.ctx.contains(&dot) {
                self.store.insert(key, dot, entry.clone());
            }
        }
        for (key, dot) in &delta.removes {
            self.store.remove(key, dot);
        }
        self.ctx.insert_range(&delta.actor, delta.first, delta.len);
        for (_, dot) in &delta.removes {
            self.ctx.insert(dot.clone());
        }
    }

    /// The `(space, id)` scopes whose entries differ between `before` and `self`: by
    /// pointer for shards still shared with `before` (a clone of this state taken
    /// earlier), by value for the others.
    pub fn changed_scopes(&self, before: &State, space: Space) -> Vec<String> {
        let mut ids: Vec<&str> = before.store.ids(space);
        ids.extend(self.store.ids(space));
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter(|id| {
                match (
                    before.store.shard_arc(space, id),
                    self.store.shard_arc(space, id),
                ) {
                    (Some(a), Some(b)) => !std::sync::Arc::ptr_eq(a, b) && a != b,
                    (None, None) => false,
                    _ => true,
                }
            })
            .map(str::to_owned)
            .collect()
    }

    /// The entries of a field.
    pub fn entries(&self, key: &Key) -> Option<&DotFun> {
        self.store.get(key)
    }

    /// The value of a field as its resolution rule reads it (`History` fields: the newest).
    pub fn get(&self, key: &Key) -> Option<&Entry> {
        resolve(key, self.store.get(key)?)
    }

    /// Every entry of a field, oldest first by `(rank, dot)`.
    pub fn history(&self, key: &Key) -> Vec<&Entry> {
        oldest_first(self.store.get(key))
    }

    /// The fields of one `(space, id)`, found once: reading many fields of a cluster
    /// (or an operation) through it does not search the whole state for each.
    pub fn view(&self, space: Space, id: &str) -> View<'_> {
        View {
            shard: self.store.shard(space, id),
        }
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
        self.store
            .shard(space, id)
            .into_iter()
            .flat_map(move |shard| shard.range(start.clone()..))
            .take_while(move |(k, _)| sub.is_none_or(|s| k.sub == s))
    }

    /// The ids present in `space` (each once, in order).
    pub fn ids(&self, space: Space) -> Vec<&str> {
        self.store.ids(space)
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

/// The fields of one `(space, id)` ([`State::view`]); its keys must be of that scope.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    shard: Option<&'a super::shards::Shard>,
}

impl<'a> View<'a> {
    /// The entries of a field.
    pub fn entries(&self, key: &Key) -> Option<&'a DotFun> {
        self.shard?.get(key)
    }

    /// The value of a field, as [`State::get`].
    pub fn get(&self, key: &Key) -> Option<&'a Entry> {
        resolve(key, self.entries(key)?)
    }

    /// Every entry of a field, as [`State::history`].
    pub fn history(&self, key: &Key) -> Vec<&'a Entry> {
        oldest_first(self.entries(key))
    }
}

/// The entry a field's resolution rule reads among its concurrent entries.
fn resolve<'a>(key: &Key, fun: &'a DotFun) -> Option<&'a Entry> {
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

/// A field's entries, oldest first by `(rank, dot)`.
fn oldest_first(fun: Option<&DotFun>) -> Vec<&Entry> {
    let mut v: Vec<(&Dot, &Entry)> = fun.map(|f| f.iter().collect()).unwrap_or_default();
    v.sort_by(|a, b| (a.1.rank, a.0).cmp(&(b.1.rank, b.0)));
    v.into_iter().map(|(_, e)| e).collect()
}
