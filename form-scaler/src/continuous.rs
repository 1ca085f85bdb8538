//! Continuous state sync (`state_sync: continuous`, docs/workload-contract.md): every
//! `interval_ms`, for each cluster this controller owns, each active member's own
//! writes since its recorded cursor are read and merged into every other active
//! member, all members at once. A member's cursor advances only when every other
//! member took its changes and the set of active members did not change meanwhile (a
//! member that became active during the round gets them in the next one), and is
//! recorded in form-state (the member's `state_sync`, at most every 2 s), so a
//! restarted or new owner resumes from there (carrying again at most the last 2 s of
//! changes, which merging ignores).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_runtime::shutdown::Shutdown;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::controller::Shared;
use crate::ops::record::now_ms;
use crate::ops::sync::{On, PumpError, carry, carry_keys, on_nodes, running};

/// A member's cursor is written to form-state at most this often (each round uses the
/// one kept here; a controller that starts over from an older recorded cursor only
/// carries some changes again, which merging ignores).
const RECORD_EVERY: Duration = Duration::from_secs(2);
/// How often the clusters in continuous mode are looked for (in the followed view,
/// `clusters.rs`: no call, unless the view is not in step).
const LIST_EVERY: Duration = Duration::from_millis(250);
/// Retry delay before the controller knows its peers.
const TICK: Duration = Duration::from_millis(20);
/// Interval when the setting says 0.
const DEFAULT_INTERVAL_MS: u32 = 1000;
/// Batch size when the setting says 0.
const DEFAULT_BATCH_BYTES: u32 = 1024 * 1024;

/// The continuous setting of `c`, if its mode is continuous.
fn setting(c: &state_pb::Cluster) -> Option<types::StateSyncContinuous> {
    match c.state_sync.as_ref().and_then(|s| s.mode.as_ref()) {
        Some(types::state_sync::Mode::Continuous(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Runs until shutdown. The clusters in continuous mode are listed every
/// `LIST_EVERY`; between two listings the loop sleeps until the next round is due,
/// and reads that cluster afresh (members and cursors) when it is.
pub async fn run(shared: Arc<Shared>, mut shutdown: Shutdown) {
    // Cluster -> when its next round is due.
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut cursors = Cursors::default();
    let mut listed_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if shared.peers.ready() && listed_at.is_none_or(|t| now >= t + LIST_EVERY) {
            let listed = shared.clusters.list(&shared.engine.platform.state).await;
            if let Ok(list) = listed {
                listed_at = Some(now);
                let mut seen = HashMap::new();
                for (id, c) in list.iter() {
                    if setting(c).is_some() && shared.peers.owns(id) {
                        let at = due.get(id).copied().unwrap_or(now);
                        seen.insert(id.clone(), at);
                    }
                }
                due = seen;
            }
        }
        let now = Instant::now();
        let ready: Vec<String> = due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            let Ok(c) = shared.engine.platform.cluster(&id).await else {
                due.remove(&id);
                continue;
            };
            let Some(s) = setting(&c) else {
                due.remove(&id);
                continue;
            };
            let interval = if s.interval_ms == 0 {
                DEFAULT_INTERVAL_MS
            } else {
                s.interval_ms
            };
            due.insert(id, now + Duration::from_millis(u64::from(interval)));
            round(&shared, &c, &s, &mut cursors).await;
        }
        let next_list = listed_at.map_or(Instant::now() + TICK, |t| t + LIST_EVERY);
        let wake = due
            .values()
            .copied()
            .min()
            .map_or(next_list, |d| d.min(next_list));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(1))) => {}
            _ = shutdown.requested() => return,
        }
    }
}

/// Where each member's changes were carried up to, and when that was last recorded in
/// form-state, by (cluster, instance).
#[derive(Debug, Default)]
struct Cursors(HashMap<(String, String), (String, Option<Instant>)>);

/// The members of `c` that take part in a round, by id: active, or draining (a drain
/// may be undone, and the member must not come back behind the others), and running
/// (a dead member must not hold up the others).
fn round_members<'a>(c: &'a state_pb::Cluster, running: &[String]) -> Vec<&'a state_pb::Member> {
    let mut v: Vec<&state_pb::Member> = c
        .members
        .values()
        .filter(|m| {
            (m.status == state_pb::MemberStatus::Active as i32
                || m.status == state_pb::MemberStatus::Draining as i32)
                && running.contains(&m.instance_id)
        })
        .collect();
    v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    v
}

