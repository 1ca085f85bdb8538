//! form-scaler: the scaling controller. Watches load and health, decides, and
//! carries out scale-out, scale-in, replacement and resize as operations recorded in
//! form-state.

pub mod config;
pub mod decide;
pub mod ownership;
pub mod policy;
pub mod victims;
pub mod window;

use std::net::SocketAddr;

use form_runtime::cli::CommonArgs;
use form_runtime::grpc::{GRPC_LISTENER, GrpcServer};
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use form_runtime::upstream;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

/// The form-scaler service.
#[derive(Debug)]
pub struct Controller {
    config: Config,
}

impl Controller {
    /// The service with this configuration.
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

impl Service for Controller {
    const NAME: &'static str = "form-scaler";
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
        let upstreams = upstream::from_config(&[
            ("state", &self.config.state),
            ("vmm", &self.config.vmm),
            ("rplb", &self.config.rplb),
        ])?;
        form_runtime::grpc::run(ctx, GrpcServer::new(), &upstreams).await
    }
}
