//! Backend selection, without any I/O: which backend serves a request, given the
//! route's affinity method, the backends' states and the request's key. The proxy
//! (data plane) asks; this module answers (Pingora keeps its load-balancing crate apart
//! from the proxy in the same way).
//!
//! - [`ring`]: consistent hashing (1024 points per weight unit); removing a backend moves
//!   only the keys that were on it;
//! - [`p2c`]: power of two choices on in-flight requests;
//! - [`cookie`]: HMAC-authenticated session cookies naming a backend;
//! - [`health`]: active checks (rise, fall) and passive ejection with a cool-off;
//! - [`select`]: the decision for one request, by affinity method and backend state.

pub mod cookie;
pub mod health;
pub mod p2c;
pub mod ring;
pub mod select;

use tokio::time::Instant;

/// State of a backend within its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Takes new requests.
    Active,
    /// Takes only requests of sessions pinned to it, until `until`.
    Draining {
        /// End of the grace period.
        until: Instant,
    },
    /// Taken out by health checks.
    Ejected,
    /// Drain finished; takes nothing.
    Drained,
}

/// One backend as the selector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable id (the instance id).
    pub id: String,
    /// Relative weight (>= 1).
    pub weight: u32,
    /// State.
    pub state: State,
}

impl Backend {
    /// Whether a new (unpinned) request may go here.
    pub fn takes_new(&self) -> bool {
        self.state == State::Active
    }

    /// Whether a request of a session pinned here may still go here at `now`.
    pub fn takes_pinned(&self, now: Instant) -> bool {
        match self.state {
            State::Active => true,
            State::Draining { until } => now < until,
            State::Ejected | State::Drained => false,
        }
    }
}

/// The hasher of the data plane's maps, whose keys the operator chooses (domains,
/// backend addresses): FNV-1a with [`hash64`]'s finaliser, fast on short keys. Lookups
/// by a client's key cannot flood a map whose entries only the operator adds.
#[derive(Debug, Clone, Copy)]
pub struct KeyHasher(u64);

impl Default for KeyHasher {
    fn default() -> Self {
        Self(FNV_OFFSET)
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// Builds [`KeyHasher`]s.
pub type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// SplitMix64's finaliser.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finaliser for spread): the same key
/// maps to the same backend across restarts and balancer replicas.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h = KeyHasher::default();
    std::hash::Hasher::write(&mut h, bytes);
    std::hash::Hasher::finish(&h)
}
