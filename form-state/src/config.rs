//! Configuration of form-state: file, environment and flags.

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Main listen address: gRPC (StateService, GossipService, health, reflection).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: SocketAddr,
    /// Other replicas to gossip with, `host:port` of their gRPC address.
    pub peers: Vec<HostPort>,
    /// Directory of this replica's write-ahead log, snapshots and key.
    pub data_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            peers: Vec::new(),
            data_dir: PathBuf::from("form-state-data"),
        }
    }
}

impl ServiceConfig for Config {
    const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 3004);
    const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9004);

    fn listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.listen
    }

    fn metrics_listen_mut(&mut self) -> &mut SocketAddr {
        &mut self.metrics_listen
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "--data-dir",
                "must not be empty; expected a directory path",
            ));
        }
        Ok(())
    }
}

/// form-state: a replica of the platform's CRDT state store. Any replica takes reads and writes at any time; replicas converge by gossiping signed deltas.
#[derive(Debug, Parser)]
#[command(name = "form-state", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated gRPC addresses of the other replicas, e.g. form-state-2:3004,form-state-3:3004
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "FORM_STATE_PEERS",
        value_delimiter = ','
    )]
    pub peers: Option<Vec<HostPort>>,

    /// Directory for the write-ahead log, snapshots and the node key [default: ./form-state-data]
    #[arg(long, value_name = "DIR", env = "FORM_STATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Flags every service shares.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// The config file (if any) with environment variables and flags applied, validated.
    pub fn into_config(self) -> Result<(Config, CommonArgs), ConfigError> {
        let config = form_runtime::config::build(&self.common, |c: &mut Config| {
            if let Some(v) = self.peers {
                c.peers = v;
            }
            if let Some(v) = self.data_dir {
                c.data_dir = v;
            }
        })?;
        Ok((config, self.common))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("form-state-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("state.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:4000\"\npeers = [\"b:3004\"]\n")
            .expect("write");
        let file = file.to_str().expect("utf-8");
        let args = Args::try_parse_from(["form-state", "--config", file, "--peers", "c:1,d:2"])
            .expect("args");
        let (c, _) = args.into_config().expect("valid");
        assert_eq!(
            c.listen,
            SocketAddr::from(([127, 0, 0, 1], 4000)),
            "from the file"
        );
        assert_eq!(
            c.metrics_listen,
            Config::default().metrics_listen,
            "default"
        );
        let peers: Vec<String> = c.peers.iter().map(ToString::to_string).collect();
        assert_eq!(peers, ["c:1", "d:2"], "the flag wins over the file");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
