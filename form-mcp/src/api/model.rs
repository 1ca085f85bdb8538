//! The JSON shapes of the API (requests refuse unknown fields), with their schemas
//! (for `/api/v1/openapi.json` and the MCP tools) and conversions from and to the
//! gRPC messages.

use std::collections::BTreeMap;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What every instance of a cluster runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Program to start (the process backend) or to put in the guest (qemu).
    #[schemars(length(min = 1))]
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Port it listens on inside a VM (qemu backend; 0: 8080). The process backend
    /// needs 0: it passes each instance a free port in `PORT`.
    #[serde(default)]
    pub port: u32,
    /// Extra environment variables. Their values are never shown by a read: each
    /// reads `<redacted>`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Path that answers 200 once an instance is ready, e.g. `/healthz`.
    #[serde(default)]
    pub health_path: String,
}

/// When and how far a cluster grows and shrinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Never fewer instances (>= 1).
    #[schemars(range(min = 1))]
    pub min_instances: u32,
    /// Never more instances (>= min_instances; at most the controller's cap, 100 by
    /// default).
    #[schemars(range(min = 1))]
    pub max_instances: u32,
    /// Target mean CPU utilisation, in (0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub target_cpu_utilization: f64,
    /// Seconds after new capacity became ready before the next scale-out.
    #[serde(default)]
    pub scale_out_cooldown_seconds: u32,
    /// Seconds after the last scaling action before the next scale-in.
    #[serde(default)]
    pub scale_in_cooldown_seconds: u32,
    /// Target requests per second per instance, from the balancer (a second signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_requests_per_instance: Option<f64>,
    /// Band around the target in which nothing changes (0: 0.1).
    #[serde(default)]
    pub tolerance: f64,
    /// Scale-out takes the lowest recommendation of this window.
    #[serde(default)]
    pub scale_out_stabilization_seconds: u32,
    /// Scale-in takes the highest recommendation of this window.
    #[serde(default)]
    pub scale_in_stabilization_seconds: u32,
    /// Seconds a new instance counts as capacity but not in metrics.
    #[serde(default)]
    pub warmup_seconds: u32,
    /// Keep a standby snapshot of the template no older than this, on two nodes, to
    /// make the cluster again if every member's node is lost (0: none; else 10-86400).
    #[serde(default)]
    pub standby_snapshot_seconds: u32,
}

/// How the balancer keeps a client on one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Affinity {
    /// None: power of two choices.
    None,
    /// Consistent hash of the client address.
    ClientIp,
    /// A balancer-issued cookie naming the instance.
    Cookie {
        /// Cookie name.
        name: String,
        /// Seconds a pin is honoured.
        ttl_seconds: u64,
    },
    /// Consistent hash of a header, or `query:NAME`.
    ConsistentHashing {
        /// Header name or `query:NAME`.
        parameter: String,
    },
}

/// CPU and memory of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs, 1-256.
    #[schemars(range(min = 1, max = 256))]
    pub vcpus: u32,
    /// Memory in MiB, 16-4194304.
    #[schemars(range(min = 16, max = 4_194_304))]
    pub memory_mib: u64,
}

/// How a cluster's instances share application state (docs/workload-contract.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSync {
    /// `none`, `on_scale` (the default) or `continuous`.
    pub mode: StateSyncMode,
    /// continuous: milliseconds between exchanges, 50-600000 (0: 1000).
    #[serde(default)]
    pub interval_ms: u32,
    /// continuous: largest batch in bytes, 4096-4194304 (0: 1048576).
    #[serde(default)]
    pub batch_bytes: u32,
    /// continuous: keys with these prefixes are carried first in each round (at most
    /// 16, of 1-256 bytes, without ',').
    #[serde(default)]
    pub priority_prefixes: Vec<String>,
    /// Fail a scale-in whose victims' writes cannot be handed off (a workload without
    /// the state contract).
    #[serde(default)]
    pub refuse_unsynced_scale_in: bool,
}

