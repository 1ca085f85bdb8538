//! Steps that carry application state through the workload state contract
//! (docs/workload-contract.md): bring new instances up to date with their source, and
//! hand a drained victim's changes to the instances that remain. Changes travel as the
//! workload's own batches, read from one instance and merged into others: by the vmm
//! node when they all run on one node (`CopyChanges`), through the controller when some
//! run on another (`ReadChanges` on the source's node, `MergeChanges` on each target's).
//! Merging is idempotent, so a step run again after a crash only repeats merges that
//! change nothing.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use tokio::task::JoinSet;
use tonic::Code;

use super::Step;
use super::engine::Engine;
use super::place::node_of;
use crate::fleet::VmmClient;
use crate::platform::{OpError, Platform};

/// Longest a copy of one instance's changes may take (a workload that never says it
/// is done must not hold the operation for ever).
const COPY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// Batch size of on-scale syncs and handoffs.
pub const BATCH_BYTES: u32 = 4 * 1024 * 1024;

/// Whether the cluster's instances share state at scaling operations: every mode but
/// `none` (unset means on_scale).
pub fn enabled(c: &state_pb::Cluster) -> bool {
    !matches!(
        c.state_sync.as_ref().and_then(|s| s.mode.as_ref()),
        Some(types::state_sync::Mode::None(_))
    )
}

/// An instance, and a client of the node that runs it.
#[derive(Debug, Clone)]
pub struct On {
    /// The instance.
    pub id: String,
    /// Its node ("" for the `--vmm` node).
    pub node: String,
    /// A client of that node.
    pub vmm: VmmClient,
}

/// `ids` of `cluster`, each with its node: where `op` placed it, else where its member
/// runs.
pub async fn on_nodes(
    p: &Platform,
    op: Option<&types::Operation>,
    cluster: &state_pb::Cluster,
    ids: &[String],
) -> Result<Vec<On>, OpError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let node = match op {
            Some(op) => node_of(op, Some(cluster), id),
            None => cluster
                .members
                .get(id)
                .map(|m| m.node_id.clone())
                .unwrap_or_default(),
        };
        let vmm = p.vmm_on(&node).await?;
        out.push(On {
            id: id.clone(),
            node,
            vmm,
        });
    }
    Ok(out)
}

/// Longest a node may take to list its instances: one that does not answer (stopped,
/// cut off) has none running as far as a sync is concerned.
const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The members of `cluster` that run now, asked of each node its members are on. A
/// node that does not answer within `LIST_TIMEOUT` counts as running none of them.
pub async fn running(p: &Platform, cluster: &state_pb::Cluster) -> Result<Vec<String>, OpError> {
    let mut nodes: Vec<&str> = cluster
        .members
        .values()
        .map(|m| m.node_id.as_str())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut out = Vec::new();
    for node in nodes {
        let req = vmm_pb::ListInstancesRequest {
            cluster_id: cluster.cluster_id.clone(),
        };
        let listed =
            tokio::time::timeout(LIST_TIMEOUT, p.vmm_on(node).await?.list_instances(req)).await;
        let listed = match listed {
            Ok(Ok(l)) => l.into_inner(),
            Ok(Err(s)) => {
                tracing::warn!(node, error = %s.message(), "a node cannot list its instances; none of them counts as running");
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    node,
                    "a node does not list its instances within {LIST_TIMEOUT:?}; none of them counts as running"
                );
                continue;
            }
        };
        out.extend(
            listed
                .instances
                .into_iter()
                .filter(|i| i.status == vmm_pb::InstanceStatus::Running as i32)
                .map(|i| i.instance_id),
        );
    }
    Ok(out)
}

/// Runs `step` (one of this module's).
pub async fn forward(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::SyncClones | Step::FinalSyncClones => sync_clones(e, op).await,
        Step::HandoffVictims => handoff(e, op).await,
        _ => Err(OpError::new(format!("{} is not a state step", step.name()))),
    }
}

/// Why changes could not be carried.
#[derive(Debug)]
pub enum PumpError {
    /// The workload does not implement the contract.
    Unsupported(String),
    /// The instance read from does not run.
    Gone(String),
    /// Anything else: the caller rolls back.
    Failed(OpError),
}

/// What a pump carried.
#[derive(Debug, Default)]
pub struct Carried {
    /// Where `from`'s history was read up to.
    pub cursor: String,
    /// Changes read (and merged into every target).
    pub changes: u64,
    /// Bytes of the batches read.
    pub bytes: u64,
    /// `from`'s own writes counted when its last batch was made.
    pub writes: u64,
}

