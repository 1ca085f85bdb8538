//! Replication between replicas: the `GossipService` server and one task per peer that
//! pushes deltas to it and runs anti-entropy with it.
//!
//! The protocol itself has no I/O: [`protocol`] says what to send and what to learn,
//! [`link`] says when a round with a peer is due and which calls it makes. The tonic
//! server ([`server`]) and driver ([`driver`]) wire them to the network, and the
//! simulator (`form-sim`) drives the same two on simulated time. See docs/gossip.md.

pub mod driver;
pub mod link;
pub mod protocol;
pub mod server;

pub use driver::{MAX_MESSAGE, Transport, run, run_links};
pub use server::{GossipApi, Peers};

use std::time::Duration;

use form_runtime::addr::HostPort;

/// How replicas exchange state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum ReplicationPolicy {
    /// Push deltas; full state only when needed deltas were compacted away.
    DeltaSync,
    /// Push the whole state every interval (simple, costly; for comparison).
    FullSync,
    /// Like `DeltaSync`, but a write touching a high-priority field is pushed at once
    /// instead of at the next interval.
    PrioritizedSync {
        /// Field groups pushed at once: `members`, `health`, `heartbeats`, `operations`, `clusters`.
        high_priority_fields: Vec<String>,
    },
}

/// The fields of the high-priority groups named in `groups`.
pub fn high_priority_fields(groups: &[String]) -> Result<Vec<crate::crdt::Field>, String> {
    use crate::crdt::Field as F;
    let mut out = Vec::new();
    for g in groups {
        out.extend_from_slice(match g.as_str() {
            "members" => &[F::MemberPresence, F::NodeId, F::Addresses, F::MemberStatus, F::Generation, F::MemberResources, F::MemberStateSync, F::MemberDrain, F::StateContract][..],
            "health" => &[F::Health, F::HeartbeatsSkipped][..],
            "heartbeats" => &[F::Heartbeat, F::StateWrites, F::HeartbeatUsage][..],
            "operations" => &[F::OperationBody, F::OperationStatus][..],
            "clusters" => &[F::ClusterPresence, F::Domain, F::Workload, F::Policy, F::Template, F::Affinity, F::ClusterResources, F::StateSync, F::Drain, F::Standby, F::NodeSelector][..],
            other => {
                return Err(format!(
                    "'{other}' is not a field group; expected members, health, heartbeats, operations or clusters"
                ));
            }
        });
    }
    Ok(out)
}

/// Gossip settings.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// Peers' gRPC addresses.
    pub peers: Vec<HostPort>,
    /// Push interval.
    pub sync_interval: Duration,
    /// How long a push at once (a write's wake) waits to gather the writes that follow.
    pub push_gather: Duration,
    /// Anti-entropy interval.
    pub anti_entropy_interval: Duration,
    /// Most deltas per message.
    pub batch_size: usize,
    /// Policy.
    pub policy: ReplicationPolicy,
}
