//! form-sim: a deterministic simulator of the platform's protocols. The replicas of
//! form-state run the production gossip protocol (its sans-IO parts,
//! `form_state::gossip::{link, protocol}`, over `form_state::replica::Replica`) on one
//! thread and simulated time, over an in-memory network that loses, duplicates, delays
//! and reorders messages, partitions and heals, crashes replicas (dropping what their
//! disks had not synced) and restarts them, skews clocks and slows disks, all from one
//! seed. After every run the invariants are checked. See docs/simulation.md.

pub mod disk;
pub mod history;
pub mod options;
pub mod platform;
pub mod rng;
pub mod track;
pub mod world;

pub use options::{Faults, Options, Peers};
pub use world::{Outcome, Stats, run};

/// The seeds CI runs on every change (`tests/seeds.rs`); failing seeds found later are
/// added to [`REGRESSIONS`].
pub const CI_SEEDS: std::ops::Range<u64> = 1..25;

/// Seeds that once found a bug, kept as regression cases (docs/simulation.md says
/// which bug each found).
pub const REGRESSIONS: &[u64] = &[];