/// A state sync mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateSyncMode {
    /// Nothing is synced: a removed instance's writes are lost.
    None,
    /// Clones catch up with their source; victims hand off their writes.
    OnScale,
    /// As on_scale, and instances exchange changes all the time.
    Continuous,
}

/// What an operation did with the application's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StateTransfer {
    /// Changes read from sources and victims and merged into other instances.
    pub changes: u64,
    /// Bytes of the batches read.
    pub bytes: u64,
    /// Victims whose writes could not be handed off, with why (those writes are lost).
    pub not_handed_off: Vec<String>,
    /// `supported`, `unsupported`, or empty when nothing was asked of the workload.
    pub contract: String,
}

/// `POST /api/v1/clusters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCluster {
    /// The cluster's id: 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter
    /// or digit.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub cluster_id: String,
    /// Host name the balancer routes to it (default `{cluster_id}.fog`).
    #[serde(default)]
    pub domain: Option<String>,
    /// What its instances run.
    pub workload: Workload,
    /// Its scaling policy; fields left out take the defaults (1-10 instances at 60%
    /// CPU, 60 s cooldowns, 300 s scale-in window, 30 s warm-up).
    #[serde(default)]
    pub policy: Option<PolicyUpdate>,
    /// Session affinity (default none).
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// Resources of each instance.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// How instances share application state (default on_scale).
    #[serde(default)]
    pub state_sync: Option<StateSync>,
    /// How a scale-in drains its victims (default 30 s, sessions move once nothing is
    /// in flight).
    #[serde(default)]
    pub drain: Option<Drain>,
    /// Labels a node must carry to take the cluster's instances (`{"zone": "eu-1"}`);
    /// none: any node.
    #[serde(default)]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
}

/// How a scale-in drains an instance before removing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// Seconds sessions pinned to the instance may still use it (0: 30; at most 3600).
    #[serde(default)]
    #[schemars(range(max = 3600))]
    pub grace_period_seconds: u32,
    /// End the drain as soon as no request is in flight, moving pinned sessions at
    /// once (true), or keep them on the instance for the whole grace period (false).
    #[serde(default = "yes")]
    pub wait_for_connections: bool,
    /// Ask clients to reconnect (`Connection: close`, GOAWAY).
    #[serde(default = "yes")]
    pub notify_clients: bool,
}

impl From<Drain> for types::DrainSettings {
    fn from(d: Drain) -> Self {
        Self {
            grace_period_seconds: d.grace_period_seconds,
            wait_for_connections: d.wait_for_connections,
            notify_clients: d.notify_clients,
        }
    }
}

impl From<Option<types::DrainSettings>> for Drain {
    fn from(d: Option<types::DrainSettings>) -> Self {
        let d = d.unwrap_or_else(form_proto::default_drain_settings);
        Self {
            grace_period_seconds: d.grace_period_seconds,
            wait_for_connections: d.wait_for_connections,
            notify_clients: d.notify_clients,
        }
    }
}

/// What a scale request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleOperation {
    /// Add instances cloned from the template.
    ScaleOut,
    /// Drain and remove instances.
    ScaleIn,
    /// Change every member's resources.
    Resize,
    /// Replace one instance by a fresh clone.
    ReplaceInstance,
}

/// `POST /api/v1/clusters/{id}/scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// What to do.
    pub operation: ScaleOperation,
    /// Instances wanted (scale_out, scale_in); 0: one more or one fewer.
    #[serde(default)]
    pub target_count: u32,
    /// Skip the cooldowns.
    #[serde(default)]
    pub immediate: bool,
    /// Drain removed instances first (default true).
    #[serde(default = "yes")]
    pub drain_connections: bool,
    /// New resources: required when `operation` is `resize`, ignored otherwise.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Instance to replace: required when `operation` is `replace_instance`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Instances to remove (scale_in), instead of letting the controller choose; a
    /// drained instance may be named. `target_count`, when set, must agree.
    #[serde(default)]
    pub instance_ids_to_remove: Vec<String>,
    /// How to drain the removed instances (default: the cluster's drain settings).
    #[serde(default)]
    pub drain: Option<Drain>,
}

fn yes() -> bool {
    true
}

