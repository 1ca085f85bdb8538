//! The standby snapshot of a cluster (docs/standby.md). When its policy asks for one
//! (`standby_snapshot_seconds`), the cluster's owner keeps a snapshot of the template
//! no older than that, on the template's node and on one other node, recorded on the
//! cluster in form-state. A replacement that finds no member to clone from (every
//! member was on a lost node) is made from it. Taking one runs in the background of
//! the evaluation round, one at a time per cluster, under the cluster's fence; the
//! previous standby snapshot is deleted once the new one is recorded.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use form_proto::state::v1 as state_pb;
use form_proto::vmm::v1 as vmm_pb;

use crate::controller::Shared;
use crate::ops::engine::Engine;
use crate::ops::record::now_ms;
use crate::platform::OpError;

/// The clusters whose standby snapshot is being taken, and when an attempt last failed.
#[derive(Debug, Clone, Default)]
pub struct Taking(Arc<Mutex<TakingSets>>);

#[derive(Debug, Default)]
struct TakingSets {
    now: HashSet<String>,
    failed_at: HashMap<String, u64>,
    /// Per cluster, the (node, snapshot) copies of replaced standby snapshots whose
    /// delete failed (a node cut off or down for a moment): tried again at the
    /// evaluation rounds that follow ([`spawn_undeleted`]).
    undeleted: HashMap<String, Vec<(String, String)>>,
}

/// The most undeleted copies remembered per cluster (the oldest are left to the
/// sweep, and the cluster's deletion, beyond it).
const UNDELETED_MAX: usize = 64;

impl Taking {
    /// Whether `cluster`'s standby snapshot is being taken.
    pub fn contains(&self, cluster: &str) -> bool {
        self.lock().now.contains(cluster)
    }

    /// Marks `cluster` as taking one until the guard drops; `None` if it already is,
    /// or if an attempt failed less than `backoff_ms` before `now_ms` (a failing copy
    /// is not retried every round).
    fn start(&self, cluster: &str, now_ms: u64, backoff_ms: u64) -> Option<TakingGuard> {
        let mut sets = self.lock();
        if sets
            .failed_at
            .get(cluster)
            .is_some_and(|at| now_ms.saturating_sub(*at) < backoff_ms)
        {
            return None;
        }
        sets.now.insert(cluster.to_owned()).then(|| TakingGuard {
            set: self.clone(),
            cluster: cluster.to_owned(),
        })
    }

    /// Records a failed attempt for `cluster` at `now_ms` (or clears it).
    fn failed(&self, cluster: &str, at_ms: Option<u64>) {
        let mut sets = self.lock();
        match at_ms {
            Some(at) => sets.failed_at.insert(cluster.to_owned(), at),
            None => sets.failed_at.remove(cluster),
        };
    }

    /// Remembers copies of `cluster`'s replaced standby snapshots that were not
    /// deleted.
    fn undeleted(&self, cluster: &str, copies: Vec<(String, String)>) {
        if copies.is_empty() {
            return;
        }
        let mut sets = self.lock();
        let kept = sets.undeleted.entry(cluster.to_owned()).or_default();
        for c in copies {
            if !kept.contains(&c) {
                kept.push(c);
            }
        }
        // The oldest first out.
        let over = kept.len().saturating_sub(UNDELETED_MAX);
        kept.drain(..over);
    }

    /// Takes the copies of `cluster` left undeleted, the oldest first.
    fn take_undeleted(&self, cluster: &str) -> Vec<(String, String)> {
        self.lock().undeleted.remove(cluster).unwrap_or_default()
    }

    /// Whether copies of `cluster` wait to be deleted.
    fn has_undeleted(&self, cluster: &str) -> bool {
        self.lock().undeleted.contains_key(cluster)
    }

