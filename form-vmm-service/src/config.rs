//! Configuration of form-vmm-service: file, environment and flags.

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
    /// Main listen address: gRPC (VmmService, health, reflection).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// form-state replicas to heartbeat instances into, `host:port` each.
    pub state: Vec<HostPort>,
    /// Id of this node, as members record it.
    pub node_id: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            state: Vec::new(),
            node_id: "node-1".to_owned(),
        }
    }
}

impl ServiceConfig for Config {
    const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 3002);
    const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9002);

    fn listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.listen
    }

    fn metrics_listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.metrics_listen
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "--node-id",
                "must not be empty; expected an id such as node-1",
            ));
        }
        Ok(())
    }
}

/// form-vmm-service: instance lifecycle on one node (create, pause, resume, snapshot, clone, resize, delete, stats).
#[derive(Debug, Parser)]
#[command(name = "form-vmm-service", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated addresses of form-state replicas to heartbeat instances into
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_VMM_STATE",
        value_delimiter = ','
    )]
    pub state: Option<Vec<HostPort>>,

    /// Id of this node, as members record it [default: node-1]
    #[arg(long, value_name = "ID", env = "FORM_VMM_NODE_ID")]
    pub node_id: Option<String>,

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
            if let Some(v) = self.node_id {
                c.node_id = v;
            }
        })?;
        Ok((config, self.common))
    }
}
