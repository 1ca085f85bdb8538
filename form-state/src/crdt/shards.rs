//! The dot store in copy-on-write shards, one per `(space, id)` (a cluster with its
//! members, an operation, a controller, a node). Cloning the store clones one `Arc`
//! per shard, so a snapshot of the whole state for a full-state send, a digest or a
//! log snapshot is taken under the replica's lock in microseconds and encoded off
//! it; a later write copies only the one shard it changes, and only while a snapshot
//! still holds it.
//!
//! It serializes as the flat map `Key -> DotFun` in key order, exactly as the store was
//! before it had shards, so logs, snapshots and gossip keep their format.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::context::Dot;
use super::key::{Key, Space};
use super::state::Entry;

/// Entries of one field by dot.
pub type DotFun = BTreeMap<Dot, Entry>;

/// The keys of one `(space, id)` with their entries.
pub type Shard = BTreeMap<Key, DotFun>;

/// The dot store. Invariants: no shard and no field is empty; `entries` counts the
/// entries (kept as they change: the count is read at every write).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shards {
    by_space: BTreeMap<Space, BTreeMap<String, Arc<Shard>>>,
    entries: usize,
}

impl Shards {
    /// The entries of a field.
    pub fn get(&self, key: &Key) -> Option<&DotFun> {
        self.shard(key.space, &key.id)?.get(key)
    }

    /// The shard of `(space, id)`.
    pub fn shard(&self, space: Space, id: &str) -> Option<&Shard> {
        self.by_space.get(&space)?.get(id).map(Arc::as_ref)
    }

    /// The shard of `(space, id)` as an `Arc` (to tell an unchanged one by pointer).
    pub fn shard_arc(&self, space: Space, id: &str) -> Option<&Arc<Shard>> {
        self.by_space.get(&space)?.get(id)
    }

    /// Adds entry `dot` of `key` (copying its shard if a snapshot shares it).
    pub fn insert(&mut self, key: &Key, dot: Dot, entry: Entry) {
        let shard = self
            .by_space
            .entry(key.space)
            .or_default()
            .entry(key.id.clone())
            .or_default();
        if Arc::make_mut(shard)
            .entry(key.clone())
            .or_default()
            .insert(dot, entry)
            .is_none()
        {
            self.entries += 1;
        }
    }

    /// Number of entries (all fields, all dots).
    pub fn entry_count(&self) -> usize {
        self.entries
    }

    /// Removes entry `dot` of `key`, and the field and shard when they become empty.
    pub fn remove(&mut self, key: &Key, dot: &Dot) {
        let Some(ids) = self.by_space.get_mut(&key.space) else {
            return;
        };
        let Some(shard) = ids.get_mut(key.id.as_str()) else {
            return;
        };
        if !shard.get(key).is_some_and(|f| f.contains_key(dot)) {
            return;
        }
        let s = Arc::make_mut(shard);
        if let Some(fun) = s.get_mut(key) {
            if fun.remove(dot).is_some() {
                self.entries -= 1;
            }
            if fun.is_empty() {
                s.remove(key);
            }
        }
        if s.is_empty() {
            ids.remove(key.id.as_str());
            if ids.is_empty() {
                self.by_space.remove(&key.space);
            }
        }
    }

    /// Keeps only the entries for which `keep` holds; shards with nothing to drop are
    /// neither copied nor written.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key, &Dot) -> bool) {
        let mut dropped = 0;
        for ids in self.by_space.values_mut() {
            ids.retain(|_, shard| {
                let drops = shard.iter().any(|(k, fun)| fun.keys().any(|d| !keep(k, d)));
                if drops {
                    Arc::make_mut(shard).retain(|k, fun| {
                        let before = fun.len();
                        fun.retain(|d, _| keep(k, d));
                        dropped += before - fun.len();
                        !fun.is_empty()
                    });
                }
                !shard.is_empty()
            });
        }
        self.by_space.retain(|_, ids| !ids.is_empty());
        self.entries -= dropped;
    }

    /// Every field with its entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &DotFun)> {
        self.by_space
            .values()
            .flat_map(|ids| ids.values())
            .flat_map(|shard| shard.iter())
    }

    /// The ids that have entries in `space`, in order.
    pub fn ids(&self, space: Space) -> Vec<&str> {
        self.by_space
            .get(&space)
            .map(|ids| ids.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.by_space
            .values()
            .flat_map(|ids| ids.values())
            .map(|s| s.len())
            .sum()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.by_space.is_empty()
    }
}