async fn pump(
    e: &Engine,
    op: &types::Operation,
    cluster: &state_pb::Cluster,
    from: &str,
    since: &str,
    to: &[String],
) -> Result<Carried, PumpError> {
    let from = on_nodes(
        &e.platform,
        Some(op),
        cluster,
        std::slice::from_ref(&from.to_owned()),
    )
    .await
    .map_err(PumpError::Failed)?;
    let to = on_nodes(&e.platform, Some(op), cluster, to)
        .await
        .map_err(PumpError::Failed)?;
    carry(&from[0], since, &to, BATCH_BYTES, false).await
}

/// Reads `from`'s changes after `since` (with `own`, only its own writes) in batches
/// of `batch_bytes` and merges each batch into every instance of `to`, until `from`
/// has nothing more. When all run on one node, the node does it (`CopyChanges`: the
/// batches do not travel through the controller; the node reads the next batch while
/// the last merges); otherwise the controller relays each batch from `from`'s node to
/// the targets' nodes. Either reads from the start when `from` no longer knows the
/// cursor. The cursor returned is that of the last batch every target merged.
pub async fn carry(
    from: &On,
    since: &str,
    to: &[On],
    batch_bytes: u32,
    own: bool,
) -> Result<Carried, PumpError> {
    carry_keys(from, since, to, batch_bytes, own, &[]).await
}

/// [`carry`] of the keys with one of `prefixes` only (none: every change). The cursor
/// it returns is a preview's: it must not be kept as `from`'s.
pub async fn carry_keys(
    from: &On,
    since: &str,
    to: &[On],
    batch_bytes: u32,
    own: bool,
    prefixes: &[String],
) -> Result<Carried, PumpError> {
    let carried = if to.iter().all(|t| t.node == from.node) {
        copy_on_node(from, since, to, batch_bytes, own, prefixes).await
    } else {
        relay(from, since, to, batch_bytes, own, prefixes).await
    };
    carried.map_err(|s| match s.code() {
        Code::Unimplemented => PumpError::Unsupported(s.message().to_owned()),
        Code::FailedPrecondition | Code::NotFound => PumpError::Gone(s.message().to_owned()),
        _ => PumpError::Failed(OpError::rpc(
            format!("carrying the changes of {}", from.id),
            &s,
        )),
    })
}

/// [`carry_keys`] by `from`'s node.
async fn copy_on_node(
    from: &On,
    since: &str,
    to: &[On],
    batch_bytes: u32,
    own: bool,
    prefixes: &[String],
) -> Result<Carried, tonic::Status> {
    let req = vmm_pb::CopyChangesRequest {
        from_instance_id: from.id.clone(),
        to_instance_ids: to.iter().map(|t| t.id.clone()).collect(),
        since: since.to_owned(),
        max_bytes: batch_bytes,
        own,
        prefixes: prefixes.to_vec(),
    };
    let deadline = tokio::time::Instant::now() + COPY_DEADLINE;
    let r = by(deadline, from.vmm.clone().copy_changes(req)).await?;
    Ok(Carried {
        cursor: r.next_cursor,
        changes: r.changes,
        bytes: r.bytes,
        writes: r.writes,
    })
}

/// The answer of `call`, or `DEADLINE_EXCEEDED` when it has none by `deadline` (a
/// workload that never says it is done must not hold an operation for ever).
async fn by<T>(
    deadline: tokio::time::Instant,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout_at(deadline, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no end within {COPY_DEADLINE:?}"
        ))),
    }
}

