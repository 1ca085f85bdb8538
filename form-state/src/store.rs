//! The replica with its durability: every applied delta goes to the write-ahead log,
//! and a write is acknowledged once it is fsynced. Start-up recovers the replica from
//! the data directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ed25519_dalek::SigningKey;
use form_proto::state::v1 as pb;
use prost::Message;
use tokio::sync::watch;

use crate::codec;
use crate::crdt::{Delta, Field, State};
use crate::envelope::{Authorized, VerifiedDelta};
use crate::error::StateError;
use crate::replica::{Limits, Received, Replica};
use crate::storage::writer::{self, WalHandle};
use crate::storage::{Record, recover};

/// What the store needs to open.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This replica's id (the part before `@` of its actor).
    pub replica_id: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The node key file.
    pub node_key: PathBuf,
    /// The authorized keys file; without it only this replica's own key is accepted.
    pub authorized_keys: Option<PathBuf>,
    /// Records between snapshots.
    pub snapshot_every: u64,
    /// Memory limits.
    pub limits: Limits,
    /// This machine's clock (the system's; a simulator skews it).
    pub clock: form_runtime::clock::Skew,
    /// A simulated slow disk (none in production).
    pub sync_latency: Option<crate::storage::slow_disk::SyncLatency>,
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct Written {
    /// The version vector after the write.
    pub version: std::collections::BTreeMap<String, u64>,
    /// Its local sequence number.
    pub lsn: u64,
}

/// A durable replica.
#[derive(Debug)]
pub struct Store {
    replica: Mutex<Replica>,
    wal: WalHandle,
    durable: watch::Sender<u64>,
    snapshot_every: u64,
    since_snapshot: Mutex<u64>,
    urgent: Mutex<Option<Urgent>>,
    boot: u64,
    anti_entropy_wanted: std::sync::atomic::AtomicBool,
    clock: form_runtime::clock::Skew,
}

/// Woken once a local write is durable: after every write (`None`), or after a write
/// to one of the fields.
type Urgent = (Arc<tokio::sync::Notify>, Option<Vec<Field>>);

/// Bits of a change sequence number that hold the lsn; the bits above hold the boot
/// count, so sequences of an earlier run of the replica never match this run's.
const LSN_BITS: u32 = 40;

impl Store {
    /// Recovers the replica from `config.data_dir` (creating it on first start) and
    /// starts the log writer. Must run inside a tokio runtime.
    pub fn open(config: &StoreConfig) -> Result<Arc<Store>, StateError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(StateError::io(dir))?;
        let incarnation = incarnation(dir)?;
        let boot = next_boot(dir)?;
        let key = crate::keys::load_or_create_node_key(&config.node_key)?;
        let authorized = authorized(config, &key)?;
        let actor = format!("{}@{incarnation}", config.replica_id);

        let started = std::time::Instant::now();
        let rec = recover::recover(dir)?;
        let state = match &rec.snapshot {
            Some(bytes) => codec::decode_state(bytes).map_err(|e| StateError::Storage {
                path: crate::storage::snapshot_path(dir, rec.snapshot_segment),
                message: format!("payload: {e}"),
            })?,
            None => State::default(),
        };
        let mut replica = Replica::new(actor, key, authorized, state, config.limits);
        let replayed = rec.records.len();
        for (i, record) in rec.records.into_iter().enumerate() {
            let bad = |m: String| StateError::Storage {
                path: dir.join("wal"),
                message: format!("record {i} after the snapshot: {m}"),
            };
            match record {
                Record::Delta(bytes) => {
                    let signed = pb::SignedDelta::decode(bytes.as_slice())
                        .map_err(|e| bad(e.to_string()))?;
                    let v = Authorized::decode_trusted(Arc::new(signed))
                        .map_err(|e| bad(e.to_string()))?;
                    replica.receive(vec![v]);
                }
                Record::FullState(bytes) => {
                    let s = codec::decode_state(&bytes).map_err(|e| bad(e.to_string()))?;
                    replica.merge_state(&s);
                }
            }
        }
        let lsn = replica.lsn();
        replica.mark_durable(lsn);
        tracing::info!(
            actor = replica.actor(),
            entries = replica.state().entry_count(),
            replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        let wal = writer::spawn(dir.clone(), rec.segment, lsn, config.sync_latency.clone())?;
        let (durable, _) = watch::channel(lsn);
        let store = Arc::new(Store {
            replica: Mutex::new(replica),
            wal,
            durable,
            snapshot_every: config.snapshot_every.max(1),
            since_snapshot: Mutex::new(replayed as u64),
            urgent: Mutex::new(None),
            boot,
            anti_entropy_wanted: std::sync::atomic::AtomicBool::new(false),
            clock: config.clock,
        });
        store.spawn_durability_follower();
        Ok(store)
    }

