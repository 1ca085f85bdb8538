//! The health part of an evaluation round: judge each member, record changes of
//! judgement in form-state (the member's health history) and of its count of skipped
//! heartbeats (`heartbeats_skipped`: whole heartbeat intervals without one, beyond the
//! one being waited for), and replace a member that
//! has been unhealthy longer than the threshold. One replacement at a time per
//! cluster (operations are one at a time), which keeps any cluster above
//! max(1, 10%) of its members in flight; when every member looks unhealthy, one is
//! replaced and the situation reported, never all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;

use crate::autoscale::Settings;
use crate::controller::Shared;
use crate::health::{self, Health};
use crate::ops::plan::Request;

/// The node records by node id, read once per evaluation round: a cluster's members
/// find their node by id, not by walking every record (at 100 nodes and 11,000
/// members, the walk was a large part of a round's own time in a profile).
pub type Nodes<'a> = HashMap<&'a str, &'a state_pb::NodeInfo>;

/// Indexes `records` by node id.
pub fn nodes(records: &[state_pb::NodeInfo]) -> Nodes<'_> {
    records.iter().map(|n| (n.node_id.as_str(), n)).collect()
}

/// Judges `c`'s members, records changes, and starts a replacement when one is due.
/// True when an operation was started (the round's decision waits for the next).
pub async fn round(
    shared: &Arc<Shared>,
    c: &state_pb::Cluster,
    nodes: &Nodes<'_>,
    ejected: &HashSet<String>,
    now: u64,
    settings: &Settings,
) -> bool {
    let heartbeat = settings.heartbeat.as_millis() as u64;
    let lost_after = shared.engine.limits.node_timeout.as_millis() as u64;
    let mut ids: Vec<&String> = c.members.keys().collect();
    ids.sort();
    // When each member's latest heartbeat reached this controller (not its node's
    // clock: `crate::arrivals`, seen for every cluster at the round's start); looked
    // up before the awaits below.
    let heard: Vec<u64> = {
        let seen = shared.heard.lock();
        ids.iter().map(|id| seen.at(id)).collect()
    };
    let mut due = Vec::new();
    let mut judged = 0usize;
    for (id, heard) in ids.into_iter().zip(heard) {
        let m = &c.members[id];
        let active = m.status == state_pb::MemberStatus::Active as i32;
        if !active && m.status != state_pb::MemberStatus::Stopped as i32 {
            continue;
        }
        judged += 1;
        let its_node = nodes.get(m.node_id.as_str()).copied();
        let node = health::node(its_node, now, heartbeat, lost_after);
        // A member never heard from is judged from when this controller first saw
        // it so (a restart of the controller starts that again), when its node has a
        // record: a node that reports itself but not the member does not run it. A
        // node without one (run without form-state) reports no member at all.
        let unheard = {
            let mut u = crate::controller::lock(&shared.unheard);
            if m.last_heartbeat_ms == 0 && its_node.is_some() {
                // Looked up before inserting: no copy of the id at every round.
                Some(match u.get(id) {
                    Some(since) => *since,
                    None => *u.entry(id.clone()).or_insert(now),
                })
            } else {
                u.remove(id);
                None
            }
        };
        let h = match &node {
            health::NodeHealth::Lost(why) => Health::Unhealthy(why.clone()),
            _ => health::judge(
                m,
                heard,
                now,
                heartbeat,
                !ejected.is_empty() && ejected.contains(&format!("{}/{id}", c.cluster_id)),
                unheard,
            ),
        };
        let recorded = m.health_history.last().map(|e| e.state);
        let health_changed =
            recorded != Some(h.state() as i32) && !(recorded.is_none() && h == Health::Healthy);
        let skipped = health::skipped(heard, now, heartbeat);
        if health_changed || skipped != m.heartbeats_skipped {
            record(shared, c, id, health_changed.then_some(&h), skipped, now).await;
        }
        match (&h, &node) {
            (Health::Unhealthy(why), health::NodeHealth::Lost(_)) => {
                due.push((id.clone(), why.clone()));
            }
            // Its node may be lost: wait until it is, or until it speaks again.
            (Health::Unhealthy(_), health::NodeHealth::Silent) => {}
            (Health::Unhealthy(why), health::NodeHealth::Up) => {
                let since = health::unhealthy_since(m).unwrap_or(now);
                if now.saturating_sub(since) >= settings.replace_after.as_millis() as u64 {
                    due.push((id.clone(), why.clone()));
                }
            }
            _ => {}
        }
    }
    let Some((victim, why)) = due.first().cloned() else {
        return false;
    };
    if due.len() == judged && judged > 1 {
        tracing::error!(cluster = %c.cluster_id, unhealthy = due.len(), "every instance looks unhealthy; replacing one, not all");
    }
    let req = Request {
        kind: types::OperationKind::ReplaceInstance as i32,
        instance_id: victim.clone(),
        drain_connections: false,
        reason: format!("{victim} unhealthy: {why}"),
        ..Default::default()
    };
    match shared.submit(&c.cluster_id, req, false).await {
        Ok(op) => {
            tracing::warn!(cluster = %c.cluster_id, instance = %victim, operation = %op.operation_id, reason = %why, "replacing an unhealthy instance");
            true
        }
        Err(e) => {
            tracing::warn!(cluster = %c.cluster_id, instance = %victim, error = %e.message(), "cannot replace an unhealthy instance");
            false
        }
    }
}

async fn record(
    shared: &Shared,
    c: &state_pb::Cluster,
    id: &str,
    h: Option<&Health>,
    skipped: u32,
    now: u64,
) {
    let req = state_pb::UpdateMemberRequest {
        cluster_id: c.cluster_id.clone(),
        instance_id: id.to_owned(),
        health: h.map(|h| state_pb::HealthEvent {
            state: h.state() as i32,
            reason: h.reason().to_owned(),
            at_ms: now,
        }),
        heartbeats_skipped: Some(skipped),
        ..Default::default()
    };
    match shared
        .engine
        .platform
        .state
        .clone()
        .update_member(req)
        .await
    {
        Ok(_) => {
            tracing::info!(cluster = %c.cluster_id, instance = id, health = ?h, "member health recorded")
        }
        Err(e) => {
            tracing::debug!(cluster = %c.cluster_id, instance = id, error = %e.message(), "cannot record health")
        }
    }
}
