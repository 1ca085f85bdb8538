//! Steps that bring new instances in: snapshot the source, clone, wait until healthy,
//! add as members, activate, wait until the balancer serves them, promote a
//! replacement to template. Each checks what exists first, so it can run again.

use std::time::Duration;

use form_proto::rplb::v1 as rplb_pb;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use tokio::task::JoinSet;

use super::Step;
use super::engine::Engine;
use super::place::node_of;
use crate::platform::{OpError, gone_ok, not_found};

/// Runs `step` (one of this module's).
pub async fn forward(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::SnapshotSource => snapshot(e, op).await,
        Step::CloneInstances => clone_all(e, op).await,
        Step::WaitHealthy => wait_healthy(e, op).await,
        Step::AddMembers => add_members(e, op).await,
        Step::ActivateMembers => {
            set_status(e, op, &op.new_instances, state_pb::MemberStatus::Active).await
        }
        Step::WaitServing => wait_serving(e, op).await,
        Step::PromoteReplacement => promote(e, op, false).await,
        _ => Err(OpError::new(format!(
            "{} is not a create step",
            step.name()
        ))),
    }
}

/// Undoes `step` (one of this module's).
pub async fn undo(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::SnapshotSource => delete_snapshots(e, op).await,
        Step::CloneInstances => {
            let notes = delete_instances(e, op, &op.new_instances).await?;
            super::remove::add_notes(op, notes);
            Ok(())
        }
        Step::AddMembers => remove_members(e, &op.cluster_id, &op.new_instances).await,
        // New instances that served may hold writes: they go to the members that stay
        // before the instances are removed.
        Step::ActivateMembers => super::sync::give_back(e, op).await,
        Step::PromoteReplacement => promote(e, op, true).await,
        // Nothing to undo: waiting changes nothing.
        _ => Ok(()),
    }
}

async fn snapshot(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() || !op.snapshot_id.is_empty() {
        return Ok(());
    }
    let req = vmm_pb::SnapshotRequest {
        instance_id: op.source_instance_id.clone(),
        resume: Some(true),
    };
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    let node = node_of(op, Some(&cluster), &op.source_instance_id);
    let info = e
        .platform
        .vmm_on(&node)
        .await?
        .snapshot(req)
        .await
        .map_err(|s| OpError::rpc(format!("snapshot of {}", op.source_instance_id), &s))?
        .into_inner();
    op.snapshot_id = info.snapshot_id;
    // Where the source's change history stood at the snapshot: the sync steps start
    // there (empty when the workload has no such history).
    op.state_cursor = info.state_cursor;
    Ok(())
}

/// Deletes the recorded snapshot and any snapshot of the source taken since the
/// operation began (one taken just before a crash that was not recorded yet), on the
/// source's node and on every node the operation copied it to.
/// The cluster's standby snapshot (docs/standby.md) is kept on the nodes that hold it,
/// and leftovers are not looked for while a standby snapshot is being taken.
pub async fn delete_snapshots(e: &Engine, op: &types::Operation) -> Result<(), OpError> {
    if op.source_instance_id.is_empty() {
        return Ok(());
    }
    let mut nodes = vec![super::place::snapshot_node(op, None)];
    for id in &op.new_instances {
        let n = node_of(op, None, id);
        if !nodes.contains(&n) {
            nodes.push(n);
        }
    }
    // Looked at before the standby is read: a standby snapshot recorded after this
    // look is read below and kept; one still being taken is not looked for.
    let leftovers = !e.taking_standby.contains(&op.cluster_id);
    let read = e
        .platform
        .state
        .clone()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: op.cluster_id.clone(),
        })
        .await;
    let standby = match read {
        Ok(c) => c.into_inner().standby,
        Err(s) if not_found(&s) => None,
        Err(s) => {
            return Err(OpError::rpc(
                format!("reading cluster {}", op.cluster_id),
                &s,
            ));
        }
    };
    for node in nodes {
        // A copy pulled to another node for this operation goes.
        let keep: Vec<String> = standby
            .as_ref()
            .filter(|s| s.node_ids.contains(&node))
            .map(|s| s.snapshot_id.clone())
            .into_iter()
            .collect();
        let vmm = e.platform.vmm_on(&node).await?;
        delete_snapshots_on(vmm, op, &keep, leftovers).await?;
    }
    Ok(())
}

