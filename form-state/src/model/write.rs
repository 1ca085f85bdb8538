//! Requests of `StateService` as deltas. Each function validates its request against
//! the state the replica has observed and returns the delta to apply, or `None` when
//! the write would change nothing.

use form_proto::state::v1 as pb;
use form_proto::types::v1 as types;
use prost::Message;

use super::validate;
use super::{HEALTH_HISTORY, read};
use crate::crdt::{Delta, DeltaBuilder, Field, Key, Space, State, Value};
use crate::error::StateError;

/// Rank of an operation status in the monotone order
/// `Requested < InProgress{0} < InProgress{1} < ... < Completed < RolledBack < Failed`.
/// Between terminal states the more cautious outcome wins (see docs/state.md).
pub fn status_rank(status: Option<&types::OperationStatus>) -> u64 {
    use types::operation_status::State as S;
    const TERMINAL: u64 = 1 << 40;
    match status.and_then(|s| s.state.as_ref()) {
        None | Some(S::Requested(_)) => 0,
        Some(S::InProgress(p)) => 1 + u64::from(p.step_index),
        Some(S::Completed(_)) => TERMINAL,
        Some(S::RolledBack(_)) => TERMINAL + 1,
        Some(S::Failed(_)) => TERMINAL + 2,
    }
}

fn msg_value(field: &str, m: &impl Message) -> Result<Value, StateError> {
    let bytes = m.encode_to_vec();
    validate::size(field, &bytes)?;
    Ok(Value::Bytes(bytes))
}

fn require_cluster(state: &State, id: &str) -> Result<(), StateError> {
    if read::cluster_exists(state, id) {
        Ok(())
    } else {
        Err(StateError::NotFound {
            what: "cluster",
            id: id.to_owned(),
        })
    }
}

fn require_member(state: &State, cluster: &str, instance: &str) -> Result<(), StateError> {
    require_cluster(state, cluster)?;
    if read::member_exists(state, cluster, instance) {
        Ok(())
    } else {
        Err(StateError::NotFound {
            what: "member",
            id: format!("{cluster}/{instance}"),
        })
    }
}

/// `PutCluster`: creates the cluster (domain defaults to `<id>.fog`) or updates the
/// fields that are set. Only a creation writes the presence marker, so an update
/// concurrent with a delete does not bring the cluster back.
pub fn put_cluster(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::PutClusterRequest,
) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", &r.cluster_id)?;
    let id = r.cluster_id.as_str();
    let mut b = DeltaBuilder::new(state, actor);
    let key = |f| Key::cluster(id, f);
    let exists = read::cluster_exists(state, id);
    if !exists && r.standby.is_some() {
        // Written by a controller's background round: it must not make a deleted
        // cluster again.
        return Err(StateError::FailedPrecondition(format!(
            "cluster '{id}' does not exist; a standby snapshot is recorded only for an existing cluster"
        )));
    }
    if !exists {
        // Fields left by updates concurrent with an earlier delete are invisible; a new
        // cluster must not inherit them.
        b.remove_scope(Space::Cluster, id, None);
        b.set(key(Field::ClusterPresence), Value::Unit, 0, now);
    }
    match (&r.domain, exists) {
        (Some(d), _) => {
            validate::domain(d)?;
            b.set(key(Field::Domain), Value::Text(d.clone()), 0, now);
        }
        (None, false) => {
            b.set(key(Field::Domain), Value::Text(format!("{id}.fog")), 0, now);
        }
        (None, true) => {}
    }
    if let Some(w) = &r.workload {
        b.set(key(Field::Workload), msg_value("workload", w)?, 0, now);
    }
    if let Some(p) = &r.scaling_policy {
        validate::policy(p)?;
        b.set(key(Field::Policy), msg_value("scaling_policy", p)?, 0, now);
    }
    if let Some(t) = &r.template_instance_id {
        if !t.is_empty() {
            validate::id("template_instance_id", t)?;
        }
        b.set(key(Field::Template), Value::Text(t.clone()), 0, now);
    }
    if let Some(a) = &r.affinity {
        form_proto::check_affinity(a).map_err(|e| StateError::invalid("affinity", e))?;
        b.set(key(Field::Affinity), msg_value("affinity", a)?, 0, now);
    }
    if let Some(res) = &r.resources {
        validate::resources("resources", res)?;
        b.set(
            key(Field::ClusterResources),
            msg_value("resources", res)?,
            0,
            now,
        );
    }
    if let Some(d) = &r.drain {
        validate::drain(d)?;
        b.set(key(Field::Drain), msg_value("drain", d)?, 0, now);
    }
    if let Some(sel) = &r.node_selector {
        validate::labels("node_selector.labels", &sel.labels)?;
        b.set(
            key(Field::NodeSelector),
            msg_value("node_selector", sel)?,
            0,
            now,
        );
    }
    if let Some(sb) = &r.standby {
        validate::standby(sb)?;
        b.set(key(Field::Standby), msg_value("standby", sb)?, 0, now);
    }
    if let Some(s) = &r.state_sync {
        validate::state_sync(s)?;
        b.set(key(Field::StateSync), msg_value("state_sync", s)?, 0, now);
    }
    Ok(b.build())
}