    fn spawn_durability_follower(self: &Arc<Self>) {
        let mut rx = self.wal.durable();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let lsn = rx.borrow_and_update().lsn;
                let Some(store) = weak.upgrade() else { return };
                store.lock().mark_durable(lsn);
                store.durable.send_replace(lsn);
            }
        });
    }

    /// The replica, locked. Keep the guard short.
    pub fn lock(&self) -> MutexGuard<'_, Replica> {
        self.replica
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Durable lsn updates (for `Watch` and gossip).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Wakes `notify` once every local write to one of `fields` is durable
    /// (PrioritizedSync), or every local write (`None`: push at once).
    pub fn set_urgent(&self, notify: Arc<tokio::sync::Notify>, fields: Option<Vec<Field>>) {
        *self
            .urgent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((notify, fields));
    }

    /// The change sequence number (as `WriteReply` and `Watch` show it) of `lsn`.
    pub fn sequence(&self, lsn: u64) -> u64 {
        (self.boot << LSN_BITS) | lsn
    }

    /// The lsn of a sequence number of this run; `None` for one of an earlier run.
    pub fn lsn_of_sequence(&self, sequence: u64) -> Option<u64> {
        (sequence >> LSN_BITS == self.boot).then_some(sequence & ((1 << LSN_BITS) - 1))
    }

    /// Whether a full buffer refused deltas since the last call: gossip then runs
    /// anti-entropy at once to fetch them in order.
    pub fn take_anti_entropy_request(&self) -> bool {
        self.anti_entropy_wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until change `lsn` is durable.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StateError> {
        self.wal.wait_durable(lsn).await
    }

    /// What the log writer has made durable, and whether it is failing (on a simulated
    /// slow disk: what the disk kept, without the writer's errors).
    pub fn wal_status(&self) -> watch::Receiver<crate::storage::writer::Durable> {
        self.wal.durable()
    }

    /// What the log writer's thread wrote; closed once the thread ended.
    pub fn wal_written(&self) -> watch::Receiver<crate::storage::writer::Durable> {
        self.wal.written()
    }

    /// Milliseconds since the Unix epoch on this replica's clock: the times it records.
    pub fn now_ms(&self) -> u64 {
        self.clock.unix_ms()
    }

    /// `f` of the replica, answered once everything it saw is durable: a read never
    /// shows a change the log has not kept (while the log fails, reads are refused).
    pub async fn read<T>(&self, f: impl FnOnce(&Replica) -> T) -> Result<T, StateError> {
        let (lsn, out) = {
            let r = self.lock();
            (r.lsn(), f(&r))
        };
        self.wal.wait_durable(lsn).await?;
        Ok(out)
    }

    /// `f` of the whole state, computed off the replica's lock on the blocking pool (the
    /// lock is held only to take a copy-on-write clone), once what it saw is durable:
    /// for reads that walk every cluster or operation, which would otherwise hold
    /// every write behind them.
    pub async fn read_all<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, StateError> {
        let (lsn, state) = {
            let r = self.lock();
            (r.lsn(), r.state().clone())
        };
        self.wal.wait_durable(lsn).await?;
        form_runtime::clock::blocking(move || f(&state))
            .await
            .map_err(|e| StateError::Unavailable(format!("a read failed: {e}")))
    }

    /// Refuses a change while the log writer fails: it would be neither kept nor
    /// acknowledged.
    fn writable(&self) -> Result<(), StateError> {
        match self.wal.failing() {
            Some(e) => Err(StateError::Unavailable(format!(
                "the write-ahead log cannot write ({e}); no change is taken until it can, retry later"
            ))),
            None => Ok(()),
        }
    }

    /// A local write; returns once it is durable.
    pub async fn write(
        &self,
        make: impl FnOnce(&State, &str) -> Result<Option<Delta>, StateError>,
    ) -> Result<Written, StateError> {
        let urgent = self
            .urgent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.writable()?;
        let (lsn, version, wake) = {
            let mut r = self.lock();
            let made = r.write(self.clock.unix_ms(), make)?;
            let mut wake = None;
            if let Some(d) = made {
                if let Some((notify, fields)) = &urgent
                    && fields.as_ref().is_none_or(|fields| {
                        d.delta
                            .writes
                            .iter()
                            .any(|(k, _)| fields.contains(&k.field))
                    })
                {
                    wake = Some(notify.clone());
                }
                self.log(&mut r, vec![d])?;
                metrics::counter!("form_state_local_writes_total").increment(1);
            }
            (r.lsn(), r.version(), wake)
        };
        self.wal.wait_durable(lsn).await?;
        self.lock().mark_durable(lsn);
        if let Some(n) = wake {
            n.notify_one();
        }
        Ok(Written { version, lsn })
    }

    /// Applies received deltas (after verification) and logs those applied.
    pub fn receive(&self, deltas: Vec<VerifiedDelta>) -> Result<Received, StateError> {
        // A peer's deltas wait (at the peer) while the log cannot keep them.
        self.writable()?;
        let mut r = self.lock();
        let out = r.receive(deltas);
        if out.overflow > 0 {
            self.anti_entropy_wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.log(&mut r, out.applied.clone())?;
        metrics::counter!("form_state_deltas_applied_total").increment(out.applied.len() as u64);
        metrics::gauge!("form_state_buffered_deltas").set(r.pending_len() as f64);
        Ok(out)
    }

    /// Joins a peer's whole state and logs it; `encoded` is the state as it arrived
    /// (what the log keeps, so it is not encoded again).
    pub fn merge_state(&self, state: &State, encoded: Vec<u8>) -> Result<(), StateError> {
        self.writable()?;
        let bytes = encoded;
        let mut r = self.lock();
        let (changed, applied) = r.merge_state(state);
        if changed {
            // A full state weighs as much in the log as many deltas: count it so.
            *self
                .since_snapshot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += bytes.len() as u64 / 1024;
            self.wal
                .append(r.lsn() - applied.len() as u64, Record::FullState(bytes))?;
            metrics::counter!("form_state_full_state_merges_total").increment(1);
        }
        self.log(&mut r, applied)?;
        Ok(())
    }

    /// Logs applied deltas (in lsn order, under the replica lock) and takes a snapshot
    /// once enough was logged since the last one.
    fn log(
        &self,
        r: &mut MutexGuard<'_, Replica>,
        applied: Vec<Arc<VerifiedDelta>>,
    ) -> Result<(), StateError> {
        let first = r.lsn() + 1 - applied.len() as u64;
        for (i, d) in applied.iter().enumerate() {
            self.wal
                .append(first + i as u64, Record::Delta(d.signed.encode_to_vec()))?;
        }
        metrics::gauge!("form_state_entries").set(r.state().entry_count() as f64);
        let mut since = self
            .since_snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *since += applied.len() as u64;
        if *since >= self.snapshot_every {
            *since = 0;
            self.wal.snapshot(r.lsn(), r.state().clone())?;
        }
        Ok(())
    }
}

/// Counts starts of the replica (persisted), so change sequences differ per run.
fn next_boot(dir: &Path) -> Result<u64, StateError> {
    let path = dir.join("boots");
    let n = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| StateError::Storage {
            path: path.clone(),
            message: format!("'{}': {e}; expected a number", s.trim()),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(StateError::io(&path)(e)),
    } + 1;
    write_synced(&path, format!("{n}\n").as_bytes())?;
    Ok(n & 0xff_ffff)
}

/// Writes a small file durably (temporary file, fsync, rename, fsync of the directory).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(StateError::io(&tmp))?;
    f.write_all(bytes).map_err(StateError::io(&tmp))?;
    f.sync_all().map_err(StateError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(StateError::io(path))?;
    if let Some(dir) = path.parent() {
        crate::storage::sync_dir(dir).map_err(StateError::io(dir))?;
    }
    Ok(())
}

fn incarnation(dir: &Path) -> Result<String, StateError> {
    let path = dir.join("incarnation");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Ok(_) => Err(StateError::Storage {
            path,
            message: "empty; expected a hex incarnation id".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!(
                "{:08x}",
                (form_runtime::clock::unix_ms() as u32) ^ std::process::id().rotate_left(16)
            );
            write_synced(&path, format!("{id}\n").as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(StateError::io(&path)(e)),
    }
}

fn authorized(config: &StoreConfig, key: &SigningKey) -> Result<Authorized, StateError> {
    let mut keys = match &config.authorized_keys {
        Some(p) => crate::keys::load_authorized(p)?,
        None => {
            tracing::warn!(
                "no --authorized-keys: only this replica's own key is accepted, so it replicates with nobody"
            );
            Default::default()
        }
    };
    match keys.get(&config.replica_id) {
        Some(k) if *k != key.verifying_key() => {
            return Err(StateError::Storage {
                path: config.authorized_keys.clone().unwrap_or_default(),
                message: format!(
                    "lists a key for {} that is not the key in {}",
                    config.replica_id,
                    config.node_key.display()
                ),
            });
        }
        Some(_) => {}
        None => {
            keys.insert(config.replica_id.clone(), key.verifying_key());
        }
    }
    Ok(Authorized::new(keys))
}
