//! form-state: the replicated CRDT state store of the platform (clusters, members,
//! operations, heartbeats), served over gRPC and replicated between replicas by
//! gossip, without consensus.

pub mod codec;
pub mod config;
pub mod crdt;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod model;
pub mod replica;
pub mod storage;
pub mod store;

use std::net::SocketAddr;

use form_runtime::cli::CommonArgs;
use form_runtime::grpc::{GRPC_LISTENER, GrpcServer};
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use form_runtime::upstream;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

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
        let peers = upstream::from_config(&[("peers", &self.config.peers)])?;
        form_runtime::grpc::run(ctx, GrpcServer::new(), &peers).await
    }
}
