//! The bridge between the wire types of `form.state.v1` and the CRDT: requests become
//! deltas ([`mod@write`]), the state is read back as clusters and operations ([`read`]),
//! requests are checked first ([`validate`]), and operations are found by cluster
//! through an [`index`].

pub mod index;
pub mod read;
pub mod validate;
pub mod write;

/// Health changes kept per member.
pub const HEALTH_HISTORY: usize = 16;
