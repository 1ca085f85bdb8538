//! The state read back as `form.state.v1` clusters and `form.types.v1` operations.

use form_proto::state::v1 as pb;
use form_proto::types::v1 as types;
use prost::Message;

use crate::crdt::{Entry, Field, Key, Space, State, Value};

/// Whether cluster `id` exists (its presence marker survives).
pub fn cluster_exists(state: &State, id: &str) -> bool {
    state
        .entries(&Key::cluster(id, Field::ClusterPresence))
        .is_some()
}

/// Whether member `instance` of cluster `id` exists.
pub fn member_exists(state: &State, id: &str, instance: &str) -> bool {
    state
        .entries(&Key::member(id, instance, Field::MemberPresence))
        .is_some()
}

fn text(e: Option<&Entry>) -> String {
    match e.map(|e| &e.value) {
        Some(Value::Text(s)) => s.clone(),
        _ => String::new(),
    }
}

fn num(e: Option<&Entry>) -> u64 {
    match e.map(|e| &e.value) {
        Some(Value::U64(n)) => *n,
        _ => 0,
    }
}

fn decode<M: Message + Default>(e: Option<&Entry>) -> Option<M> {
    match e.map(|e| &e.value) {
        Some(Value::Bytes(b)) => M::decode(b.as_slice()).ok(),
        _ => None,
    }
}

/// One cluster with its members, or `None` if it does not exist.
pub fn cluster(state: &State, id: &str) -> Option<pb::Cluster> {
    if !cluster_exists(state, id) {
        return None;
    }
    let get = |f| state.get(&Key::cluster(id, f));
    let members = state
        .subs(id)
        .into_iter()
        .filter(|i| member_exists(state, id, i))
        .map(|i| (i.to_owned(), member(state, id, i)))
        .collect();
    Some(pb::Cluster {
        cluster_id: id.to_owned(),
        domain: text(get(Field::Domain)),
        workload: decode(get(Field::Workload)),
        scaling_policy: decode(get(Field::Policy)),
        template_instance_id: text(get(Field::Template)),
        affinity: decode(get(Field::Affinity)),
        members,
        resources: decode(get(Field::ClusterResources)),
        state_sync: decode(get(Field::StateSync)),
        drain: decode(get(Field::Drain)),
        node_selector: decode(get(Field::NodeSelector)),
        standby: decode::<pb::StandbySnapshot>(get(Field::Standby))
            .filter(|s| !s.snapshot_id.is_empty()),
        created_at_ms: state
            .entries(&Key::cluster(id, Field::ClusterPresence))
            .and_then(|e| e.values().map(|e| e.at_ms).min())
            .unwrap_or(0),
        fence: fence(state, id),
    })
}

/// The highest fence claimed for cluster `id`, if any.
pub fn fence(state: &State, id: &str) -> Option<types::Fence> {
    state
        .get(&Key::cluster(id, Field::Fence))
        .map(|e| types::Fence {
            epoch: e.rank,
            owner: match &e.value {
                Value::Text(s) => s.clone(),
                _ => String::new(),
            },
        })
}

fn member(state: &State, id: &str, instance: &str) -> pb::Member {
    let key = |f| Key::member(id, instance, f);
    let get = |f| state.get(&key(f));
    let heartbeat = get(Field::Heartbeat);
    pb::Member {
        instance_id: instance.to_owned(),
        node_id: text(get(Field::NodeId)),
        addresses: match get(Field::Addresses).map(|e| &e.value) {
            Some(Value::Texts(v)) => v.clone(),
            _ => Vec::new(),
        },
        status: i32::try_from(num(get(Field::MemberStatus))).unwrap_or(0),
        generation: num(get(Field::Generation)),
        last_heartbeat_ms: heartbeat.map(|e| e.rank).unwrap_or(0),
        heartbeats_skipped: u32::try_from(num(get(Field::HeartbeatsSkipped))).unwrap_or(u32::MAX),
        resources: decode(get(Field::MemberResources)),
        health_history: state
            .history(&key(Field::Health))
            .into_iter()
            .filter_map(|e| decode(Some(e)))
            .collect(),
        cpu_utilization: heartbeat
            .map(|e| f64::from_bits(num(Some(e))))
            .unwrap_or(0.0),
        state_sync: decode(get(Field::MemberStateSync)),
        state_writes: get(Field::StateWrites).map(|e| e.rank).unwrap_or(0),
        usage: decode(get(Field::HeartbeatUsage)),
        drain: decode(get(Field::MemberDrain)),
    }
}

