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
}

#[derive(Debug)]
struct Running {
    stop: ShutdownHandle,
    store: Weak<Store>,
    wal: tokio::sync::watch::Receiver<form_state::storage::writer::Durable>,
}

impl Replicas {
    /// Starts `count` replicas under `dir`.
    pub(super) fn start(
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        dir: &Path,
        count: usize,
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
    ) -> anyhow::Result<()> {
        let n = i + 1;
        let name = &self.names[i];
        let (stop, stopped) = shutdown::channel();
        let store = Store::open(&StoreConfig {
            replica_id: format!("s{n}"),
            data_dir: self.dir.join(format!("state-{n}")),
            node_key: key_path(&self.dir, n),
            authorized_keys: Some(self.authorized_keys.clone()),
            snapshot_every: 10_000,
            limits: Default::default(),
        })?;
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
            wal: store.wal_status(),
        });
        tasks.spawn(gossip::driver::run_links(
            store, peers, config, links, urgent, stopped,
        ));
        Ok(())
    }

    /// Stops replica `i` as a killed process stops: its services end, every
    /// connection to or from it breaks, and its log writer closes what it wrote.
    /// Returns once nothing of it runs (its store is gone and its writer's thread
    /// ended), so it can be started again on the same files.
    pub(super) async fn crash(&mut self, net: &Net, i: usize) {
        let Some(r) = self.running[i].take() else {
            return;
        };
        r.stop.trigger(ShutdownKind::Fast);
        net.partition(&self.names[i]);
        while r.store.strong_count() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The writer is a thread: the simulated clock waits for it.
        let _hold = form_runtime::clock::hold();
        let mut wal = r.wal;
        while wal.changed().await.is_ok() {}
    }

    /// Starts replica `i` again from its files and lets connections reach it.
    pub(super) fn restart(
        &mut self,
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        i: usize,
    ) -> anyhow::Result<()> {
        self.run(net, tasks, i)?;
        net.heal(&self.names[i]);
        Ok(())
    }

    /// Stops every replica.
    pub(super) fn stop(&mut self) {
        for r in self.running.iter_mut().filter_map(Option::take) {
            r.stop.trigger(ShutdownKind::Fast);
        }
    }
}

fn key_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("state-{i}.key"))
}
