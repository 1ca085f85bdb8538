//! Configuration of form-scaler: file, environment and flags.

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
    /// Main listen address: gRPC (ScalerService, health, reflection).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// form-state replicas, `host:port` each.
    pub state: Vec<HostPort>,
    /// form-vmm-service nodes, `host:port` each.
    pub vmm: Vec<HostPort>,
    /// form-rplb control addresses, `host:port` each.
    pub rplb: Vec<HostPort>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            state: Vec::new(),
            vmm: Vec::new(),
            rplb: Vec::new(),
        }
    }
}

impl ServiceConfig for Config {
    const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 3006);
    const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9006);

    fn listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.listen
    }

    fn metrics_listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.metrics_listen
    }
}

/// form-scaler: the scaling controller (decisions, operations with rollback, health and failover, vertical scaling).
#[derive(Debug, Parser)]
#[command(name = "form-scaler", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated addresses of form-state replicas
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_SCALER_STATE",
        value_delimiter = ','
    )]
    pub state: Option<Vec<HostPort>>,

    /// Comma-separated addresses of form-vmm-service nodes
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_SCALER_VMM",
        value_delimiter = ','
    )]
    pub vmm: Option<Vec<HostPort>>,

    /// Comma-separated gRPC control addresses of form-rplb
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_SCALER_RPLB",
        value_delimiter = ','
    )]
    pub rplb: Option<Vec<HostPort>>,

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
            if let Some(v) = self.vmm {
                c.vmm = v;
            }
            if let Some(v) = self.rplb {
                c.rplb = v;
            }
        })?;
        Ok((config, self.common))
    }
}
