//! Steps that carry application state through the workload state contract
//! (docs/workload-contract.md): bring new instances up to date with their source, and
//! hand a drained victim's changes to the instances that remain. Changes travel as the
//! workload's own batches, read from one instance and merged into others through the
//! vmm node; merging is idempotent, so a step run again after a crash only repeats
//! merges that change nothing.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use super::Step;
use super::engine::Engine;
use crate::platform::OpError;

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

/// The instances of `cluster` that the vmm node runs now.
pub async fn running(
    vmm: &VmmServiceClient<Channel>,
    cluster: &str,
) -> Result<Vec<String>, tonic::Status> {
    Ok(vmm
        .clone()
        .list_instances(vmm_pb::ListInstancesRequest {
            cluster_id: cluster.to_owned(),
        })
        .await?
        .into_inner()
        .instances
        .into_iter()
        .filter(|i| i.status == vmm_pb::InstanceStatus::Running as i32)
        .map(|i| i.instance_id)
        .collect())
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

async fn pump(e: &Engine, from: &str, since: &str, to: &[String]) -> Result<Carried, PumpError> {
    let vmm = e.platform.vmm().map_err(PumpError::Failed)?;
    carry(&vmm, from, since, to, BATCH_BYTES, false).await
}

/// Reads `from`'s changes after `since` (with `own`, only its own writes) in batches
/// of `batch_bytes` and merges each batch into every instance of `to`, until `from`
/// has nothing more, on the vmm node (`CopyChanges`: the batches do not travel through
/// the controller; the node reads the next batch while the last merges, and reads from
/// the start when `from` no longer knows the cursor). The cursor returned is that of
/// the last batch every target merged.
pub async fn carry(
    vmm: &VmmServiceClient<Channel>,
    from: &str,
    since: &str,
    to: &[String],
    batch_bytes: u32,
    own: bool,
) -> Result<Carried, PumpError> {
    carry_keys(vmm, from, since, to, batch_bytes, own, &[]).await
}

/// [`carry`] of the keys with one of `prefixes` only (none: every change). The cursor
/// it returns is a preview's: it must not be kept as `from`'s.
pub async fn carry_keys(
    vmm: &VmmServiceClient<Channel>,
    from: &str,
    since: &str,
    to: &[String],
    batch_bytes: u32,
    own: bool,
    prefixes: &[String],
) -> Result<Carried, PumpError> {
    let req = vmm_pb::CopyChangesRequest {
        from_instance_id: from.to_owned(),
        to_instance_ids: to.to_vec(),
        since: since.to_owned(),
        max_bytes: batch_bytes,
        own,
        prefixes: prefixes.to_vec(),
    };
    let copied = tokio::time::timeout(COPY_DEADLINE, vmm.clone().copy_changes(req))
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no end within {COPY_DEADLINE:?}"
            )))
        });
    match copied {
        Ok(r) => {
            let r = r.into_inner();
            Ok(Carried {
                cursor: r.next_cursor,
                changes: r.changes,
                bytes: r.bytes,
                writes: r.writes,
            })
        }
        Err(s) if s.code() == Code::Unimplemented => {
            Err(PumpError::Unsupported(s.message().to_owned()))
        }
        Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
            Err(PumpError::Gone(s.message().to_owned()))
        }
        Err(s) => Err(PumpError::Failed(OpError::rpc(
            format!("carrying the changes of {from}"),
            &s,
        ))),
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
    let vmm = e.platform.vmm()?;
    let running = running(&vmm, &op.cluster_id)
        .await
        .map_err(|s| OpError::rpc("listing the running instances", &s))?;
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
        match carry(&vmm, new, "", &stay, BATCH_BYTES, false).await {
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
                let mut cut = ENTRY;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
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
    if !enabled(&cluster) {
        return Ok(());
    }
    if op.state_cursor.is_empty() {
        // The snapshot recorded no cursor: the workload has no change history.
        transfer(op).contract = "unsupported".into();
        return Ok(());
    }
    let source = op.source_instance_id.clone();
    match pump(e, &source, &op.state_cursor.clone(), &op.new_instances).await {
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
    let survivors: Vec<String> = cluster
        .members
        .values()
        .filter(|m| {
            !op.victims.contains(&m.instance_id)
                && m.status == state_pb::MemberStatus::Active as i32
        })
        .map(|m| m.instance_id.clone())
        .collect();
    if survivors.is_empty() {
        return Err(OpError::new(format!(
            "no active instance remains to take the changes of {:?}",
            op.victims
        )));
    }
    let mut lost = Vec::new();
    for victim in op.victims.clone() {
        match pump(e, &victim, "", &survivors).await {
            Ok(c) => {
                let t = transfer(op);
                t.contract = "supported".into();
                t.changes += c.changes;
                t.bytes += c.bytes;
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
