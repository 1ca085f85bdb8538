//! One backend of one route at run time: its counters, its drain state and its health.
//! A backend object lives as long as its id and address stay in the route; in-flight
//! requests hold it, so a route change never drops them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use form_proto::rplb::v1 as pb;
use http::uri::Authority;
use tokio::sync::watch;

use super::settings::BackendSpec;
use crate::balance::health::{HealthConfig, HealthTracker};
use crate::balance::{Backend as SelBackend, State};
use crate::stats::Stats;

/// How long a session counts as pinned after its last request.
pub const SESSION_ACTIVE: Duration = Duration::from_secs(60);
/// Sessions remembered per backend at most: a flood of new sessions costs bounded
/// memory and at most one sweep per second (the count then saturates).
pub const SESSIONS_MAX: usize = 65_536;

/// Recently seen sessions of one backend.
#[derive(Debug, Default)]
struct Sessions {
    seen: HashMap<u64, Instant>,
    swept: Option<Instant>,
}

/// The operator's side of a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    /// Takes new requests.
    Active,
    /// Being drained until `until`.
    Draining {
        /// End of the grace period.
        until: Instant,
        /// Whether clients are told to reconnect.
        notify: bool,
    },
    /// Drain finished.
    Drained,
}

/// A backend at run time.
#[derive(Debug)]
pub struct BackendRt {
    /// Stable id.
    pub id: String,
    /// `host:port`.
    pub authority: Authority,
    /// Relative weight.
    pub weight: u32,
    /// Requests in flight (until the response body ends).
    pub in_flight: AtomicU64,
    /// Request statistics.
    pub stats: Stats,
    admin: Mutex<Admin>,
    health: Mutex<HealthTracker>,
    sessions: Mutex<Sessions>,
    /// Progress of the running or last drain.
    drain: Mutex<Option<watch::Receiver<pb::DrainProgress>>>,
    /// Leaves the route when its drain ends.
    leaving: AtomicBool,
    /// No longer in its route (its checks and drain stop).
    removed: AtomicBool,
}

impl BackendRt {
    /// A new, active and healthy backend.
    pub fn new(spec: &BackendSpec, health: HealthConfig, now: Instant) -> Self {
        Self {
            id: spec.id.clone(),
            authority: spec.authority.clone(),
            weight: spec.weight,
            in_flight: AtomicU64::new(0),
            stats: Stats::new(now),
            admin: Mutex::new(Admin::Active),
            health: Mutex::new(HealthTracker::new(health)),
            sessions: Mutex::new(Sessions::default()),
            drain: Mutex::new(None),
            leaving: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    /// Whether this object serves `spec`: same id, address and weight, and, when the
    /// spec wants it active, not drained, draining or leaving.
    pub fn matches(&self, spec: &BackendSpec) -> bool {
        self.id == spec.id
            && self.authority == spec.authority
            && self.weight == spec.weight
            && (!spec.active || (self.admin() == Admin::Active && !self.is_leaving()))
    }

    /// Starts a drain if it is active: sets `Draining` and keeps the progress channel,
    /// in one step (two drains cannot both start). False when it was not active.
    pub fn begin_drain(&self, admin: Admin, rx: &watch::Receiver<pb::DrainProgress>) -> bool {
        let mut a = lock(&self.admin);
        if *a != Admin::Active {
            return false;
        }
        *a = admin;
        *lock(&self.drain) = Some(rx.clone());
        true
    }

    /// The admin state.
    pub fn admin(&self) -> Admin {
        *lock(&self.admin)
    }

    /// Sets the admin state.
    pub fn set_admin(&self, admin: Admin) {
        *lock(&self.admin) = admin;
    }

    /// Runs `f` on the health tracker.
    pub fn with_health<T>(&self, f: impl FnOnce(&mut HealthTracker) -> T) -> T {
        f(&mut lock(&self.health))
    }

    /// The state the selector works with: drained, then ejected, then draining.
    pub fn state(&self) -> State {
        match self.admin() {
            Admin::Drained => State::Drained,
            _ if !self.with_health(|h| h.is_healthy()) => State::Ejected,
            Admin::Draining { until, .. } => State::Draining { until },
            Admin::Active => State::Active,
        }
    }

    /// The state as the contract names it.
    pub fn state_pb(&self) -> pb::BackendState {
        match self.state() {
            State::Active => pb::BackendState::Active,
            State::Draining { .. } => pb::BackendState::Draining,
            State::Ejected => pb::BackendState::Ejected,
            State::Drained => pb::BackendState::Drained,
        }
    }

    /// The selector's view of it.
    pub fn selector_backend(&self) -> SelBackend {
        SelBackend {
            id: self.id.clone(),
            weight: self.weight,
            state: self.state(),
        }
    }

    /// Whether its responses tell clients to reconnect (a drain with notification).
    pub fn notifies_clients(&self) -> bool {
        match self.admin() {
            Admin::Draining { notify, .. } => notify,
            Admin::Drained => true,
            Admin::Active => false,
        }
    }

    /// Records a request of the session whose cookie hashes to `session` at `now`.
    pub fn touch_session(&self, session: u64, now: Instant) {
        let mut s = lock(&self.sessions);
        if s.seen.len() >= SESSIONS_MAX && !s.seen.contains_key(&session) {
            if s.swept
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
            {
                return;
            }
            s.seen
                .retain(|_, seen| now.duration_since(*seen) < SESSION_ACTIVE);
            s.swept = Some(now);
            if s.seen.len() >= SESSIONS_MAX {
                return;
            }
        }
        s.seen.insert(session, now);
    }

    /// Sessions pinned here that sent a request within [`SESSION_ACTIVE`].
    pub fn pinned_sessions(&self, now: Instant) -> u32 {
        let s = lock(&self.sessions);
        let n = s
            .seen
            .values()
            .filter(|seen| now.duration_since(**seen) < SESSION_ACTIVE)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The contract's view of it.
    pub fn to_pb(&self) -> pb::Backend {
        pb::Backend {
            id: self.id.clone(),
            address: self.authority.to_string(),
            weight: self.weight,
            state: self.state_pb().into(),
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The progress channel of its drain, if one ran.
    pub fn drain_progress(&self) -> Option<watch::Receiver<pb::DrainProgress>> {
        lock(&self.drain).clone()
    }

    /// Marks it to leave the route when its drain ends.
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Relaxed);
    }

    /// Whether it leaves the route when its drain ends.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    /// Marks it removed from its route.
    pub fn set_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
    }

    /// Whether it was removed from its route.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
