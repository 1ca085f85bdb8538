//! Checks of request fields, each failing with a message that names the field, the
//! value and what is accepted.

use form_proto::types::v1 as pb;

use crate::error::StateError;

/// Largest encoded value of one field (workload, policy, ...), in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Most instances a policy may allow.
pub const MAX_INSTANCES_CAP: u32 = 1000;

/// An id (see `form_runtime::ids`).
pub fn id(field: &str, value: &str) -> Result<(), StateError> {
    form_runtime::ids::check(value).map_err(|m| StateError::invalid(field, m))
}

/// A host name for the balancer: labels of `[a-z0-9-]` separated by dots.
pub fn domain(value: &str) -> Result<(), StateError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(StateError::invalid(
            "domain",
            format!(
                "'{value}' is not a host name; expected lowercase labels of a-z 0-9 - separated by dots, e.g. web.fog"
            ),
        ))
    }
}

/// Members' addresses: each an instance's `IP:PORT` that may receive traffic (never
/// link-local, where cloud metadata answers, nor an address of no host).
pub fn instance_addresses(field: &str, list: &[String]) -> Result<(), StateError> {
    for a in list {
        form_runtime::addr::check_instance_address(a).map_err(|e| StateError::invalid(field, e))?;
    }
    Ok(())
}