/// One exchange among the active members of `c`.
async fn round(
    shared: &Shared,
    c: &state_pb::Cluster,
    s: &types::StateSyncContinuous,
    cursors: &mut Cursors,
) {
    let platform = &shared.engine.platform;
    let Ok(running) = running(platform, c).await else {
        return;
    };
    let active = round_members(c, &running);
    if active.len() < 2 {
        return;
    }
    let ids: Vec<String> = active.iter().map(|m| m.instance_id.clone()).collect();
    let Ok(placed) = on_nodes(platform, None, c, &ids).await else {
        return;
    };
    let batch = if s.batch_bytes == 0 {
        DEFAULT_BATCH_BYTES
    } else {
        s.batch_bytes
    };
    let mut set = JoinSet::new();
    for m in active {
        let from = m.instance_id.clone();
        let cursor = match cursors.0.get(&(c.cluster_id.clone(), from.clone())) {
            Some((c, _)) => c.clone(),
            None => m
                .state_sync
                .as_ref()
                .map(|s| s.cursor.clone())
                .unwrap_or_default(),
        };
        let Some(src) = placed.iter().find(|o| o.id == from).cloned() else {
            continue;
        };
        let others: Vec<On> = placed.iter().filter(|o| o.id != from).cloned().collect();
        let priority = s.priority_prefixes.clone();
        set.spawn(crate::fencing::scoped(async move {
            if !priority.is_empty() {
                // The keys that matter most first; the full pass below carries them
                // again (merging ignores them), and only its cursor is kept.
                if let Err(e) = carry_keys(&src, &cursor, &others, batch, true, &priority).await {
                    tracing::debug!(instance = %from, error = ?e, "priority pass failed");
                }
            }
            let r = carry(&src, &cursor, &others, batch, true).await;
            (from, cursor, r)
        }));
    }
    let mut results = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Ok(r) = done {
            results.push(r);
        }
    }
    // A member that became active while the round ran was cloned from a source that
    // may have got these changes after its last sync: the cursors stay, and the next
    // round carries the same changes to it too.
    match shared.engine.platform.cluster(&c.cluster_id).await {
        Ok(cl)
            if round_members(&cl, &running)
                .iter()
                .map(|m| &m.instance_id)
                .eq(ids.iter()) => {}
        _ => return,
    }
    let mut state = shared.engine.platform.state.clone();
    for (from, old, r) in results {
        match r {
            Ok(carried) => {
                metrics::counter!("form_scaler_state_sync_changes_total")
                    .increment(carried.changes);
                if carried.cursor == old {
                    continue;
                }
                let key = (c.cluster_id.clone(), from.clone());
                let recorded = cursors.0.get(&key).and_then(|(_, at)| *at);
                let record = recorded.is_none_or(|at| at.elapsed() >= RECORD_EVERY);
                let at = if record {
                    Some(Instant::now())
                } else {
                    recorded
                };
                cursors.0.insert(key.clone(), (carried.cursor.clone(), at));
                if !record {
                    continue;
                }
                let req = state_pb::UpdateMemberRequest {
                    cluster_id: c.cluster_id.clone(),
                    instance_id: from.clone(),
                    state_sync: Some(state_pb::MemberStateSync {
                        cursor: carried.cursor,
                        synced_at_ms: now_ms(),
                        changes_last_round: carried.changes,
                        writes_synced: carried.writes,
                    }),
                    ..Default::default()
                };
                if let Err(e) = state.update_member(req).await {
                    tracing::debug!(instance = %from, error = %e.message(), "cannot record the sync cursor; it is recorded again later");
                    if let Some(k) = cursors.0.get_mut(&key) {
                        k.1 = None;
                    }
                }
            }
            Err(PumpError::Unsupported(why)) => {
                tracing::debug!(instance = %from, %why, "no continuous sync");
            }
            Err(e) => {
                metrics::counter!("form_scaler_state_sync_failures_total").increment(1);
                tracing::warn!(cluster = %c.cluster_id, instance = %from, error = ?e, "continuous sync of a member failed; its cursor stays");
            }
        }
    }
    // Members of this cluster that left are forgotten.
    cursors
        .0
        .retain(|(cluster, id), _| *cluster != c.cluster_id || c.members.contains_key(id));
}