/// [`carry_keys`] through the controller: each batch read on `from`'s node and merged
/// on every target's node at once, the next read after every target merged.
async fn relay(
    from: &On,
    since: &str,
    to: &[On],
    batch_bytes: u32,
    own: bool,
    prefixes: &[String],
) -> Result<Carried, tonic::Status> {
    let deadline = tokio::time::Instant::now() + COPY_DEADLINE;
    let mut out = Carried {
        cursor: since.to_owned(),
        ..Default::default()
    };
    let mut restarted = false;
    loop {
        let req = vmm_pb::ReadChangesRequest {
            instance_id: from.id.clone(),
            since: out.cursor.clone(),
            max_bytes: batch_bytes,
            own,
            prefixes: prefixes.to_vec(),
        };
        let b = match by(deadline, from.vmm.clone().read_changes(req)).await {
            Ok(b) => b,
            // A cursor the workload no longer knows: everything again (merging what a
            // target has changes nothing).
            Err(s) if s.code() == Code::OutOfRange && !restarted && !out.cursor.is_empty() => {
                restarted = true;
                out.cursor.clear();
                continue;
            }
            Err(s) => return Err(s),
        };
        if b.changes > 0 {
            let batch = std::sync::Arc::new(b.batch.clone());
            let mut set = JoinSet::new();
            for t in to.iter().cloned() {
                let batch = batch.clone();
                set.spawn(crate::fencing::scoped(async move {
                    let req = vmm_pb::MergeChangesRequest {
                        instance_id: t.id.clone(),
                        batch: batch.as_ref().clone(),
                    };
                    t.vmm.clone().merge_changes(req).await.map_err(|s| {
                        tonic::Status::aborted(format!(
                            "merging into {} on node {}: {} ({:?})",
                            t.id,
                            t.node,
                            s.message(),
                            s.code()
                        ))
                    })
                }));
            }
            while let Some(r) = set.join_next().await {
                r.map_err(|j| tonic::Status::internal(format!("a merge task failed: {j}")))??;
            }
        }
        out.changes += b.changes;
        out.bytes += b.batch.len() as u64;
        out.cursor = b.next_cursor;
        out.writes = b.writes;
        if !b.more {
            return Ok(out);
        }
    }
}

/// The undo of `activate_members`: new instances that served may have taken writes.
/// They are drained and everything they hold is merged into the running members that
/// stay, before a later undo removes and deletes them. When that cannot be done the
/// undo fails (retried, then the rollback is suspended and resumed later): an instance
/// holding writes is never deleted.
pub async fn give_back(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    if !enabled(&cluster) {
        return Ok(());
    }
    let served: Vec<String> = op
        .new_instances
        .iter()
        .filter(|id| {
            cluster.members.get(*id).is_some_and(|m| {
                m.status == state_pb::MemberStatus::Active as i32
                    || m.status == state_pb::MemberStatus::Draining as i32
            })
        })
        .cloned()
        .collect();
    if served.is_empty() {
        return Ok(());
    }
    let running = running(&e.platform, &cluster).await?;
    let stay: Vec<String> = cluster
        .members
        .values()
        .filter(|m| {
            !op.new_instances.contains(&m.instance_id)
                && m.status == state_pb::MemberStatus::Active as i32
                && running.contains(&m.instance_id)
        })
        .map(|m| m.instance_id.clone())
        .collect();
    if stay.is_empty() {
        // They keep serving: draining them would leave nothing that serves.
        return Err(OpError::new(format!(
            "no running member stays to take the changes of {served:?}; they are kept, serving, until one does"
        )));
    }
    let notes = super::remove::drain_members(e, op, &served, false).await?;
    super::remove::add_notes(op, notes);
    for new in &served {
        match pump(e, op, &cluster, new, "", &stay).await {
            Ok(c) => {
                tracing::info!(operation = %op.operation_id, instance = %new, changes = c.changes, "a new instance's changes handed back before its removal");
            }
            // Nothing can be read: no contract, or the instance does not run any more.
            Err(PumpError::Unsupported(_) | PumpError::Gone(_)) => {}
            Err(PumpError::Failed(err)) => {
                return Err(OpError::new(format!(
                    "handing back the changes of {new} failed: {err}"
                )));
            }
        }
    }
    Ok(())
}

/// Victims listed by name at most; the operation record must stay small (form-state
/// takes 16 KiB per value).
const LISTED: usize = 16;
/// Longest entry kept.
const ENTRY: usize = 300;

/// `lost` cut to [`LISTED`] entries of at most [`ENTRY`] bytes, the rest counted.
fn bounded(lost: Vec<String>) -> Vec<String> {
    let n = lost.len();
    let mut out: Vec<String> = lost
        .into_iter()
        .take(LISTED)
        .map(|mut l| {
            if l.len() > ENTRY {
                l.truncate(l.floor_char_boundary(ENTRY));
                l.push_str("...");
            }
            l
        })
        .collect();
    if n > LISTED {
        out.push(format!(
            "and {} more victims, for the same reasons",
            n - LISTED
        ));
    }
    out
}

