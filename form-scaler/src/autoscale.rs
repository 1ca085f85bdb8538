//! The control loop: every evaluation interval, for each cluster with a template and
//! no running operation, observe (CPU from the heartbeats in form-state, the request
//! rate from the balancer, each the mean of its metric window: `observe.rs`), decide,
//! and submit the scale-out or scale-in the decision asks for. Unfinished operations
//! found in form-state are adopted on each round too, so a restarted controller picks
//! up what its predecessor left.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use form_proto::rplb::v1 as rplb_pb;
use form_proto::types::v1 as types;
use form_runtime::shutdown::Shutdown;

use crate::controller::{LastDecision, Shared};
use crate::decide;
use crate::health_round as health;
use crate::observe::{Load, Round};
use crate::ops::plan::{self, Request};
use crate::ops::record::now_ms;

/// Clusters a round evaluates between two yields to the runtime.
const YIELD_EVERY: usize = 32;

/// A heartbeat older than this many intervals makes the CPU figure stale.
const STALE_HEARTBEATS: u64 = 5;

/// How long the evaluation rounds take (the last one, and how many ran), for
/// benchmarks and the `form_scaler_evaluation_round_seconds` histogram.
#[derive(Debug, Default)]
pub struct Rounds {
    count: std::sync::atomic::AtomicU64,
    last_us: std::sync::atomic::AtomicU64,
}

impl Rounds {
    fn ran(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        metrics::histogram!("form_scaler_evaluation_round_seconds").record(took.as_secs_f64());
        self.last_us.store(took.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Rounds run so far, and how long the last one took.
    pub fn last(&self) -> (u64, Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.count.load(Relaxed),
            Duration::from_micros(self.last_us.load(Relaxed)),
        )
    }
}

/// Loop settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time between two evaluations.
    pub interval: Duration,
    /// The vmm heartbeat interval (staleness of CPU figures).
    pub heartbeat: Duration,
    /// Whether decisions are acted on (false: only operations are resumed).
    pub act: bool,
    /// An instance unhealthy this long is replaced.
    pub replace_after: Duration,
    /// Span of the mean each decision takes of a metric.
    pub metric_window: Duration,
}

/// Runs until shutdown.
pub async fn run(shared: Arc<Shared>, settings: Settings, mut shutdown: Shutdown) {
    loop {
        if !shared.peers.ready() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                _ = shutdown.requested() => return,
            }
        }
        if let Err(e) = shared.resume().await {
            tracing::debug!(error = %e.message(), "cannot read operations to resume yet");
        }
        let started = std::time::Instant::now();
        if let Err(e) = round(&shared, &settings).await {
            tracing::debug!(error = %e.message(), "evaluation round failed");
        }
        shared.rounds.ran(started.elapsed());
        // After the adoption of unfinished operations and the round: a test waits on it.
        metrics::counter!("form_scaler_evaluation_rounds_total").increment(1);
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.requested() => return,
        }
    }
}

/// What the balancer says per `cluster/backend`.
#[derive(Debug, Default)]
struct Balancer {
    loads: HashMap<String, Load>,
    ejected: HashSet<String>,
    /// A balancer did not answer: `loads` stays empty this round.
    incomplete: bool,
}

async fn balancer(shared: &Shared) -> Balancer {
    let mut out = Balancer::default();
    // Each balancer serves a share of the clients: an instance's load is the sum, and
    // one balancer's ejection counts.
    for (_, rplb) in &shared.engine.platform.balancers {
        let mut rplb = rplb.clone();
        let Ok(s) = crate::platform::balancer_stats(&mut rplb, "").await else {
            // A balancer that does not answer would make every instance look less
            // busy than it is: no request rate this round (CPU still counts).
            out.loads.clear();
            out.incomplete = true;
            continue;
        };
        for r in s.routes {
            for b in r.backends {
                let key = format!("{}/{}", r.cluster_id, b.id);
                if b.state == rplb_pb::BackendState::Ejected as i32 {
                    out.ejected.insert(key.clone());
                }
                if out.incomplete {
                    continue;
                }
                out.loads
                    .entry(key)
                    .or_insert(Load {
                        requests_per_second: 0.0,
                    })
                    .requests_per_second += b.requests_per_second;
            }
        }
    }
    out
}