/// `DeleteCluster`: removes every entry of the cluster and its members this replica saw.
pub fn delete_cluster(state: &State, actor: &str, id: &str) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", id)?;
    require_cluster(state, id)?;
    let mut b = DeltaBuilder::new(state, actor);
    b.remove_scope(Space::Cluster, id, None);
    // Its operations go with it: a cluster made again with this id starts with no
    // history (and no cooldown). A delete operation stays: it is still running, and
    // says what became of the cluster.
    for op in read::operations(state, id, 0, false) {
        if op.kind != types::OperationKind::DeleteCluster as i32 {
            b.remove_scope(Space::Operation, &op.operation_id, None);
        }
    }
    Ok(b.build())
}

/// `AddMember`: writes the member's presence and every field.
pub fn add_member(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::AddMemberRequest,
) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", &r.cluster_id)?;
    let m = r.member.as_ref().ok_or_else(|| {
        StateError::invalid(
            "member",
            "is missing; expected a Member with an instance_id",
        )
    })?;
    validate::id("member.instance_id", &m.instance_id)?;
    if !m.node_id.is_empty() {
        validate::id("member.node_id", &m.node_id)?;
    }
    require_cluster(state, &r.cluster_id)?;
    let key = |f| Key::member(&r.cluster_id, &m.instance_id, f);
    let status = match pb::MemberStatus::try_from(m.status) {
        Ok(pb::MemberStatus::Unspecified) => pb::MemberStatus::Starting,
        Ok(s) => s,
        Err(_) => {
            return Err(StateError::invalid(
                "member.status",
                format!("{} is not a MemberStatus", m.status),
            ));
        }
    };
    let addresses = m.addresses.join(",");
    validate::size("member.addresses", addresses.as_bytes())?;
    validate::instance_addresses("member.addresses", &m.addresses)?;
    let mut b = DeltaBuilder::new(state, actor);
    if !read::member_exists(state, &r.cluster_id, &m.instance_id) {
        // A new member must not inherit fields left by updates concurrent with a remove.
        b.remove_scope(Space::Cluster, &r.cluster_id, Some(&m.instance_id));
    }
    b.set(key(Field::MemberPresence), Value::Unit, 0, now);
    b.set(key(Field::NodeId), Value::Text(m.node_id.clone()), 0, now);
    b.set(
        key(Field::Addresses),
        Value::Texts(m.addresses.clone()),
        0,
        now,
    );
    b.set(
        key(Field::MemberStatus),
        Value::U64(status as i32 as u64),
        0,
        now,
    );
    b.set(key(Field::Generation), Value::U64(m.generation), 0, now);
    if let Some(res) = &m.resources {
        validate::resources("member.resources", res)?;
        b.set(
            key(Field::MemberResources),
            msg_value("member.resources", res)?,
            0,
            now,
        );
    }
    if m.last_heartbeat_ms > 0 {
        b.set(
            key(Field::Heartbeat),
            Value::U64(m.cpu_utilization.to_bits()),
            m.last_heartbeat_ms,
            now,
        );
    }
    Ok(b.build())
}

/// `RemoveMember`: removes every entry of the member this replica saw.
pub fn remove_member(
    state: &State,
    actor: &str,
    cluster: &str,
    instance: &str,
) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", cluster)?;
    validate::id("instance_id", instance)?;
    require_member(state, cluster, instance)?;
    let mut b = DeltaBuilder::new(state, actor);
    b.remove_scope(Space::Cluster, cluster, Some(instance));
    Ok(b.build())
}

/// `UpdateMember`: sets the fields that are given, appends a health change.
pub fn update_member(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::UpdateMemberRequest,
) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", &r.cluster_id)?;
    validate::id("instance_id", &r.instance_id)?;
    require_member(state, &r.cluster_id, &r.instance_id)?;
    let key = |f| Key::member(&r.cluster_id, &r.instance_id, f);
    let mut b = DeltaBuilder::new(state, actor);
    if let Some(s) = r.status {
        match pb::MemberStatus::try_from(s) {
            Ok(pb::MemberStatus::Unspecified) | Err(_) => {
                return Err(StateError::invalid(
                    "status",
                    format!(
                        "{s} is not accepted; expected STARTING, ACTIVE, DRAINING, PAUSED or STOPPED"
                    ),
                ));
            }
            Ok(_) => {
                b.set(key(Field::MemberStatus), Value::U64(s as u64), 0, now);
            }
        }
    }
    if !r.addresses.is_empty() {
        validate::size("addresses", r.addresses.join(",").as_bytes())?;
        validate::instance_addresses("addresses", &r.addresses)?;
        b.set(
            key(Field::Addresses),
            Value::Texts(r.addresses.clone()),
            0,
            now,
        );
    }
    if let Some(res) = &r.resources {
        validate::resources("resources", res)?;
        b.set(
            key(Field::MemberResources),
            msg_value("resources", res)?,
            0,
            now,
        );
    }
    if let Some(h) = &r.health {
        let rank = if h.at_ms == 0 { now } else { h.at_ms };
        let event = pb::HealthEvent {
            at_ms: rank,
            ..h.clone()
        };
        b.append(
            key(Field::Health),
            msg_value("health", &event)?,
            rank,
            now,
            HEALTH_HISTORY,
        );
    }
    if let Some(d) = &r.drain {
        validate::drain(d)?;
        b.set(key(Field::MemberDrain), msg_value("drain", d)?, 0, now);
    }
    if let Some(sync) = &r.state_sync {
        b.set(
            key(Field::MemberStateSync),
            msg_value("state_sync", sync)?,
            0,
            now,
        );
    }
    if let Some(n) = r.heartbeats_skipped {
        b.set(
            key(Field::HeartbeatsSkipped),
            Value::U64(u64::from(n)),
            0,
            now,
        );
    }
    Ok(b.build())
}