async fn delete_snapshots_on(
    mut vmm: crate::fleet::VmmClient,
    op: &types::Operation,
    keep: &[String],
    leftovers: bool,
) -> Result<(), OpError> {
    let mut ids = Vec::new();
    if !op.snapshot_id.is_empty() && !keep.contains(&op.snapshot_id) {
        ids.push(op.snapshot_id.clone());
    }
    if leftovers {
        // The vmm node's clock may be behind the controller's: a minute of slack. Any
        // other snapshot of the source in that window is a leftover too (one operation
        // runs per cluster, and each deletes its snapshot).
        let since = op.created_at_ms.saturating_sub(60_000);
        for s in list_snapshots(&mut vmm, &op.source_instance_id).await? {
            if s.created_at_ms >= since
                && !ids.contains(&s.snapshot_id)
                && !keep.contains(&s.snapshot_id)
            {
                ids.push(s.snapshot_id);
            }
        }
    }
    for id in ids {
        delete_snapshot(&mut vmm, &id).await?;
    }
    Ok(())
}

/// The snapshots on a node, of `source` ("" for all).
pub async fn list_snapshots(
    vmm: &mut crate::fleet::VmmClient,
    source: &str,
) -> Result<Vec<vmm_pb::SnapshotInfo>, OpError> {
    vmm.list_snapshots(vmm_pb::ListSnapshotsRequest {
        source_instance_id: source.to_owned(),
    })
    .await
    .map(|r| r.into_inner().snapshots)
    .map_err(|s| OpError::rpc("listing snapshots", &s))
}

/// Deletes snapshot `id` on a node (already gone counts as deleted).
pub async fn delete_snapshot(vmm: &mut crate::fleet::VmmClient, id: &str) -> Result<(), OpError> {
    let r = vmm
        .delete_snapshot(vmm_pb::DeleteSnapshotRequest {
            snapshot_id: id.to_owned(),
        })
        .await;
    gone_ok(r, format!("deleting snapshot {id}"))
}

async fn clone_all(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    let resources = cluster.resources;
    let notes = super::transfer::copy_snapshot(e, op, &cluster).await?;
    super::remove::add_notes(op, notes);
    let mut set = JoinSet::new();
    for id in op.new_instances.clone() {
        let mut vmm = e.platform.vmm_on(&node_of(op, Some(&cluster), &id)).await?;
        let snapshot_id = op.snapshot_id.clone();
        let cluster = op.cluster_id.clone();
        set.spawn(crate::fencing::scoped(async move {
            match vmm
                .get_instance(vmm_pb::InstanceRef {
                    instance_id: id.clone(),
                })
                .await
            {
                Ok(i) if i.get_ref().status != vmm_pb::InstanceStatus::Failed as i32 => {
                    return Ok(());
                }
                Ok(_) => {
                    // A failed leftover of an earlier attempt: make room for a new one.
                    let _ = vmm
                        .delete_instance(vmm_pb::InstanceRef {
                            instance_id: id.clone(),
                        })
                        .await;
                }
                Err(s) if not_found(&s) => {}
                Err(s) => return Err(OpError::rpc(format!("reading instance {id}"), &s)),
            }
            let req = vmm_pb::CloneRequest {
                snapshot_id,
                instance_id: id.clone(),
                resources,
            };
            VmmServiceClient::clone(&mut vmm, req)
                .await
                .map(|_| ())
                .map_err(|s| OpError::rpc(format!("clone {id} of cluster {cluster}"), &s))
        }));
    }
    join_all(set).await
}

