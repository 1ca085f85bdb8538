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
    /// Backend that runs instances: `process` (child processes) or `qemu` (VMs).
    pub backend: String,
    /// qemu backend: directory of the guest kernel and initramfs (deploy/guest/build.sh).
    pub guest_dir: Option<std::path::PathBuf>,
    /// qemu backend: acceleration, `auto` (KVM where it works, else TCG), `kvm` or `tcg`.
    pub accel: crate::qemu::Accel,
    /// qemu backend: vCPUs a VM can be resized to in place (its `maxcpus`).
    pub qemu_max_vcpus: u32,
    /// qemu backend: memory a VM can be resized to in place, MiB (its `maxmem`).
    pub qemu_max_memory_mib: u64,
    /// qemu backend: how a VM's memory is kept and snapshotted (`stream` or `file`).
    pub qemu_memory: crate::qemu::Memory,
    /// process backend: where the cgroup file systems are mounted.
    pub cgroup_root: std::path::PathBuf,
    /// Directory of instance working directories and the snapshot store.
    pub data_dir: std::path::PathBuf,
    /// IP address instances listen on and are reached at.
    pub instance_host: std::net::IpAddr,
    /// Milliseconds between heartbeats of the instances into form-state.
    pub heartbeat_interval_ms: u64,
    /// Milliseconds a new instance may take to serve before it is marked failed.
    pub ready_timeout_ms: u64,
    /// Programs instances may run (absolute paths or names in PATH); `*` for any;
    /// empty: the demo app beside this binary.
    pub allowed_commands: Vec<String>,
    /// The user process-backend workloads run as: `UID[:GID]`, or `same` for this
    /// node's own; empty: 65534:65534 (nobody) when the node runs as root, else `same`.
    pub workload_user: String,
    /// Where other services reach this node's API (`host:port`), as its record in
    /// form-state says; unset: the listen address, with the instance host when it
    /// listens on every interface.
    pub advertise: Option<HostPort>,
    /// Instances this node runs at most (its record's slots).
    pub instance_slots: u32,
    /// vCPUs this node offers; 0: 8 per CPU of this host (vCPUs are time-shared).
    pub capacity_vcpus: u32,
    /// Memory this node offers, MiB; 0: this host's memory.
    pub capacity_memory_mib: u64,
    /// Labels of this node, `key=value` each (placement matches them).
    pub labels: Vec<String>,
    /// MiB per second a snapshot pulled from another node may take at most; 0: no
    /// limit.
    pub transfer_rate_mib: u64,
    /// MiB the snapshot store may hold at most (pulls that would pass it are refused);
    /// 0: what the disk has.
    pub snapshot_store_max_mib: u64,
    /// Test only: the chunk with this number that the node serves to a pulling node
    /// goes out damaged (its hash does not match); 0: none.
    pub fault_corrupt_chunk: u64,
}

impl Config {
    /// The (uid, gid) workloads run as; `None`: this node's own user.
    pub fn workload_user(&self) -> Result<Option<(u32, u32)>, String> {
        let root = nix::unistd::geteuid().is_root();
        let v = self.workload_user.trim();
        if v == "same" || (v.is_empty() && !root) {
            return Ok(None);
        }
        if v.is_empty() {
            return Ok(Some((NOBODY, NOBODY)));
        }
        let num = |s: &str| {
            s.parse::<u32>().map_err(|_| {
                format!("'{v}' is not UID[:GID] or 'same'; expected numbers, e.g. 65534:65534")
            })
        };
        let (u, g) = match v.split_once(':') {
            Some((u, g)) => (num(u)?, num(g)?),
            None => (num(v)?, num(v)?),
        };
        if !root && u != nix::unistd::geteuid().as_raw() {
            return Err(format!(
                "'{v}': running workloads as another user needs this node to run as root"
            ));
        }
        Ok(Some((u, g)))
    }
}

/// The user and group `nobody`.
const NOBODY: u32 = 65534;