    /// Forgets what it remembers of clusters not in `alive` (deleted clusters: their
    /// deletion deletes their snapshots).
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        let mut sets = self.lock();
        sets.failed_at.retain(|c, _| alive(c));
        sets.undeleted.retain(|c, _| alive(c));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TakingSets> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct TakingGuard {
    set: Taking,
    cluster: String,
}

impl Drop for TakingGuard {
    fn drop(&mut self) {
        self.set.lock().now.remove(&self.cluster);
    }
}

/// The interval of `c`'s standby snapshot in ms (0: none kept).
fn interval_ms(c: &state_pb::Cluster) -> u64 {
    c.scaling_policy
        .as_ref()
        .map_or(0, |p| u64::from(p.standby_snapshot_seconds) * 1000)
}

/// Whether `c`'s standby snapshot is to be taken (or dropped) at `now`: none yet, older
/// than the interval, of another instance than the template, or no longer wanted.
pub fn due(c: &state_pb::Cluster, now: u64) -> bool {
    let every = interval_ms(c);
    match &c.standby {
        None => every > 0,
        Some(_) if every == 0 => true,
        Some(s) => {
            now.saturating_sub(s.taken_at_ms) >= every
                || s.source_instance_id != c.template_instance_id
        }
    }
}

/// Starts taking `c`'s standby snapshot in the background when it is due and not
/// being taken already.
pub fn spawn_if_due(shared: &Arc<Shared>, c: &state_pb::Cluster, now: u64) {
    if c.template_instance_id.is_empty() || !due(c, now) {
        spawn_undeleted(shared, &c.cluster_id, now);
        return;
    }
    // A failed attempt is tried again after the interval (10 s at least).
    let backoff = interval_ms(c).max(10_000);
    let Some(guard) = shared
        .engine
        .taking_standby
        .start(&c.cluster_id, now, backoff)
    else {
        return;
    };
    let shared = shared.clone();
    let cluster = c.cluster_id.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let Some(kept) = fenced(&shared, &cluster, keep(&shared, &cluster)).await else {
            return;
        };
        let failed = kept.as_ref().err().map(|_| now_ms());
        shared.engine.taking_standby.failed(&cluster, failed);
        match kept {
            Ok(Some(s)) => {
                metrics::counter!("form_scaler_standby_snapshots_total").increment(1);
                tracing::info!(%cluster, snapshot = %s.snapshot_id, nodes = ?s.node_ids, "standby snapshot kept");
            }
            Ok(None) => {}
            Err(err) => {
                metrics::counter!("form_scaler_standby_snapshot_failures_total").increment(1);
                tracing::warn!(%cluster, error = %err, "standby snapshot not taken");
            }
        }
    });
}

/// Between standby rounds (none may come: the policy dropped its standby), tries again
/// in the background the deletes of `cluster`'s replaced standby copies that failed.
fn spawn_undeleted(shared: &Arc<Shared>, cluster: &str, now: u64) {
    let taking = &shared.engine.taking_standby;
    if !taking.has_undeleted(cluster) {
        return;
    }
    let Some(guard) = taking.start(cluster, now, 0) else {
        return;
    };
    let (shared, cluster) = (shared.clone(), cluster.to_owned());
    tokio::spawn(async move {
        let _guard = guard;
        fenced(&shared, &cluster, delete_undeleted(&shared, &cluster)).await;
    });
}

/// Runs `work` under `cluster`'s fence, claimed for it; `None` when an operation of
/// the cluster runs (another controller's keeps its fence: not claimed from under it)
/// or the fence cannot be claimed (logged).
async fn fenced<T>(
    shared: &Shared,
    cluster: &str,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    if shared.busy(cluster).await {
        return None;
    }
    let fence = match shared
        .epochs
        .hold(&shared.id, &shared.engine.platform.state, cluster)
        .await
    {
        Ok(f) => f,
        Err(err) => {
            tracing::warn!(%cluster, error = %err, "standby snapshot: cannot claim the cluster's fence");
            return None;
        }
    };
    Some(crate::fencing::with(fence, work).await)
}

