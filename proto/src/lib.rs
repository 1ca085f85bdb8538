//! The gRPC contracts of every service, generated at build time from the `.proto`
//! files under `proto/` (with protox, so no `protoc` is needed).
//!
//! Prost types stay at the edges: each service converts them into its own domain
//! types with `From`/`TryFrom`.

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]

/// Encoded `FileDescriptorSet` of every contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/form_descriptor.bin"));

/// `form.types.v1`: domain types shared by several services.
pub mod types {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("form.types.v1");
    }
}

/// `form.state.v1`: the replicated state store and its gossip.
pub mod state {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("form.state.v1");
    }
}

/// `form.rplb.v1`: control of the load balancer.
pub mod rplb {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("form.rplb.v1");
    }
}

/// `form.vmm.v1`: instance lifecycle on one node.
pub mod vmm {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("form.vmm.v1");
    }
}

/// `form.scaler.v1`: the scaling controller.
pub mod scaler {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("form.scaler.v1");
    }
}

/// The API name of an operation kind (`scale_out`, `scale_in`, `replace_instance`,
/// `resize`, or `unspecified`), as logs, metrics and the REST API spell it.
pub fn operation_kind_name(kind: i32) -> &'static str {
    use types::v1::OperationKind as K;
    match K::try_from(kind) {
        Ok(K::ScaleOut) => "scale_out",
        Ok(K::ScaleIn) => "scale_in",
        Ok(K::ReplaceInstance) => "replace_instance",
        Ok(K::Resize) => "resize",
        Ok(K::CreateCluster) => "create_cluster",
        Ok(K::DeleteCluster) => "delete_cluster",
        _ => "unspecified",
    }
}

/// Whether an operation has reached a terminal state (completed, failed, rolled back).
pub fn operation_is_terminal(op: &types::v1::Operation) -> bool {
    op.status.as_ref().is_some_and(status_is_terminal)
}

/// Whether an operation status is an end (completed, failed or rolled back).
pub fn status_is_terminal(s: &types::v1::OperationStatus) -> bool {
    use types::v1::operation_status::State as S;
    matches!(
        s.state.as_ref(),
        Some(S::Completed(_) | S::Failed(_) | S::RolledBack(_))
    )
}

/// The policy of a cluster that never set one, and the values a partial policy's
/// missing fields take: 1 to 10 instances at 60% CPU, HPA's windows (scale-in looks
/// back 300 s, tolerance 0.1), 60 s cooldowns, 30 s warm-up, no standby snapshot.
pub fn default_scaling_policy() -> types::v1::ScalingPolicy {
    types::v1::ScalingPolicy {
        min_instances: 1,
        max_instances: 10,
        target_cpu_utilization: 0.6,
        scale_out_cooldown_seconds: 60,
        scale_in_cooldown_seconds: 60,
        target_requests_per_instance: None,
        tolerance: 0.1,
        scale_out_stabilization_seconds: 0,
        scale_in_stabilization_seconds: 300,
        warmup_seconds: 30,
        standby_snapshot_seconds: 0,
    }
}

/// The drain of a cluster whose settings are unset: the balancer's default drain (30 s,
/// sessions move once nothing is in flight, clients asked to reconnect).
pub fn default_drain_settings() -> types::v1::DrainSettings {
    types::v1::DrainSettings {
        grace_period_seconds: 30,
        wait_for_connections: true,
        notify_clients: true,
    }
}

/// The grace period of drain settings, seconds: 0 means 30 (the balancer's default).
pub fn drain_grace_seconds(d: &types::v1::DrainSettings) -> u32 {
    if d.grace_period_seconds == 0 {
        30
    } else {
        d.grace_period_seconds
    }
}

/// Longest cookie affinity TTL accepted: a year.
pub const MAX_COOKIE_TTL: u64 = 365 * 24 * 3600;

