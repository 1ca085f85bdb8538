//! form-rplb: the load balancer. Routes HTTP requests by Host to a cluster's
//! instances with session affinity, drains instances before removal and checks their
//! health; controlled over gRPC (`form.rplb.v1.RplbControl`).

pub mod balance;
pub mod config;

use std::net::SocketAddr;

use form_runtime::cli::CommonArgs;
use form_runtime::grpc::{GRPC_LISTENER, GrpcServer};
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use form_runtime::upstream;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

/// The form-rplb service.
#[derive(Debug)]
pub struct Balancer {
    config: Config,
}

impl Balancer {
    /// The service with this configuration.
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

impl Service for Balancer {
    const NAME: &'static str = "form-rplb";
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
        let upstreams = upstream::from_config(&[("state", &self.config.state)])?;
        form_runtime::grpc::run(ctx, GrpcServer::new(), &upstreams).await
    }
}
