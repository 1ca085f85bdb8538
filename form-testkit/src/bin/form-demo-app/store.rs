//! The demo app's state as a mergeable CRDT, for the workload state contract
//! (docs/workload-contract.md):
//!
//! - the key-value map is a last-writer-wins map: each entry carries the hybrid
//!   logical clock reading of its write and the write's dot (instance, counter); of two
//!   entries of a key the one with the larger `(ts, dot, value)` wins, so merging is
//!   commutative, associative and idempotent. A delete is an entry without a value (a
//!   delete marker), so an older write never brings a key back;
//! - each session counter is a grow-only counter: one cell per instance, merged by max.
//!
//! Every change of an entry or a cell (a local write, or a merge that changed it) takes
//! the next number of this instance's change log; a cursor is a position in that log,
//! so `changes since a cursor` is whatever changed after it, local or merged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The batch format this store reads and writes.
pub(crate) const FORMAT: &str = "form.changes/v1";
/// Longest key accepted.
pub(crate) const MAX_KEY: usize = 1024;
/// Largest value accepted.
pub(crate) const MAX_VALUE: usize = 1024 * 1024;
/// Longest instance or session id accepted in a batch.
const MAX_ID: usize = 256;
/// Largest dot counter and counter cell accepted in a batch (far from overflow).
const MAX_COUNT: u64 = 1 << 62;
/// How far ahead of this instance's clock a merged change may be.
const MAX_DRIFT_MS: u64 = 60_000;

/// Whether `s` is an acceptable instance or session id: 1 to 256 bytes.
pub(crate) fn id_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID
}

/// A hybrid logical clock reading: milliseconds since the Unix epoch, then a counter
/// that orders writes within one millisecond. Written `[ms, n]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Hlc(pub(crate) u64, pub(crate) u32);

impl Hlc {
    /// `ms.n`, as a cookie carries it.
    pub(crate) fn text(self) -> String {
        format!("{}.{}", self.0, self.1)
    }

    /// A reading written by [`Hlc::text`].
    pub(crate) fn parse(s: &str) -> Option<Hlc> {
        let (ms, n) = s.split_once('.')?;
        Some(Hlc(ms.parse().ok()?, n.parse().ok()?))
    }

    /// The reading of a new local write at wall time `now_ms`: after every reading seen.
    fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.0 {
            *self = Hlc(now_ms, 0);
        } else if self.1 == u32::MAX {
            *self = Hlc(self.0 + 1, 0);
        } else {
            self.1 += 1;
        }
        *self
    }
}

/// The identity of one write: the instance that made it and its counter there.
/// Written `["instance", n]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Dot(pub(crate) String, pub(crate) u64);

/// One key's entry: its value (`None`: deleted), when and by which write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    value: Option<String>,
    ts: Hlc,
    dot: Dot,
    /// Position in this instance's change log.
    seq: u64,
}

impl Entry {
    /// The order of two entries of one key: the larger wins.
    fn rank(&self) -> (Hlc, &Dot, &Option<String>) {
        (self.ts, &self.dot, &self.value)
    }
}

/// One instance's cell of a session counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Cell {
    count: u64,
    seq: u64,
}

/// Each key's entry and each counter cell, for comparing instances in tests.
#[cfg(test)]
type View = (
    Vec<(String, Option<String>, Hlc, Dot)>,
    Vec<(String, String, u64)>,
);

/// What a change-log position names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Kv(String),
    Counter(String, String),
}

/// One change as it travels in a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Change {
    /// A key's entry; `value: null` is a delete marker.
    Kv {
        key: String,
        value: Option<String>,
        ts: Hlc,
        dot: Dot,
    },
    /// One instance's cell of a session counter.
    Counter {
        session: String,
        instance: String,
        count: u64,
    },
}

/// A batch of changes: what `GET /_form/changes` answers and `POST /_form/merge` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Batch {
    pub(crate) format: String,
    pub(crate) origin: String,
    #[serde(default)]
    pub(crate) since: String,
    #[serde(default)]
    pub(crate) next_cursor: String,
    #[serde(default)]
    pub(crate) more: bool,
    #[serde(default)]
    pub(crate) pending: u64,
    pub(crate) changes: Vec<Change>,
}