/// One member of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Member {
    /// Instance id.
    pub instance_id: String,
    /// starting, active, draining, paused or stopped.
    pub status: String,
    /// Where it serves.
    pub addresses: Vec<String>,
    /// The vmm node that runs it.
    #[serde(default)]
    pub node_id: String,
    /// healthy, degraded or unhealthy.
    pub health: String,
    /// Why, when not healthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health_reason: String,
    /// CPU utilisation from its latest heartbeat.
    pub cpu_utilization: f64,
    /// Whether it is the template clones are made from.
    pub template: bool,
    /// Continuous state sync of its changes (state_sync continuous), once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_sync: Option<MemberSync>,
    /// Whether its workload implements the state contract, as its node saw it start:
    /// `supported` or `unsupported: <why>`; absent before its node said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state_contract: String,
}

/// Where continuous state sync stands for one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MemberSync {
    /// When a round last read its changes (RFC 3339).
    pub synced_at: String,
    /// Changes that round carried to the others: how far behind they were.
    pub changes_last_round: u64,
}

/// A cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cluster {
    /// Its id.
    pub cluster_id: String,
    /// Host name the balancer routes to it.
    pub domain: String,
    /// What its instances run.
    pub workload: Option<Workload>,
    /// Its scaling policy.
    pub policy: Option<Policy>,
    /// Session affinity.
    pub affinity: Option<Affinity>,
    /// Resources of new instances.
    pub resources: Option<Resources>,
    /// The template instance.
    pub template_instance_id: String,
    /// Its members, by id.
    pub members: Vec<Member>,
    /// How its instances share application state.
    pub state_sync: StateSync,
    /// How a scale-in drains its victims.
    pub drain: Drain,
    /// Labels a node must carry to take its instances (empty: any node).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// The standby snapshot its controller keeps (`policy.standby_snapshot_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<Standby>,
}

/// A snapshot of the template kept on more than one node (docs/standby.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Standby {
    /// The snapshot's id.
    pub snapshot_id: String,
    /// The instance it was taken of.
    pub source_instance_id: String,
    /// The nodes that hold it, the source's first.
    pub node_ids: Vec<String>,
    /// When it was taken (RFC 3339).
    pub taken_at: String,
}

/// `GET /api/v1/clusters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterList {
    /// Every cluster.
    pub clusters: Vec<Cluster>,
}

/// Resources of a node: what it has, or what its instances take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeAmount {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Instances.
    pub instance_slots: u32,
}

impl From<Option<form_proto::state::v1::NodeCapacity>> for NodeAmount {
    fn from(c: Option<form_proto::state::v1::NodeCapacity>) -> Self {
        let c = c.unwrap_or_default();
        Self {
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            instance_slots: c.instance_slots,
        }
    }
}

/// A form-vmm-service node as form-state last heard of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Node {
    /// Its id.
    pub node_id: String,
    /// Where its API is reached.
    pub addresses: Vec<String>,
    /// What it has in all.
    pub capacity: NodeAmount,
    /// What its instances took at its latest heartbeat.
    pub used: NodeAmount,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its backend: process, qemu, or simulated (a node of form-bench's simulated fleet).
    pub backend: String,
    /// Its latest heartbeat, milliseconds since the Unix epoch.
    pub last_heartbeat_ms: u64,
    /// Cordoned: takes no new instance.
    pub cordoned: bool,
}

impl From<form_proto::state::v1::NodeInfo> for Node {
    fn from(n: form_proto::state::v1::NodeInfo) -> Self {
        Self {
            node_id: n.node_id,
            addresses: n.addresses,
            capacity: n.capacity.into(),
            used: n.used.into(),
            labels: n.labels.into_iter().collect(),
            backend: n.backend,
            last_heartbeat_ms: n.last_heartbeat_ms,
            cordoned: n.cordoned,
        }
    }
}

/// `GET /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeList {
    /// Every node, ordered by id.
    pub nodes: Vec<Node>,
}