impl Serialize for Shards {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, fun) in self.iter() {
            map.serialize_entry(k, fun)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let flat = BTreeMap::<Key, DotFun>::deserialize(d)?;
        let mut out = Shards::default();
        for (k, fun) in flat {
            if fun.is_empty() {
                continue;
            }
            out.entries += fun.len();
            let shard = out
                .by_space
                .entry(k.space)
                .or_default()
                .entry(k.id.clone())
                .or_default();
            Arc::make_mut(shard).insert(k, fun);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{Field, Value};

    fn entry(n: u64) -> Entry {
        Entry {
            at_ms: n,
            rank: 0,
            value: Value::U64(n),
        }
    }

    #[test]
    fn a_clone_shares_shards_until_one_is_written() {
        let mut a = Shards::default();
        let web = Key::cluster("web", Field::Domain);
        let api = Key::cluster("api", Field::Domain);
        a.insert(&web, Dot::new("r", 1), entry(1));
        a.insert(&api, Dot::new("r", 2), entry(2));
        let snapshot = a.clone();
        a.insert(&web, Dot::new("r", 3), entry(3));
        let same = |s: &Shards, t: &Shards, id: &str| {
            Arc::ptr_eq(
                s.shard_arc(Space::Cluster, id).expect("shard"),
                t.shard_arc(Space::Cluster, id).expect("shard"),
            )
        };
        assert!(same(&a, &snapshot, "api"), "an untouched shard is shared");
        assert!(!same(&a, &snapshot, "web"), "a written shard is copied");
        assert_eq!(snapshot.get(&web).map(BTreeMap::len), Some(1));
        assert_eq!(a.get(&web).map(BTreeMap::len), Some(2));
    }

    #[test]
    fn empty_fields_and_shards_go_away_and_equality_holds() {
        let mut a = Shards::default();
        let k = Key::operation("op-1", Field::OperationStatus);
        a.insert(&k, Dot::new("r", 1), entry(1));
        a.insert(&k, Dot::new("r", 2), entry(2));
        assert_eq!(a.entry_count(), 2);
        a.remove(&k, &Dot::new("r", 1));
        a.remove(&k, &Dot::new("r", 1));
        assert_eq!(a.entry_count(), 1);
        a.remove(&k, &Dot::new("r", 2));
        assert_eq!(a.entry_count(), 0);
        assert!(a.is_empty());
        assert_eq!(a, Shards::default());
        a.insert(&k, Dot::new("r", 1), entry(1));
        a.retain(|_, _| false);
        assert_eq!(a.entry_count(), 0);
        assert_eq!(a, Shards::default());
    }

    #[test]
    fn it_serializes_as_the_flat_map_it_replaced() {
        let mut a = Shards::default();
        let mut flat = BTreeMap::<Key, DotFun>::new();
        for (i, k) in [
            Key::node("n1", Field::Heartbeat),
            Key::member("web", "i-1", Field::MemberStatus),
            Key::cluster("web", Field::Domain),
            Key::operation("op", Field::OperationBody),
        ]
        .into_iter()
        .enumerate()
        {
            let d = Dot::new("r", i as u64 + 1);
            a.insert(&k, d.clone(), entry(i as u64));
            flat.entry(k).or_default().insert(d, entry(i as u64));
        }
        let ours = postcard::to_allocvec(&a).expect("encodes");
        assert_eq!(ours, postcard::to_allocvec(&flat).expect("encodes"));
        let back: Shards = postcard::from_bytes(&ours).expect("decodes");
        assert_eq!(back, a);
        assert_eq!(back.entry_count(), 4);
        let order: Vec<&Key> = a.iter().map(|(k, _)| k).collect();
        let flat_order: Vec<&Key> = flat.keys().collect();
        assert_eq!(order, flat_order);
    }
}