/// An encoded value within [`MAX_VALUE_BYTES`].
pub fn size(field: &str, bytes: &[u8]) -> Result<(), StateError> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(StateError::invalid(
            field,
            format!(
                "is {} bytes encoded; at most {MAX_VALUE_BYTES} accepted",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// A scaling policy: `1 <= min <= max <= 1000`, target in (0, 1], tolerance in [0, 1).
pub fn policy(p: &pb::ScalingPolicy) -> Result<(), StateError> {
    let f = |name: &str| format!("scaling_policy.{name}");
    if p.min_instances < 1 {
        return Err(StateError::invalid(
            f("min_instances"),
            "is 0; at least 1 accepted",
        ));
    }
    if p.max_instances < p.min_instances {
        return Err(StateError::invalid(
            f("max_instances"),
            format!(
                "is {} but min_instances is {}; max must be >= min",
                p.max_instances, p.min_instances
            ),
        ));
    }
    if p.max_instances > MAX_INSTANCES_CAP {
        return Err(StateError::invalid(
            f("max_instances"),
            format!(
                "is {}; at most {MAX_INSTANCES_CAP} accepted",
                p.max_instances
            ),
        ));
    }
    let t = p.target_cpu_utilization;
    if !(t > 0.0 && t <= 1.0) {
        return Err(StateError::invalid(
            f("target_cpu_utilization"),
            format!("is {t}; expected a fraction in (0, 1], e.g. 0.6"),
        ));
    }
    if !(0.0..1.0).contains(&p.tolerance) {
        return Err(StateError::invalid(
            f("tolerance"),
            format!(
                "is {}; expected a fraction in [0, 1), e.g. 0.1",
                p.tolerance
            ),
        ));
    }
    if let Some(r) = p.target_requests_per_instance
        && !(r > 0.0 && r.is_finite())
    {
        return Err(StateError::invalid(
            f("target_requests_per_instance"),
            format!("is {r}; expected a positive number"),
        ));
    }
    let sb = p.standby_snapshot_seconds;
    if sb != 0 && !(MIN_STANDBY_SECONDS..=MAX_STANDBY_SECONDS).contains(&sb) {
        return Err(StateError::invalid(
            f("standby_snapshot_seconds"),
            format!(
                "is {sb}; expected 0 (no standby snapshot) or {MIN_STANDBY_SECONDS}-{MAX_STANDBY_SECONDS}"
            ),
        ));
    }
    Ok(())
}

/// Most labels a node (or a selector) may carry, and their longest key and value.
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 256;

/// Node labels (`field` names them in errors): at most 32, keys of 1-63 bytes, values
/// of at most 256.
pub fn labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), StateError> {
    if labels.len() > MAX_LABELS {
        return Err(StateError::invalid(
            field,
            format!("has {} labels; at most {MAX_LABELS} accepted", labels.len()),
        ));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE {
            return Err(StateError::invalid(
                field,
                format!(
                    "'{k}={v}': expected a key of 1 to {MAX_LABEL_KEY} bytes and a value of at most {MAX_LABEL_VALUE}"
                ),
            ));
        }
    }
    Ok(())
}

/// Shortest and longest standby snapshot interval accepted, seconds.
pub const MIN_STANDBY_SECONDS: u32 = 10;
/// See [`MIN_STANDBY_SECONDS`].
pub const MAX_STANDBY_SECONDS: u32 = 86_400;

/// A standby snapshot record: empty (cleared), or an id with a source and a node.
pub fn standby(s: &form_proto::state::v1::StandbySnapshot) -> Result<(), StateError> {
    if s.snapshot_id.is_empty() {
        return Ok(());
    }
    id("standby.snapshot_id", &s.snapshot_id)?;
    id("standby.source_instance_id", &s.source_instance_id)?;
    if s.node_ids.is_empty() {
        return Err(StateError::invalid(
            "standby.node_ids",
            "is empty; expected the nodes that hold the snapshot",
        ));
    }
    for n in &s.node_ids {
        id("standby.node_ids", n)?;
    }
    Ok(())
}

/// Longest drain grace period accepted, seconds.
pub const MAX_DRAIN_GRACE_SECONDS: u32 = 3600;

/// Checks drain settings.
pub fn drain(d: &pb::DrainSettings) -> Result<(), StateError> {
    if d.grace_period_seconds > MAX_DRAIN_GRACE_SECONDS {
        return Err(StateError::invalid(
            "drain.grace_period_seconds",
            format!(
                "is {}; expected 0 (30) to {MAX_DRAIN_GRACE_SECONDS}",
                d.grace_period_seconds
            ),
        ));
    }
    Ok(())
}

/// A state sync setting: a continuous interval of 50 ms to 10 min and batches of
/// 4 KiB to 4 MiB (0 picks the default of each), at most 16 priority prefixes of 1 to
/// 256 bytes without ','.
pub fn state_sync(s: &pb::StateSync) -> Result<(), StateError> {
    let Some(pb::state_sync::Mode::Continuous(c)) = &s.mode else {
        return Ok(());
    };
    let f = |name: &str| format!("state_sync.continuous.{name}");
    if c.interval_ms != 0 && !(50..=600_000).contains(&c.interval_ms) {
        return Err(StateError::invalid(
            f("interval_ms"),
            format!(
                "is {}; expected 50 to 600000 (or 0 for 1000)",
                c.interval_ms
            ),
        ));
    }
    if c.batch_bytes != 0 && !(4096..=4_194_304).contains(&c.batch_bytes) {
        return Err(StateError::invalid(
            f("batch_bytes"),
            format!(
                "is {}; expected 4096 to 4194304 (or 0 for 1048576)",
                c.batch_bytes
            ),
        ));
    }
    if c.priority_prefixes.len() > 16
        || c.priority_prefixes
            .iter()
            .any(|p| p.is_empty() || p.len() > 256 || p.contains(','))
    {
        return Err(StateError::invalid(
            f("priority_prefixes"),
            "expected at most 16 prefixes of 1 to 256 bytes without ','",
        ));
    }
    Ok(())
}

/// Resources: at least one vCPU and 16 MiB when set.
pub fn resources(field: &str, r: &pb::Resources) -> Result<(), StateError> {
    if r.vcpus == 0 || r.vcpus > 256 {
        return Err(StateError::invalid(
            format!("{field}.vcpus"),
            format!("is {}; expected 1-256", r.vcpus),
        ));
    }
    if r.memory_mib < 16 || r.memory_mib > 4 * 1024 * 1024 {
        return Err(StateError::invalid(
            format!("{field}.memory_mib"),
            format!("is {}; expected 16-4194304", r.memory_mib),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_sync_settings_name_what_is_out_of_range() {
        let continuous = |interval_ms, batch_bytes, prefixes: &[&str]| pb::StateSync {
            mode: Some(pb::state_sync::Mode::Continuous(pb::StateSyncContinuous {
                interval_ms,
                batch_bytes,
                priority_prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            })),
            refuse_unsynced_scale_in: false,
        };
        assert!(state_sync(&pb::StateSync::default()).is_ok());
        assert!(state_sync(&continuous(0, 0, &[])).is_ok());
        assert!(state_sync(&continuous(50, 4096, &[])).is_ok());
        assert!(state_sync(&continuous(0, 0, &["cart/"])).is_ok());
        for (bad, says) in [
            (continuous(49, 0, &[]), "interval_ms"),
            (continuous(0, 4095, &[]), "batch_bytes"),
            (continuous(0, 0, &[""]), "priority_prefixes"),
            (continuous(0, 0, &["a,b"]), "priority_prefixes"),
        ] {
            let e = state_sync(&bad).expect_err(says).to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_standby_interval_is_0_or_10_to_86400_seconds() {
        let p = |standby_snapshot_seconds| pb::ScalingPolicy {
            standby_snapshot_seconds,
            ..form_proto::default_scaling_policy()
        };
        for ok in [0, 10, 86_400] {
            assert!(policy(&p(ok)).is_ok(), "{ok}");
        }
        for bad in [1, 9, 86_401] {
            let e = policy(&p(bad)).expect_err("out of range").to_string();
            assert!(
                e.contains("scaling_policy.standby_snapshot_seconds") && e.contains("10-86400"),
                "{e}"
            );
        }
    }

    #[test]
    fn ids_name_the_field_and_the_rule() {
        assert!(id("cluster_id", "web-1.a_b").is_ok());
        let e = id("cluster_id", "").expect_err("empty").to_string();
        assert!(e.contains("cluster_id") && e.contains("empty"), "{e}");
        let e = id("instance_id", "a/b").expect_err("slash").to_string();
        assert!(e.contains("instance_id") && e.contains("'/'"), "{e}");
        let e = id("cluster_id", &"x".repeat(200))
            .expect_err("long")
            .to_string();
        assert!(e.contains("200 bytes") && e.contains("128"), "{e}");
    }

    #[test]
    fn policies_are_checked_field_by_field() {
        let good = pb::ScalingPolicy {
            min_instances: 1,
            max_instances: 5,
            target_cpu_utilization: 0.6,
            tolerance: 0.1,
            ..Default::default()
        };
        assert!(policy(&good).is_ok());
        let e = policy(&pb::ScalingPolicy {
            max_instances: 0,
            ..good
        })
        .expect_err("max<min");
        assert!(
            e.to_string().contains("scaling_policy.max_instances"),
            "{e}"
        );
        let e = policy(&pb::ScalingPolicy {
            target_cpu_utilization: 1.5,
            ..good
        })
        .expect_err("target");
        assert!(
            e.to_string().contains("target_cpu_utilization") && e.to_string().contains("(0, 1]"),
            "{e}"
        );
        let e = policy(&pb::ScalingPolicy {
            max_instances: 5000,
            ..good
        })
        .expect_err("cap");
        assert!(e.to_string().contains("1000"), "{e}");
        assert!(domain("web.fog").is_ok());
        assert!(domain("Web..fog").is_err());
    }
}