/// A scaling operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Operation {
    /// Its id.
    pub operation_id: String,
    /// The cluster.
    pub cluster_id: String,
    /// scale_out, scale_in, resize or replace_instance.
    #[serde(rename = "type")]
    pub kind: String,
    /// requested, in_progress, completed, failed or rolled_back.
    pub status: String,
    /// The step running (in_progress).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub step: String,
    /// Steps recorded so far, undo steps included: the running step's 0-based index
    /// while in progress, the number recorded once it ended (it never goes back).
    pub step_index: u32,
    /// The planned steps.
    pub steps: Vec<String>,
    /// Instances wanted.
    pub target_count: u32,
    /// Instances it creates.
    pub new_instances: Vec<String>,
    /// Instances it removes.
    pub victims: Vec<String>,
    /// Why it was requested.
    pub reason: String,
    /// Why it failed or was rolled back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// What a failed operation could not clean up, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<String>,
    /// When it was requested (RFC 3339).
    pub created_at: String,
    /// When it ended (RFC 3339), if it has.
    pub completed_at: Option<String>,
    /// What it did with the application's state (sync and handoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_transfer: Option<StateTransfer>,
    /// What the run noted on its way, e.g. a balancer it stopped waiting for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The node of each instance it touches: where a new one goes and why, where a
    /// victim or the clones' source runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<Placement>,
    /// The controller that runs it (another adopts it when that one stops).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
}

/// The node of one instance of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Placement {
    /// The instance.
    pub instance_id: String,
    /// Its node.
    pub node_id: String,
    /// Why that node.
    pub reason: String,
}

/// The latest operation, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LastOperation {
    /// Its id.
    pub operation_id: String,
    /// scale_out, scale_in, resize or replace_instance.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it ended (RFC 3339), if it has.
    pub completed_at: Option<String>,
    /// Its status.
    pub status: String,
    /// Victims whose writes could not be handed off, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_handed_off: Vec<String>,
}

/// The latest scaling decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Decision {
    /// Instances wanted.
    pub desired: u32,
    /// Instances when decided.
    pub current: u32,
    /// Why.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// `GET /api/v1/clusters/{id}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Status {
    /// The cluster.
    pub cluster_id: String,
    /// Members that count (not draining or stopped).
    pub instances: u32,
    /// Members that are active.
    pub ready_instances: u32,
    /// stable (no operation runs), scaling_out, scaling_in, resizing, replacing or
    /// creating.
    pub scaling_status: String,
    /// healthy, degraded or unhealthy.
    pub health_status: String,
    /// The latest operation.
    pub last_operation: Option<LastOperation>,
    /// Members with their health.
    pub members: Vec<Member>,
    /// The latest decision of the controller that owns the cluster.
    pub last_decision: Option<Decision>,
    /// The policy in force.
    pub policy: Option<Policy>,
    /// The controller that handles the cluster.
    pub owner: String,
    /// The state sync mode (`none`, `on_scale`, `continuous`), or `unsupported` when
    /// a member's workload does not implement the state contract, as the members'
    /// `state_contract` says (then a scale-in loses the removed instances' writes).
    pub state_sync: String,
}

/// `202` reply to a scale request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScaleAccepted {
    /// The operation's id (poll `GET /api/v1/operations/{id}`).
    pub operation_id: String,
    /// The operation as accepted.
    pub operation: Operation,
}

/// `DELETE /api/v1/clusters/{id}` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    /// The cluster.
    pub cluster_id: String,
    /// Instances deleted with it.
    pub instances_deleted: Vec<String>,
}

/// `POST /api/v1/clusters/{id}/instances/{instance}/drain` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Drained {
    /// The cluster.
    pub cluster_id: String,
    /// The instance now draining: no new unpinned request goes to it.
    pub instance_id: String,
}

impl From<Workload> for types::Workload {
    fn from(w: Workload) -> Self {
        Self {
            command: w.command,
            args: w.args,
            image: String::new(),
            port: w.port,
            env: w.env.into_iter().collect(),
            health_path: w.health_path,
        }
    }
}

/// A workload as the API shows it: environment values are never shown.
impl From<types::Workload> for Workload {
    fn from(w: types::Workload) -> Self {
        let w = form_proto::redact_env(w);
        Self {
            command: w.command,
            args: w.args,
            port: w.port,
            env: w.env.into_iter().collect(),
            health_path: w.health_path,
        }
    }
}

