//! form-state: the replicated CRDT state store of the platform (clusters, members,
//! operations, heartbeats), served over gRPC and replicated between replicas by
//! gossip, without consensus.

pub mod codec;
pub mod config;
pub mod crdt;
pub mod envelope;
pub mod error;
pub mod gossip;
pub mod keys;
pub mod model;
pub mod replica;
pub mod service;
pub mod storage;
pub mod store;
pub mod watch;

use std::net::SocketAddr;

use form_runtime::cli::CommonArgs;
use form_runtime::grpc::{GRPC_LISTENER, GrpcServer};
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1::gossip_service_server::GossipServiceServer;
use form_proto::state::v1::state_service_server::StateServiceServer;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

use crate::gossip::{GossipApi, ReplicationPolicy};
use crate::replica::Limits;
use crate::service::StateApi;
use crate::store::{Store, StoreConfig};

/// The store settings of a replica's configuration.
pub fn store_config(c: &Config) -> StoreConfig {
    StoreConfig {
        replica_id: c.replica_id.clone(),
        data_dir: c.data_dir.clone(),
        node_key: c.node_key_path(),
        authorized_keys: c.authorized_keys.clone(),
        snapshot_every: c.snapshot_every,
        limits: Limits {
            buffer: c.buffer_limit,
            log: c.delta_log_limit,
            ..Limits::default()
        },
        clock: Default::default(),
        sync_latency: None,
    }
}

/// `form-state --print-public-key`: prints `<replica-id> <public key hex>`, creating
/// the node key if it is missing.
pub fn print_public_key() -> std::process::ExitCode {
    use std::process::ExitCode;
    let args: Args = match form_runtime::cli::parse() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let (config, _) = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            form_runtime::cli::usage_error(&e.to_string());
            return ExitCode::from(form_runtime::cli::EXIT_USAGE);
        }
    };
    match keys::load_or_create_node_key(&config.node_key_path()) {
        Ok(k) => {
            println!(
                "{} {}",
                config.replica_id,
                keys::hex(k.verifying_key().as_bytes())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("form-state: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A form-state replica.
#[derive(Debug)]
pub struct StateReplica {
    config: Config,
}

impl StateReplica {
    /// A replica with this configuration.
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

/// Largest request StateService decodes.
pub const MAX_WRITE_MESSAGE: usize = 1024 * 1024;

impl Service for StateReplica {
    const NAME: &'static str = "form-state";
    type Args = Args;
    type Config = Config;

    fn configure(args: Args) -> Result<(Self, CommonArgs), ConfigError> {
        let (config, common) = args.into_config()?;
        Ok((Self::new(config), common))
    }

    fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        vec![
            (GRPC_LISTENER, self.config.listen),
            (METRICS_LISTENER, self.config.metrics_listen),
        ]
    }

    async fn run(self, ctx: RunContext) -> Result<(), RuntimeError> {
        let c = &self.config;
        let store =
            Store::open(&store_config(c)).map_err(|e| RuntimeError::Service(e.to_string()))?;
        let peers = Arc::new(gossip::Peers::default());
        let urgent = Arc::new(tokio::sync::Notify::new());
        match &c.replication {
            // A full state per write would cost the whole state per write: full
            // replication keeps to its rounds.
            ReplicationPolicy::FullSync => {}
            _ if c.push_at_once => store.set_urgent(urgent.clone(), None),
            ReplicationPolicy::PrioritizedSync {
                high_priority_fields,
            } => {
                let fields = gossip::high_priority_fields(high_priority_fields)
                    .map_err(RuntimeError::Service)?;
                store.set_urgent(urgent.clone(), Some(fields));
            }
            ReplicationPolicy::DeltaSync => {}
        }
        let gossip_config = gossip::GossipConfig {
            peers: c.peers.clone(),
            sync_interval: Duration::from_millis(c.sync_interval_ms),
            push_gather: Duration::from_millis(c.push_gather_ms),
            anti_entropy_interval: Duration::from_millis(c.anti_entropy_interval_ms),
            batch_size: c.batch_size,
            policy: c.replication.clone(),
        };
        if c.peers.is_empty() {
            tracing::warn!("no --peers given: this replica replicates to nobody");
        }
        let wal_status = store.wal_status();
        let gossip_task = tokio::spawn(gossip::run(
            store.clone(),
            peers.clone(),
            gossip_config,
            urgent,
            ctx.shutdown.clone(),
        ));
        let server = GrpcServer::new()
            .add_service(
                StateServiceServer::new(
                    StateApi::new(store.clone(), c.operations_kept_per_cluster, c.max_clusters)
                        .with_member_networks(c.member_networks.clone()),
                )
                // A write is small (each value is at most 16 KiB); a 200 MiB request
                // must not make the replica hold it.
                .max_decoding_message_size(MAX_WRITE_MESSAGE)
                .max_encoding_message_size(gossip::MAX_MESSAGE),
            )
            .add_service(
                GossipServiceServer::new(GossipApi::new(store, peers, c.batch_size))
                    .max_decoding_message_size(gossip::MAX_MESSAGE)
                    .max_encoding_message_size(gossip::MAX_MESSAGE),
            );
        // While the log cannot write, the replica says so: NOT_SERVING until it can.
        let health = server.health();
        let mut wal = wal_status;
        tokio::spawn(async move {
            loop {
                let failing = wal.borrow_and_update().error.is_some();
                let status = if failing {
                    tonic_health::ServingStatus::NotServing
                } else {
                    tonic_health::ServingStatus::Serving
                };
                for name in [
                    "",
                    "form.state.v1.StateService",
                    "form.state.v1.GossipService",
                ] {
                    health.set_service_status(name, status).await;
                }
                if wal.changed().await.is_err() {
                    return;
                }
            }
        });
        let served = form_runtime::grpc::run(ctx, server, &[]).await;
        gossip_task.abort();
        served
    }
}
