//! The other controllers, as form-state knows them: this controller sends its
//! heartbeat every interval and reads everyone's back; a controller whose heartbeat is
//! older than the TTL is dead. [`Peers::owner_of`] is the rendezvous owner of a cluster
//! among the live ones (this controller always counts itself live). Clocks of the
//! controllers are compared, so they should agree to well within the TTL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_runtime::shutdown::Shutdown;

use crate::ops::record::now_ms;
use crate::ownership::{self, Controller};

/// This controller's view of the others.
#[derive(Debug)]
pub struct Peers {
    me: String,
    ttl_ms: u64,
    view: Mutex<Vec<Controller>>,
    ready: AtomicBool,
}

impl Peers {
    /// The view of controller `me`, with heartbeats older than `ttl` counting as dead.
    pub fn new(me: String, ttl: Duration) -> Self {
        Self {
            me,
            ttl_ms: ttl.as_millis() as u64,
            view: Mutex::default(),
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

    fn set(&self, controllers: Vec<Controller>) {
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

    #[test]
    fn a_dead_peer_owns_nothing_and_the_view_always_holds_this_controller() {
        let p = Peers::new("a".into(), Duration::from_secs(3));
        assert!(p.owns("anything"), "alone, it owns everything");
        p.set(vec![
            Controller {
                id: "b".into(),
                last_heartbeat_ms: now_ms(),
            },
            Controller {
                id: "c".into(),
                last_heartbeat_ms: now_ms() - 60_000,
            },
        ]);
        assert!(p.is_live("a") && p.is_live("b") && !p.is_live("c"));
        let owners: std::collections::BTreeSet<String> =
            (0..50).map(|i| p.owner_of(&format!("c{i}"))).collect();
        assert_eq!(
            owners.into_iter().collect::<Vec<_>>(),
            ["a", "b"],
            "clusters spread over the live controllers only"
        );
    }
}