/// `PUT /api/v1/clusters/{id}/policy`: the fields to change. A field left out keeps
/// the value of the policy in force (the cluster's, or the defaults when it has none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    /// Never fewer instances (>= 1).
    #[schemars(range(min = 1))]
    pub min_instances: Option<u32>,
    /// Never more instances (>= min_instances, at most the controller's cap).
    #[schemars(range(min = 1))]
    pub max_instances: Option<u32>,
    /// Target mean CPU utilisation, in (0, 1].
    #[schemars(range(min = 0.0, max = 1.0))]
    pub target_cpu_utilization: Option<f64>,
    /// Seconds after new capacity became ready before the next scale-out (at most a day).
    pub scale_out_cooldown_seconds: Option<u32>,
    /// Seconds after the last scaling action before the next scale-in (at most a day).
    pub scale_in_cooldown_seconds: Option<u32>,
    /// Target requests per second per instance, from the balancer (a second signal).
    pub target_requests_per_instance: Option<f64>,
    /// Band around the target in which nothing changes, in [0, 1) (0: 0.1).
    pub tolerance: Option<f64>,
    /// Scale-out takes the lowest recommendation of this window (seconds).
    pub scale_out_stabilization_seconds: Option<u32>,
    /// Scale-in takes the highest recommendation of this window (seconds).
    pub scale_in_stabilization_seconds: Option<u32>,
    /// Seconds a new instance counts as capacity but not in metrics.
    pub warmup_seconds: Option<u32>,
    /// Keep a standby snapshot of the template no older than this (0: none; else
    /// 10-86400).
    pub standby_snapshot_seconds: Option<u32>,
}

impl PolicyUpdate {
    /// `current` with the fields this update sets.
    pub fn apply(self, current: Policy) -> Policy {
        Policy {
            min_instances: self.min_instances.unwrap_or(current.min_instances),
            max_instances: self.max_instances.unwrap_or(current.max_instances),
            target_cpu_utilization: self
                .target_cpu_utilization
                .unwrap_or(current.target_cpu_utilization),
            scale_out_cooldown_seconds: self
                .scale_out_cooldown_seconds
                .unwrap_or(current.scale_out_cooldown_seconds),
            scale_in_cooldown_seconds: self
                .scale_in_cooldown_seconds
                .unwrap_or(current.scale_in_cooldown_seconds),
            target_requests_per_instance: self
                .target_requests_per_instance
                .or(current.target_requests_per_instance),
            tolerance: self.tolerance.unwrap_or(current.tolerance),
            scale_out_stabilization_seconds: self
                .scale_out_stabilization_seconds
                .unwrap_or(current.scale_out_stabilization_seconds),
            scale_in_stabilization_seconds: self
                .scale_in_stabilization_seconds
                .unwrap_or(current.scale_in_stabilization_seconds),
            warmup_seconds: self.warmup_seconds.unwrap_or(current.warmup_seconds),
            standby_snapshot_seconds: self
                .standby_snapshot_seconds
                .unwrap_or(current.standby_snapshot_seconds),
        }
    }
}

impl From<Policy> for types::ScalingPolicy {
    fn from(p: Policy) -> Self {
        Self {
            min_instances: p.min_instances,
            max_instances: p.max_instances,
            target_cpu_utilization: p.target_cpu_utilization,
            scale_out_cooldown_seconds: p.scale_out_cooldown_seconds,
            scale_in_cooldown_seconds: p.scale_in_cooldown_seconds,
            target_requests_per_instance: p.target_requests_per_instance,
            tolerance: p.tolerance,
            scale_out_stabilization_seconds: p.scale_out_stabilization_seconds,
            scale_in_stabilization_seconds: p.scale_in_stabilization_seconds,
            warmup_seconds: p.warmup_seconds,
            standby_snapshot_seconds: p.standby_snapshot_seconds,
        }
    }
}

