//! The in-process platform's form-state replicas: each a `Store` on its own data
//! directory with the `StateService` and `GossipService` served on the in-memory
//! network, every replica's key authorized by every other, and gossip links to each
//! other replica over in-memory channels (the production driver, `run_links`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use form_proto::state::v1::gossip_service_client::GossipServiceClient;
use form_proto::state::v1::gossip_service_server::GossipServiceServer;
use form_proto::state::v1::state_service_server::StateServiceServer;
use form_runtime::shutdown::{self, ShutdownHandle, ShutdownKind};
use form_state::gossip::{self, GossipApi, GossipConfig, ReplicationPolicy};
use form_state::service::StateApi;
use form_state::store::{Store, StoreConfig};
use form_testkit::memnet::Net;
use tonic::transport::Server;

use super::{replica, serve};
use crate::rng::Rng;

/// Deltas per gossip message.
const BATCH: usize = 1000;

/// The replicas of a platform: their names, and how each is stopped and started again.
#[derive(Debug)]
pub(super) struct Replicas {
    /// Names on the network, in order (`state-1:1`, ...).
    pub names: Vec<String>,
    dir: PathBuf,
    authorized_keys: PathBuf,
    /// Per replica: what stops it, and its store while it runs.
    running: Vec<Option<Running>>,
    /// Their machines' disks and clocks.
    machines: Machines,
    /// Per replica, how many times it was started (each start's disk draws anew).
    starts: Vec<u64>,
}

/// What the replicas' machines are like: each one's clock offset, and the most a
/// sync of its disk takes on simulated time on top of the real one (drawn for each
/// sync from the machine's own stream).
#[derive(Debug, Clone, Default)]
pub(super) struct Machines {
    pub skews: Vec<form_runtime::clock::Skew>,
    pub sync_most: Duration,
    pub seed: u64,
    /// Broken on purpose: writes acknowledged before the disk synced them.
    pub ack_before_sync: bool,
}

#[derive(Debug)]
struct Running {
    stop: ShutdownHandle,
    store: Weak<Store>,
    /// What the disk has kept (slow disks: later than written).
    durable: tokio::sync::watch::Receiver<form_state::storage::writer::Durable>,
    /// What the writer's thread wrote; closed when it ends.
    written: tokio::sync::watch::Receiver<form_state::storage::writer::Durable>,
}

/// What a replica's crash did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Crashed {
    /// Its own writes that were durable at the crash (each may have been
    /// acknowledged): it must have them all when it starts again.
    pub own_durable: u64,
    /// Bytes its log had written but not synced, which the crash dropped.
    pub dropped: u64,
}

impl Replicas {
    /// Starts `count` replicas under `dir`.
    pub(super) fn start(
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        dir: &Path,
        count: usize,
        machines: Machines,
    ) -> anyhow::Result<Self> {
        let names: Vec<String> = (1..=count).map(replica).collect();
        // Every replica's key, authorized by all.
        let mut authorized = String::new();
        for i in 1..=count {
            let key = form_state::keys::load_or_create_node_key(&key_path(dir, i))?;
            authorized.push_str(&format!(
                "s{i} {}\n",
                form_state::keys::hex(key.verifying_key().as_bytes())
            ));
        }
        let authorized_keys = dir.join("authorized-keys");
        std::fs::write(&authorized_keys, authorized)?;
        let mut r = Self {
            names,
            dir: dir.to_owned(),
            authorized_keys,
            running: (0..count).map(|_| None).collect(),
            machines,
            starts: vec![0; count],
        };
        for i in 0..count {
            r.run(net, tasks, i)?;
        }
        Ok(r)
    }

    /// Starts replica `i` (from 0) from its directory.
    fn run(
        &mut self,
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        i: usize,
    ) -> anyhow::Result<u64> {
        self.starts[i] += 1;
        let n = i + 1;
        let name = &self.names[i];
        let (stop, stopped) = shutdown::channel();
        let store = Store::open(&StoreConfig {
            replica_id: format!("s{n}"),
            data_dir: self.dir.join(format!("state-{n}")),
            node_key: key_path(&self.dir, n),
            authorized_keys: Some(self.authorized_keys.clone()),
            // Often enough that runs rotate the log and crashes meet snapshots (a
            // crash lets a queued snapshot finish; one it interrupts leaves the
            // state form-state's storage tests recover from).
            snapshot_every: 500,
            limits: Default::default(),
            clock: self.machines.skews.get(i).copied().unwrap_or_default(),
            sync_latency: Some(self.sync_latency(i)),
        })?;
        // What it recovered of its own writes, before anything new reaches it.
        let recovered = {
            let r = store.lock();
            r.version().get(r.actor()).copied().unwrap_or(0)
        };
        let peers = Arc::new(gossip::Peers::default());
        let router = Server::builder()
            .add_service(StateServiceServer::new(StateApi::new(
                store.clone(),
                10,
                100_000,
            )))
            .add_service(GossipServiceServer::new(GossipApi::new(
                store.clone(),
                peers.clone(),
                BATCH,
            )));
        serve(net, tasks, name, router, stopped.clone());
        let links: Vec<(String, GossipServiceClient<tonic::transport::Channel>)> = self
            .names
            .iter()
            .filter(|other| *other != name)
            .map(|other| {
                let ch = net.channel_from(name, other);
                (other.clone(), GossipServiceClient::new(ch))
            })
            .collect();
        let config = GossipConfig {
            peers: Vec::new(),
            sync_interval: Duration::from_millis(100),
            push_gather: Duration::from_millis(1),
            anti_entropy_interval: Duration::from_secs(1),
            batch_size: BATCH,
            policy: ReplicationPolicy::DeltaSync,
        };
        // As deployed: every durable write is pushed to the peers at once.
        let urgent = Arc::new(tokio::sync::Notify::new());
        store.set_urgent(urgent.clone(), None);
        self.running[i] = Some(Running {
            stop,
            store: Arc::downgrade(&store),
            durable: store.wal_status(),
            written: store.wal_written(),
        });
        tasks.spawn(gossip::driver::run_links(
            store, peers, config, links, urgent, stopped,
        ));
        Ok(recovered)
    }

