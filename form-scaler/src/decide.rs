//! The scaling decision: a pure function of the policy, what was observed, the history
//! of recommendations and actions, and the time (injected, milliseconds).
//!
//! 1. Capacity is every instance that is ready or warming up. Warming instances count as
//!    capacity but are left out of the metrics.
//! 2. Per signal (CPU; requests per second when the policy sets
//!    `target_requests_per_instance`), the ratio is
//!    the mean observed value over the target, across ready instances with a fresh value.
//!    - Within the tolerance band: hold.
//!    - Above it: `ceil(sum / target)` instances. Instances without a value count as idle
//!      here, so a scale-out is never inflated.
//!    - Below it, with every ready instance measured: `ceil(sum / target)`.
//!    - Below it, with a value missing: hold. Missing or stale metrics never cause a
//!      scale-in.
//! 3. Signals combine: any signal can scale out (the highest wins); scale-in needs every
//!    signal to agree (the highest of their recommendations wins).
//! 4. Stabilization: scale-out takes the lowest recommendation of its window, scale-in the
//!    highest of its own (both windows include this one).
//! 5. Cooldowns, one per direction. Scale-out waits `scale_out_cooldown` after the last
//!    new capacity became ready. Scale-in waits `scale_in_cooldown` after the last
//!    scaling action.
//! 6. Clamp to `[min, max]`. Correcting a count outside the bounds ignores cooldowns.

use form_proto::types::v1::ScalingPolicy;

use crate::policy;

/// One instance as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Instance id.
    pub instance_id: String,
    /// Ready (serving) rather than warming up.
    pub ready: bool,
    /// CPU utilisation in [0, 1], if fresh.
    pub cpu: Option<f64>,
    /// Requests per second, if fresh (from the balancer).
    pub requests_per_second: Option<f64>,
}

/// What happened before, as `decide` needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Earlier raw recommendations, `(at_ms, desired)`, oldest first.
    pub recommendations: Vec<(u64, u32)>,
    /// When the last new capacity became ready.
    pub last_capacity_ready_ms: Option<u64>,
    /// When the last scaling action ended.
    pub last_action_ms: Option<u64>,
}

impl History {
    /// Records a raw recommendation and forgets what no window can still need.
    pub fn record(&mut self, at_ms: u64, desired: u32, keep_ms: u64) {
        self.recommendations.push((at_ms, desired));
        let from = at_ms.saturating_sub(keep_ms);
        self.recommendations.retain(|(t, _)| *t >= from);
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Instances wanted.
    pub desired: u32,
    /// Instances counted now (ready and warming).
    pub current: u32,
    /// The recommendation before stabilization, cooldowns and bounds (kept in history).
    pub raw: u32,
    /// Why, for people.
    pub reason: String,
    /// Why, for machines (the `form_scaler_decision` gauge).
    pub why: Why,
}

/// The kind of a decision, as a stable number for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Within the band, or every signal holds.
    Hold = 0,
    /// A signal asks for more instances and nothing holds it back.
    ScaleOut = 1,
    /// Every signal asks for fewer instances and nothing holds it back.
    ScaleIn = 2,
    /// A change is wanted, but a cooldown holds it.
    Cooldown = 3,
    /// A change is wanted, but the stabilization window holds it.
    Stabilizing = 4,
    /// Fewer instances than the policy's minimum.
    BelowMin = 5,
    /// More instances than the policy's maximum.
    AboveMax = 6,
}

impl Decision {
    /// Whether it asks for a change.
    pub fn changes(&self) -> bool {
        self.desired != self.current
    }
}

enum Signal {
    Hold(String),
    Missing(String),
    Want(u32, String),
}

fn signal(name: &str, target: f64, values: &[Option<f64>], current: u32, tolerance: f64) -> Signal {
    let measured: Vec<f64> = values.iter().flatten().copied().collect();
    let missing = values.len() - measured.len();
    if measured.is_empty() {
        return Signal::Missing(format!("{name}: no fresh value"));
    }
    let sum: f64 = measured.iter().sum();
    let ratio = sum / (target * measured.len() as f64);
    let mean = sum / measured.len() as f64;
    if (1.0 - ratio).abs() <= tolerance {
        return Signal::Hold(format!(
            "{name} {mean:.2} within {:.0}% of target {target}",
            tolerance * 100.0
        ));
    }
    let want = ((sum / target) - 1e-9).ceil().max(1.0) as u32;
    if ratio > 1.0 {
        if want <= current {
            return Signal::Hold(format!(
                "{name} {mean:.2} above target {target}, but {current} instances cover it"
            ));
        }
        return Signal::Want(
            want,
            format!("{name} {mean:.2} over target {target}: {want} instances"),
        );
    }
    if missing > 0 {
        return Signal::Missing(format!(
            "{name}: {missing} ready instances without a fresh value; no scale-in"
        ));
    }
    Signal::Want(
        want.min(current),
        format!("{name} {mean:.2} under target {target}: {want} instances"),
    )
}