/// Whether `name` is an HTTP token (RFC 9110): a header or cookie name.
pub fn is_http_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks an affinity as the balancer applies it; the error names the field and what
/// is accepted. Every writer of a cluster checks it, so the balancer never has to drop
/// an affinity it cannot apply.
pub fn check_affinity(a: &types::v1::AffinityMethod) -> Result<(), String> {
    use types::v1::affinity_method::Method;
    match &a.method {
        None | Some(Method::None(_)) | Some(Method::ClientIp(_)) => Ok(()),
        Some(Method::Cookie(c)) if !is_http_token(&c.name) => Err(format!(
            "affinity.cookie.name '{}': expected a cookie name of letters, digits and !#$%&'*+-.^_`|~",
            c.name
        )),
        Some(Method::Cookie(c)) if c.ttl_seconds == 0 || c.ttl_seconds > MAX_COOKIE_TTL => {
            Err(format!(
                "affinity.cookie.ttl_seconds {}: expected 1 to {MAX_COOKIE_TTL}",
                c.ttl_seconds
            ))
        }
        Some(Method::Cookie(_)) => Ok(()),
        Some(Method::ConsistentHashing(h)) => {
            let p = h.parameter.trim();
            if is_http_token(p.strip_prefix("query:").unwrap_or(p)) {
                Ok(())
            } else {
                Err(format!(
                    "affinity.consistent_hashing.parameter '{}': expected a header name or query:NAME",
                    h.parameter
                ))
            }
        }
    }
}

/// A member's health as people read it, `healthy`, `degraded` or `unhealthy`, with the
/// reason: the last recorded health event, or `stopped` for a stopped member.
pub fn member_health(m: &state::v1::Member) -> (&'static str, String) {
    use state::v1::{HealthState, MemberStatus};
    match m.health_history.last() {
        Some(e) if e.state == HealthState::Unhealthy as i32 => ("unhealthy", e.reason.clone()),
        Some(e) if e.state == HealthState::Degraded as i32 => ("degraded", e.reason.clone()),
        _ if m.status == MemberStatus::Stopped as i32 => ("unhealthy", "stopped".into()),
        _ => ("healthy", String::new()),
    }
}

/// What a secret value reads as wherever it is shown.
pub const REDACTED: &str = "<redacted>";

/// `w` with the values of its environment hidden (names kept): environment values
/// carry secrets (`DB_PASSWORD`) and are never shown by a read (REST, MCP, a vmm
/// node's instance listing).
pub fn redact_env(mut w: types::v1::Workload) -> types::v1::Workload {
    for v in w.env.values_mut() {
        *v = REDACTED.to_owned();
    }
    w
}

/// Every gRPC method of the contracts, as `package.Service/Method`.
pub fn methods() -> Vec<String> {
    use prost::Message as _;
    let Ok(fds) = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    fds.file
        .iter()
        .flat_map(|f| {
            f.service.iter().flat_map(move |s| {
                s.method
                    .iter()
                    .map(move |m| format!("{}.{}/{}", f.package(), s.name(), m.name()))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    #[test]
    fn descriptor_set_names_every_service() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        for want in [
            "form.state.v1.StateService",
            "form.state.v1.GossipService",
            "form.rplb.v1.RplbControl",
            "form.vmm.v1.VmmService",
            "form.scaler.v1.ScalerService",
        ] {
            assert!(
                services.iter().any(|s| s == want),
                "{want} missing from {services:?}"
            );
        }
    }

    #[test]
    fn every_message_and_field_is_documented() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut undocumented = Vec::new();
        for file in &fds.file {
            let info = file.source_code_info.as_ref().expect("source info kept");
            let documented = |path: &[i32]| {
                info.location
                    .iter()
                    .any(|l| l.path == path && !l.leading_comments().trim().is_empty())
            };
            // 4 = message_type, 2 = field, 5 = enum_type, 6 = service, 2 = method.
            for (mi, m) in file.message_type.iter().enumerate() {
                let mp = vec![4, mi as i32];
                if !documented(&mp) {
                    undocumented.push(format!("{}: message {}", file.name(), m.name()));
                }
                for (fi, f) in m.field.iter().enumerate() {
                    let mut fp = mp.clone();
                    fp.extend([2, fi as i32]);
                    if !documented(&fp) {
                        undocumented.push(format!("{}: {}.{}", file.name(), m.name(), f.name()));
                    }
                }
            }
            for (ei, e) in file.enum_type.iter().enumerate() {
                if !documented(&[5, ei as i32]) {
                    undocumented.push(format!("{}: enum {}", file.name(), e.name()));
                }
            }
            for (si, s) in file.service.iter().enumerate() {
                for (mi, m) in s.method.iter().enumerate() {
                    if !documented(&[6, si as i32, 2, mi as i32]) {
                        undocumented.push(format!("{}: rpc {}", file.name(), m.name()));
                    }
                }
            }
        }
        assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
    }
}