impl From<types::ScalingPolicy> for Policy {
    fn from(p: types::ScalingPolicy) -> Self {
        Self {
            min_instances: p.min_instances,
            max_instances: p.max_instances,
            target_cpu_utilization: p.target_cpu_utilization,
            scale_out_cooldown_seconds: p.scale_out_cooldown_seconds,
            scale_in_cooldown_seconds: p.scale_in_cooldown_seconds,
            target_requests_per_instance: p.target_requests_per_instance,
            tolerance: p.tolerance,
            scale_out_stabilization_seconds: p.scale_out_stabilization_seconds,
            scale_in_stabilization_seconds: p.scale_in_stabilization_seconds,
            warmup_seconds: p.warmup_seconds,
            standby_snapshot_seconds: p.standby_snapshot_seconds,
        }
    }
}

impl From<Affinity> for types::AffinityMethod {
    fn from(a: Affinity) -> Self {
        use types::affinity_method::Method;
        let method = match a {
            Affinity::None => Method::None(types::NoAffinity {}),
            Affinity::ClientIp => Method::ClientIp(types::ClientIpAffinity {}),
            Affinity::Cookie { name, ttl_seconds } => {
                Method::Cookie(types::CookieAffinity { name, ttl_seconds })
            }
            Affinity::ConsistentHashing { parameter } => {
                Method::ConsistentHashing(types::ConsistentHashAffinity { parameter })
            }
        };
        Self {
            method: Some(method),
        }
    }
}

impl From<types::AffinityMethod> for Affinity {
    fn from(a: types::AffinityMethod) -> Self {
        use types::affinity_method::Method;
        match a.method {
            None | Some(Method::None(_)) => Affinity::None,
            Some(Method::ClientIp(_)) => Affinity::ClientIp,
            Some(Method::Cookie(c)) => Affinity::Cookie {
                name: c.name,
                ttl_seconds: c.ttl_seconds,
            },
            Some(Method::ConsistentHashing(h)) => Affinity::ConsistentHashing {
                parameter: h.parameter,
            },
        }
    }
}

impl From<StateSync> for types::StateSync {
    fn from(s: StateSync) -> Self {
        use types::state_sync::Mode;
        let mode = match s.mode {
            StateSyncMode::None => Mode::None(types::StateSyncNone {}),
            StateSyncMode::OnScale => Mode::OnScale(types::StateSyncOnScale {}),
            StateSyncMode::Continuous => Mode::Continuous(types::StateSyncContinuous {
                interval_ms: s.interval_ms,
                batch_bytes: s.batch_bytes,
                priority_prefixes: s.priority_prefixes,
            }),
        };
        Self {
            mode: Some(mode),
            refuse_unsynced_scale_in: s.refuse_unsynced_scale_in,
        }
    }
}

impl From<Option<types::StateSync>> for StateSync {
    fn from(s: Option<types::StateSync>) -> Self {
        use types::state_sync::Mode;
        let s = s.unwrap_or_default();
        let mut out = StateSync {
            mode: StateSyncMode::OnScale,
            interval_ms: 0,
            batch_bytes: 0,
            priority_prefixes: Vec::new(),
            refuse_unsynced_scale_in: s.refuse_unsynced_scale_in,
        };
        match s.mode {
            Some(Mode::None(_)) => out.mode = StateSyncMode::None,
            Some(Mode::Continuous(c)) => {
                out.mode = StateSyncMode::Continuous;
                out.interval_ms = c.interval_ms;
                out.batch_bytes = c.batch_bytes;
                out.priority_prefixes = c.priority_prefixes;
            }
            Some(Mode::OnScale(_)) | None => {}
        }
        out
    }
}

/// The API's name of a state sync mode.
pub fn state_sync_mode(s: &StateSync) -> &'static str {
    match s.mode {
        StateSyncMode::None => "none",
        StateSyncMode::OnScale => "on_scale",
        StateSyncMode::Continuous => "continuous",
    }
}

impl From<Resources> for types::Resources {
    fn from(r: Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
        }
    }
}

impl From<types::Resources> for Resources {
    fn from(r: types::Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
        }
    }
}

