//! form-rplb: the load balancer. Routes HTTP requests by Host to a cluster's
//! instances with session affinity, drains instances before removal and checks their
//! health; controlled over gRPC (`form.rplb.v1.RplbControl`) and following form-state.

pub mod balance;
pub mod config;
pub mod control;
pub mod core;
pub mod drain;
pub mod export;
pub mod follow;
pub mod health_check;
pub mod proxy;
pub mod routes;
pub mod stats;
pub mod trusted;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use form_proto::rplb::v1::rplb_control_server::RplbControlServer;
use form_runtime::cli::CommonArgs;
use form_runtime::grpc::{GRPC_LISTENER, GrpcServer};
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use form_runtime::tls::public::PublicCerts;
use form_runtime::upstream::Upstream;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

/// Name of the HTTP data plane listener.
pub const HTTP_LISTENER: &str = "http";
/// Name of the HTTPS data plane listener.
pub const HTTPS_LISTENER: &str = "https";

/// The form-rplb service.
#[derive(Debug)]
pub struct Balancer {
    config: Config,
    key: [u8; 32],
    /// The HTTPS certificates, read at start (with `listen_https`).
    https: Option<Arc<PublicCerts>>,
}

/// Reads a cookie key file: 64 hex characters (surrounding white space ignored).
pub fn read_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            "cookie_key_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let hex = text.trim();
    let bad = || {
        ConfigError::invalid(
            "cookie_key_file",
            format!("{} must hold 64 hex characters (32 bytes)", path.display()),
        )
    };
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

fn random_key() -> Result<[u8; 32], ConfigError> {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| {
            ConfigError::invalid(
                "cookie_key_file",
                format!("no key file and /dev/urandom unreadable: {e}"),
            )
        })?;
    Ok(key)
}

impl Balancer {
    /// The service with this configuration and cookie key.
    pub fn new(config: Config, key: [u8; 32]) -> Self {
        Self {
            config,
            key,
            https: None,
        }
    }
}

impl Service for Balancer {
    const NAME: &'static str = "form-rplb";
    type Args = Args;
    type Config = Config;

    fn configure(args: Args) -> Result<(Self, CommonArgs), ConfigError> {
        let (config, common) = args.into_config()?;
        let key = match &config.cookie_key_file {
            Some(p) => read_key(p)?,
            None => random_key()?,
        };
        let https = PublicCerts::from_setting(config.https_certs.as_deref())?;
        Ok((
            Self {
                https,
                ..Self::new(config, key)
            },
            common,
        ))
    }

    fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut v = vec![
            (GRPC_LISTENER, self.config.listen),
            (METRICS_LISTENER, self.config.metrics_listen),
            (HTTP_LISTENER, self.config.listen_http),
        ];
        v.extend(self.config.listen_https.map(|a| (HTTPS_LISTENER, a)));
        v
    }

    fn graceful_deadline(&self) -> Duration {
        self.config.shutdown_grace() + Duration::from_secs(1)
    }

    async fn run(self, mut ctx: RunContext) -> Result<(), RuntimeError> {
        if self.config.cookie_key_file.is_none() {
            tracing::warn!(
                "no cookie_key_file: using a random key; cookie sessions re-pin after a restart and differ between balancer replicas"
            );
        }
        let grace = self.config.shutdown_grace();
        let workers = self.config.workers();
        let state = self.config.state.clone();
        let core = Arc::new(core::Core::new(self.config, self.key));
        let mut listeners = vec![proxy::conn::Listener {
            socket: ctx.take_listener(HTTP_LISTENER)?,
            tls: None,
        }];
        if let Some(certs) = &self.https {
            certs.spawn_reloader(ctx.shutdown.clone());
            tracing::info!(names = ?certs.names(), "serving HTTPS");
            listeners.push(proxy::conn::Listener {
                socket: ctx.take_listener(HTTPS_LISTENER)?,
                tls: Some(certs.acceptor().map_err(RuntimeError::Service)?),
            });
        }
        let grpc = ctx.take_listener(GRPC_LISTENER)?;
        let mut upstreams = Vec::new();
        if !state.is_empty() {
            let u = Upstream::new("state", &state)?;
            u.spawn_watcher(ctx.shutdown.clone());
            tokio::spawn(follow::run(core.clone(), u.clone(), ctx.shutdown.clone()));
            upstreams.push(u);
        }
        export::register(&core);
        let data = tokio::spawn(proxy::conn::serve(
            listeners,
            core.clone(),
            ctx.shutdown.clone(),
            grace,
            workers,
        ));
        let server =
            GrpcServer::new().add_service(RplbControlServer::new(control::Control::new(core)));
        let shutdown = ctx.shutdown.clone();
        server.serve(grpc, shutdown, || ctx.ready()).await?;
        data.await
            .map_err(|e| RuntimeError::Service(format!("data plane: {e}")))?
            .map_err(|e| RuntimeError::Service(format!("data plane: {e}")))?;
        Ok(())
    }
}
