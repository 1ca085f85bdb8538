//! The state read back as `form.state.v1` clusters and `form.types.v1` operations.

use form_proto::state::v1 as pb;
use form_proto::types::v1 as types;
use prost::Message;

use crate::crdt::{Entry, Field, Key, Space, State, Value, View};

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

/// One cluster with its members, or `None` if it does not exist. Its fields are read
/// through one [`View`] of its scope, with one key per member changed field by field
/// (no search of the whole state, no allocation, per field).
pub fn cluster(state: &State, id: &str) -> Option<pb::Cluster> {
    let view = state.view(Space::Cluster, id);
    let mut key = Key::cluster(id, Field::ClusterPresence);
    let presence = view.entries(&key)?;
    let created_at_ms = presence.values().map(|e| e.at_ms).min().unwrap_or(0);
    let mut get = |f| {
        key.field = f;
        view.get(&key)
    };
    let domain = text(get(Field::Domain));
    let workload = decode(get(Field::Workload));
    let scaling_policy = decode(get(Field::Policy));
    let template_instance_id = text(get(Field::Template));
    let affinity = decode(get(Field::Affinity));
    let resources = decode(get(Field::ClusterResources));
    let state_sync = decode(get(Field::StateSync));
    let drain = decode(get(Field::Drain));
    let node_selector = decode(get(Field::NodeSelector));
    let standby =
        decode::<pb::StandbySnapshot>(get(Field::Standby)).filter(|s| !s.snapshot_id.is_empty());
    let fence = get(Field::Fence).map(fence_of);
    let members = state
        .subs(id)
        .into_iter()
        .filter_map(|i| member(view, id, i).map(|m| (i.to_owned(), m)))
        .collect();
    Some(pb::Cluster {
        cluster_id: id.to_owned(),
        domain,
        workload,
        scaling_policy,
        template_instance_id,
        affinity,
        members,
        resources,
        state_sync,
        drain,
        node_selector,
        standby,
        created_at_ms,
        fence,
    })
}

/// The highest fence claimed for cluster `id`, if any.
pub fn fence(state: &State, id: &str) -> Option<types::Fence> {
    state.get(&Key::cluster(id, Field::Fence)).map(fence_of)
}

fn fence_of(e: &Entry) -> types::Fence {
    types::Fence {
        epoch: e.rank,
        owner: match &e.value {
            Value::Text(s) => s.clone(),
            _ => String::new(),
        },
    }
}

/// Member `instance` of the cluster `view` shows, if it exists.
fn member(view: View<'_>, id: &str, instance: &str) -> Option<pb::Member> {
    let mut key = Key::member(id, instance, Field::MemberPresence);
    view.entries(&key)?;
    let mut get = |f| {
        key.field = f;
        view.get(&key)
    };
    let heartbeat = get(Field::Heartbeat);
    let node_id = text(get(Field::NodeId));
    let addresses = match get(Field::Addresses).map(|e| &e.value) {
        Some(Value::Texts(v)) => v.clone(),
        _ => Vec::new(),
    };
    let status = i32::try_from(num(get(Field::MemberStatus))).unwrap_or(0);
    let generation = num(get(Field::Generation));
    let heartbeats_skipped = u32::try_from(num(get(Field::HeartbeatsSkipped))).unwrap_or(u32::MAX);
    let resources = decode(get(Field::MemberResources));
    let state_sync = decode(get(Field::MemberStateSync));
    let state_writes = get(Field::StateWrites).map(|e| e.rank).unwrap_or(0);
    let usage = decode(get(Field::HeartbeatUsage));
    let drain = decode(get(Field::MemberDrain));
    let state_contract = text(get(Field::StateContract));
    key.field = Field::Health;
    let health_history = view
        .history(&key)
        .into_iter()
        .filter_map(|e| decode(Some(e)))
        .collect();
    Some(pb::Member {
        instance_id: instance.to_owned(),
        node_id,
        addresses,
        status,
        generation,
        last_heartbeat_ms: heartbeat.map(|e| e.rank).unwrap_or(0),
        heartbeats_skipped,
        resources,
        health_history,
        cpu_utilization: heartbeat
            .map(|e| f64::from_bits(num(Some(e))))
            .unwrap_or(0.0),
        state_sync,
        state_writes,
        usage,
        drain,
        state_contract,
    })
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

/// Only the cluster of an operation's body: decoding it skips every other field, so
/// finding one cluster's operations among a fleet's does not decode them all.
#[derive(Clone, PartialEq, prost::Message)]
struct ClusterOf {
    /// `Operation.cluster_id`.
    #[prost(string, tag = "2")]
    cluster_id: String,
}

/// Operations of `cluster` (all when empty), newest first, at most `limit` (0 = all);
/// with `unfinished_only`, only those that have not ended. It looks at every
/// operation; [`operations_among`] looks only at candidates an index gave.
pub fn operations(
    state: &State,
    cluster: &str,
    limit: usize,
    unfinished_only: bool,
) -> Vec<types::Operation> {
    operations_among(
        state,
        state.ids(Space::Operation),
        cluster,
        limit,
        unfinished_only,
    )
}

/// [`operations`] among the operations `ids` (each is checked, so a candidate that is
/// not of `cluster`, or has ended, is left out).
pub fn operations_among<'a>(
    state: &State,
    ids: impl IntoIterator<Item = &'a str>,
    cluster: &str,
    limit: usize,
    unfinished_only: bool,
) -> Vec<types::Operation> {
    let mut ops: Vec<types::Operation> = ids
        .into_iter()
        .filter(|id| {
            (cluster.is_empty() || operation_cluster(state, id).is_some_and(|c| c == cluster))
                && (!unfinished_only || operation_unfinished(state, id))
        })
        .filter_map(|id| operation(state, id))
        .collect();
    ops.sort_by(|a, b| (b.created_at_ms, &b.operation_id).cmp(&(a.created_at_ms, &a.operation_id)));
    if limit > 0 {
        ops.truncate(limit);
    }
    ops
}

/// The cluster of operation `id` (decoding only that field of its body), if it exists.
pub fn operation_cluster(state: &State, id: &str) -> Option<String> {
    decode::<ClusterOf>(state.get(&Key::operation(id, Field::OperationBody))).map(|c| c.cluster_id)
}

/// Whether operation `id` has a status that has not ended (no status: not started).
pub fn operation_unfinished(state: &State, id: &str) -> bool {
    !decode::<types::OperationStatus>(state.get(&Key::operation(id, Field::OperationStatus)))
        .is_some_and(|s| form_proto::status_is_terminal(&s))
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