    /// Replica `i`'s disk: none, or syncs that take up to `sync_most` more, drawn from
    /// the replica's own stream.
    fn sync_latency(&self, i: usize) -> form_state::storage::slow_disk::SyncLatency {
        // Also without latency: the disk then keeps each record at the instant it is
        // queued (once the writer's thread wrote it), so what a crash finds synced is
        // a matter of simulated time, not of how far the thread got.
        let most = self.machines.sync_most.as_millis() as u64;
        let stream = self.machines.seed ^ (i as u64 + 1) ^ (self.starts[i] << 32);
        let rng = std::sync::Mutex::new(Rng::new(stream));
        form_state::storage::slow_disk::SyncLatency {
            draw: Arc::new(move || {
                let mut rng = rng
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                Duration::from_millis(rng.range(0, most))
            }),
            ack_before_sync: self.machines.ack_before_sync,
        }
    }

    /// Whether replica `i` has applied a change its disk has not kept yet.
    pub(super) fn unsynced(&self, i: usize) -> bool {
        let store = self.running[i].as_ref().and_then(|r| r.store.upgrade());
        store.is_some_and(|s| {
            let r = s.lock();
            r.lsn() > r.durable_lsn()
        })
    }

    /// Stops replica `i` as its machine's crash stops it: its services end, every
    /// connection to or from it breaks, and what its log had written but its disk had
    /// not synced at that moment is cut at a point `rng` draws (a torn record
    /// included). Returns once nothing of it runs (its store is gone and its writer's
    /// thread ended), so it can be started again on the same files.
    ///
    /// The writer's thread finishes what it was given after the crash's moment; all of
    /// that counts as unsynced. If it rotated its segment meanwhile (a snapshot), the
    /// snapshot stays: it holds everything that was synced, and more.
    pub(super) async fn crash(&mut self, net: &Net, i: usize, rng: &mut Rng) -> Crashed {
        let Some(r) = self.running[i].take() else {
            return Crashed::default();
        };
        let own_durable = r
            .store
            .upgrade()
            .map_or(0, |s| s.lock().durable_own_writes());
        let synced = r.durable.borrow().end;
        r.stop.trigger(ShutdownKind::Fast);
        net.partition(&self.names[i]);
        while r.store.strong_count() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        {
            // The writer is a thread: the simulated clock waits for it.
            let _hold = form_runtime::clock::hold();
            let mut written = r.written;
            while written.changed().await.is_ok() {}
        }
        // A slow disk's last syncs pass on simulated time.
        let mut durable = r.durable;
        while durable.changed().await.is_ok() {}
        let dropped = cut_unsynced(&self.dir.join(format!("state-{}", i + 1)), synced, rng);
        Crashed {
            own_durable,
            dropped,
        }
    }

    /// Starts replica `i` again from its files and lets connections reach it; returns
    /// its version vector's own entry as recovered (before any new write).
    pub(super) fn restart(
        &mut self,
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        i: usize,
    ) -> anyhow::Result<u64> {
        let recovered = self.run(net, tasks, i)?;
        net.heal(&self.names[i]);
        Ok(recovered)
    }

    /// Stops every replica.
    pub(super) fn stop(&mut self) {
        for r in self.running.iter_mut().filter_map(Option::take) {
            r.stop.trigger(ShutdownKind::Fast);
        }
    }
}

/// Cuts the newest log segment under `data_dir` back to what was synced (`synced`:
/// segment and length) and a drawn part of the rest; returns the bytes cut.
fn cut_unsynced(data_dir: &Path, synced: (u64, u64), rng: &mut Rng) -> u64 {
    let newest = std::fs::read_dir(data_dir.join("wal"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_suffix(".log")?.parse::<u64>().ok()?;
            Some(n)
        })
        .max();
    let Some(segment) = newest else { return 0 };
    let path = form_state::storage::segment_path(data_dir, segment);
    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
    let kept = if segment == synced.0 {
        synced.1.min(len)
    } else {
        0
    };
    let keep = kept + rng.range(0, len - kept);
    if keep < len {
        let f = std::fs::OpenOptions::new().write(true).open(&path);
        if let Err(e) = f.and_then(|f| f.set_len(keep)) {
            panic!("cutting {}: {e}", path.display());
        }
    }
    len - keep
}

fn key_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("state-{i}.key"))
}