/// Takes, copies and records a new standby snapshot of `cluster` and deletes the one
/// it replaces; or, when the policy no longer asks for one, deletes and clears it.
async fn keep(
    shared: &Shared,
    cluster: &str,
) -> Result<Option<state_pb::StandbySnapshot>, OpError> {
    let e = &shared.engine;
    delete_undeleted(shared, cluster).await;
    let c = e.platform.cluster(cluster).await?;
    let old = c.standby.clone();
    if interval_ms(&c) == 0 {
        if let Some(old) = old {
            record(e, cluster, state_pb::StandbySnapshot::default()).await?;
            let left = delete(e, &old).await;
            e.taking_standby.undeleted(cluster, left);
        }
        return Ok(None);
    }
    let source = c
        .members
        .get(&c.template_instance_id)
        .filter(|m| m.status == state_pb::MemberStatus::Active as i32)
        .ok_or_else(|| {
            OpError::new(format!(
                "the template {} is not an active member",
                c.template_instance_id
            ))
        })?;
    if let Some(why) = e
        .platform
        .lost(&source.node_id, e.limits.node_timeout)
        .await
    {
        return Err(OpError::new(format!("the template's {why}")));
    }
    let info = e
        .platform
        .vmm_on(&source.node_id)
        .await?
        .snapshot(vmm_pb::SnapshotRequest {
            instance_id: source.instance_id.clone(),
            resume: Some(true),
        })
        .await
        .map_err(|s| OpError::rpc(format!("snapshot of {}", source.instance_id), &s))?
        .into_inner();
    let mut taken = state_pb::StandbySnapshot {
        snapshot_id: info.snapshot_id.clone(),
        source_instance_id: source.instance_id.clone(),
        node_ids: vec![source.node_id.clone()],
        taken_at_ms: now_ms(),
        state_cursor: info.state_cursor.clone(),
    };
    let selector = c.node_selector.as_ref().map(|s| &s.labels);
    let copied = match other_node(e, &source.node_id, old.as_ref(), selector).await {
        Some(other) => {
            taken.node_ids.push(other.clone());
            copy(e, &source.node_id, &other, &info).await
        }
        None => {
            tracing::warn!(%cluster, "standby snapshot on one node only: no other node takes it");
            Ok(())
        }
    };
    if let Err(err) = match copied {
        Ok(()) => record(e, cluster, taken.clone()).await,
        Err(err) => Err(err),
    } {
        // A record whose answer was lost may have landed: then it is the standby, and
        // stays. Unknown (form-state unreachable): left for a later round, which
        // never deletes the recorded one.
        match e.platform.cluster(cluster).await {
            Ok(now) if now.standby.as_ref().map(|s| &s.snapshot_id) == Some(&taken.snapshot_id) => {
                tracing::info!(%cluster, snapshot = %taken.snapshot_id, error = %err, "standby snapshot recorded after all");
            }
            Ok(_) => {
                let left = delete(e, &taken).await;
                e.taking_standby.undeleted(cluster, left);
                return Err(err);
            }
            Err(_) => {
                let all = taken
                    .node_ids
                    .iter()
                    .map(|n| (n.clone(), taken.snapshot_id.clone()));
                e.taking_standby.undeleted(cluster, all.collect());
                return Err(err);
            }
        }
    }
    // An operation started meanwhile may be reading the previous one (a replacement
    // made from it): then it is left to a later sweep.
    if shared.busy(cluster).await {
        return Ok(Some(taken));
    }
    if let Some(old) = old
        && old.snapshot_id != taken.snapshot_id
    {
        let left = delete(e, &old).await;
        e.taking_standby.undeleted(cluster, left);
    }
    // The standby's nodes, and those of the members: an operation's snapshot is
    // taken on a member's node and pulled to its clones' nodes, so what a crash left
    // behind is on one of these (a node that holds neither is not listed).
    // A lost member node is left out: the call would only wait for it.
    let mut nodes: Vec<&String> = taken.node_ids.iter().collect();
    for m in c.members.values() {
        if !nodes.contains(&&m.node_id)
            && !m.node_id.is_empty()
            && e.platform
                .lost(&m.node_id, e.limits.node_timeout)
                .await
                .is_none()
        {
            nodes.push(&m.node_id);
        }
    }
    for node in nodes {
        if let Err(err) = sweep(shared, cluster, node, &taken).await {
            tracing::warn!(%cluster, %node, error = %err, "old snapshots not swept");
        }
    }
    Ok(Some(taken))
}

/// Slack for the clocks of the controller and a vmm node.
const CLOCK_SLACK_MS: u64 = 60_000;

