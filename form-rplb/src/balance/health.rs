//! Health of one backend as a state machine, without I/O: active checks (`rise`
//! consecutive successes bring an ejected backend back, `fall` consecutive failures
//! eject it) and passive ejection (`passive_failures` consecutive failed requests eject
//! it for `cool_off`, after which it is checked again before it takes traffic, unless
//! the route may not lose another backend to passive ejection: then it is held in
//! rotation, and ejected by the first failure once that is allowed).
//!
//! ```text
//!            fall failed checks / passive failures
//!   Healthy ─────────────────────────────────────> Ejected{until}
//!      ^                                              │ until passed: a check is due
//!      └──────────── rise passed checks ──────────────┘
//! ```

use std::time::Duration;

use tokio::time::Instant;

/// Thresholds of the health state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive passed checks that bring an ejected backend back.
    pub rise: u32,
    /// Consecutive failed checks that eject a backend.
    pub fall: u32,
    /// Consecutive failed requests (connect errors, 5xx from the backend) that eject it.
    pub passive_failures: u32,
    /// How long a passively ejected backend rests before it is checked again.
    pub cool_off: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            rise: 2,
            fall: 3,
            passive_failures: 5,
            cool_off: Duration::from_secs(10),
        }
    }
}

/// What a backend's health says about new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Takes traffic.
    Healthy,
    /// Out of rotation; back after `rise` passed checks, checked from `recheck_at` on.
    Ejected {
        /// When the next check may bring it back (the end of a cool-off).
        recheck_at: Instant,
    },
}

/// What a failed request did to a backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passive {
    /// Nothing changed.
    Unchanged,
    /// The backend was ejected.
    Ejected,
    /// It reached the threshold but was kept in rotation (ejection not allowed).
    Held,
}

/// The health of one backend.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    config: HealthConfig,
    health: Health,
    passed: u32,
    failed_checks: u32,
    failed_requests: u32,
}

impl HealthTracker {
    /// A healthy backend.
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            health: Health::Healthy,
            passed: 0,
            failed_checks: 0,
            failed_requests: 0,
        }
    }

    /// Changes the thresholds (counts so far are kept).
    pub fn set_config(&mut self, config: HealthConfig) {
        self.config = config;
    }

    /// The current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Whether it takes new traffic.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Healthy
    }

    /// Whether an active check is due at `now` (always while healthy, at the interval;
    /// for an ejected backend only after its cool-off).
    pub fn check_due(&self, now: Instant) -> bool {
        match self.health {
            Health::Healthy => true,
            Health::Ejected { recheck_at } => now >= recheck_at,
        }
    }

    /// Records an active check; returns true when the health changed.
    pub fn on_check(&mut self, passed: bool, now: Instant) -> bool {
        let before = self.health;
        if passed {
            self.failed_checks = 0;
            self.passed = self.passed.saturating_add(1);
            if matches!(self.health, Health::Ejected { .. }) && self.passed >= self.config.rise {
                self.health = Health::Healthy;
                self.failed_requests = 0;
            }
        } else {
            self.passed = 0;
            self.failed_checks = self.failed_checks.saturating_add(1);
            if self.failed_checks >= self.config.fall && self.is_healthy() {
                self.health = Health::Ejected { recheck_at: now };
            }
        }
        self.health != before
    }

    /// Whether one more failed request would eject it (if allowed).
    pub fn failure_reaches_threshold(&self) -> bool {
        self.is_healthy() && self.failed_requests.saturating_add(1) >= self.config.passive_failures
    }

    /// Records the outcome of a proxied request; `may_eject` says whether its route can
    /// lose this backend to passive ejection now. [`Passive::Held`] is reported once,
    /// when the threshold is first reached without leave to eject.
    pub fn on_request(&mut self, ok: bool, now: Instant, may_eject: bool) -> Passive {
        if ok {
            self.failed_requests = 0;
            return Passive::Unchanged;
        }
        self.failed_requests = self.failed_requests.saturating_add(1);
        if !self.is_healthy() || self.failed_requests < self.config.passive_failures {
            return Passive::Unchanged;
        }
        if !may_eject {
            return if self.failed_requests == self.config.passive_failures {
                Passive::Held
            } else {
                Passive::Unchanged
            };
        }
        self.health = Health::Ejected {
            recheck_at: now + self.config.cool_off,
        };
        self.passed = 0;
        Passive::Ejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthConfig {
        HealthConfig {
            rise: 2,
            fall: 3,
            passive_failures: 5,
            cool_off: Duration::from_secs(10),
        }
    }

    #[test]
    fn fall_failed_checks_eject_and_rise_passed_checks_bring_back() {
        let now = Instant::now();
        let mut h = HealthTracker::new(config());
        assert!(!h.on_check(false, now) && !h.on_check(false, now));
        assert!(h.is_healthy(), "two failures are not yet `fall`");
        assert!(h.on_check(false, now), "the third ejects");
        assert!(!h.is_healthy());
        assert!(!h.on_check(true, now), "one pass is not yet `rise`");
        assert!(h.on_check(true, now), "the second brings it back");
        assert!(h.is_healthy());
        // A failure between passes restarts the count.
        h.on_check(false, now);
        h.on_check(false, now);
        h.on_check(true, now);
        h.on_check(false, now);
        assert!(h.is_healthy(), "failures must be consecutive");
    }

    #[test]
    fn passive_failures_eject_for_a_cool_off_then_checks_decide() {
        let now = Instant::now();
        let mut h = HealthTracker::new(config());
        for _ in 0..4 {
            assert_eq!(h.on_request(false, now, true), Passive::Unchanged);
        }
        assert_eq!(
            h.on_request(true, now, true),
            Passive::Unchanged,
            "a success resets the count"
        );
        for _ in 0..4 {
            h.on_request(false, now, true);
        }
        assert_eq!(
            h.on_request(false, now, true),
            Passive::Ejected,
            "five in a row eject"
        );
        assert!(
            !h.check_due(now + Duration::from_secs(9)),
            "resting during the cool-off"
        );
        assert!(h.check_due(now + Duration::from_secs(10)));
        let later = now + Duration::from_secs(10);
        h.on_check(true, later);
        assert!(h.on_check(true, later), "back after `rise` passes");
        assert!(h.is_healthy());
    }

    #[test]
    fn a_backend_the_route_cannot_lose_is_held_until_it_can() {
        let now = Instant::now();
        let mut h = HealthTracker::new(config());
        for _ in 0..4 {
            assert!(!h.failure_reaches_threshold());
            h.on_request(false, now, false);
        }
        assert!(h.failure_reaches_threshold());
        assert_eq!(h.on_request(false, now, false), Passive::Held, "said once");
        assert!(h.failure_reaches_threshold(), "every failure asks again");
        assert_eq!(h.on_request(false, now, false), Passive::Unchanged);
        assert!(h.is_healthy(), "still in rotation");
        assert_eq!(
            h.on_request(false, now, true),
            Passive::Ejected,
            "the first failure once it may go"
        );
    }
}
