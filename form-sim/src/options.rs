//! What a simulated run is made of: its size, its faults and its timings.

use form_state::gossip::ReplicationPolicy;
use form_state::gossip::protocol::Broken;

/// Faults injected while the fault phase lasts.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// A message's delay, ms (drawn per message, so messages overtake each other).
    pub delay_ms: (u64, u64),
    /// Most partitions (each splits the replicas in two, then heals).
    pub partitions: u64,
    /// Most crashes (each drops what the disk had not synced, then restarts).
    pub crashes: u64,
    /// Most clock offset of a replica, ms, either way.
    pub skew_ms: u64,
    /// Slowest fsync, ms (each replica draws its disk between 1 ms and this).
    pub slowest_disk_ms: u64,
}

impl Faults {
    /// No faults: messages arrive once, after 1-5 ms.
    pub fn none() -> Self {
        Self {
            loss: 0.0,
            duplicate: 0.0,
            delay_ms: (1, 5),
            partitions: 0,
            crashes: 0,
            skew_ms: 0,
            slowest_disk_ms: 2,
        }
    }

    /// Every kind of fault.
    pub fn all() -> Self {
        Self {
            loss: 0.05,
            duplicate: 0.03,
            delay_ms: (1, 250),
            partitions: 3,
            crashes: 4,
            skew_ms: 2_000,
            slowest_disk_ms: 300,
        }
    }
}

/// Whom each replica gossips with (its `--peers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Every other replica (how deployments run).
    Mesh,
    /// The next `k` replicas around a ring: a delta must be forwarded to reach the rest.
    Ring(usize),
    /// Replica i gossips only with i + 1 (the last with the one before it): nobody
    /// pulls from replica 0, whose writes leave it only by its own pushes.
    Chain,
    /// Drawn from the seed: a mesh or a ring of 1 (each replica peers with the next),
    /// half the runs each.
    Seeded,
}

/// One simulated run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Replicas of form-state.
    pub replicas: usize,
    /// Simulated ms of the fault phase (writes and faults).
    pub fault_ms: u64,
    /// Simulated ms after the last heal within which the replicas must converge.
    pub settle_ms: u64,
    /// Client writes per simulated second, over all replicas.
    pub writes_per_second: u64,
    /// Clusters each replica holds before the run (fleet scale), with this many
    /// members each.
    pub clusters: usize,
    /// Members of each of those clusters.
    pub members: usize,
    /// The faults of the fault phase.
    pub faults: Faults,
    /// Whom each replica gossips with.
    pub peers: Peers,
    /// The replication policy; `None`: drawn from the seed (delta half the runs,
    /// prioritized on cluster fields, whose writes wake a push at once, or full state).
    pub policy: Option<ReplicationPolicy>,
    /// A peer address every replica has that never answers (a black hole).
    pub black_hole: bool,
    /// Messages between replicas 0 and 1 take 1.5 s more, for the whole run: a pull
    /// over that link is slower than the anti-entropy interval.
    pub slow_link: bool,
    /// Push interval, ms.
    pub sync_ms: u64,
    /// Anti-entropy interval, ms.
    pub anti_entropy_ms: u64,
    /// Most deltas per message.
    pub batch: usize,
    /// Deltas a replica buffers while waiting for predecessors.
    pub buffer: usize,
    /// Deltas a replica keeps for gossip (fewer force the full-state fallback).
    pub delta_log: usize,
    /// Draw `buffer` and `delta_log` from the seed instead: half the runs small (the
    /// full-state fallback and anti-entropy on overflow run), half as deployed.
    pub seeded_limits: bool,
    /// A deliberately broken protocol, to prove the checker can fail.
    pub broken: Broken,
    /// A deliberately broken disk that acknowledges a write before syncing it, to prove
    /// the durability checks can fail.
    pub ack_before_sync: bool,
}

impl Options {
    /// The CI case: 5 replicas, 60 simulated seconds of every fault, small buffers and
    /// delta logs so the fallbacks run too.
    pub fn faulty() -> Self {
        Self {
            replicas: 5,
            fault_ms: 60_000,
            settle_ms: 60_000,
            writes_per_second: 20,
            clusters: 0,
            members: 0,
            faults: Faults::all(),
            peers: Peers::Seeded,
            policy: None,
            black_hole: false,
            slow_link: false,
            sync_ms: 100,
            anti_entropy_ms: 1_000,
            batch: 16,
            buffer: 32,
            delta_log: 200,
            seeded_limits: true,
            broken: Broken::default(),
            ack_before_sync: false,
        }
    }

    /// A platform without faults, as the defaults of form-state run it.
    pub fn calm(replicas: usize) -> Self {
        Self {
            replicas,
            faults: Faults::none(),
            peers: Peers::Mesh,
            policy: Some(ReplicationPolicy::DeltaSync),
            fault_ms: 30_000,
            settle_ms: 10_000,
            batch: 64,
            buffer: 10_000,
            delta_log: 100_000,
            seeded_limits: false,
            ..Self::faulty()
        }
    }
}
