//! The replica with its durability: every applied delta goes to the write-ahead log,
//! and a write is acknowledged once it is fsynced. Start-up recovers the replica from
//! the data directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

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
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    urgent: Mutex<Option<(Arc<tokio::sync::Notify>, Vec<Field>)>>,
}

impl Store {
    /// Recovers the replica from `config.data_dir` (creating it on first start) and
    /// starts the log writer. Must run inside a tokio runtime.
    pub fn open(config: &StoreConfig) -> Result<Arc<Store>, StateError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(StateError::io(dir))?;
        let incarnation = incarnation(dir)?;
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
        let wal = writer::spawn(dir.clone(), rec.segment, lsn)?;
        let (durable, _) = watch::channel(lsn);
        let store = Arc::new(Store {
            replica: Mutex::new(replica),
            wal,
            durable,
            snapshot_every: config.snapshot_every.max(1),
            since_snapshot: Mutex::new(replayed as u64),
            urgent: Mutex::new(None),
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

    /// Wakes `notify` after every local write to one of `fields` (PrioritizedSync).
    pub fn set_urgent(&self, notify: Arc<tokio::sync::Notify>, fields: Vec<Field>) {
        *self
            .urgent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((notify, fields));
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
        let (lsn, version, wake) = {
            let mut r = self.lock();
            let made = r.write(now_ms(), make)?;
            let mut wake = None;
            if let Some(d) = made {
                if let Some((notify, fields)) = &urgent
                    && d.delta
                        .writes
                        .iter()
                        .any(|(k, _)| fields.contains(&k.field))
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
        let mut r = self.lock();
        let out = r.receive(deltas);
        self.log(&mut r, out.applied.clone())?;
        metrics::counter!("form_state_deltas_applied_total").increment(out.applied.len() as u64);
        metrics::gauge!("form_state_buffered_deltas").set(r.pending_len() as f64);
        Ok(out)
    }

    /// Joins a peer's whole state and logs it.
    pub fn merge_state(&self, state: &State) -> Result<(), StateError> {
        let mut r = self.lock();
        let applied = r.merge_state(state);
        self.wal.append(
            r.lsn() - applied.len() as u64,
            Record::FullState(codec::encode_state(state)),
        )?;
        self.log(&mut r, applied)?;
        metrics::counter!("form_state_full_state_merges_total").increment(1);
        Ok(())
    }

    fn log(
        &self,
        r: &mut MutexGuard<'_, Replica>,
        applied: Vec<Arc<VerifiedDelta>>,
    ) -> Result<(), StateError> {
        if applied.is_empty() {
            return Ok(());
        }
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
                (now_ms() as u32) ^ std::process::id().rotate_left(16)
            );
            std::fs::write(&path, format!("{id}\n")).map_err(StateError::io(&path))?;
            crate::storage::sync_dir(dir).map_err(StateError::io(dir))?;
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