/// What a merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Merged {
    /// Changes that changed the state.
    pub(crate) applied: u64,
    /// Changes already here (the same write).
    pub(crate) duplicates: u64,
    /// Changes older than what is here.
    pub(crate) stale: u64,
}

/// Why a cursor cannot be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CursorError {
    /// Not a cursor at all.
    Malformed(String),
    /// A cursor of another instance or of an earlier run: read from the start.
    Gone(String),
}

/// The state of one instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Store {
    /// This instance's id: the origin of its dots.
    pub(crate) me: String,
    /// Identifies this run's change log in cursors (new at every start and identity).
    #[serde(skip)]
    incarnation: u64,
    hlc: Hlc,
    /// Counter of this instance's dots.
    counter: u64,
    /// Last position of the change log.
    seq: u64,
    kv: BTreeMap<String, Entry>,
    /// Session -> instance -> cell.
    counters: BTreeMap<String, BTreeMap<String, Cell>>,
    /// Clone generation (not merged).
    pub(crate) generation: u64,
    /// Sessions started here (not merged: session ids carry the instance id).
    pub(crate) next_session: u64,
    /// Position -> what changed there.
    #[serde(skip)]
    log: BTreeMap<u64, Item>,
    /// Writes made here under the current identity (puts, deletes, counter visits).
    #[serde(skip)]
    writes: u64,
}

impl Store {
    /// An empty store of instance `me`.
    pub(crate) fn new(me: &str, incarnation: u64) -> Self {
        Self {
            me: me.to_owned(),
            incarnation,
            ..Self::default()
        }
    }

    /// A store read back from its JSON (a snapshot), as instance `me`.
    pub(crate) fn restore(json: &[u8], me: &str, incarnation: u64) -> serde_json::Result<Self> {
        let mut s: Store = serde_json::from_slice(json)?;
        s.rename(me, incarnation);
        for (k, e) in &s.kv {
            s.log.insert(e.seq, Item::Kv(k.clone()));
        }
        for (session, cells) in &s.counters {
            for (instance, c) in cells {
                s.log
                    .insert(c.seq, Item::Counter(session.clone(), instance.clone()));
            }
        }
        Ok(s)
    }

    /// Takes a new identity (a clone): new dots and cursors from here on.
    pub(crate) fn rename(&mut self, me: &str, incarnation: u64) {
        self.me = me.to_owned();
        self.incarnation = incarnation;
        self.writes = 0;
    }

    /// Writes made here under the current identity.
    pub(crate) fn writes(&self) -> u64 {
        self.writes
    }

