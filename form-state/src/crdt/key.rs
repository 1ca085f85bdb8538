//! Where a value lives in the state: `(space, id, sub, field)`. Keys sort so that all
//! keys of one cluster, and all keys of one member, are contiguous ranges.

use serde::{Deserialize, Serialize};

/// Top-level key spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Space {
    /// Clusters (id = cluster id; sub = "" for the cluster's own fields, or an
    /// instance id for a member's fields).
    Cluster,
    /// Operations (id = operation id, sub = "").
    Operation,
    /// Scaling controllers (id = controller id, sub = "").
    Controller,
    /// form-vmm-service nodes (id = node id, sub = "").
    Node,
}

/// A field of a cluster, member or operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Field {
    /// The cluster exists (written on creation only).
    ClusterPresence,
    /// Host name the balancer routes by.
    Domain,
    /// What instances run (encoded `Workload`).
    Workload,
    /// Encoded `ScalingPolicy`.
    Policy,
    /// Template instance id.
    Template,
    /// Encoded `AffinityMethod`.
    Affinity,
    /// Encoded `Resources` of new instances.
    ClusterResources,
    /// The member exists (written by an add only).
    MemberPresence,
    /// Node running the member.
    NodeId,
    /// The member's addresses.
    Addresses,
    /// Lifecycle status (enum number).
    MemberStatus,
    /// Clone generation.
    Generation,
    /// Latest heartbeat: rank = time in ms, value = encoded heartbeat.
    Heartbeat,
    /// Heartbeats missed.
    HeartbeatsSkipped,
    /// Encoded `Resources` of the member.
    MemberResources,
    /// Health changes: rank = time in ms, value = encoded `HealthEvent`.
    Health,
    /// The operation exists; value = the encoded operation without its status.
    OperationBody,
    /// Operation status: rank = position in the status order, value = encoded status.
    OperationStatus,
    /// A controller's latest heartbeat: rank = time in ms, value = its address.
    ControllerHeartbeat,
    /// Encoded `StateSync` of a cluster (after the older fields, so stored keys keep
    /// their encoding).
    StateSync,
    /// Encoded `MemberStateSync` of a member.
    MemberStateSync,
    /// A member's own writes as its workload counted them: rank = the count (max).
    StateWrites,
    /// A member's memory and uptime: rank = heartbeat time in ms, value = encoded
    /// `InstanceUsage` (max).
    HeartbeatUsage,
    /// Encoded `DrainSettings` of a cluster.
    Drain,
    /// Encoded `DrainSettings` of a member.
    MemberDrain,
    /// A node's latest heartbeat: rank = time in ms, value = the encoded
    /// `NodeHeartbeatRequest` (max).
    NodeHeartbeat,
    /// Whether a node is cordoned (`U64` 1 or 0).
    NodeCordon,
    /// A cluster's fence: rank = the epoch, value = the owner that claimed it (max).
    Fence,
    /// Encoded `StandbySnapshot` of a cluster (docs/standby.md).
    Standby,
    /// Encoded `NodeSelector` of a cluster: the labels its instances' nodes carry.
    NodeSelector,
    /// Whether a member's workload implements the state contract, as its node said
    /// with a heartbeat (text).
    StateContract,
}

/// How the entries of one field are read when concurrent writes left several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// The entry with the largest `(at_ms, dot)` wins.
    LastWriterWins,
    /// The entry with the largest `(rank, at_ms, dot)` wins (max register, monotone status).
    Max,
    /// Every entry is kept, ordered by `(rank, dot)`; writers trim what they observed.
    History,
}

impl Field {
    /// How this field's entries are read.
    pub fn resolve(self) -> Resolve {
        match self {
            Field::Heartbeat
            | Field::OperationStatus
            | Field::ControllerHeartbeat
            | Field::StateWrites
            | Field::HeartbeatUsage
            | Field::NodeHeartbeat
            | Field::Fence => Resolve::Max,
            Field::Health => Resolve::History,
            _ => Resolve::LastWriterWins,
        }
    }
}

/// The address of one field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    /// Key space.
    pub space: Space,
    /// Cluster or operation id.
    pub id: String,
    /// Instance id for member fields; empty otherwise.
    pub sub: String,
    /// The field.
    pub field: Field,
}

impl Key {
    /// A field of cluster `id`.
    pub fn cluster(id: &str, field: Field) -> Self {
        Self {
            space: Space::Cluster,
            id: id.to_owned(),
            sub: String::new(),
            field,
        }
    }

    /// A field of member `instance` of cluster `id`.
    pub fn member(id: &str, instance: &str, field: Field) -> Self {
        Self {
            space: Space::Cluster,
            id: id.to_owned(),
            sub: instance.to_owned(),
            field,
        }
    }

    /// A field of operation `id`.
    pub fn operation(id: &str, field: Field) -> Self {
        Self {
            space: Space::Operation,
            id: id.to_owned(),
            sub: String::new(),
            field,
        }
    }

    /// A field of controller `id`.
    pub fn controller(id: &str, field: Field) -> Self {
        Self {
            space: Space::Controller,
            id: id.to_owned(),
            sub: String::new(),
            field,
        }
    }

    /// A field of node `id`.
    pub fn node(id: &str, field: Field) -> Self {
        Self {
            space: Space::Node,
            id: id.to_owned(),
            sub: String::new(),
            field,
        }
    }

    /// The smallest key of `(space, id, sub)`; the keys of a cluster (with its members),
    /// a member or an operation follow it contiguously.
    pub fn prefix_start(space: Space, id: &str, sub: &str) -> Self {
        Self {
            space,
            id: id.to_owned(),
            sub: sub.to_owned(),
            field: Field::ClusterPresence,
        }
    }
}