/// The time a heartbeat is kept with: the caller's (`0`: none given), but never later
/// than the receiving replica's clock, so no caller can look alive, or hold a
/// cluster's ownership, with a date in the future.
fn heartbeat_time(at_ms: u64, now: u64) -> u64 {
    if at_ms == 0 { now } else { at_ms.min(now) }
}

/// Longest `state_contract` a heartbeat may carry (a word and why).
const MAX_CONTRACT: usize = 1024;

/// `Heartbeat`: a max register; a heartbeat older than the newest one changes nothing
/// of it (its `state_contract` is still written if it differs).
pub fn heartbeat(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::HeartbeatRequest,
) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", &r.cluster_id)?;
    validate::id("instance_id", &r.instance_id)?;
    if !(0.0..=1024.0).contains(&r.cpu_utilization) {
        return Err(StateError::invalid(
            "cpu_utilization",
            format!(
                "is {}; expected a fraction per vCPU, >= 0",
                r.cpu_utilization
            ),
        ));
    }
    require_member(state, &r.cluster_id, &r.instance_id)?;
    let at = heartbeat_time(r.at_ms, now);
    let key = Key::member(&r.cluster_id, &r.instance_id, Field::Heartbeat);
    let mut b = DeltaBuilder::new(state, actor);
    if state.get(&key).is_none_or(|e| e.rank < at) {
        b.set(key, Value::U64(r.cpu_utilization.to_bits()), at, now);
    }
    if let Some(u) = &r.usage {
        if !(0.0..=1e10).contains(&u.uptime_seconds) {
            return Err(StateError::invalid(
                "usage.uptime_seconds",
                format!("is {}; expected seconds >= 0", u.uptime_seconds),
            ));
        }
        let key = Key::member(&r.cluster_id, &r.instance_id, Field::HeartbeatUsage);
        if state.get(&key).is_none_or(|e| e.rank < at) {
            b.set(key, msg_value("usage", u)?, at, now);
        }
    }
    if let Some(n) = r.state_writes {
        let key = Key::member(&r.cluster_id, &r.instance_id, Field::StateWrites);
        if state.get(&key).is_none_or(|e| e.rank < n) {
            b.set(key, Value::Unit, n, now);
        }
    }
    if !r.state_contract.is_empty() {
        // Kept to its first MAX_CONTRACT bytes (a word and why): a long reason must
        // not cost the instance its heartbeat.
        let contract = &r.state_contract[..r.state_contract.floor_char_boundary(MAX_CONTRACT)];
        // Written when it changes, not with every heartbeat (an older heartbeat's
        // too: the node learns it once per instance).
        let key = Key::member(&r.cluster_id, &r.instance_id, Field::StateContract);
        let known = state.get(&key).map(|e| &e.value);
        if !matches!(known, Some(Value::Text(t)) if t == contract) {
            b.set(key, Value::Text(contract.to_owned()), 0, now);
        }
    }
    Ok(b.build())
}

/// `ControllerHeartbeat`: the controller's latest heartbeat (older ones are ignored).
pub fn controller_heartbeat(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::ControllerHeartbeatRequest,
) -> Result<Option<Delta>, StateError> {
    validate::id("controller_id", &r.controller_id)?;
    if r.address.len() > 256 {
        return Err(StateError::invalid(
            "address",
            format!("is {} bytes long; at most 256 accepted", r.address.len()),
        ));
    }
    let at = heartbeat_time(r.at_ms, now);
    let key = Key::controller(&r.controller_id, Field::ControllerHeartbeat);
    if state.get(&key).is_some_and(|e| e.rank >= at) {
        return Ok(None);
    }
    let mut b = DeltaBuilder::new(state, actor);
    b.set(key, Value::Text(r.address.clone()), at, now);
    Ok(b.build())
}

