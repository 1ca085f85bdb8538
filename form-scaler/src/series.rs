//! The controller's Prometheus series per cluster, written at each evaluation round
//! (docs/scaler.md, "Metrics"):
//!
//! | series | labels | what |
//! |---|---|---|
//! | `form_scaler_instances` | cluster | instances counted (ready and warming) |
//! | `form_scaler_ready_instances` | cluster | instances whose metrics count |
//! | `form_scaler_desired_instances` | cluster | what the last decision wants |
//! | `form_scaler_decision` | cluster | the last decision's kind, `decide::Why` as a number |
//! | `form_scaler_cooldown_remaining_seconds` | cluster, direction | seconds until a scale in that direction may start |
//! | `form_scaler_members` | cluster, health | members by health (healthy, degraded, unhealthy) |
//!
//! and, when an operation ends, `form_scaler_operation_duration_seconds` (histogram;
//! kind, outcome) beside `form_scaler_operations_total`.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;

use crate::decide::{Decision, History, Observation};

/// Writes the series of cluster `c` after a decision.
pub fn cluster(
    c: &state_pb::Cluster,
    policy: &types::ScalingPolicy,
    obs: &[Observation],
    d: &Decision,
    h: &History,
    now_ms: u64,
) {
    let id = c.cluster_id.clone();
    metrics::gauge!("form_scaler_instances", "cluster" => id.clone()).set(f64::from(d.current));
    metrics::gauge!("form_scaler_ready_instances", "cluster" => id.clone())
        .set(obs.iter().filter(|o| o.ready).count() as f64);
    metrics::gauge!("form_scaler_desired_instances", "cluster" => id.clone())
        .set(f64::from(d.desired));
    metrics::gauge!("form_scaler_decision", "cluster" => id.clone()).set(d.why as u8 as f64);
    let left = |since: Option<u64>, secs: u32| {
        since.map_or(0.0, |t| {
            (t + u64::from(secs) * 1000).saturating_sub(now_ms) as f64 / 1000.0
        })
    };
    metrics::gauge!("form_scaler_cooldown_remaining_seconds", "cluster" => id.clone(), "direction" => "out")
        .set(left(h.last_capacity_ready_ms, policy.scale_out_cooldown_seconds));
    metrics::gauge!("form_scaler_cooldown_remaining_seconds", "cluster" => id.clone(), "direction" => "in")
        .set(left(h.last_action_ms, policy.scale_in_cooldown_seconds));
    for health in ["healthy", "degraded", "unhealthy"] {
        let n = c
            .members
            .values()
            .filter(|m| form_proto::member_health(m).0 == health)
            .count();
        metrics::gauge!("form_scaler_members", "cluster" => id.clone(), "health" => health)
            .set(n as f64);
    }
}

/// Records how long an operation that ended took.
pub fn operation_ended(op: &types::Operation, outcome: &'static str) {
    let secs = op.completed_at_ms.saturating_sub(op.created_at_ms) as f64 / 1000.0;
    metrics::histogram!(
        "form_scaler_operation_duration_seconds",
        "kind" => crate::ops::kind_name(op.kind),
        "outcome" => outcome
    )
    .record(secs);
}
