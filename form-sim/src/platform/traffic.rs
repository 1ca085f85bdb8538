//! Requests through the balancers' data plane, without sockets: every few
//! milliseconds each balancer picks a backend for a few clients of one domain, with
//! the function its proxy picks with for every request (`form_rplb::proxy::handler::pick`),
//! on the route table its follower keeps. Each pick is checked against what that
//! balancer had seen before it:
//! - never a backend its route marks removed;
//! - never a backend it had seen removed (marked, or gone from the route) earlier: an
//!   instance id never comes back, so a route that brings one back replays stale
//!   state (a reordered or repeated watch event, a resync from an old replica);
//! - a request without a session never goes to a draining backend.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use form_rplb::core::Core;
use form_runtime::shutdown::Shutdown;

use super::balancer::Balancer;

/// Clients per balancer, each its own address.
const CLIENTS: u8 = 4;

/// The picks made and the violations seen, shared with the picking tasks.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    picks: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl Traffic {
    /// Picks so far.
    pub fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    /// The violations so far, each once.
    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn violated(&self, what: String) {
        let mut v = self
            .violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if v.len() < 20 && !v.contains(&what) {
            v.push(what);
        }
    }

    /// Starts picking for `domain` on every balancer, every `every`, until `stop`.
    pub fn start(
        &self,
        balancers: &[Balancer],
        domain: &str,
        every: Duration,
        tasks: &mut tokio::task::JoinSet<()>,
        stop: &Shutdown,
    ) {
        for b in balancers {
            let (t, core, name, domain) = (
                self.clone(),
                b.core.clone(),
                b.name.clone(),
                domain.to_owned(),
            );
            let mut stop = stop.clone();
            tasks.spawn(async move {
                let mut seen = Seen::default();
                loop {
                    t.round(&core, &name, &domain, &mut seen);
                    tokio::select! {
                        _ = stop.requested() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            });
        }
    }

    /// One pick per client on balancer `name`, checked against what it saw before.
    fn round(&self, core: &Core, name: &str, domain: &str, seen: &mut Seen) {
        let headers = http::HeaderMap::new();
        for c in 1..=CLIENTS {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, c));
            let Some((route, d)) = form_rplb::proxy::handler::pick(core, domain, &headers, ip)
            else {
                continue;
            };
            self.picks.fetch_add(1, Ordering::Relaxed);
            let Some(b) = route.backends.get(d.backend) else {
                self.violated(format!(
                    "{name} picked index {} of {} backends",
                    d.backend,
                    route.backends.len()
                ));
                continue;
            };
            if b.is_removed() {
                self.violated(format!(
                    "{name} picked {}, which its route marks removed",
                    b.id
                ));
            } else if seen.gone.contains(&b.id) {
                self.violated(format!("{name} picked {}, which it had seen removed", b.id));
            } else if !d.pinned && !b.selector_backend().takes_new() {
                self.violated(format!(
                    "{name} sent a request without a session to {}, which is draining",
                    b.id
                ));
            }
            seen.update(&route);
        }
    }
}

/// What one balancer's routes showed so far.
#[derive(Debug, Default)]
struct Seen {
    /// Ids in the last route read.
    present: BTreeSet<String>,
    /// Ids seen removed (marked, or gone from the route).
    gone: BTreeSet<String>,
}

impl Seen {
    fn update(&mut self, route: &form_rplb::routes::RouteView) {
        let now: BTreeSet<String> = route
            .backends
            .iter()
            .filter(|b| !b.is_removed())
            .map(|b| b.id.clone())
            .collect();
        self.gone.extend(
            route
                .backends
                .iter()
                .filter(|b| b.is_removed())
                .map(|b| b.id.clone()),
        );
        self.gone.extend(self.present.difference(&now).cloned());
        self.present = now;
    }
}