/// How many clusters exist.
pub fn cluster_count(state: &State) -> usize {
    state
        .ids(Space::Cluster)
        .into_iter()
        .filter(|id| cluster_exists(state, id))
        .count()
}

/// Every existing cluster, ordered by id.
pub fn clusters(state: &State) -> Vec<pb::Cluster> {
    state
        .ids(Space::Cluster)
        .into_iter()
        .filter_map(|id| cluster(state, id))
        .collect()
}

/// Every controller that sent a heartbeat, ordered by id.
pub fn controllers(state: &State) -> Vec<pb::ControllerInfo> {
    state
        .ids(Space::Controller)
        .into_iter()
        .filter_map(|id| {
            let e = state.get(&Key::controller(id, Field::ControllerHeartbeat))?;
            let address = match &e.value {
                Value::Text(t) => t.clone(),
                _ => String::new(),
            };
            Some(pb::ControllerInfo {
                controller_id: id.to_owned(),
                last_heartbeat_ms: e.rank,
                address,
            })
        })
        .collect()
}

/// The identity that writes node `id`'s record, if it has one.
pub fn node_identity(state: &State, id: &str) -> Option<String> {
    let r: pb::NodeHeartbeatRequest = decode(state.get(&Key::node(id, Field::NodeHeartbeat)))?;
    Some(r.identity)
}

/// Every node that sent a heartbeat, ordered by id.
pub fn nodes(state: &State) -> Vec<pb::NodeInfo> {
    state
        .ids(Space::Node)
        .into_iter()
        .filter_map(|id| {
            let e = state.get(&Key::node(id, Field::NodeHeartbeat))?;
            let r: pb::NodeHeartbeatRequest = decode(Some(e))?;
            let cordoned = matches!(
                state
                    .get(&Key::node(id, Field::NodeCordon))
                    .map(|c| &c.value),
                Some(Value::U64(1))
            );
            Some(pb::NodeInfo {
                node_id: id.to_owned(),
                addresses: r.addresses,
                capacity: r.capacity,
                used: r.used,
                labels: r.labels,
                backend: r.backend,
                last_heartbeat_ms: e.rank,
                cordoned,
                identity: r.identity,
            })
        })
        .collect()
}

/// One operation, or `None`.
pub fn operation(state: &State, id: &str) -> Option<types::Operation> {
    let body: types::Operation = decode(state.get(&Key::operation(id, Field::OperationBody)))?;
    let status = decode(state.get(&Key::operation(id, Field::OperationStatus)));
    Some(types::Operation { status, ..body })
}

/// Operations of `cluster` (all when empty), newest first, at most `limit` (0 = all).
pub fn operations(state: &State, cluster: &str, limit: usize) -> Vec<types::Operation> {
    let mut ops: Vec<types::Operation> = state
        .ids(Space::Operation)
        .into_iter()
        .filter_map(|id| operation(state, id))
        .filter(|o| cluster.is_empty() || o.cluster_id == cluster)
        .collect();
    ops.sort_by(|a, b| (b.created_at_ms, &b.operation_id).cmp(&(a.created_at_ms, &a.operation_id)));
    if limit > 0 {
        ops.truncate(limit);
    }
    ops
}

/// A status for messages, e.g. `InProgress{2: clone}`.
pub fn status_name(status: Option<&types::OperationStatus>) -> String {
    use types::operation_status::State as S;
    match status.and_then(|s| s.state.as_ref()) {
        None | Some(S::Requested(_)) => "Requested".into(),
        Some(S::InProgress(p)) => format!("InProgress{{{}: {}}}", p.step_index, p.step),
        Some(S::Completed(_)) => "Completed".into(),
        Some(S::RolledBack(_)) => "RolledBack".into(),
        Some(S::Failed(_)) => "Failed".into(),
    }
}
