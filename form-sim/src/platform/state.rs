//! The in-process platform's form-state replicas: each a `Store` on its own data
//! directory with the `StateService` and `GossipService` served on the in-memory
//! network, every replica's key authorized by every other, and gossip links to each
//! other replica over in-memory channels (the production driver, `run_links`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1::gossip_service_client::GossipServiceClient;
use form_proto::state::v1::gossip_service_server::GossipServiceServer;
use form_proto::state::v1::state_service_server::StateServiceServer;
use form_runtime::shutdown::Shutdown;
use form_state::gossip::{self, GossipApi, GossipConfig, ReplicationPolicy};
use form_state::service::StateApi;
use form_state::store::{Store, StoreConfig};
use form_testkit::memnet::Net;
use tonic::transport::Server;

use super::{replica, serve};

/// Deltas per gossip message.
const BATCH: usize = 1000;

/// Starts `count` replicas under `dir`; their names on `net`.
pub(super) fn start(
    net: &Net,
    tasks: &mut tokio::task::JoinSet<()>,
    dir: &Path,
    count: usize,
    stopped: &Shutdown,
) -> anyhow::Result<Vec<String>> {
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
    for (i, name) in names.iter().enumerate().map(|(i, n)| (i + 1, n)) {
        let store = Store::open(&StoreConfig {
            replica_id: format!("s{i}"),
            data_dir: dir.join(format!("state-{i}")),
            node_key: key_path(dir, i),
            authorized_keys: Some(authorized_keys.clone()),
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
        let links: Vec<(String, GossipServiceClient<tonic::transport::Channel>)> = names
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
            anti_entropy_interval: Duration::from_secs(1),
            batch_size: BATCH,
            policy: ReplicationPolicy::DeltaSync,
        };
        tasks.spawn(gossip::driver::run_links(
            store,
            peers,
            config,
            links,
            Arc::new(tokio::sync::Notify::new()),
            stopped.clone(),
        ));
    }
    Ok(names)
}

fn key_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("state-{i}.key"))
}