    /// The value of `key`, unless missing or deleted.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.kv.get(key).and_then(|e| e.value.as_deref())
    }

    /// Keys with a value.
    pub(crate) fn len(&self) -> usize {
        self.kv.values().filter(|e| e.value.is_some()).count()
    }

    /// Writes `value` (`None` deletes) at wall time `now_ms`; returns its clock reading.
    pub(crate) fn put(&mut self, key: &str, value: Option<String>, now_ms: u64) -> Hlc {
        let ts = self.hlc.tick(now_ms);
        self.counter = self.counter.saturating_add(1);
        self.writes = self.writes.saturating_add(1);
        let dot = Dot(self.me.clone(), self.counter);
        self.set_entry(key.to_owned(), value, ts, dot);
        ts
    }

    /// Takes a reading seen elsewhere (a session's last write) into this instance's
    /// clock, unless it is more than a minute ahead of `now_ms` (a client's value is
    /// not trusted further).
    pub(crate) fn observe(&mut self, seen: Hlc, now_ms: u64) {
        if seen.0 <= now_ms + MAX_DRIFT_MS {
            self.hlc = self.hlc.max(seen);
        }
    }

    fn next_seq(&mut self, item: Item, old: Option<u64>) -> u64 {
        if let Some(old) = old {
            self.log.remove(&old);
        }
        self.seq += 1;
        self.log.insert(self.seq, item);
        self.seq
    }

    fn set_entry(&mut self, key: String, value: Option<String>, ts: Hlc, dot: Dot) {
        let old = self.kv.get(&key).map(|e| e.seq);
        let seq = self.next_seq(Item::Kv(key.clone()), old);
        self.kv.insert(
            key,
            Entry {
                value,
                ts,
                dot,
                seq,
            },
        );
    }

    fn set_cell(&mut self, session: &str, instance: &str, count: u64) {
        let old = self
            .counters
            .get(session)
            .and_then(|c| c.get(instance))
            .map(|c| c.seq);
        let item = Item::Counter(session.to_owned(), instance.to_owned());
        let seq = self.next_seq(item, old);
        self.counters
            .entry(session.to_owned())
            .or_default()
            .insert(instance.to_owned(), Cell { count, seq });
    }

    /// Counts one visit of `session` here; returns the session's total over instances.
    pub(crate) fn bump(&mut self, session: &str) -> u64 {
        let me = self.me.clone();
        let mine = self
            .counters
            .get(session)
            .and_then(|c| c.get(&me))
            .map_or(0, |c| c.count);
        self.set_cell(session, &me, mine.saturating_add(1));
        self.writes = self.writes.saturating_add(1);
        self.count(session)
    }

    /// The total of `session`'s counter.
    pub(crate) fn count(&self, session: &str) -> u64 {
        self.counters
            .get(session)
            .map_or(0, |c| c.values().fold(0, |a, c| a.saturating_add(c.count)))
    }

    /// The cursor after every change made so far.
    pub(crate) fn cursor(&self) -> String {
        self.cursor_at(self.seq)
    }

    /// Number of changes in the log (its last position).
    pub(crate) fn head(&self) -> u64 {
        self.seq
    }

    fn cursor_at(&self, seq: u64) -> String {
        format!("{:016x}.{seq}", self.incarnation)
    }

    /// The log position a cursor names.
    fn position(&self, cursor: &str) -> Result<u64, CursorError> {
        if cursor.is_empty() {
            return Ok(0);
        }
        let malformed = || {
            CursorError::Malformed(format!(
                "cursor '{}' is malformed; expected a next_cursor of an earlier batch, or empty for everything",
                cursor.chars().take(64).collect::<String>()
            ))
        };
        let (inc, seq) = cursor.split_once('.').ok_or_else(malformed)?;
        let inc = u64::from_str_radix(inc, 16).map_err(|_| malformed())?;
        let seq: u64 = seq.parse().map_err(|_| malformed())?;
        if inc != self.incarnation || seq > self.seq {
            return Err(CursorError::Gone(format!(
                "cursor '{cursor}' is not from this run of instance {}; read again from an empty cursor",
                self.me
            )));
        }
        Ok(seq)
    }

    fn change(&self, item: &Item) -> Option<Change> {
        match item {
            Item::Kv(key) => self.kv.get(key).map(|e| Change::Kv {
                key: key.clone(),
                value: e.value.clone(),
                ts: e.ts,
                dot: e.dot.clone(),
            }),
            Item::Counter(session, instance) => self
                .counters
                .get(session)
                .and_then(|c| c.get(instance))
                .map(|c| Change::Counter {
                    session: session.clone(),
                    instance: instance.clone(),
                    count: c.count,
                }),
        }
    }

    /// Whether the change at a log position is this instance's own write (not one it
    /// merged from another instance).
    fn own(&self, item: &Item) -> bool {
        match item {
            Item::Kv(key) => self.kv.get(key).is_some_and(|e| e.dot.0 == self.me),
            Item::Counter(_, instance) => *instance == self.me,
        }
    }

    /// Whether the change at a log position is of a key with one of `prefixes`
    /// (every change when there are none; counters never when there are).
    fn matches(item: &Item, prefixes: &[String]) -> bool {
        prefixes.is_empty()
            || matches!(item, Item::Kv(key) if prefixes.iter().any(|p| key.starts_with(p.as_str())))
    }

    /// The changes after `since` as a batch in JSON, at most `max_bytes` long unless a
    /// single change is longer (then it travels alone). With `own`, only this
    /// instance's own writes; with `prefixes`, only keys with one of them. What is
    /// left out is skipped: the cursor still moves past it.
    pub(crate) fn changes(
        &self,
        since: &str,
        max_bytes: usize,
        own: bool,
        prefixes: &[String],
    ) -> Result<Vec<u8>, CursorError> {
        let from = self.position(since)?;
        let mut body = Vec::with_capacity(max_bytes.min(1 << 20));
        let mut last = from;
        let mut more = false;
        // Room for the envelope's other fields.
        let budget = max_bytes.saturating_sub(512);
        for (&seq, item) in self.log.range(from + 1..) {
            let change = match self.change(item) {
                Some(c) if (!own || self.own(item)) && Self::matches(item, prefixes) => c,
                _ => {
                    last = seq;
                    continue;
                }
            };
            let one = serde_json::to_vec(&change).unwrap_or_default();
            if !body.is_empty() && body.len() + one.len() + 1 > budget {
                more = true;
                break;
            }
            if !body.is_empty() {
                body.push(b',');
            }
            body.extend_from_slice(&one);
            last = seq;
        }
        let pending = self
            .log
            .range(last + 1..)
            .filter(|(_, item)| (!own || self.own(item)) && Self::matches(item, prefixes))
            .count() as u64;
        let head = serde_json::json!({
            "format": FORMAT,
            "origin": self.me,
            "since": since,
            "next_cursor": self.cursor_at(last),
            "more": more,
            "pending": pending,
            "writes": self.writes,
        })
        .to_string();
        // `{...head fields..., "changes": [ ... ]}`
        let mut out = Vec::with_capacity(head.len() + body.len() + 16);
        out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
        out.extend_from_slice(b",\"changes\":[");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// Checks every change of `batch` (nothing is merged unless all are acceptable).
    pub(crate) fn check(batch: &Batch, now_ms: u64) -> Result<(), String> {
        if batch.format != FORMAT {
            return Err(format!(
                "format '{}' is not accepted; expected '{FORMAT}'",
                batch.format
            ));
        }
        if !id_ok(&batch.origin) {
            return Err(format!("origin must be 1 to {MAX_ID} bytes"));
        }
        for (i, c) in batch.changes.iter().enumerate() {
            match c {
                Change::Kv {
                    key,
                    value,
                    ts,
                    dot,
                } => {
                    if key.is_empty() || key.len() > MAX_KEY {
                        return Err(format!("changes[{i}].key must be 1 to {MAX_KEY} bytes"));
                    }
                    if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE) {
                        return Err(format!(
                            "changes[{i}].value is longer than {MAX_VALUE} bytes"
                        ));
                    }
                    if !id_ok(&dot.0) || dot.1 == 0 || dot.1 > MAX_COUNT {
                        return Err(format!(
                            "changes[{i}].dot must be [instance of 1 to {MAX_ID} bytes, counter 1 to {MAX_COUNT}]"
                        ));
                    }
                    if ts.0 > now_ms + MAX_DRIFT_MS {
                        return Err(format!(
                            "changes[{i}].ts is {} ms, more than {MAX_DRIFT_MS} ms ahead of this instance's clock ({now_ms})",
                            ts.0
                        ));
                    }
                }
                Change::Counter {
                    session,
                    instance,
                    count,
                } => {
                    if !id_ok(session) || !id_ok(instance) || *count > MAX_COUNT {
                        return Err(format!(
                            "changes[{i}]: session and instance must be 1 to {MAX_ID} bytes and count at most {MAX_COUNT}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Merges a checked batch.
    pub(crate) fn merge(&mut self, batch: Batch) -> Merged {
        let mut m = Merged::default();
        for c in batch.changes {
            match c {
                Change::Kv {
                    key,
                    value,
                    ts,
                    dot,
                } => {
                    self.hlc = self.hlc.max(ts);
                    if dot.0 == self.me {
                        // Never issue this dot again.
                        self.counter = self.counter.max(dot.1);
                    }
                    let incoming = (ts, &dot, &value);
                    match self.kv.get(&key) {
                        Some(e) if e.rank() == incoming => m.duplicates += 1,
                        Some(e) if e.rank() > incoming => m.stale += 1,
                        _ => {
                            self.set_entry(key, value, ts, dot);
                            m.applied += 1;
                        }
                    }
                }
                Change::Counter {
                    session,
                    instance,
                    count,
                } => {
                    let here = self
                        .counters
                        .get(&session)
                        .and_then(|c| c.get(&instance))
                        .map(|c| c.count);
                    match here {
                        Some(h) if h == count => m.duplicates += 1,
                        Some(h) if h > count => m.stale += 1,
                        _ => {
                            self.set_cell(&session, &instance, count);
                            m.applied += 1;
                        }
                    }
                }
            }
        }
        m
    }

    /// What every instance must agree on after exchanging all changes: each key's
    /// entry and each counter cell (not log positions, which are local).
    #[cfg(test)]
    fn view(&self) -> View {
        (
            self.kv
                .iter()
                .map(|(k, e)| (k.clone(), e.value.clone(), e.ts, e.dot.clone()))
                .collect(),
            self.counters
                .iter()
                .flat_map(|(s, c)| c.iter().map(move |(i, c)| (s.clone(), i.clone(), c.count)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn batch(s: &Store, since: &str, max: usize) -> Batch {
        serde_json::from_slice(&s.changes(since, max, false, &[]).expect("cursor")).expect("json")
    }

    /// Every change of `s`, in one batch or several.
    fn all(s: &Store) -> Batch {
        batch(s, "", usize::MAX)
    }

    #[test]
    fn the_newer_write_wins_everywhere_and_a_delete_stays_deleted() {
        let mut a = Store::new("a", 1);
        let mut b = Store::new("b", 2);
        a.put("k", Some("from a".into()), NOW);
        b.put("k", Some("from b".into()), NOW); // same ms: the dot decides, b > a
        let (ba, bb) = (all(&a), all(&b));
        a.merge(bb.clone());
        b.merge(ba.clone());
        assert_eq!(a.get("k"), Some("from b"));
        assert_eq!(b.get("k"), Some("from b"));
        // a deletes after seeing b's write; an older write replayed later changes nothing.
        a.put("k", None, NOW);
        b.merge(all(&a));
        assert_eq!(b.get("k"), None);
        let old = bb.clone();
        let m = b.merge(old.clone());
        assert_eq!(m.applied, 0, "{m:?}");
        assert_eq!(
            b.get("k"),
            None,
            "a delete is never undone by an older write"
        );
    }

    #[test]
    fn a_session_that_moved_keeps_its_last_write_even_against_a_clock_ahead() {
        // The victim's clock runs 500 ms ahead; the session wrote A there, moved, and
        // wrote B on the survivor, carrying the reading of A in its cookie.
        let mut victim = Store::new("v", 1);
        let mut survivor = Store::new("s", 2);
        let a = victim.put("cart", Some("A".into()), NOW + 500);
        survivor.observe(Hlc::parse(&a.text()).expect("cookie"), NOW);
        let b = survivor.put("cart", Some("B".into()), NOW);
        assert!(b > a, "{b:?} after {a:?}");
        survivor.merge(all(&victim));
        assert_eq!(
            survivor.get("cart"),
            Some("B"),
            "the handoff of A does not undo B"
        );
        // Without the cookie the older A would win: the clock alone cannot tell.
        let mut other = Store::new("o", 3);
        other.put("cart", Some("B".into()), NOW);
        other.merge(all(&victim));
        assert_eq!(other.get("cart"), Some("A"));
        // A reading far ahead is not taken from a client.
        let before = survivor.put("x", None, NOW);
        survivor.observe(Hlc(NOW + 3_600_000, 0), NOW);
        assert!(
            survivor.put("y", None, NOW).0 < NOW + 3_600_000,
            "{before:?}"
        );
    }

    #[test]
    fn a_replayed_batch_is_recognised_and_changes_nothing() {
        let mut a = Store::new("a", 1);
        a.put("x", Some("1".into()), NOW);
        a.bump("s");
        let mut b = Store::new("b", 2);
        let first = b.merge(all(&a));
        assert_eq!(first.applied, 2);
        let head = b.head();
        let again = b.merge(all(&a));
        assert_eq!(
            again,
            Merged {
                applied: 0,
                duplicates: 2,
                stale: 0
            }
        );
        assert_eq!(b.head(), head, "a replay does not touch the change log");
    }

    #[test]
    fn counters_add_up_over_instances() {
        let mut a = Store::new("a", 1);
        let mut b = Store::new("b", 2);
        a.bump("s");
        a.bump("s");
        b.bump("s");
        let ba = all(&a);
        b.merge(ba.clone());
        a.merge(all(&b));
        assert_eq!(a.count("s"), 3);
        assert_eq!(b.count("s"), 3);
        assert_eq!(b.bump("s"), 4);
    }

    #[test]
    fn batches_are_bounded_and_cursors_resume_where_they_stopped() {
        let mut a = Store::new("a", 7);
        for i in 0..50 {
            a.put(&format!("key-{i:02}"), Some("v".repeat(100)), NOW + i);
        }
        let mut cursor = String::new();
        let mut seen = 0;
        let mut b = Store::new("b", 8);
        loop {
            let bytes = a.changes(&cursor, 2048, false, &[]).expect("cursor");
            assert!(bytes.len() <= 2048, "{} bytes", bytes.len());
            let batch: Batch = serde_json::from_slice(&bytes).expect("json");
            seen += batch.changes.len();
            assert_eq!(batch.pending as usize, 50 - seen);
            b.merge(batch.clone());
            cursor = batch.next_cursor;
            if !batch.more {
                break;
            }
        }
        assert_eq!(seen, 50);
        assert_eq!(b.view(), a.view());
        // Nothing after the last cursor; a write after it is the only change.
        assert!(batch(&a, &cursor, 4096).changes.is_empty());
        a.put("key-07", Some("new".into()), NOW + 100);
        let after = batch(&a, &cursor, 4096);
        assert_eq!(after.changes.len(), 1);
    }

    #[test]
    fn own_changes_leave_out_what_was_merged_and_still_move_the_cursor() {
        let mut a = Store::new("a", 1);
        let mut b = Store::new("b", 2);
        b.put("from-b", Some("1".into()), NOW);
        b.bump("s");
        a.put("mine", Some("2".into()), NOW);
        a.merge(all(&b));
        a.bump("s");
        let own: Batch =
            serde_json::from_slice(&a.changes("", usize::MAX, true, &[]).expect("own"))
                .expect("json");
        let keys: Vec<String> = own
            .changes
            .iter()
            .map(|c| match c {
                Change::Kv { key, .. } => key.clone(),
                Change::Counter { instance, .. } => format!("counter of {instance}"),
            })
            .collect();
        assert_eq!(keys, ["mine", "counter of a"]);
        assert_eq!(
            own.next_cursor,
            a.cursor(),
            "the cursor moves past merged changes"
        );
        assert_eq!(own.pending, 0);
        assert_eq!(all(&a).changes.len(), 4, "without own: everything");
    }

    #[test]
    fn a_prefix_read_gives_only_those_keys_and_moves_the_cursor_past_the_rest() {
        let mut a = Store::new("a", 1);
        a.put("cart/1", Some("x".into()), NOW);
        a.put("other", Some("y".into()), NOW);
        a.bump("s");
        a.put("cart/2", Some("z".into()), NOW);
        let b: Batch = serde_json::from_slice(
            &a.changes("", usize::MAX, false, &["cart/".into()])
                .expect("prefix"),
        )
        .expect("json");
        let keys: Vec<String> = b
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Kv { key, .. } => Some(key.clone()),
                Change::Counter { .. } => None,
            })
            .collect();
        assert_eq!(keys, ["cart/1", "cart/2"]);
        assert_eq!(b.changes.len(), 2, "no counters");
        assert_eq!(b.next_cursor, a.cursor());
    }

    #[test]
    fn foreign_and_malformed_cursors_are_refused() {
        let mut a = Store::new("a", 1);
        a.put("k", Some("v".into()), NOW);
        let b = Store::new("b", 2);
        assert!(matches!(
            b.changes(&a.cursor(), 100, false, &[]),
            Err(CursorError::Gone(_))
        ));
        assert!(matches!(
            a.changes("nonsense", 100, false, &[]),
            Err(CursorError::Malformed(_))
        ));
        // A clone restored from a's snapshot has a log of its own.
        let snap = serde_json::to_vec(&a).expect("json");
        let c = Store::restore(&snap, "c", 3).expect("restore");
        assert!(matches!(
            c.changes(&a.cursor(), 100, false, &[]),
            Err(CursorError::Gone(_))
        ));
        assert_eq!(c.get("k"), Some("v"));
        assert_eq!(all(&c).changes.len(), 1, "the restored log is readable");
    }

    #[test]
    fn bad_batches_are_refused_whole() {
        let mut a = Store::new("a", 1);
        a.put("k", Some("v".into()), NOW);
        let mut bad = all(&a);
        bad.format = "form.changes/v9".into();
        assert!(Store::check(&bad, NOW).is_err_and(|e| e.contains("form.changes/v1")));
        let mut future = all(&a);
        if let Change::Kv { ts, .. } = &mut future.changes[0] {
            ts.0 = NOW + 3_600_000;
        }
        assert!(Store::check(&future, NOW).is_err_and(|e| e.contains("ahead")));
        let mut no_dot = all(&a);
        if let Change::Kv { dot, .. } = &mut no_dot.changes[0] {
            dot.1 = 0;
        }
        assert!(Store::check(&no_dot, NOW).is_err());
    }

    /// One write: instance index, key index, value or delete.
    fn op() -> impl Strategy<Value = (usize, u8, Option<u8>, u64)> {
        (0usize..3, 0u8..4, proptest::option::of(0u8..3), 0u64..3)
    }

    proptest! {
        #[test]
        fn instances_converge_under_any_order_and_duplication(
            ops in proptest::collection::vec(op(), 1..30),
            order in proptest::collection::vec((0usize..3, 0usize..3), 0..20),
        ) {
            let mut s: Vec<Store> = (0..3).map(|i| Store::new(&format!("i{i}"), i as u64)).collect();
            for (i, (who, key, val, dt)) in ops.iter().enumerate() {
                let k = format!("k{key}");
                if *key == 3 {
                    s[*who].bump("sess");
                } else {
                    s[*who].put(&k, val.map(|v| format!("v{v}-{i}")), NOW + dt);
                }
            }
            // Random exchanges first (some repeated), then everyone from everyone twice.
            for (from, to) in order {
                let b = all(&s[from]);
                s[to].merge(b.clone());
            }
            for _ in 0..2 {
                for from in 0..3 {
                    let b = all(&s[from]);
                    for to in s.iter_mut() {
                        to.merge(b.clone());
                    }
                }
            }
            prop_assert_eq!(s[0].view(), s[1].view());
            prop_assert_eq!(s[1].view(), s[2].view());
        }

        #[test]
        fn merging_is_commutative_associative_and_idempotent(
            ops in proptest::collection::vec(op(), 1..30),
        ) {
            let mut s: Vec<Store> = (0..3).map(|i| Store::new(&format!("i{i}"), i as u64)).collect();
            for (i, (who, key, val, dt)) in ops.iter().enumerate() {
                s[*who].put(&format!("k{key}"), val.map(|v| format!("v{v}-{i}")), NOW + dt);
                s[*who].bump(&format!("s{key}"));
            }
            let (a, b, c) = (all(&s[0]), all(&s[1]), all(&s[2]));
            let mut x = Store::new("x", 10);
            for batch in [&a, &b, &c] { x.merge(batch.clone()); }
            let mut y = Store::new("y", 11);
            for batch in [&c, &a, &b, &a, &c] { y.merge(batch.clone()); }
            // (b . c) first, as one batch, then a.
            let mut bc = Store::new("bc", 12);
            bc.merge(b.clone());
            bc.merge(c.clone());
            let mut z = Store::new("z", 13);
            z.merge(all(&bc));
            z.merge(a.clone());
            prop_assert_eq!(x.view(), y.view());
            prop_assert_eq!(x.view(), z.view());
        }
    }
}
