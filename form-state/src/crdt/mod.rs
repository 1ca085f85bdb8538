//! The replicated state as a delta-state CRDT (Almeida, Shoker, Baquero), free of
//! tokio and gRPC.
//!
//! Every value is an entry of a *dot store*: each write gets a fresh dot
//! `(replica, counter)`, and a write that replaces a value removes the dots it observed.
//! The state carries a *causal context* (every dot it has seen). Joining two states
//! keeps an entry when both have it, or when the other side has not seen its dot; so a
//! remove wins only over what it observed (concurrent adds survive: add-wins), and a
//! removed entry never comes back (its dot stays in the context). See `docs/state.md`.
//!
//! ```text
//! State
//!  ├ ctx: CausalContext      version vector + dots seen out of order
//!  └ store: Key -> DotFun     DotFun = { dot -> Entry { at_ms, value } }
//!            in copy-on-write shards by (space, id): a clone is cheap (shards.rs)
//!     Key = (space, id, sub, field)   e.g. (Cluster, "web", "i-3", MemberStatus)
//! ```
//!
//! A field with several entries (concurrent writes) is resolved on read: last writer
//! wins by `(at_ms, dot)`, the largest value wins for max registers, all entries
//! are kept for histories.

pub mod context;
pub mod delta;
pub mod key;
pub mod shards;
pub mod state;

pub use context::{CausalContext, Dot};
pub use delta::{Delta, DeltaBuilder};
pub use key::{Field, Key, Resolve, Space};
pub use state::{Entry, State, Value, View};

#[cfg(test)]
mod tests;