fn member_status(s: i32) -> &'static str {
    match state_pb::MemberStatus::try_from(s) {
        Ok(state_pb::MemberStatus::Starting) => "starting",
        Ok(state_pb::MemberStatus::Active) => "active",
        Ok(state_pb::MemberStatus::Draining) => "draining",
        Ok(state_pb::MemberStatus::Paused) => "paused",
        Ok(state_pb::MemberStatus::Stopped) => "stopped",
        _ => "unknown",
    }
}

/// A member as the API shows it.
pub fn member(m: &state_pb::Member, template: &str) -> Member {
    let (health, health_reason) = form_proto::member_health(m);
    Member {
        instance_id: m.instance_id.clone(),
        status: member_status(m.status).into(),
        addresses: m.addresses.clone(),
        node_id: m.node_id.clone(),
        health: health.into(),
        health_reason,
        cpu_utilization: m.cpu_utilization,
        template: m.instance_id == template,
        state_sync: m.state_sync.as_ref().map(|s| MemberSync {
            synced_at: crate::time::rfc3339(s.synced_at_ms),
            changes_last_round: s.changes_last_round,
        }),
        state_contract: m.state_contract.clone(),
    }
}

/// A cluster as the API shows it.
pub fn cluster(c: state_pb::Cluster) -> Cluster {
    let mut members: Vec<Member> = c
        .members
        .values()
        .map(|m| member(m, &c.template_instance_id))
        .collect();
    members.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    Cluster {
        cluster_id: c.cluster_id,
        domain: c.domain,
        workload: c.workload.map(Into::into),
        policy: c.scaling_policy.map(Into::into),
        affinity: c.affinity.map(Into::into),
        resources: c.resources.map(Into::into),
        template_instance_id: c.template_instance_id,
        members,
        state_sync: c.state_sync.into(),
        drain: c.drain.into(),
        node_selector: c
            .node_selector
            .map(|s| s.labels.into_iter().collect())
            .unwrap_or_default(),
        standby: c.standby.map(|s| Standby {
            snapshot_id: s.snapshot_id,
            source_instance_id: s.source_instance_id,
            node_ids: s.node_ids,
            taken_at: crate::time::rfc3339(s.taken_at_ms),
        }),
    }
}

/// The name of an operation kind as the API spells it.
pub fn kind_name(kind: i32) -> &'static str {
    form_proto::operation_kind_name(kind)
}

/// An operation as the API shows it.
pub fn operation(o: types::Operation) -> Operation {
    use types::operation_status::State as S;
    let done = o.steps_recorded;
    let (status, step, step_index, error, left_behind) = match o.status.and_then(|s| s.state) {
        None | Some(S::Requested(_)) => ("requested", String::new(), 0, String::new(), vec![]),
        Some(S::InProgress(p)) => ("in_progress", p.step, p.step_index, String::new(), vec![]),
        Some(S::Completed(_)) => ("completed", String::new(), done, String::new(), vec![]),
        Some(S::Failed(f)) => ("failed", String::new(), done, f.error, f.left_behind),
        Some(S::RolledBack(r)) => ("rolled_back", String::new(), done, r.reason, vec![]),
    };
    Operation {
        operation_id: o.operation_id,
        cluster_id: o.cluster_id,
        kind: kind_name(o.kind).into(),
        status: status.into(),
        step,
        step_index,
        steps: o.steps,
        target_count: o.target_count,
        new_instances: o.new_instances,
        victims: o.victims,
        reason: o.reason,
        error,
        left_behind,
        created_at: crate::time::rfc3339(o.created_at_ms),
        completed_at: (o.completed_at_ms > 0).then(|| crate::time::rfc3339(o.completed_at_ms)),
        state_transfer: o.state_transfer.map(|t| StateTransfer {
            changes: t.changes,
            bytes: t.bytes,
            not_handed_off: t.not_handed_off,
            contract: t.contract,
        }),
        notes: o.notes,
        placements: o
            .placements
            .into_iter()
            .map(|p| Placement {
                instance_id: p.instance_id,
                node_id: p.node_id,
                reason: p.reason,
            })
            .collect(),
        owner: o.owner,
    }
}