/// Waits for every task; the first error wins.
pub async fn join_all(mut set: JoinSet<Result<(), OpError>>) -> Result<(), OpError> {
    let mut first = None;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap_or_else(|j| Err(OpError::new(format!("task failed: {j}"))));
        if let Err(err) = r {
            first.get_or_insert(err);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Deletes `ids` of `op`, each on its node (already gone counts as deleted). An
/// instance on a lost node is not waited for: the node stops it when it comes back
/// (docs/operations.md, "A lost node"); the returned notes say so.
pub async fn delete_instances(
    e: &Engine,
    op: &types::Operation,
    ids: &[String],
) -> Result<Vec<String>, OpError> {
    let mut notes = Vec::new();
    for id in ids {
        let node = node_of(op, None, id);
        if let Some(why) = e.platform.lost(&node, e.limits.node_timeout).await {
            notes.push(format!(
                "instance {id} not deleted: {why}; the node stops it when it comes back"
            ));
            continue;
        }
        let mut vmm = e.platform.vmm_on(&node).await?;
        let r = vmm
            .delete_instance(vmm_pb::InstanceRef {
                instance_id: id.clone(),
            })
            .await;
        gone_ok(r, format!("deleting instance {id}"))?;
    }
    Ok(notes)
}

async fn wait_healthy(e: &Engine, op: &types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() {
        return Ok(());
    }
    let path = e
        .platform
        .cluster(&op.cluster_id)
        .await?
        .workload
        .map(|w| w.health_path)
        .unwrap_or_default();
    let deadline = tokio::time::Instant::now() + e.limits.ready_timeout;
    for id in &op.new_instances {
        let mut vmm = e.platform.vmm_on(&node_of(op, None, id)).await?;
        loop {
            let i = vmm
                .get_instance(vmm_pb::InstanceRef {
                    instance_id: id.clone(),
                })
                .await
                .map_err(|s| OpError::rpc(format!("reading instance {id}"), &s))?
                .into_inner();
            if i.status == vmm_pb::InstanceStatus::Failed as i32 {
                return Err(OpError::new(format!("instance {id} failed: {}", i.failure)));
            }
            let running = i.status == vmm_pb::InstanceStatus::Running as i32;
            if running
                && (!path.starts_with('/')
                    || crate::probe::http_ok(&i.address, &path, Duration::from_secs(2)).await)
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(OpError::new(format!(
                    "instance {id} not healthy within {:?} (status {}, {path} on {})",
                    e.limits.ready_timeout, i.status, i.address
                )));
            }
            tokio::time::sleep(e.limits.poll).await;
        }
    }
    Ok(())
}

async fn add_members(e: &Engine, op: &types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    let mut state = e.platform.state.clone();
    for id in &op.new_instances {
        if cluster.members.contains_key(id) {
            continue;
        }
        let mut vmm = e.platform.vmm_on(&node_of(op, None, id)).await?;
        let i = vmm
            .get_instance(vmm_pb::InstanceRef {
                instance_id: id.clone(),
            })
            .await
            .map_err(|s| OpError::rpc(format!("reading instance {id}"), &s))?
            .into_inner();
        let member = state_pb::Member {
            instance_id: id.clone(),
            node_id: i.node_id,
            addresses: vec![i.address],
            status: state_pb::MemberStatus::Starting as i32,
            generation: i.generation,
            resources: i.resources,
            ..Default::default()
        };
        state
            .add_member(state_pb::AddMemberRequest {
                cluster_id: op.cluster_id.clone(),
                member: Some(member),
            })
            .await
            .map_err(|s| OpError::rpc(format!("adding member {id}"), &s))?;
    }
    Ok(())
}

/// Removes the members `ids` of `cluster` (already gone counts as removed).
pub async fn remove_members(e: &Engine, cluster: &str, ids: &[String]) -> Result<(), OpError> {
    let mut state = e.platform.state.clone();
    for id in ids {
        let r = state
            .remove_member(state_pb::RemoveMemberRequest {
                cluster_id: cluster.to_owned(),
                instance_id: id.clone(),
            })
            .await;
        gone_ok(r, format!("removing member {id}"))?;
    }
    Ok(())
}

/// Sets the status of the members `ids` that still exist.
pub async fn set_status(
    e: &Engine,
    op: &types::Operation,
    ids: &[String],
    status: state_pb::MemberStatus,
) -> Result<(), OpError> {
    set_status_with(e, op, ids, status, None).await
}

/// [`set_status`], with drain settings for the members when given.
pub async fn set_status_with(
    e: &Engine,
    op: &types::Operation,
    ids: &[String],
    status: state_pb::MemberStatus,
    drain: Option<types::DrainSettings>,
) -> Result<(), OpError> {
    let mut state = e.platform.state.clone();
    for id in ids {
        let req = state_pb::UpdateMemberRequest {
            cluster_id: op.cluster_id.clone(),
            instance_id: id.clone(),
            status: Some(status as i32),
            drain,
            ..Default::default()
        };
        gone_ok(
            state.update_member(req).await,
            format!("setting member {id} {status:?}"),
        )?;
    }
    Ok(())
}

/// Waits until every balancer serves the new instances. A balancer that cannot be
/// reached for `balancer_timeout` is not waited for: the operation notes it.
async fn wait_serving(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    if op.new_instances.is_empty() || e.platform.balancers.is_empty() {
        return Ok(());
    }
    let domain = e.platform.cluster(&op.cluster_id).await?.domain;
    let deadline = tokio::time::Instant::now() + e.limits.ready_timeout;
    let mut waiting = e.platform.balancers.clone();
    // Since when each balancer has not answered.
    let mut silent: std::collections::HashMap<String, tokio::time::Instant> =
        std::collections::HashMap::new();
    loop {
        let mut still = Vec::new();
        let mut missing_anywhere: Vec<String> = Vec::new();
        for (at, mut rplb) in waiting {
            let stats = match crate::platform::balancer_stats(&mut rplb, &domain).await {
                Ok(s) => {
                    silent.remove(&at);
                    s
                }
                // A cluster just created: the balancer has not made its route yet.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    silent.remove(&at);
                    rplb_pb::StatsReply::default()
                }
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    let since = *silent
                        .entry(at.clone())
                        .or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= e.limits.balancer_timeout {
                        tracing::warn!(balancer = %at, error = %s, "balancer unreachable; not waiting for it to serve the new instances");
                        let note = format!(
                            "stopped waiting for balancer {at} to serve {:?}: unreachable for {:?} ({})",
                            op.new_instances,
                            e.limits.balancer_timeout,
                            s.message()
                        );
                        super::remove::add_notes(op, vec![note]);
                    } else {
                        still.push((at, rplb));
                    }
                    continue;
                }
                Err(s) => {
                    return Err(OpError::rpc(
                        format!("balancer {at}: stats of {domain}"),
                        &s,
                    ));
                }
            };
            let active: Vec<&str> = stats
                .routes
                .iter()
                .flat_map(|r| &r.backends)
                .filter(|b| b.state == rplb_pb::BackendState::Active as i32)
                .map(|b| b.id.as_str())
                .collect();
            let missing: Vec<String> = op
                .new_instances
                .iter()
                .filter(|id| !active.contains(&id.as_str()))
                .cloned()
                .collect();
            if !missing.is_empty() {
                missing_anywhere.extend(missing.into_iter().map(|m| format!("{m} on {at}")));
                still.push((at, rplb));
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(OpError::new(format!(
                "the balancers do not serve {missing_anywhere:?} on {domain} within {:?}",
                e.limits.ready_timeout
            )));
        }
        waiting = still;
        tokio::time::sleep(e.limits.poll).await;
    }
}

