//! The other controllers, as form-state knows them: this controller sends its
//! heartbeat every interval and reads everyone's back; a controller whose heartbeat
//! this one has not seen grow for the TTL is dead. [`Peers::owner_of`] is the
//! rendezvous owner of a cluster among the live ones (this controller always counts
//! itself live). Heartbeats are timed by when this controller saw their stamps grow,
//! on its own clock ([`crate::arrivals`]), not by the stamps: a controller whose clock
//! runs behind is not taken for dead (and its clusters taken over) while it beats. A
//! controller seen for the first time counts from then, so one that died before this
//! one started is found dead one TTL after the first read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::shutdown::Shutdown;

use crate::arrivals::Arrivals;
use crate::ops::record::now_ms;
use crate::ownership::{self, Controller};

/// This controller's view of the others.
#[derive(Debug)]
pub struct Peers {
    me: String,
    ttl_ms: u64,
    /// Each controller's heartbeats, with the time its last one counted as heard.
    view: Mutex<Vec<Controller>>,
    arrivals: Arrivals,
    ready: AtomicBool,
}

impl Peers {
    /// The view of controller `me`, with heartbeats older than `ttl` counting as dead.
    pub fn new(me: String, ttl: Duration) -> Self {
        Self {
            me,
            ttl_ms: ttl.as_millis() as u64,
            view: Mutex::default(),
            arrivals: Arrivals::default(),
            ready: AtomicBool::new(false),
        }
    }

    /// Whether the view has been read once. Before that this controller would think
    /// itself alone and adopt every operation, so it neither resumes nor evaluates.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn live_ids(&self) -> Vec<String> {
        let view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live: Vec<String> = ownership::live(&view, now_ms(), self.ttl_ms)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if !live.contains(&self.me) {
            live.push(self.me.clone());
        }
        live
    }

    /// Whether controller `id` is live (this one always is).
    pub fn is_live(&self, id: &str) -> bool {
        self.live_ids().iter().any(|c| c == id)
    }

    /// The controller that handles `cluster`.
    pub fn owner_of(&self, cluster: &str) -> String {
        let live = self.live_ids();
        let refs: Vec<&str> = live.iter().map(String::as_str).collect();
        ownership::owner(cluster, &refs)
            .unwrap_or(&self.me)
            .to_owned()
    }

    /// Whether this controller handles `cluster`.
    pub fn owns(&self, cluster: &str) -> bool {
        self.owner_of(cluster) == self.me
    }

    /// Takes the controllers' heartbeats as read at `now` (this controller's clock):
    /// each one's time becomes when its stamp was seen to grow.
    fn set(&self, mut controllers: Vec<Controller>, now: u64) {
        {
            let mut seen = self.arrivals.lock();
            for c in &mut controllers {
                c.last_heartbeat_ms = seen.heard(&c.id, c.last_heartbeat_ms, now, now);
            }
        }
        // Every controller seen stays remembered (they are few): a read of a replica
        // that lacks a record must not make that controller new, and live, again.
        *self.view.lock().unwrap_or_else(PoisonError::into_inner) = controllers;
        self.ready.store(true, Ordering::Release);
    }

    /// Sends heartbeats and refreshes the view every `interval`, until shutdown.
    pub async fn run(
        &self,
        mut state: StateServiceClient<crate::fencing::Ch>,
        address: String,
        interval: Duration,
        mut shutdown: Shutdown,
    ) {
        loop {
            let beat = state_pb::ControllerHeartbeatRequest {
                controller_id: self.me.clone(),
                at_ms: now_ms(),
                address: address.clone(),
            };
            if let Err(e) = state.controller_heartbeat(beat).await {
                tracing::debug!(error = %e.message(), "controller heartbeat failed");
            }
            match state
                .list_controllers(state_pb::ListControllersRequest {})
                .await
            {
                Ok(r) => self.set(
                    r.into_inner()
                        .controllers
                        .into_iter()
                        .map(|c| Controller {
                            id: c.controller_id,
                            last_heartbeat_ms: c.last_heartbeat_ms,
                        })
                        .collect(),
                    now_ms(),
                ),
                Err(e) => tracing::debug!(error = %e.message(), "cannot read the controllers"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.requested() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str, at: u64) -> Controller {
        Controller {
            id: id.into(),
            last_heartbeat_ms: at,
        }
    }

    #[test]
    fn a_dead_peer_owns_nothing_and_the_view_always_holds_this_controller() {
        let p = Peers::new("a".into(), Duration::from_secs(3));
        assert!(p.owns("anything"), "alone, it owns everything");
        let now = now_ms();
        // First sight counts from then, whatever the stamps say.
        p.set(vec![hb("b", now), hb("c", now - 60_000)], now);
        assert!(p.is_live("b") && p.is_live("c"));
        // Read 4 s apart: b's stamp grew, c's did not, so c is dead (TTL 3 s).
        let p = Peers::new("a".into(), Duration::from_secs(3));
        p.set(
            vec![hb("b", now - 4_000), hb("c", now - 60_000)],
            now - 4_000,
        );
        p.set(vec![hb("b", now), hb("c", now - 60_000)], now);
        assert!(p.is_live("a") && p.is_live("b") && !p.is_live("c"));
        let owners: std::collections::BTreeSet<String> =
            (0..50).map(|i| p.owner_of(&format!("c{i}"))).collect();
        assert_eq!(
            owners.into_iter().collect::<Vec<_>>(),
            ["a", "b"],
            "clusters spread over the live controllers only"
        );
    }

    #[test]
    fn a_peer_whose_clock_runs_a_minute_behind_is_live_while_it_beats() {
        let behind = 60_000;
        let now = now_ms();
        // b beats every second with a clock a minute behind, read every second.
        let beats = |p: &Peers, until: u64| {
            for s in (0..20).rev() {
                let at = until - s * 1000;
                p.set(vec![hb("b", at - behind)], at);
            }
        };
        let p = Peers::new("a".into(), Duration::from_secs(3));
        beats(&p, now);
        assert!(
            p.is_live("b"),
            "a beating controller is live whatever its clock"
        );
        // b stopped 4 s ago; a lower stamp since (a lagging replica's) is no beat.
        let p = Peers::new("a".into(), Duration::from_secs(3));
        beats(&p, now - 4_000);
        p.set(vec![hb("b", now - 10_000 - behind)], now);
        assert!(!p.is_live("b"), "silent for more than the TTL");
    }

    #[test]
    fn a_read_that_lacks_a_record_does_not_make_a_dead_peer_new_again() {
        let p = Peers::new("a".into(), Duration::from_secs(3));
        let now = now_ms();
        p.set(vec![hb("b", 1_000)], now - 4_000);
        // A replica still catching up lists no b; then b again, its stamp unchanged.
        p.set(vec![], now - 2_000);
        p.set(vec![hb("b", 1_000)], now);
        assert!(!p.is_live("b"), "silent since it was first seen, 4 s ago");
    }
}
