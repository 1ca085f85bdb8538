//! Configuration of form-mcp: file, environment and flags.

use std::net::SocketAddr;

use clap::Parser;
use form_runtime::ConfigError;
use form_runtime::addr::HostPort;
use form_runtime::cli::CommonArgs;
use form_runtime::config::ServiceConfig;
use serde::{Deserialize, Serialize};

/// Configuration (TOML keys are the field names; every key is optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Main listen address: HTTP (REST /api/v1, MCP /mcp, /healthz, /metrics).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// form-state replicas, `host:port` each.
    pub state: Vec<HostPort>,
    /// form-scaler controllers, `host:port` each.
    pub scaler: Vec<HostPort>,
    /// Bearer tokens, one per line: `TOKEN admin|read [NAME]`.
    pub tokens_file: Option<std::path::PathBuf>,
    /// Host names (or `host:port`) accepted in `Host` by `/mcp` besides loopback, e.g.
    /// `form-mcp:3010` in a container network.
    pub mcp_allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host:port`, `:*` for any port) `/mcp` accepts in
    /// `Origin`; a request with any other `Origin` is refused (403), one without passes.
    pub mcp_allowed_origins: Vec<String>,
    /// Directory of HTTPS certificates (`<name>.crt` with `<name>.key`, picked by SNI;
    /// `default.crt` serves other names): with it, `listen` serves HTTPS only.
    pub https_certs: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            state: Vec::new(),
            scaler: Vec::new(),
            tokens_file: None,
            mcp_allowed_hosts: Vec::new(),
            mcp_allowed_origins: Vec::new(),
            https_certs: None,
        }
    }
}

impl ServiceConfig for Config {
    const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 3010);
    const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9010);

    fn listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.listen
    }

    fn metrics_listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.metrics_listen
    }
}

/// form-mcp: the API gateway (REST /api/v1, Model Context Protocol at /mcp, /metrics).
#[derive(Debug, Parser)]
#[command(name = "form-mcp", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated addresses of form-state replicas
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_MCP_STATE",
        value_delimiter = ','
    )]
    pub state: Option<Vec<HostPort>>,

    /// Comma-separated addresses of form-scaler controllers
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_MCP_SCALER",
        value_delimiter = ','
    )]
    pub scaler: Option<Vec<HostPort>>,

    /// Serve HTTPS only, with the certificates in DIR: NAME.crt with NAME.key, picked by SNI; default.crt serves other names
    #[arg(long, value_name = "DIR", env = "FORM_MCP_HTTPS_CERTS")]
    pub https_certs: Option<std::path::PathBuf>,

    /// File of bearer tokens, one per line: TOKEN admin|read, then a NAME if wanted
    #[arg(long, value_name = "PATH", env = "FORM_MCP_TOKENS_FILE")]
    pub tokens_file: Option<std::path::PathBuf>,

    /// Comma-separated hosts (or host:port) /mcp accepts in Host besides loopback
    #[arg(
        long,
        value_name = "HOST[:PORT],...",
        env = "FORM_MCP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub mcp_allowed_hosts: Option<Vec<String>>,

    /// Comma-separated browser origins /mcp accepts in Origin (scheme://host:port, or
    /// :* for any port); a request with another Origin is refused, one without passes
    #[arg(
        long,
        value_name = "ORIGIN,...",
        env = "FORM_MCP_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub mcp_allowed_origins: Option<Vec<String>>,

    /// Flags every service shares.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// The config file (if any) with environment variables and flags applied, validated.
    pub fn into_config(self) -> Result<(Config, CommonArgs), ConfigError> {
        let config = form_runtime::config::build(&self.common, |c: &mut Config| {
            if let Some(v) = self.state {
                c.state = v;
            }
            if let Some(v) = self.scaler {
                c.scaler = v;
            }
            if let Some(v) = self.https_certs {
                c.https_certs = Some(v);
            }
            if let Some(v) = self.tokens_file {
                c.tokens_file = Some(v);
            }
            if let Some(v) = self.mcp_allowed_hosts {
                c.mcp_allowed_hosts = v;
            }
            if let Some(v) = self.mcp_allowed_origins {
                c.mcp_allowed_origins = v;
            }
        })?;
        Ok((config, self.common))
    }
}