/// Deletes on `node` the snapshots of `cluster` older than `kept` (by more than the
/// clock slack) when no operation of the cluster runs: standby snapshots that a lost
/// node kept while a newer one was taken, and what a crash left behind. An operation
/// started since has a newer snapshot.
async fn sweep(
    shared: &Shared,
    cluster: &str,
    node: &str,
    kept: &state_pb::StandbySnapshot,
) -> Result<(), OpError> {
    let mut vmm = shared.engine.platform.vmm_on(node).await?;
    let cutoff = kept.taken_at_ms.saturating_sub(CLOCK_SLACK_MS);
    for s in crate::ops::create::list_snapshots(&mut vmm, "").await? {
        if s.cluster_id != cluster
            || s.snapshot_id == kept.snapshot_id
            || s.created_at_ms >= cutoff
            || shared.running(cluster).is_some()
        {
            continue;
        }
        crate::ops::create::delete_snapshot(&mut vmm, &s.snapshot_id).await?;
        tracing::info!(%cluster, %node, snapshot = %s.snapshot_id, "old snapshot swept");
    }
    Ok(())
}

/// Records `s` as `cluster`'s standby snapshot (an empty one clears it).
async fn record(e: &Engine, cluster: &str, s: state_pb::StandbySnapshot) -> Result<(), OpError> {
    e.platform
        .put_cluster(
            state_pb::PutClusterRequest {
                cluster_id: cluster.to_owned(),
                standby: Some(s),
                ..Default::default()
            },
            format!("recording the standby snapshot of {cluster}"),
        )
        .await
}

/// The node the copy goes to: not the source's, neither cordoned nor lost, with the
/// labels of the cluster's node selector; the one the previous standby snapshot used
/// when it still may, else the first by id.
async fn other_node(
    e: &Engine,
    source: &str,
    old: Option<&state_pb::StandbySnapshot>,
    selector: Option<&std::collections::HashMap<String, String>>,
) -> Option<String> {
    let p = &e.platform;
    let records = p.fleet.records(&p.state, false).await.ok()?;
    let lost_after = e.limits.node_timeout.as_millis() as u64;
    let now = now_ms();
    let mut fit: Vec<String> = records
        .iter()
        .filter(|r| r.node_id != source && !r.cordoned)
        .filter(|r| selector.is_none_or(|sel| sel.iter().all(|(k, v)| r.labels.get(k) == Some(v))))
        .filter(|r| !crate::ops::place::node(r, now, lost_after).lost)
        .map(|r| r.node_id.clone())
        .collect();
    fit.sort();
    let before = old.and_then(|o| o.node_ids.iter().find(|n| fit.contains(n)));
    before.cloned().or_else(|| fit.into_iter().next())
}

/// Pulls snapshot `info` from node `from` to node `to`.
async fn copy(
    e: &Engine,
    from: &str,
    to: &str,
    info: &vmm_pb::SnapshotInfo,
) -> Result<(), OpError> {
    let p = &e.platform;
    let from_address = p.fleet.address(&p.state, from).await?;
    p.vmm_on(to)
        .await?
        .pull_snapshot(vmm_pb::PullSnapshotRequest {
            snapshot_id: info.snapshot_id.clone(),
            from_address,
            expected_files: info.files.clone(),
            max_bytes_per_second: 0,
        })
        .await
        .map(|_| ())
        .map_err(|s| {
            OpError::rpc(
                format!("copying snapshot {} to node {to}", info.snapshot_id),
                &s,
            )
        })
}

/// Deletes standby snapshot `s` on every node that holds it; returns the (node,
/// snapshot) copies it could not delete now (a node lost, cut off or down), logged.
pub async fn delete(e: &Engine, s: &state_pb::StandbySnapshot) -> Vec<(String, String)> {
    let mut left = Vec::new();
    for node in &s.node_ids {
        if let Err(err) = delete_on(e, node, &s.snapshot_id).await {
            tracing::warn!(snapshot = %s.snapshot_id, %node, error = %err, "standby snapshot not deleted");
            left.push((node.clone(), s.snapshot_id.clone()));
        }
    }
    left
}