/// When the template is a victim, promotes a healthy member: the source of the
/// clones when it stays, otherwise the template's own replacement. `back` restores
/// the template recorded before the operation.
async fn promote(e: &Engine, op: &types::Operation, back: bool) -> Result<(), OpError> {
    let previous = &op.previous_template_instance_id;
    if previous.is_empty() {
        return Ok(());
    }
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    let to = if back {
        previous.clone()
    } else if cluster.template_instance_id != *previous {
        // Promoted already (a step run again after a restart).
        return Ok(());
    } else if !op.victims.contains(&op.source_instance_id)
        && cluster.members.contains_key(&op.source_instance_id)
    {
        op.source_instance_id.clone()
    } else {
        let k = op.victims.iter().position(|v| v == previous);
        match k.and_then(|k| op.new_instances.get(k)) {
            Some(new) => new.clone(),
            None => {
                return Err(OpError::new(format!(
                    "no successor for template {previous}"
                )));
            }
        }
    };
    if cluster.template_instance_id == to {
        return Ok(());
    }
    let req = state_pb::PutClusterRequest {
        cluster_id: op.cluster_id.clone(),
        template_instance_id: Some(to.clone()),
        ..Default::default()
    };
    e.platform
        .put_cluster(req, format!("making {to} the template"))
        .await
}
