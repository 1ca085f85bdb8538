//! form-mcp: the API gateway of the platform. Serves the REST API (`/api/v1`), the
//! Model Context Protocol (`/mcp`), `/healthz` and `/metrics` over HTTP, and talks to
//! form-state and form-scaler over gRPC.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
mod http;
mod https;
pub mod mcp;
pub mod mcp_guard;
pub mod openapi;
mod parse_errors;
pub mod rest;
pub mod time;

use std::net::SocketAddr;
use std::sync::Arc;

use form_runtime::cli::CommonArgs;
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use form_runtime::tls::public::PublicCerts;
use form_runtime::upstream;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

/// Name of the HTTP listener in ready files.
pub const HTTP_LISTENER: &str = "http";

/// The API gateway.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    /// The HTTPS certificates, read at start (with `https_certs`).
    https: Option<Arc<PublicCerts>>,
}

impl Gateway {
    /// The gateway with this configuration.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            https: None,
        }
    }
}

impl Service for Gateway {
    const NAME: &'static str = "form-mcp";
    type Args = Args;
    type Config = Config;

    fn configure(args: Args) -> Result<(Self, CommonArgs), ConfigError> {
        let (config, common) = args.into_config()?;
        let https = PublicCerts::from_setting(config.https_certs.as_deref())?;
        Ok((
            Self {
                https,
                ..Self::new(config)
            },
            common,
        ))
    }

    fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        vec![
            (HTTP_LISTENER, self.config.listen),
            (METRICS_LISTENER, self.config.metrics_listen),
        ]
    }

    async fn run(self, mut ctx: RunContext) -> Result<(), RuntimeError> {
        let upstreams = upstream::from_config(&[
            ("state", &self.config.state),
            ("scaler", &self.config.scaler),
        ])?;
        for u in &upstreams {
            u.spawn_watcher(ctx.shutdown.clone());
        }
        let tokens = match &self.config.tokens_file {
            Some(path) => {
                Some(auth::Tokens::load(path).map_err(|e| ConfigError::invalid("tokens_file", e))?)
            }
            None => {
                tracing::warn!("no --tokens-file: every API and MCP request is refused");
                None
            }
        };
        let app = Arc::new(rest::App {
            backends: api::backends::Backends::new(&upstreams),
            tokens,
        });
        let listener = ctx.take_listener(HTTP_LISTENER)?;
        let mut shutdown = ctx.shutdown.clone();
        ctx.ready();
        let mut hosts = self.config.mcp_allowed_hosts.clone();
        if !self.config.listen.ip().is_unspecified() {
            hosts.push(self.config.listen.ip().to_string());
        }
        let hosts = mcp::allowed_hosts(&hosts);
        let stop = tokio_util::sync::CancellationToken::new();
        let stop_mcp = stop.clone();
        let router = http::router(
            app,
            hosts,
            self.config.mcp_allowed_origins.clone(),
            stop_mcp,
        );
        let stopped = async move {
            shutdown.requested().await;
            stop.cancel();
        };
        let served = match &self.https {
            None => {
                axum::serve(parse_errors::JsonParseErrors(listener), router)
                    .with_graceful_shutdown(stopped)
                    .await
            }
            Some(certs) => {
                certs.spawn_reloader(ctx.shutdown.clone());
                tracing::info!(names = ?certs.names(), "serving HTTPS");
                let tls = https::HttpsListener::new(listener, certs)
                    .map_err(|e| RuntimeError::Service(format!("HTTPS: {e}")))?;
                axum::serve(parse_errors::JsonParseErrors(tls), router)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        };
        served.map_err(|e| RuntimeError::Serve {
            name: "http",
            message: e.to_string(),
        })
    }
}
