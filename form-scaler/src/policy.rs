//! Scaling policies: validation (every refusal names the field, the value and what is
//! accepted) and the effective values of optional fields.

use form_proto::types::v1::ScalingPolicy;

/// Longest accepted cooldown or window: a day.
pub const MAX_WINDOW_SECONDS: u32 = 86_400;
/// Longest accepted warm-up: an hour.
pub const MAX_WARMUP_SECONDS: u32 = 3_600;
/// Tolerance used when a policy leaves it at 0 (Kubernetes' HPA uses the same).
pub const DEFAULT_TOLERANCE: f64 = 0.1;

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The field, as the contract names it.
    pub field: &'static str,
    /// What is wrong and what is accepted.
    pub message: String,
}

fn err(field: &'static str, message: String) -> PolicyError {
    PolicyError { field, message }
}

/// Checks `p`; `cap` is the largest `max_instances` this controller accepts.
pub fn validate(p: &ScalingPolicy, cap: u32) -> Result<(), PolicyError> {
    if p.min_instances < 1 {
        return Err(err(
            "min_instances",
            format!("{} is too small; expected at least 1", p.min_instances),
        ));
    }
    if p.max_instances < p.min_instances {
        return Err(err(
            "max_instances",
            format!(
                "{} is below min_instances {}; expected max_instances >= min_instances",
                p.max_instances, p.min_instances
            ),
        ));
    }
    if p.max_instances > cap {
        return Err(err(
            "max_instances",
            format!(
                "{} is above this controller's cap of {cap}",
                p.max_instances
            ),
        ));
    }
    let t = p.target_cpu_utilization;
    if !(t > 0.0 && t <= 1.0) {
        return Err(err(
            "target_cpu_utilization",
            format!("{t} is outside (0, 1]; e.g. 0.6 for 60%"),
        ));
    }
    if let Some(r) = p.target_requests_per_instance
        && !(r > 0.0 && r.is_finite())
    {
        return Err(err(
            "target_requests_per_instance",
            format!("{r} must be a positive number of in-flight requests"),
        ));
    }
    if !(0.0..1.0).contains(&p.tolerance) {
        return Err(err(
            "tolerance",
            format!(
                "{} is outside [0, 1); 0 means the default {DEFAULT_TOLERANCE}",
                p.tolerance
            ),
        ));
    }
    for (field, v) in [
        ("scale_out_cooldown_seconds", p.scale_out_cooldown_seconds),
        ("scale_in_cooldown_seconds", p.scale_in_cooldown_seconds),
        (
            "scale_out_stabilization_seconds",
            p.scale_out_stabilization_seconds,
        ),
        (
            "scale_in_stabilization_seconds",
            p.scale_in_stabilization_seconds,
        ),
    ] {
        if v > MAX_WINDOW_SECONDS {
            return Err(err(
                field,
                format!("{v} is too long; expected 0 to {MAX_WINDOW_SECONDS} seconds"),
            ));
        }
    }
    if p.warmup_seconds > MAX_WARMUP_SECONDS {
        return Err(err(
            "warmup_seconds",
            format!(
                "{} is too long; expected 0 to {MAX_WARMUP_SECONDS} seconds",
                p.warmup_seconds
            ),
        ));
    }
    let sb = p.standby_snapshot_seconds;
    if sb != 0 && !(10..=86_400).contains(&sb) {
        return Err(err(
            "standby_snapshot_seconds",
            format!("{sb} is out of range; expected 0 (no standby snapshot) or 10-86400"),
        ));
    }
    Ok(())
}

/// The tolerance in force.
pub fn tolerance(p: &ScalingPolicy) -> f64 {
    if p.tolerance == 0.0 {
        DEFAULT_TOLERANCE
    } else {
        p.tolerance
    }
}

/// A policy for clusters that never set one: 1 to 10 instances at 60% CPU, HPA's
/// windows (scale-in looks back 300 s), 60 s cooldowns, 30 s warm-up.
pub fn default_policy() -> ScalingPolicy {
    form_proto::default_scaling_policy()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_policies_are_refused_naming_the_field() {
        let ok = default_policy();
        assert_eq!(validate(&ok, 100), Ok(()));
        let cases: Vec<(ScalingPolicy, &str, &str)> = vec![
            (
                ScalingPolicy {
                    min_instances: 0,
                    ..ok
                },
                "min_instances",
                "at least 1",
            ),
            (
                ScalingPolicy {
                    min_instances: 5,
                    max_instances: 3,
                    ..ok
                },
                "max_instances",
                "below min_instances 5",
            ),
            (
                ScalingPolicy {
                    max_instances: 101,
                    ..ok
                },
                "max_instances",
                "cap of 100",
            ),
            (
                ScalingPolicy {
                    target_cpu_utilization: 0.0,
                    ..ok
                },
                "target_cpu_utilization",
                "(0, 1]",
            ),
            (
                ScalingPolicy {
                    target_cpu_utilization: 1.5,
                    ..ok
                },
                "target_cpu_utilization",
                "1.5",
            ),
            (
                ScalingPolicy {
                    target_cpu_utilization: f64::NAN,
                    ..ok
                },
                "target_cpu_utilization",
                "(0, 1]",
            ),
            (
                ScalingPolicy {
                    target_requests_per_instance: Some(-1.0),
                    ..ok
                },
                "target_requests_per_instance",
                "positive",
            ),
            (
                ScalingPolicy {
                    tolerance: 1.0,
                    ..ok
                },
                "tolerance",
                "[0, 1)",
            ),
            (
                ScalingPolicy {
                    scale_in_stabilization_seconds: 100_000,
                    ..ok
                },
                "scale_in_stabilization_seconds",
                "86400",
            ),
            (
                ScalingPolicy {
                    warmup_seconds: 4000,
                    ..ok
                },
                "warmup_seconds",
                "3600",
            ),
        ];
        for (p, field, text) in cases {
            let e = validate(&p, 100).expect_err(field);
            assert_eq!(e.field, field);
            assert!(e.to_string().contains(text), "{e}");
        }
    }
}