/// Decides how many instances `policy` wants at `now_ms`.
pub fn decide(
    policy: &ScalingPolicy,
    observations: &[Observation],
    history: &History,
    now_ms: u64,
) -> Decision {
    let current = observations.len() as u32;
    let (min, max) = (
        policy.min_instances,
        policy.max_instances.max(policy.min_instances),
    );
    let done = |desired: u32, raw: u32, reason: String, why: Why| Decision {
        desired,
        current,
        raw,
        reason,
        why,
    };
    if current < min {
        return done(
            min,
            min,
            format!("{current} instances, below the minimum {min}"),
            Why::BelowMin,
        );
    }
    if current > max {
        return done(
            max,
            max,
            format!("{current} instances, above the maximum {max}"),
            Why::AboveMax,
        );
    }
    let ready: Vec<&Observation> = observations.iter().filter(|o| o.ready).collect();
    let tolerance = policy::tolerance(policy);
    let mut signals = vec![signal(
        "cpu",
        policy.target_cpu_utilization,
        &ready.iter().map(|o| o.cpu).collect::<Vec<_>>(),
        current,
        tolerance,
    )];
    if let Some(t) = policy.target_requests_per_instance {
        signals.push(signal(
            "requests/s",
            t,
            &ready
                .iter()
                .map(|o| o.requests_per_second)
                .collect::<Vec<_>>(),
            current,
            tolerance,
        ));
    }
    // Any signal scales out; scale-in needs every signal to ask for it.
    let up = signals
        .iter()
        .filter_map(|s| match s {
            Signal::Want(n, r) if *n > current => Some((*n, r.clone())),
            _ => None,
        })
        .max_by_key(|(n, _)| *n);
    let all_down = signals
        .iter()
        .all(|s| matches!(s, Signal::Want(n, _) if *n < current));
    let (raw, why) = if let Some((n, r)) = up {
        (n, r)
    } else if all_down {
        let n = signals
            .iter()
            .filter_map(|s| match s {
                Signal::Want(n, _) => Some(*n),
                _ => None,
            })
            .max()
            .unwrap_or(current);
        let reasons: Vec<String> = signals
            .iter()
            .filter_map(|s| match s {
                Signal::Want(_, r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        (n, reasons.join("; "))
    } else {
        let reasons: Vec<String> = signals
            .iter()
            .map(|s| match s {
                Signal::Hold(r) | Signal::Missing(r) | Signal::Want(_, r) => r.clone(),
            })
            .collect();
        (current, reasons.join("; "))
    };
    let raw = raw.clamp(min, max);
    if raw == current {
        return done(current, raw, format!("hold: {why}"), Why::Hold);
    }
    let window = |secs: u32| {
        let from = now_ms.saturating_sub(u64::from(secs) * 1000);
        history
            .recommendations
            .iter()
            .filter(move |(t, _)| *t >= from && *t <= now_ms)
            .map(|(_, n)| *n)
            .chain(std::iter::once(raw))
    };
    if raw > current {
        let stable = window(policy.scale_out_stabilization_seconds)
            .min()
            .unwrap_or(raw);
        if stable <= current {
            return done(
                current,
                raw,
                format!(
                    "hold: {why}, but the scale-out window ({} s) saw {stable}",
                    policy.scale_out_stabilization_seconds
                ),
                Why::Stabilizing,
            );
        }
        let cooldown = u64::from(policy.scale_out_cooldown_seconds) * 1000;
        if let Some(t) = history
            .last_capacity_ready_ms
            .filter(|t| now_ms < t + cooldown)
        {
            return done(
                current,
                raw,
                format!(
                    "hold: {why}, but scale-out cools down for {} s more",
                    (t + cooldown - now_ms).div_ceil(1000)
                ),
                Why::Cooldown,
            );
        }
        return done(
            stable,
            raw,
            format!("scale out {current} -> {stable}: {why}"),
            Why::ScaleOut,
        );
    }
    let stable = window(policy.scale_in_stabilization_seconds)
        .max()
        .unwrap_or(raw);
    if stable >= current {
        return done(
            current,
            raw,
            format!(
                "hold: {why}, but the scale-in window ({} s) saw {stable}",
                policy.scale_in_stabilization_seconds
            ),
            Why::Stabilizing,
        );
    }
    let cooldown = u64::from(policy.scale_in_cooldown_seconds) * 1000;
    if let Some(t) = history.last_action_ms.filter(|t| now_ms < t + cooldown) {
        return done(
            current,
            raw,
            format!(
                "hold: {why}, but scale-in cools down for {} s more",
                (t + cooldown - now_ms).div_ceil(1000)
            ),
            Why::Cooldown,
        );
    }
    done(
        stable,
        raw,
        format!("scale in {current} -> {stable}: {why}"),
        Why::ScaleIn,
    )
}