/// `NodeHeartbeat` from `sender` (its certificate identity; empty in plaintext): the
/// node's latest record (older ones are ignored). The first identity to write a
/// node's record keeps it: another vmm cannot take the record over.
pub fn node_heartbeat(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::NodeHeartbeatRequest,
    sender: &str,
) -> Result<Option<Delta>, StateError> {
    validate::id("node_id", &r.node_id)?;
    let key = Key::node(&r.node_id, Field::NodeHeartbeat);
    if let Some(owner) = read::node_identity(state, &r.node_id)
        && !owner.is_empty()
        && owner != sender
    {
        return Err(StateError::FailedPrecondition(format!(
            "node '{}' is recorded by {owner}; {} may not write its record",
            r.node_id,
            if sender.is_empty() {
                "an unidentified caller"
            } else {
                sender
            }
        )));
    }
    if r.addresses.is_empty() || r.addresses.len() > 8 {
        return Err(StateError::invalid(
            "addresses",
            format!(
                "has {} entries; expected 1 to 8 host:port addresses of the node's API",
                r.addresses.len()
            ),
        ));
    }
    for a in &r.addresses {
        a.parse::<form_runtime::addr::HostPort>()
            .map_err(|e| StateError::invalid("addresses", format!("'{a}': {e}")))?;
    }
    validate::labels("labels", &r.labels)?;
    // "simulated": a node of form-bench's simulated fleet, on which no workload runs.
    if !matches!(r.backend.as_str(), "process" | "qemu" | "simulated") {
        return Err(StateError::invalid(
            "backend",
            format!(
                "'{}' is not a backend; expected process, qemu or simulated",
                r.backend
            ),
        ));
    }
    let at = heartbeat_time(r.at_ms, now);
    if state.get(&key).is_some_and(|e| e.rank >= at) {
        return Ok(None);
    }
    let record = pb::NodeHeartbeatRequest {
        at_ms: at,
        identity: sender.to_owned(),
        ..r.clone()
    };
    let value = msg_value("node", &record)?;
    let mut b = DeltaBuilder::new(state, actor);
    b.set(key, value, at, now);
    Ok(b.build())
}

/// Refuses a write of `cluster` that carries fence `f` older than the cluster's
/// (docs/fencing.md); a write without a fence is not fenced.
pub fn check_fence(
    state: &State,
    cluster: &str,
    f: Option<&types::Fence>,
) -> Result<(), StateError> {
    match (f, read::fence(state, cluster)) {
        (Some(f), Some(seen)) if seen.epoch > f.epoch => {
            Err(StateError::FailedPrecondition(format!(
                "stale fence: epoch {} of {} for cluster {cluster} is older than epoch {} of {} seen here; another controller owns the cluster now",
                f.epoch, f.owner, seen.epoch, seen.owner
            )))
        }
        _ => Ok(()),
    }
}

/// `ClaimCluster`, and the fence any fenced write carries: refused when older than
/// the cluster's, recorded when newer (the same one again changes nothing).
pub fn claim_fence(
    state: &State,
    actor: &str,
    now: u64,
    cluster: &str,
    f: &types::Fence,
) -> Result<Option<Delta>, StateError> {
    validate::id("cluster_id", cluster)?;
    validate::id("fence.owner", &f.owner)?;
    check_fence(state, cluster, Some(f))?;
    if read::fence(state, cluster).is_some_and(|seen| seen.epoch == f.epoch) {
        return Ok(None);
    }
    let mut b = DeltaBuilder::new(state, actor);
    b.set(
        Key::cluster(cluster, Field::Fence),
        Value::Text(f.owner.clone()),
        f.epoch,
        now,
    );
    Ok(b.build())
}

/// `SetNodeCordon`: cordons a node that has sent a heartbeat, or lifts its cordon.
pub fn set_node_cordon(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::SetNodeCordonRequest,
) -> Result<Option<Delta>, StateError> {
    validate::id("node_id", &r.node_id)?;
    if state
        .get(&Key::node(&r.node_id, Field::NodeHeartbeat))
        .is_none()
    {
        return Err(StateError::NotFound {
            what: "node",
            id: r.node_id.clone(),
        });
    }
    let mut b = DeltaBuilder::new(state, actor);
    b.set(
        Key::node(&r.node_id, Field::NodeCordon),
        Value::U64(u64::from(r.cordoned)),
        0,
        now,
    );
    Ok(b.build())
}

/// `PutOperation`: creates or advances an operation; its status never moves back. An
/// operation that ends takes the oldest finished operations of its cluster beyond
/// `keep` with it.
pub fn put_operation(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::PutOperationRequest,
    keep: usize,
) -> Result<Option<Delta>, StateError> {
    let prune = finished_beyond(state, state.ids(Space::Operation), r, keep);
    put_operation_pruning(state, actor, now, r, &prune)
}

/// The finished operations of `r`'s cluster that go when `r` ends its operation, the
/// oldest beyond `keep` (`r`'s own counted as the newest); none when `r` does not end
/// one. It looks among the operations `ids` (the service gives those of the cluster,
/// from the replica's index); [`put_operation_pruning`] checks each again.
pub fn finished_beyond<'a>(
    state: &State,
    ids: impl IntoIterator<Item = &'a str>,
    r: &pb::PutOperationRequest,
    keep: usize,
) -> Vec<String> {
    let Some(op) = r.operation.as_ref() else {
        return Vec::new();
    };
    if !form_proto::operation_is_terminal(op) {
        return Vec::new();
    }
    read::operations_among(state, ids, &op.cluster_id, 0, false)
        .into_iter()
        .filter(|o| o.operation_id != op.operation_id && form_proto::operation_is_terminal(o))
        .skip(keep.saturating_sub(1))
        .map(|o| o.operation_id)
        .collect()
}

