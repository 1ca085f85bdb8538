//! The bridge between the wire types of `form.state.v1` and the CRDT: requests become
//! deltas ([`write`]), the state is read back as clusters and operations ([`read`]),
//! and requests are checked first ([`validate`]).

pub mod read;
pub mod validate;
pub mod write;

/// Health changes kept per member.
pub const HEALTH_HISTORY: usize = 16;