fn transfer(op: &mut types::Operation) -> &mut types::StateTransfer {
    op.state_transfer.get_or_insert_with(Default::default)
}

/// Brings the new instances up to date with their source: every change the source made
/// after the cursor its snapshot recorded (then after the last sync's cursor).
async fn sync_clones(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() || op.snapshot_id.is_empty() {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    if !op.snapshot_node_id.is_empty() {
        // Made from the standby snapshot: its source's node is lost.
        let age = cluster
            .standby
            .as_ref()
            .filter(|s| s.snapshot_id == op.snapshot_id)
            // Against the request, not now: both sync steps write the same note.
            .map(|s| {
                format!(
                    ", taken {} s before the request",
                    op.created_at_ms.saturating_sub(s.taken_at_ms) / 1000
                )
            })
            .unwrap_or_default();
        super::remove::add_notes(
            op,
            vec![format!(
                "made from the standby snapshot {} of {}{age}: what the source wrote after it is lost",
                op.snapshot_id, op.source_instance_id
            )],
        );
        return Ok(());
    }
    if !enabled(&cluster) {
        return Ok(());
    }
    if op.state_cursor.is_empty() {
        // The snapshot recorded no cursor: the workload has no change history.
        transfer(op).contract = "unsupported".into();
        return Ok(());
    }
    let source = op.source_instance_id.clone();
    let (since, to) = (op.state_cursor.clone(), op.new_instances.clone());
    match pump(e, op, &cluster, &source, &since, &to).await {
        Ok(c) => {
            let t = transfer(op);
            t.contract = "supported".into();
            t.changes += c.changes;
            t.bytes += c.bytes;
            op.state_cursor = c.cursor;
            tracing::info!(operation = %op.operation_id, source = %source, changes = c.changes, "clones synced with their source");
            Ok(())
        }
        Err(PumpError::Unsupported(why)) => {
            transfer(op).contract = "unsupported".into();
            tracing::info!(operation = %op.operation_id, %why, "no state sync");
            Ok(())
        }
        Err(PumpError::Gone(why)) => Err(OpError::new(format!(
            "the source {source} cannot give its changes: {why}"
        ))),
        Err(PumpError::Failed(e)) => Err(e),
    }
}

/// The active members that stay: those of `cluster` that are not `op`'s victims.
fn survivors(cluster: &state_pb::Cluster, op: &types::Operation) -> Vec<String> {
    cluster
        .members
        .values()
        .filter(|m| {
            !op.victims.contains(&m.instance_id)
                && m.status == state_pb::MemberStatus::Active as i32
        })
        .map(|m| m.instance_id.clone())
        .collect()
}

/// Carries what each handed-off victim took after its handoff (before it is removed):
/// the drain keeps the balancer's requests off a victim, but not a client that reaches
/// the instance itself, nor anything the workload writes on its own. Each one found is
/// noted on the operation (and logged): a victim should take nothing after its drain.
/// A victim that cannot be read now (it stopped) is noted too; it does not hold the
/// removal up: what its handoff carried is all there is.
pub async fn carry_late(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    let cursors = match &op.state_transfer {
        Some(t) if !t.handoff_cursors.is_empty() => t.handoff_cursors.clone(),
        _ => return Ok(()),
    };
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    let to = survivors(&cluster, op);
    if to.is_empty() {
        return Ok(());
    }
    let mut notes = Vec::new();
    let mut victims: Vec<&String> = cursors.keys().collect();
    victims.sort();
    for victim in victims {
        let since = &cursors[victim];
        // A victim whose node was lost since its handoff cannot be asked (and is not
        // waited for).
        let node = node_of(op, Some(&cluster), victim);
        let late = match e.platform.lost(&node, e.limits.node_timeout).await {
            Some(why) => Err(PumpError::Gone(why)),
            None => pump(e, op, &cluster, victim, since, &to).await,
        };
        match late {
            Ok(c) if c.changes == 0 => {}
            Ok(c) => {
                tracing::warn!(operation = %op.operation_id, victim = %victim, changes = c.changes, "a victim took changes after its handoff; carried them too");
                notes.push(format!(
                    "{victim} took {} changes after its handoff (not through the balancer: it was drained); they were carried to the members that stay",
                    c.changes
                ));
                let t = transfer(op);
                t.changes += c.changes;
                t.bytes += c.bytes;
                t.handoff_cursors.insert(victim.clone(), c.cursor);
            }
            Err(err) => {
                let why = match err {
                    PumpError::Gone(w) | PumpError::Unsupported(w) => w,
                    PumpError::Failed(e) => e.message,
                };
                tracing::warn!(operation = %op.operation_id, victim = %victim, error = %why, "cannot look for changes after a victim's handoff");
                notes.push(format!(
                    "{victim}: could not look for changes after its handoff ({why}); what the handoff carried is kept"
                ));
            }
        }
    }
    super::remove::add_notes(op, notes);
    Ok(())
}

/// Hands each victim's changes to the instances that remain. A victim that answers
/// but refuses, or a survivor that refuses, fails the step (the operation rolls back
/// and the victim serves again); a victim that does not run any more, or a workload
/// without the contract, is recorded as not handed off.
async fn handoff(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    if op.victims.is_empty() {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    if !enabled(&cluster) {
        let lost = op
            .victims
            .iter()
            .map(|v| format!("{v}: state_sync is none; its writes are lost"))
            .collect();
        transfer(op).not_handed_off = bounded(lost);
        return Ok(());
    }
    let refuse = cluster
        .state_sync
        .as_ref()
        .is_some_and(|s| s.refuse_unsynced_scale_in);
    let survivors = survivors(&cluster, op);
    if survivors.is_empty() {
        return Err(OpError::new(format!(
            "no active instance remains to take the changes of {:?}",
            op.victims
        )));
    }
    let mut lost = Vec::new();
    for victim in op.victims.clone() {
        // A victim on a lost node cannot give anything: what continuous sync carried
        // before is all there is.
        let node = node_of(op, Some(&cluster), &victim);
        let carried = match e.platform.lost(&node, e.limits.node_timeout).await {
            Some(why) => Err(PumpError::Gone(why)),
            None => pump(e, op, &cluster, &victim, "", &survivors).await,
        };
        match carried {
            Ok(c) => {
                let t = transfer(op);
                t.contract = "supported".into();
                t.changes += c.changes;
                t.bytes += c.bytes;
                t.handoff_cursors.insert(victim.clone(), c.cursor.clone());
                tracing::info!(operation = %op.operation_id, victim = %victim, changes = c.changes, survivors = ?survivors, "victim's changes handed off");
            }
            Err(PumpError::Unsupported(why)) if refuse => {
                return Err(OpError::refused(format!(
                    "the changes of {victim} cannot be handed off ({why}) and the cluster's state_sync refuses such scale-ins"
                )));
            }
            Err(PumpError::Unsupported(why)) => {
                transfer(op).contract = "unsupported".into();
                lost.push(format!(
                    "{victim}: the workload does not implement the state contract ({why}); its writes are lost"
                ));
            }
            Err(PumpError::Gone(why)) => {
                let member = cluster.members.get(&victim);
                let synced = member.and_then(|m| m.state_sync.as_ref());
                // What its last heartbeat counted, less what the last round carried.
                let counted = member.map_or(0, |m| m.state_writes);
                let unsynced = counted.saturating_sub(synced.map_or(0, |s| s.writes_synced));
                let since = match synced {
                    Some(s) => format!(
                        "its writes after its last continuous sync ({} ms before the handoff) are lost: {unsynced} counted by its last heartbeat",
                        crate::ops::record::now_ms().saturating_sub(s.synced_at_ms)
                    ),
                    None => format!(
                        "its writes since it was cloned are lost: {unsynced} counted by its last heartbeat"
                    ),
                };
                lost.push(format!(
                    "{victim}: it stopped before its handoff ({why}); {since}"
                ));
            }
            Err(PumpError::Failed(err)) => {
                return Err(OpError::new(format!("handoff of {victim} failed: {err}")));
            }
        }
    }
    if !lost.is_empty() {
        tracing::warn!(operation = %op.operation_id, lost = ?lost, "victims not handed off");
        transfer(op).not_handed_off = bounded(lost);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_of_victims_not_handed_off_stays_small() {
        let lost: Vec<String> = (0..100)
            .map(|i| format!("v{i}: {}", "é".repeat(400)))
            .collect();
        let b = bounded(lost);
        assert_eq!(b.len(), LISTED + 1);
        assert!(b.iter().all(|l| l.len() <= ENTRY + 3));
        assert_eq!(b[LISTED], "and 84 more victims, for the same reasons");
        assert_eq!(
            bounded(vec!["v: short".into()]),
            vec!["v: short".to_owned()]
        );
    }
}