/// Tries again the deletes of `cluster`'s replaced standby snapshots that failed,
/// unless an operation of the cluster runs (it may be reading one: a replacement made
/// from it); what fails again is kept for the next round.
async fn delete_undeleted(shared: &Shared, cluster: &str) {
    let e = &shared.engine;
    let copies = e.taking_standby.take_undeleted(cluster);
    if copies.is_empty() {
        return;
    }
    if shared.busy(cluster).await {
        e.taking_standby
            .undeleted(cluster, copies.into_iter().collect());
        return;
    }
    // Never the one recorded now (a record whose answer was lost may have kept it).
    let recorded = match e.platform.cluster(cluster).await {
        Ok(c) => c.standby.map(|s| s.snapshot_id),
        Err(_) => {
            e.taking_standby
                .undeleted(cluster, copies.into_iter().collect());
            return;
        }
    };
    let mut left = Vec::new();
    for (node, snapshot) in copies {
        if recorded.as_deref() == Some(snapshot.as_str()) {
            continue;
        }
        match delete_on(e, &node, &snapshot).await {
            Ok(()) => {
                tracing::info!(%cluster, %node, %snapshot, "replaced standby snapshot deleted at last")
            }
            Err(_) => left.push((node, snapshot)),
        }
    }
    e.taking_standby.undeleted(cluster, left);
}

/// Deletes `snapshot` on `node` (done when it is not there), unless the node is lost.
async fn delete_on(e: &Engine, node: &str, snapshot: &str) -> Result<(), OpError> {
    if let Some(why) = e.platform.lost(node, e.limits.node_timeout).await {
        return Err(OpError::new(why));
    }
    let mut vmm = e.platform.vmm_on(node).await?;
    crate::ops::create::delete_snapshot(&mut vmm, snapshot).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(every: u32, standby: Option<(&str, u64)>) -> state_pb::Cluster {
        state_pb::Cluster {
            cluster_id: "web".into(),
            template_instance_id: "web-0".into(),
            scaling_policy: Some(form_proto::types::v1::ScalingPolicy {
                standby_snapshot_seconds: every,
                ..form_proto::default_scaling_policy()
            }),
            standby: standby.map(|(source, at)| state_pb::StandbySnapshot {
                snapshot_id: "snap-1".into(),
                source_instance_id: source.into(),
                node_ids: vec!["n1".into(), "n2".into()],
                taken_at_ms: at,
                state_cursor: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_standby_snapshot_is_due_when_missing_old_of_another_template_or_unwanted() {
        let now = 100_000;
        for (c, due_now, why) in [
            (cluster(0, None), false, "none wanted, none kept"),
            (cluster(10, None), true, "wanted, none kept"),
            (cluster(10, Some(("web-0", 95_000))), false, "5 s old of 10"),
            (cluster(10, Some(("web-0", 90_000))), true, "10 s old of 10"),
            (
                cluster(10, Some(("web-9", 99_000))),
                true,
                "of a former template",
            ),
            (
                cluster(0, Some(("web-0", 99_000))),
                true,
                "kept, no longer wanted",
            ),
        ] {
            assert_eq!(due(&c, now), due_now, "{why}");
        }
        let mut unplanned = cluster(10, None);
        unplanned.scaling_policy = None;
        assert!(!due(&unplanned, now), "no policy: none");
    }

    #[test]
    fn one_taking_at_a_time_per_cluster_and_a_failure_waits_its_backoff() {
        let t = Taking::default();
        let g = t.start("web", 0, 10_000).expect("first");
        assert!(t.start("web", 0, 10_000).is_none() && t.contains("web"));
        assert!(t.start("api", 0, 10_000).is_some(), "another cluster");
        drop(g);
        assert!(!t.contains("web") && t.start("web", 0, 10_000).is_some());
        t.failed("web", Some(1_000));
        assert!(
            t.start("web", 10_999, 10_000).is_none(),
            "within the backoff"
        );
        assert!(t.start("web", 11_000, 10_000).is_some(), "after it");
        t.failed("web", None);
        assert!(
            t.start("web", 1_001, 10_000).is_some(),
            "a success clears it"
        );
    }
}
