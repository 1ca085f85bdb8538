//! Configuration of form-state: file, environment and flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use form_runtime::ConfigError;
use form_runtime::addr::HostPort;
use form_runtime::cli::CommonArgs;
use form_runtime::config::ServiceConfig;

use crate::gossip::ReplicationPolicy;

/// `--replication` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// DeltaSync.
    Delta,
    /// FullSync.
    Full,
    /// PrioritizedSync.
    Prioritized,
}
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
    /// This replica's id; the authorized keys file binds it to the node key.
    pub replica_id: String,
    /// The Ed25519 node key file (created on first start); default `<data_dir>/node.key`.
    pub node_key: Option<PathBuf>,
    /// File of `<replica-id> <public key hex>` lines: the replicas whose deltas are
    /// accepted. Without it, only this replica's own key is accepted.
    pub authorized_keys: Option<PathBuf>,
    /// Milliseconds between delta pushes to each peer.
    pub sync_interval_ms: u64,
    /// Whether a durable write is pushed to every peer at once (delta and prioritized
    /// replication), rather than at the next round; the rounds go on as the repair path.
    pub push_at_once: bool,
    /// Milliseconds a push at once waits to gather the writes that follow (0: none).
    pub push_gather_ms: u64,
    /// Milliseconds between anti-entropy rounds with each peer.
    pub anti_entropy_interval_ms: u64,
    /// Most deltas per gossip message.
    pub batch_size: usize,
    /// How replicas exchange state.
    pub replication: ReplicationPolicy,
    /// Log records between snapshots (compaction).
    pub snapshot_every: u64,
    /// Deltas held while waiting for their predecessors.
    pub buffer_limit: usize,
    /// Deltas kept in memory for gossip.
    pub delta_log_limit: usize,
    /// Finished operations kept per cluster; older ones are deleted when one ends.
    pub operations_kept_per_cluster: usize,
    /// Clusters a replica accepts; a new one past it is refused (a quota).
    pub max_clusters: usize,
    /// Networks members' addresses must be in (CIDR blocks); empty: any address that
    /// may receive traffic.
    pub member_networks: Vec<form_runtime::cidr::Cidr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            peers: Vec::new(),
            data_dir: PathBuf::from("form-state-data"),
            replica_id: "state-1".to_owned(),
            node_key: None,
            authorized_keys: None,
            sync_interval_ms: 100,
            push_at_once: true,
            push_gather_ms: 2,
            anti_entropy_interval_ms: 1000,
            batch_size: 256,
            replication: ReplicationPolicy::DeltaSync,
            snapshot_every: 10_000,
            buffer_limit: 10_000,
            delta_log_limit: 100_000,
            operations_kept_per_cluster: 100,
            max_clusters: 10_000,
            member_networks: Vec::new(),
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
        crate::model::validate::id("replica_id", &self.replica_id)
            .map_err(|e| ConfigError::invalid("--replica-id", e.to_string()))?;
        let ranges: [(&str, u64, u64, u64); 9] = [
            ("--sync-interval-ms", self.sync_interval_ms, 1, 60_000),
            ("--push-gather-ms", self.push_gather_ms, 0, 1_000),
            (
                "--anti-entropy-interval-ms",
                self.anti_entropy_interval_ms,
                10,
                3_600_000,
            ),
            ("--batch-size", self.batch_size as u64, 1, 100_000),
            ("--snapshot-every", self.snapshot_every, 1, u64::MAX),
            ("--buffer-limit", self.buffer_limit as u64, 1, 10_000_000),
            (
                "--delta-log-limit",
                self.delta_log_limit as u64,
                1,
                100_000_000,
            ),
            (
                "--operations-kept-per-cluster",
                self.operations_kept_per_cluster as u64,
                1,
                100_000,
            ),
            ("--max-clusters", self.max_clusters as u64, 1, 10_000_000),
        ];
        for (flag, v, lo, hi) in ranges {
            if v < lo || v > hi {
                return Err(ConfigError::invalid(
                    flag,
                    format!("{v} is out of range; expected {lo}-{hi}"),
                ));
            }
        }
        if let ReplicationPolicy::PrioritizedSync {
            high_priority_fields,
        } = &self.replication
        {
            crate::gossip::high_priority_fields(high_priority_fields)
                .map_err(|e| ConfigError::invalid("--high-priority-fields", e))?;
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

    /// This replica's id, as the authorized keys file names it [default: state-1]
    #[arg(long, value_name = "ID", env = "FORM_STATE_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Ed25519 node key file, created on first start [default: DATA_DIR/node.key]
    #[arg(long, value_name = "FILE", env = "FORM_STATE_NODE_KEY")]
    pub node_key: Option<PathBuf>,

    /// File of 'REPLICA_ID PUBLIC_KEY_HEX' lines: replicas whose deltas are accepted
    /// (without it, only this replica's own)
    #[arg(long, value_name = "FILE", env = "FORM_STATE_AUTHORIZED_KEYS")]
    pub authorized_keys: Option<PathBuf>,

    /// Milliseconds between delta pushes to each peer [default: 100]
    #[arg(long, value_name = "MS", env = "FORM_STATE_SYNC_INTERVAL_MS")]
    pub sync_interval_ms: Option<u64>,

    /// Push each durable write to every peer at once (delta and prioritized replication;
    /// the rounds every --sync-interval-ms go on as the repair path) [default: true]
    #[arg(long, value_name = "BOOL", env = "FORM_STATE_PUSH_AT_ONCE")]
    pub push_at_once: Option<bool>,

    /// Milliseconds a push at once waits to gather the writes that follow, 0-1000
    /// [default: 2]
    #[arg(long, value_name = "MS", env = "FORM_STATE_PUSH_GATHER_MS")]
    pub push_gather_ms: Option<u64>,

    /// Milliseconds between anti-entropy rounds with each peer [default: 1000]
    #[arg(long, value_name = "MS", env = "FORM_STATE_ANTI_ENTROPY_INTERVAL_MS")]
    pub anti_entropy_interval_ms: Option<u64>,

    /// Most deltas per gossip message [default: 256]
    #[arg(long, value_name = "N", env = "FORM_STATE_BATCH_SIZE")]
    pub batch_size: Option<usize>,

    /// Replication policy: delta (push deltas), full (push the whole state), prioritized
    /// (deltas, high-priority fields pushed at once) [default: delta]
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        env = "FORM_STATE_REPLICATION"
    )]
    pub replication: Option<PolicyArg>,

    /// Field groups pushed at once with --replication prioritized: members, health,
    /// heartbeats, operations, clusters [default: members,health]
    #[arg(
        long,
        value_name = "GROUP,...",
        env = "FORM_STATE_HIGH_PRIORITY_FIELDS",
        value_delimiter = ','
    )]
    pub high_priority_fields: Option<Vec<String>>,

    /// Log records between snapshots [default: 10000]
    #[arg(long, value_name = "N", env = "FORM_STATE_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,

    /// Deltas held while waiting for their predecessors [default: 10000]
    #[arg(long, value_name = "N", env = "FORM_STATE_BUFFER_LIMIT")]
    pub buffer_limit: Option<usize>,

    /// Deltas kept in memory for gossip; peers that lack older ones get the full state
    /// [default: 100000]
    #[arg(long, value_name = "N", env = "FORM_STATE_DELTA_LOG_LIMIT")]
    pub delta_log_limit: Option<usize>,

    /// Finished operations kept per cluster; the oldest go when another ends
    /// [default: 100]
    #[arg(long, value_name = "N", env = "FORM_STATE_OPERATIONS_KEPT_PER_CLUSTER")]
    pub operations_kept_per_cluster: Option<usize>,

    /// Clusters this replica accepts; creating one more is refused [default: 10000]
    #[arg(long, value_name = "N", env = "FORM_STATE_MAX_CLUSTERS")]
    pub max_clusters: Option<usize>,

    /// Comma-separated CIDR blocks members' addresses must be in (the nodes' instance
    /// networks) [default: any address that may receive traffic]
    #[arg(
        long,
        value_name = "CIDR,...",
        env = "FORM_STATE_MEMBER_NETWORKS",
        value_delimiter = ','
    )]
    pub member_networks: Option<Vec<form_runtime::cidr::Cidr>>,

    /// Print 'REPLICA_ID PUBLIC_KEY_HEX' for the authorized keys file (creating the
    /// node key if missing) and exit
    #[arg(long)]
    pub print_public_key: bool,

    /// Flags every service shares.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Config {
    /// The node key file.
    pub fn node_key_path(&self) -> PathBuf {
        self.node_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("node.key"))
    }
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
            if let Some(v) = self.replica_id {
                c.replica_id = v;
            }
            if let Some(v) = self.node_key {
                c.node_key = Some(v);
            }
            if let Some(v) = self.authorized_keys {
                c.authorized_keys = Some(v);
            }
            if let Some(v) = self.sync_interval_ms {
                c.sync_interval_ms = v;
            }
            if let Some(v) = self.anti_entropy_interval_ms {
                c.anti_entropy_interval_ms = v;
            }
            if let Some(v) = self.push_at_once {
                c.push_at_once = v;
            }
            if let Some(v) = self.push_gather_ms {
                c.push_gather_ms = v;
            }
            if let Some(v) = self.batch_size {
                c.batch_size = v;
            }
            if let Some(v) = self.snapshot_every {
                c.snapshot_every = v;
            }
            if let Some(v) = self.buffer_limit {
                c.buffer_limit = v;
            }
            if let Some(v) = self.max_clusters {
                c.max_clusters = v;
            }
            if let Some(v) = self.member_networks {
                c.member_networks = v;
            }
            if let Some(v) = self.operations_kept_per_cluster {
                c.operations_kept_per_cluster = v;
            }
            if let Some(v) = self.delta_log_limit {
                c.delta_log_limit = v;
            }
            let fields = self.high_priority_fields;
            match (self.replication, fields) {
                (Some(PolicyArg::Delta), _) => c.replication = ReplicationPolicy::DeltaSync,
                (Some(PolicyArg::Full), _) => c.replication = ReplicationPolicy::FullSync,
                (Some(PolicyArg::Prioritized), f) => {
                    c.replication = ReplicationPolicy::PrioritizedSync {
                        high_priority_fields: f
                            .unwrap_or_else(|| vec!["members".into(), "health".into()]),
                    }
                }
                (None, Some(f)) => {
                    if let ReplicationPolicy::PrioritizedSync {
                        high_priority_fields,
                    } = &mut c.replication
                    {
                        *high_priority_fields = f;
                    }
                }
                (None, None) => {}
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