/// Backends this build runs.
pub const BACKENDS: &[&str] = &["process", "qemu"];

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            metrics_listen: Self::DEFAULT_METRICS_LISTEN,
            state: Vec::new(),
            node_id: "node-1".to_owned(),
            backend: "process".to_owned(),
            guest_dir: None,
            accel: crate::qemu::Accel::Auto,
            qemu_max_vcpus: 8,
            cgroup_root: "/sys/fs/cgroup".into(),
            qemu_max_memory_mib: 8192,
            qemu_memory: crate::qemu::Memory::Stream,
            data_dir: "form-vmm-data".into(),
            instance_host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            heartbeat_interval_ms: 1000,
            ready_timeout_ms: 10_000,
            allowed_commands: Vec::new(),
            workload_user: String::new(),
            advertise: None,
            instance_slots: 100,
            capacity_vcpus: 0,
            capacity_memory_mib: 0,
            labels: Vec::new(),
            transfer_rate_mib: 0,
            snapshot_store_max_mib: 0,
            fault_corrupt_chunk: 0,
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
        crate::allow::Allowed::from_config(&self.allowed_commands)
            .map_err(|e| ConfigError::invalid("--allowed-commands", e))?;
        self.workload_user()
            .map_err(|e| ConfigError::invalid("--workload-user", e))?;
        crate::node::labels(&self.labels).map_err(|e| ConfigError::invalid("--labels", e))?;
        for (flag, v) in [
            ("--transfer-rate-mib", self.transfer_rate_mib),
            ("--snapshot-store-max-mib", self.snapshot_store_max_mib),
        ] {
            if v > 1 << 30 {
                return Err(ConfigError::invalid(
                    flag,
                    format!("{v} is out of range; expected 0 (no limit) to 1073741824"),
                ));
            }
        }
        if self.instance_slots == 0 {
            return Err(ConfigError::invalid(
                "--instance-slots",
                "must be at least 1",
            ));
        }
        if !self.node_id.trim().is_empty() {
            form_runtime::ids::check(&self.node_id)
                .map_err(|e| ConfigError::invalid("--node-id", e))?;
        }
        if self.node_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "--node-id",
                "must not be empty; expected an id such as node-1",
            ));
        }
        if !BACKENDS.contains(&self.backend.as_str()) {
            return Err(ConfigError::invalid(
                "--backend",
                format!(
                    "'{}' is not available; expected one of: {}",
                    self.backend,
                    BACKENDS.join(", ")
                ),
            ));
        }
        if self.backend == "qemu" && self.guest_dir.is_none() {
            return Err(ConfigError::invalid(
                "--guest-dir",
                "is required with --backend qemu; expected the directory deploy/guest/build.sh wrote",
            ));
        }
        if !(1..=240).contains(&self.qemu_max_vcpus) {
            return Err(ConfigError::invalid(
                "--qemu-max-vcpus",
                format!("{} is out of range; expected 1-240", self.qemu_max_vcpus),
            ));
        }
        if !(128..=1_048_576).contains(&self.qemu_max_memory_mib) {
            return Err(ConfigError::invalid(
                "--qemu-max-memory-mib",
                format!(
                    "{} is out of range; expected 128-1048576",
                    self.qemu_max_memory_mib
                ),
            ));
        }
        for (flag, v) in [
            ("--heartbeat-interval-ms", self.heartbeat_interval_ms),
            ("--ready-timeout-ms", self.ready_timeout_ms),
        ] {
            if !(10..=3_600_000).contains(&v) {
                return Err(ConfigError::invalid(
                    flag,
                    format!("{v} is out of range; expected 10-3600000"),
                ));
            }
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

    /// Backend that runs instances: process or qemu [default: process]
    #[arg(long, value_name = "BACKEND", env = "FORM_VMM_BACKEND")]
    pub backend: Option<String>,

    /// qemu backend: directory of the guest kernel and initramfs built by
    /// deploy/guest/build.sh
    #[arg(long, value_name = "DIR", env = "FORM_VMM_GUEST_DIR")]
    pub guest_dir: Option<std::path::PathBuf>,

    /// qemu backend: acceleration [default: auto, KVM where it can run the guest, else TCG]
    #[arg(long, value_enum, value_name = "ACCEL", env = "FORM_VMM_ACCEL")]
    pub accel: Option<crate::qemu::Accel>,

    /// qemu backend: vCPUs a VM can be resized to in place by hot-plug [default: 8]
    #[arg(long, value_name = "N", env = "FORM_VMM_QEMU_MAX_VCPUS")]
    pub qemu_max_vcpus: Option<u32>,

    /// qemu backend: memory a VM can be resized to in place by hot-plug, MiB [default: 8192]
    #[arg(long, value_name = "MIB", env = "FORM_VMM_QEMU_MAX_MEMORY_MIB")]
    pub qemu_max_memory_mib: Option<u64>,

    /// qemu backend: how a VM's memory is kept and snapshotted: `stream` (anonymous
    /// memory, a snapshot is a migration stream of all of it) or `file` (a file on
    /// tmpfs; a snapshot copies its data, clones map it copy-on-write) [default: stream]
    #[arg(long, value_enum, value_name = "MEMORY", env = "FORM_VMM_QEMU_MEMORY")]
    pub qemu_memory: Option<crate::qemu::Memory>,

    /// process backend: where the cgroup file systems are mounted; limits are enforced
    /// with the cgroups found there, and a resize fails where none can be written
    /// [default: /sys/fs/cgroup]
    #[arg(long, value_name = "DIR", env = "FORM_VMM_CGROUP_ROOT")]
    pub cgroup_root: Option<std::path::PathBuf>,

    /// Directory of instance working directories and snapshots [default: ./form-vmm-data]
    #[arg(long, value_name = "DIR", env = "FORM_VMM_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,

    /// IP address instances listen on and are reached at [default: 127.0.0.1]
    #[arg(long, value_name = "IP", env = "FORM_VMM_INSTANCE_HOST")]
    pub instance_host: Option<std::net::IpAddr>,

    /// Milliseconds between instance heartbeats into form-state [default: 1000]
    #[arg(long, value_name = "MS", env = "FORM_VMM_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,

    /// Milliseconds a new instance may take to serve [default: 10000]
    #[arg(long, value_name = "MS", env = "FORM_VMM_READY_TIMEOUT_MS")]
    pub ready_timeout_ms: Option<u64>,

    /// Comma-separated programs instances may run (absolute paths, or names found in
    /// PATH); '*' runs any (development only) [default: the form-demo-app beside
    /// this binary]
    #[arg(
        long,
        value_name = "PATH,...",
        env = "FORM_VMM_ALLOWED_COMMANDS",
        value_delimiter = ','
    )]
    pub allowed_commands: Option<Vec<String>>,

    /// User process-backend workloads run as: UID or UID:GID, or 'same' for this node's
    /// own [default: 65534:65534 (nobody) when the node runs as root, else same]
    #[arg(long, value_name = "UID[:GID]|same", env = "FORM_VMM_WORKLOAD_USER")]
    pub workload_user: Option<String>,

    /// Where other services reach this node's API, HOST:PORT [default: the listen
    /// address, with --instance-host when it listens on every interface]
    #[arg(long, value_name = "HOST:PORT", env = "FORM_VMM_ADVERTISE")]
    pub advertise: Option<HostPort>,

    /// Instances this node runs at most [default: 100]
    #[arg(long, value_name = "N", env = "FORM_VMM_INSTANCE_SLOTS")]
    pub instance_slots: Option<u32>,

    /// vCPUs this node offers [default: 8 per CPU of this host, as vCPUs are
    /// time-shared]
    #[arg(long, value_name = "N", env = "FORM_VMM_CAPACITY_VCPUS")]
    pub capacity_vcpus: Option<u32>,

    /// Memory this node offers, MiB [default: this host's memory]
    #[arg(long, value_name = "MIB", env = "FORM_VMM_CAPACITY_MEMORY_MIB")]
    pub capacity_memory_mib: Option<u64>,

    /// Comma-separated labels of this node, key=value (e.g. zone=eu-1,disk=ssd)
    #[arg(
        long,
        value_name = "KEY=VALUE,...",
        env = "FORM_VMM_LABELS",
        value_delimiter = ','
    )]
    pub labels: Option<Vec<String>>,

    /// MiB per second a snapshot pulled from another node may take at most; 0 for
    /// no limit [default: 0]
    #[arg(long, value_name = "MIB", env = "FORM_VMM_TRANSFER_RATE_MIB")]
    pub transfer_rate_mib: Option<u64>,

    /// MiB the snapshot store may hold; a pull that would pass it is refused; 0 for
    /// what the disk has [default: 0]
    #[arg(long, value_name = "MIB", env = "FORM_VMM_SNAPSHOT_STORE_MAX_MIB")]
    pub snapshot_store_max_mib: Option<u64>,

    /// Test only: serve the Nth snapshot chunk damaged
    #[arg(long, value_name = "N", hide = true)]
    pub fault_corrupt_chunk: Option<u64>,

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
            if let Some(v) = self.backend {
                c.backend = v;
            }
            if let Some(v) = self.guest_dir {
                c.guest_dir = Some(v);
            }
            if let Some(v) = self.accel {
                c.accel = v;
            }
            if let Some(v) = self.qemu_max_vcpus {
                c.qemu_max_vcpus = v;
            }
            if let Some(v) = self.qemu_max_memory_mib {
                c.qemu_max_memory_mib = v;
            }
            if let Some(v) = self.qemu_memory {
                c.qemu_memory = v;
            }
            if let Some(v) = self.cgroup_root {
                c.cgroup_root = v;
            }
            if let Some(v) = self.data_dir {
                c.data_dir = v;
            }
            if let Some(v) = self.instance_host {
                c.instance_host = v;
            }
            if let Some(v) = self.heartbeat_interval_ms {
                c.heartbeat_interval_ms = v;
            }
            if let Some(v) = self.allowed_commands {
                c.allowed_commands = v;
            }
            if let Some(v) = self.workload_user {
                c.workload_user = v;
            }
            if let Some(v) = self.advertise {
                c.advertise = Some(v);
            }
            if let Some(v) = self.instance_slots {
                c.instance_slots = v;
            }
            if let Some(v) = self.capacity_vcpus {
                c.capacity_vcpus = v;
            }
            if let Some(v) = self.capacity_memory_mib {
                c.capacity_memory_mib = v;
            }
            if let Some(v) = self.labels {
                c.labels = v;
            }
            if let Some(v) = self.ready_timeout_ms {
                c.ready_timeout_ms = v;
            }
            if let Some(v) = self.transfer_rate_mib {
                c.transfer_rate_mib = v;
            }
            if let Some(v) = self.snapshot_store_max_mib {
                c.snapshot_store_max_mib = v;
            }
            if let Some(v) = self.fault_corrupt_chunk {
                c.fault_corrupt_chunk = v;
            }
        })?;
        Ok((config, self.common))
    }
}