async fn round(shared: &Arc<Shared>, settings: &Settings) -> Result<(), tonic::Status> {
    let platform = &shared.engine.platform;
    let clusters = shared.clusters.list(&platform.state).await?;
    // Without the node records no member is judged this round: its node's state is
    // unknown, and a member never heard from would have its clock reset.
    let records = platform.fleet.records(&platform.state, false).await;
    if let Err(e) = &records {
        tracing::debug!(error = %e.message, "no health judgement this round");
    }
    let nodes = records.as_deref().ok().map(|r| health::nodes(r));
    let lb = balancer(shared).await;
    let now = now_ms();
    let stale_ms = settings.heartbeat.as_millis() as u64 * STALE_HEARTBEATS;
    {
        let alive: HashSet<&str> = clusters
            .values()
            .flat_map(|c| c.members.keys().map(String::as_str))
            .collect();
        lock(&shared.observer).retain(|id| alive.contains(id));
        lock(&shared.unheard).retain(|id, _| alive.contains(id.as_str()));
        shared.heard.retain(|id| alive.contains(id));
        // Every member's stamp is seen here, at every round, whoever owns its cluster
        // (the health judgement and the observations read what this saw): a
        // controller that takes a cluster over, or restarts, judges its members'
        // silence from then on; at first sight, from the intervals the judge before
        // recorded them silent (`crate::arrivals`).
        let heartbeat = settings.heartbeat.as_millis() as u64;
        let mut seen = shared.heard.lock();
        for c in clusters.values() {
            for (id, m) in &c.members {
                let silent = (u64::from(m.heartbeats_skipped) + 1).saturating_mul(heartbeat);
                seen.heard(id, m.last_heartbeat_ms, now, now.saturating_sub(silent));
            }
        }
        drop(seen);
        shared
            .engine
            .taking_standby
            .retain(|c| clusters.contains_key(c));
    }
    for (i, c) in clusters.values().enumerate() {
        // A round over a fleet's clusters takes milliseconds of CPU: it lets the
        // operations' steps (woken on this worker) run between clusters.
        if i % YIELD_EVERY == YIELD_EVERY - 1 {
            tokio::task::yield_now().await;
        }
        if c.template_instance_id.is_empty()
            || shared.running(&c.cluster_id).is_some()
            || !shared.peers.owns(&c.cluster_id)
        {
            continue;
        }
        shared.forget_if_recreated(c);
        if let Some(nodes) = &nodes
            && health::round(shared, c, nodes, &lb.ejected, now, settings).await
        {
            continue;
        }
        crate::standby::spawn_if_due(shared, c, now);
        if !settings.act {
            continue;
        }
        let policy = plan::policy_of(c);
        let obs = {
            let activated = lock(&shared.activated);
            let round = Round {
                loads: &lb.loads,
                activated: &activated,
                now_ms: now,
                stale_ms,
                window_ms: settings.metric_window.as_millis() as u64,
            };
            lock(&shared.observer).observe(c, &policy, round, &shared.heard.lock())
        };
        if obs.is_empty() {
            continue;
        }
        let keep_ms = u64::from(
            policy
                .scale_in_stabilization_seconds
                .max(policy.scale_out_stabilization_seconds),
        ) * 1000;
        if !shared
            .histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&c.cluster_id)
        {
            shared.seed_history(&c.cluster_id).await;
        }
        let d = {
            let mut h = shared
                .histories
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let h = h.entry(c.cluster_id.clone()).or_default();
            let d = decide::decide(&policy, &obs, h, now);
            h.record(now, d.raw, keep_ms);
            crate::series::cluster(c, &policy, &obs, &d, h, now);
            d
        };
        shared
            .decisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                c.cluster_id.clone(),
                LastDecision {
                    decision: d.clone(),
                    at_ms: now,
                },
            );
        if !d.changes() {
            continue;
        }
        let kind = if d.desired > d.current {
            types::OperationKind::ScaleOut
        } else {
            types::OperationKind::ScaleIn
        };
        let req = Request {
            kind: kind as i32,
            target_count: d.desired,
            drain_connections: true,
            reason: d.reason.clone(),
            ..Default::default()
        };
        match shared.submit(&c.cluster_id, req, false).await {
            Ok(op) => {
                tracing::info!(cluster = %c.cluster_id, operation = %op.operation_id, desired = d.desired, current = d.current, reason = %d.reason, "scaling")
            }
            Err(e) => {
                tracing::warn!(cluster = %c.cluster_id, error = %e.message(), "decision not carried out")
            }
        }
    }
    Ok(())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