/// [`put_operation`] with the finished operations to remove given (each is removed
/// only if it is still a finished operation of the same cluster).
pub fn put_operation_pruning(
    state: &State,
    actor: &str,
    now: u64,
    r: &pb::PutOperationRequest,
    prune: &[String],
) -> Result<Option<Delta>, StateError> {
    let op = r
        .operation
        .as_ref()
        .ok_or_else(|| StateError::invalid("operation", "is missing; expected an Operation"))?;
    validate::id("operation.operation_id", &op.operation_id)?;
    validate::id("operation.cluster_id", &op.cluster_id)?;
    if matches!(
        types::OperationKind::try_from(op.kind),
        Ok(types::OperationKind::Unspecified) | Err(_)
    ) {
        return Err(StateError::invalid(
            "operation.kind",
            format!(
                "{} is not accepted; expected SCALE_OUT, SCALE_IN, REPLACE_INSTANCE, RESIZE, CREATE_CLUSTER or DELETE_CLUSTER",
                op.kind
            ),
        ));
    }
    use types::operation_status::State as S;
    let current = read::operation(state, &op.operation_id);
    // A create precedes its cluster; every other operation acts on one that exists.
    if current.is_none() && op.kind != types::OperationKind::CreateCluster as i32 {
        require_cluster(state, &op.cluster_id)?;
    }
    let rank = status_rank(op.status.as_ref());
    let current_rank = current.as_ref().map(|c| status_rank(c.status.as_ref()));
    if let Some(cur) = current_rank
        && rank < cur
    {
        return Err(StateError::FailedPrecondition(format!(
            "operation {} is {}; its status cannot move back to {}",
            op.operation_id,
            read::status_name(current.as_ref().and_then(|c| c.status.as_ref())),
            read::status_name(op.status.as_ref()),
        )));
    }
    if let (Some(cur), Some(S::InProgress(new))) = (
        current.as_ref(),
        op.status.as_ref().and_then(|s| s.state.as_ref()),
    ) && current_rank == Some(rank)
        && let Some(S::InProgress(old)) = cur.status.as_ref().and_then(|s| s.state.as_ref())
        && old.step != new.step
    {
        // Two runs of one operation: the second to record a step loses.
        return Err(StateError::FailedPrecondition(format!(
            "operation {} recorded step {} as '{}' already; '{}' is refused (is another controller running it?)",
            op.operation_id, old.step_index, old.step, new.step
        )));
    }
    let body = types::Operation {
        status: None,
        ..op.clone()
    };
    let key = |f| Key::operation(&op.operation_id, f);
    let mut b = DeltaBuilder::new(state, actor);
    if current.as_ref().map(|c| types::Operation {
        status: None,
        ..c.clone()
    }) != Some(body.clone())
    {
        b.set(
            key(Field::OperationBody),
            msg_value("operation", &body)?,
            0,
            now,
        );
    }
    if current_rank != Some(rank) {
        let status = op.status.clone().unwrap_or(types::OperationStatus {
            state: Some(types::operation_status::State::Requested(
                types::Requested {},
            )),
        });
        b.set(
            key(Field::OperationStatus),
            msg_value("operation.status", &status)?,
            rank,
            now,
        );
        if form_proto::operation_is_terminal(op) {
            for id in prune.iter().filter(|id| **id != op.operation_id) {
                if read::operation(state, id).is_some_and(|o| {
                    o.cluster_id == op.cluster_id && form_proto::operation_is_terminal(&o)
                }) {
                    b.remove_scope(Space::Operation, id, None);
                }
            }
        }
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(state: &mut State, write: impl FnOnce(&State) -> Result<Option<Delta>, StateError>) {
        if let Some(d) = write(state).expect("valid write") {
            state.apply(&d);
        }
    }

    fn node(id: &str, at_ms: u64) -> pb::NodeHeartbeatRequest {
        pb::NodeHeartbeatRequest {
            node_id: id.into(),
            at_ms,
            addresses: vec!["10.0.0.7:3002".into()],
            capacity: Some(pb::NodeCapacity {
                vcpus: 8,
                memory_mib: 16384,
                instance_slots: 100,
            }),
            used: Some(pb::NodeCapacity {
                vcpus: 2,
                memory_mib: 1024,
                instance_slots: 2,
            }),
            labels: [("zone".to_owned(), "eu-1".to_owned())].into(),
            backend: "process".into(),
            identity: String::new(),
        }
    }

    #[test]
    fn nodes_keep_their_newest_record_never_dated_after_the_replica() {
        let mut s = State::default();
        apply(&mut s, |s| {
            node_heartbeat(s, "a", 1_000, &node("n1", 900), "vmm/n1")
        });
        let mut older = node("n1", 800);
        older.used = None;
        assert!(
            node_heartbeat(&s, "a", 1_000, &older, "vmm/n1")
                .expect("valid")
                .is_none()
        );
        // A heartbeat from the future is kept at the replica's time.
        apply(&mut s, |s| {
            node_heartbeat(s, "a", 2_000, &node("n1", 99_999_999), "vmm/n1")
        });
        let listed = read::nodes(&s);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_heartbeat_ms, 2_000);
        assert_eq!(listed[0].used.map(|u| u.instance_slots), Some(2));
        assert_eq!(listed[0].labels["zone"], "eu-1");
        assert!(!listed[0].cordoned);
        apply(&mut s, |s| {
            set_node_cordon(
                s,
                "a",
                2_001,
                &pb::SetNodeCordonRequest {
                    node_id: "n1".into(),
                    cordoned: true,
                },
            )
        });
        assert!(read::nodes(&s)[0].cordoned);
        assert_eq!(read::nodes(&s)[0].identity, "vmm/n1");
        // Another vmm cannot take the record over.
        let e = node_heartbeat(&s, "a", 3_000, &node("n1", 0), "vmm/intruder")
            .expect_err("not its record")
            .to_string();
        assert!(
            e.contains("recorded by vmm/n1") && e.contains("vmm/intruder"),
            "{e}"
        );
        let e = set_node_cordon(
            &s,
            "a",
            2_002,
            &pb::SetNodeCordonRequest {
                node_id: "ghost".into(),
                cordoned: true,
            },
        )
        .expect_err("unknown node");
        assert_eq!(e.to_string(), "node 'ghost' not found");
    }

    #[test]
    fn bad_node_records_are_refused_naming_the_field() {
        let s = State::default();
        let check = |r: pb::NodeHeartbeatRequest, words: &[&str]| {
            let e = node_heartbeat(&s, "a", 1, &r, "vmm/n")
                .expect_err("refused")
                .to_string();
            for w in words {
                assert!(e.contains(w), "'{w}' not in '{e}'");
            }
        };
        check(
            pb::NodeHeartbeatRequest {
                backend: "docker".into(),
                ..node("n", 1)
            },
            &["backend", "docker", "process, qemu or simulated"],
        );
        check(
            pb::NodeHeartbeatRequest {
                addresses: vec![],
                ..node("n", 1)
            },
            &["addresses", "1 to 8"],
        );
        check(
            pb::NodeHeartbeatRequest {
                addresses: vec!["nope".into()],
                ..node("n", 1)
            },
            &["addresses", "'nope'"],
        );
        check(
            pb::NodeHeartbeatRequest {
                node_id: "a b".into(),
                ..node("n", 1)
            },
            &["node_id"],
        );
        let many = (0..40).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        check(
            pb::NodeHeartbeatRequest {
                labels: many,
                ..node("n", 1)
            },
            &["labels", "at most 32"],
        );
    }

    #[test]
    fn finished_operations_are_bounded_per_cluster_and_go_with_their_cluster() {
        use types::operation_status::State as S;
        let mut s = State::default();
        for c in ["web", "db"] {
            apply(&mut s, |s| {
                put_cluster(
                    s,
                    "a",
                    1,
                    &pb::PutClusterRequest {
                        cluster_id: c.into(),
                        ..Default::default()
                    },
                )
            });
        }
        let done = |id: String, cluster: &str, at: u64| pb::PutOperationRequest {
            operation: Some(types::Operation {
                operation_id: id,
                cluster_id: cluster.into(),
                kind: types::OperationKind::ScaleOut as i32,
                created_at_ms: at,
                status: Some(types::OperationStatus {
                    state: Some(S::Completed(types::Completed {})),
                }),
                ..Default::default()
            }),
        };
        for k in 0..5u64 {
            apply(&mut s, |s| {
                put_operation(s, "a", 10 + k, &done(format!("w{k}"), "web", k), 3)
            });
        }
        apply(&mut s, |s| {
            put_operation(s, "a", 20, &done("d0".into(), "db", 1), 3)
        });
        let ids = |s: &State, c: &str| -> Vec<String> {
            read::operations(s, c, 0, false)
                .into_iter()
                .map(|o| o.operation_id)
                .collect()
        };
        assert_eq!(ids(&s, "web"), ["w4", "w3", "w2"], "the newest 3 are kept");
        // A prune list read off the lock is checked again: another cluster's
        // operation, or one that is gone, is left alone.
        apply(&mut s, |s| {
            put_operation_pruning(
                s,
                "a",
                15,
                &done("w5".into(), "web", 5),
                &["d0".into(), "w0".into(), "w2".into()],
            )
        });
        assert_eq!(ids(&s, "web"), ["w5", "w4", "w3"]);
        assert_eq!(ids(&s, "db"), ["d0"]);
        let mut del = done("del".into(), "web", 9);
        if let Some(o) = del.operation.as_mut() {
            o.kind = types::OperationKind::DeleteCluster as i32;
            o.status = Some(types::OperationStatus {
                state: Some(S::InProgress(types::InProgress {
                    step_index: 0,
                    step: "delete_cluster_record".into(),
                })),
            });
        }
        apply(&mut s, |s| put_operation(s, "a", 30, &del, 3));
        let unfinished: Vec<String> = read::operations(&s, "", 0, true)
            .into_iter()
            .map(|o| o.operation_id)
            .collect();
        assert_eq!(
            unfinished,
            ["del"],
            "only what has not ended, of every cluster"
        );
        apply(&mut s, |s| delete_cluster(s, "a", "web"));
        assert_eq!(
            ids(&s, "web"),
            ["del"],
            "deleted with their cluster, but for the delete itself"
        );
        assert_eq!(ids(&s, "db"), ["d0"], "another cluster's stay");
    }

    #[test]
    fn operation_status_only_moves_forward() {
        use types::operation_status::State as S;
        let mut s = State::default();
        apply(&mut s, |s| {
            put_cluster(
                s,
                "a",
                1,
                &pb::PutClusterRequest {
                    cluster_id: "web".into(),
                    ..Default::default()
                },
            )
        });
        let op = |st: S| pb::PutOperationRequest {
            operation: Some(types::Operation {
                operation_id: "op1".into(),
                cluster_id: "web".into(),
                kind: types::OperationKind::ScaleOut as i32,
                status: Some(types::OperationStatus { state: Some(st) }),
                ..Default::default()
            }),
        };
        apply(&mut s, |s| {
            put_operation(
                s,
                "a",
                2,
                &op(S::InProgress(types::InProgress {
                    step_index: 2,
                    step: "clone".into(),
                })),
                100,
            )
        });
        let step = |name: &str| {
            op(S::InProgress(types::InProgress {
                step_index: 2,
                step: name.into(),
            }))
        };
        assert!(
            put_operation(&s, "a", 3, &step("clone"), 100).is_ok(),
            "the same step again (what it learned) is accepted"
        );
        let e = put_operation(&s, "a", 3, &step("undo:clone"), 100).expect_err("other step");
        assert!(e.to_string().contains("another controller"), "{e}");
        let e = put_operation(&s, "a", 3, &op(S::Requested(types::Requested {})), 100)
            .expect_err("backwards");
        assert!(e.to_string().contains("cannot move back"), "{e}");
        apply(&mut s, |s| {
            put_operation(s, "a", 4, &op(S::Completed(types::Completed {})), 100)
        });
        assert_eq!(
            status_rank(read::operation(&s, "op1").expect("op").status.as_ref()),
            1 << 40
        );
        assert!(
            matches!(
                put_operation(&s, "a", 5, &op(S::Completed(types::Completed {})), 100),
                Ok(None)
            ),
            "a repeat is a no-op"
        );
    }

    #[test]
    fn writes_to_unknown_things_are_not_found() {
        let s = State::default();
        let e = add_member(
            &s,
            "a",
            1,
            &pb::AddMemberRequest {
                cluster_id: "nope".into(),
                member: Some(pb::Member {
                    instance_id: "i1".into(),
                    ..Default::default()
                }),
            },
        )
        .expect_err("unknown cluster");
        assert!(
            matches!(
                e,
                StateError::NotFound {
                    what: "cluster",
                    ..
                }
            ),
            "{e}"
        );
        let e = heartbeat(
            &s,
            "a",
            1,
            &pb::HeartbeatRequest {
                cluster_id: "".into(),
                ..Default::default()
            },
        )
        .expect_err("empty");
        assert!(e.to_string().contains("cluster_id"), "{e}");
    }

    #[test]
    fn a_standby_snapshot_is_recorded_checked_and_cleared_but_never_makes_a_cluster() {
        let mut s = State::default();
        let standby = |id: &str, nodes: &[&str]| pb::PutClusterRequest {
            cluster_id: "web".into(),
            standby: Some(pb::StandbySnapshot {
                snapshot_id: id.into(),
                source_instance_id: "web-0".into(),
                node_ids: nodes.iter().map(|n| (*n).to_owned()).collect(),
                taken_at_ms: 5,
                state_cursor: String::new(),
            }),
            ..Default::default()
        };
        let e = put_cluster(&s, "a", 1, &standby("snap-1", &["n1"])).expect_err("no cluster");
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(read::cluster(&s, "web").is_none());
        apply(&mut s, |s| {
            put_cluster(
                s,
                "a",
                1,
                &pb::PutClusterRequest {
                    cluster_id: "web".into(),
                    ..Default::default()
                },
            )
        });
        apply(&mut s, |s| {
            put_cluster(s, "a", 2, &standby("snap-1", &["n1", "n2"]))
        });
        let kept = read::cluster(&s, "web")
            .and_then(|c| c.standby)
            .expect("kept");
        assert_eq!(
            (kept.snapshot_id.as_str(), kept.node_ids.len()),
            ("snap-1", 2)
        );
        let e = put_cluster(&s, "a", 3, &standby("snap-2", &[])).expect_err("no node");
        assert!(e.to_string().contains("standby.node_ids"), "{e}");
        let e = put_cluster(&s, "a", 3, &standby("snap 2", &["n1"])).expect_err("bad id");
        assert!(e.to_string().contains("standby.snapshot_id"), "{e}");
        apply(&mut s, |s| put_cluster(s, "a", 4, &standby("", &[])));
        assert!(
            read::cluster(&s, "web").expect("web").standby.is_none(),
            "cleared"
        );
    }

    #[test]
    fn a_recreated_cluster_does_not_inherit_leftovers() {
        let mut s = State::default();
        apply(&mut s, |s| {
            put_cluster(
                s,
                "a",
                1,
                &pb::PutClusterRequest {
                    cluster_id: "web".into(),
                    ..Default::default()
                },
            )
        });
        // b updates the domain while a deletes the cluster without having seen it.
        let mut b = s.clone();
        let upd = pb::PutClusterRequest {
            cluster_id: "web".into(),
            domain: Some("old.fog".into()),
            ..Default::default()
        };
        let update = put_cluster(&b, "b", 2, &upd)
            .expect("valid")
            .expect("delta");
        b.apply(&update);
        let delete = delete_cluster(&s, "a", "web")
            .expect("valid")
            .expect("delta");
        s.apply(&delete);
        s.apply(&update);
        assert!(
            read::cluster(&s, "web").is_none(),
            "the update does not revive the cluster"
        );
        apply(&mut s, |s| {
            put_cluster(
                s,
                "a",
                3,
                &pb::PutClusterRequest {
                    cluster_id: "web".into(),
                    ..Default::default()
                },
            )
        });
        assert_eq!(
            read::cluster(&s, "web").expect("re-created").domain,
            "web.fog",
            "no leftover domain"
        );
    }

    #[test]
    fn an_older_heartbeat_changes_nothing() {
        let mut s = State::default();
        apply(&mut s, |s| {
            put_cluster(
                s,
                "a",
                1,
                &pb::PutClusterRequest {
                    cluster_id: "web".into(),
                    ..Default::default()
                },
            )
        });
        let m = pb::Member {
            instance_id: "i1".into(),
            ..Default::default()
        };
        apply(&mut s, |s| {
            add_member(
                s,
                "a",
                1,
                &pb::AddMemberRequest {
                    cluster_id: "web".into(),
                    member: Some(m),
                },
            )
        });
        let hb = |at| pb::HeartbeatRequest {
            cluster_id: "web".into(),
            instance_id: "i1".into(),
            at_ms: at,
            cpu_utilization: 0.5,
            state_writes: None,
            usage: Some(pb::InstanceUsage {
                memory_bytes: at * 1000,
                uptime_seconds: at as f64,
            }),
            state_contract: String::new(),
        };
        apply(&mut s, |s| heartbeat(s, "a", 200, &hb(100)));
        assert!(matches!(heartbeat(&s, "a", 211, &hb(50)), Ok(None)));
        let c = read::cluster(&s, "web").expect("cluster");
        assert_eq!(c.members["i1"].last_heartbeat_ms, 100);
        // Memory and uptime come with the newest heartbeat, like the CPU.
        assert_eq!(
            c.members["i1"].usage,
            Some(pb::InstanceUsage {
                memory_bytes: 100_000,
                uptime_seconds: 100.0
            })
        );
        assert_eq!(c.domain, "web.fog");
        // A heartbeat dated after the replica's clock is kept at the replica's time.
        apply(&mut s, |s| heartbeat(s, "a", 300, &hb(99_999_999)));
        let c = read::cluster(&s, "web").expect("cluster");
        assert_eq!(c.members["i1"].last_heartbeat_ms, 300);

        // Whether the workload implements the state contract is kept on the member,
        // written when it changes only, and bounded.
        let with = |at, contract: &str| pb::HeartbeatRequest {
            state_contract: contract.into(),
            ..hb(at)
        };
        assert_eq!(
            read::cluster(&s, "web").expect("cluster").members["i1"].state_contract,
            ""
        );
        apply(&mut s, |s| {
            heartbeat(s, "a", 400, &with(400, "unsupported: 404"))
        });
        let c = read::cluster(&s, "web").expect("cluster");
        assert_eq!(c.members["i1"].state_contract, "unsupported: 404");
        let same = heartbeat(&s, "a", 500, &with(500, "unsupported: 404")).expect("heartbeat");
        let changed = |d: &Delta| {
            d.writes
                .iter()
                .any(|(k, _)| k.field == crate::crdt::key::Field::StateContract)
        };
        assert!(
            !same.as_ref().is_some_and(changed),
            "an unchanged contract is not written again"
        );
        apply(&mut s, |s| heartbeat(s, "a", 600, &with(600, "")));
        let c = read::cluster(&s, "web").expect("cluster");
        assert_eq!(
            c.members["i1"].state_contract, "unsupported: 404",
            "an empty one says nothing"
        );
        apply(&mut s, |s| heartbeat(s, "a", 700, &with(700, "supported")));
        let c = read::cluster(&s, "web").expect("cluster");
        assert_eq!(
            c.members["i1"].state_contract, "supported",
            "a change is written"
        );
        let long = format!("unsupported: {}", "é".repeat(1000));
        apply(&mut s, |s| heartbeat(s, "a", 800, &with(800, &long)));
        let c = read::cluster(&s, "web").expect("cluster");
        let kept = &c.members["i1"].state_contract;
        assert!(
            kept.len() <= 1024 && long.starts_with(kept.as_str()),
            "cut at a character: {}",
            kept.len()
        );
        assert_eq!(
            c.members["i1"].last_heartbeat_ms, 800,
            "a long one costs no heartbeat"
        );
    }
}
