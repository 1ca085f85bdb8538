//! form-scaler: the scaling controller. Watches load and health, decides, and
//! carries out scale-out, scale-in, replacement and resize as operations recorded in
//! form-state.

pub mod arrivals;
pub mod autoscale;
pub mod clusters;
pub mod config;
pub mod continuous;
pub mod controller;
pub mod decide;
pub mod faults;
pub mod fencing;
pub mod fleet;
pub mod health;
pub mod health_round;
pub mod keyed;
pub mod observe;
pub mod ops;
pub mod ownership;
pub mod peers;
pub mod placement;
pub mod platform;
pub mod policy;
pub mod probe;
pub mod series;
pub mod service;
pub mod standby;
pub mod victims;
pub mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use controller::Shared;
use faults::Faults;
use form_proto::scaler::v1::scaler_service_server::ScalerServiceServer;
use ops::engine::{Engine, Limits};
use platform::Platform;
use service::Api;

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
        let c = self.config;
        let upstreams =
            upstream::from_config(&[("state", &c.state), ("vmm", &c.vmm), ("rplb", &c.rplb)])?;
        let state = upstreams
            .iter()
            .find(|u| u.name() == "state")
            .ok_or_else(|| {
                ConfigError::invalid(
                    "state",
                    "no form-state address given; expected --state HOST:PORT[,HOST:PORT...] (operations are recorded there)",
                )
            })?;
        let engine = Engine {
            platform: Platform::new(state, &c.vmm, &c.rplb)?,
            limits: Limits {
                ready_timeout: Duration::from_millis(c.ready_timeout_ms),
                drain_timeout: Duration::from_millis(c.drain_timeout_ms),
                balancer_timeout: Duration::from_millis(c.balancer_timeout_ms),
                operation_timeout: Duration::from_millis(c.operation_timeout_ms),
                node_timeout: Duration::from_millis(c.node_timeout_ms),
                ..Limits::default()
            },
            faults: Faults::parse(&c.inject_fault)?,
            taking_standby: Default::default(),
        };
        let shared = Arc::new(Shared::new(
            c.id.clone(),
            engine,
            c.max_instances_cap,
            Duration::from_millis(c.controller_ttl_ms),
        ));
        {
            let shared = shared.clone();
            let client = shared.engine.platform.state.clone();
            let address = ctx
                .local_addr(GRPC_LISTENER)
                .map_or_else(|| c.listen.to_string(), |a| a.to_string());
            let interval = Duration::from_millis(c.controller_heartbeat_ms);
            let shutdown = ctx.shutdown.clone();
            tokio::spawn(
                async move { shared.peers.run(client, address, interval, shutdown).await },
            );
        }
        let settings = autoscale::Settings {
            interval: Duration::from_millis(c.evaluate_interval_ms),
            heartbeat: Duration::from_millis(c.heartbeat_interval_ms),
            act: c.autoscale,
            replace_after: Duration::from_millis(c.replace_after_ms),
            metric_window: Duration::from_millis(c.metric_window_ms),
        };
        tokio::spawn(autoscale::run(
            shared.clone(),
            settings,
            ctx.shutdown.clone(),
        ));
        tokio::spawn(continuous::run(shared.clone(), ctx.shutdown.clone()));
        tokio::spawn(
            shared
                .clusters
                .clone()
                .follow(shared.engine.platform.state.clone(), ctx.shutdown.clone()),
        );
        let server = GrpcServer::new().add_service(ScalerServiceServer::new(Api::new(shared)));
        form_runtime::grpc::run(ctx, server, &upstreams).await
    }
}
