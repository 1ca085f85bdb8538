//! The steps of a cluster's deletion: its record first (the balancer stops routing to
//! it, no controller starts an operation on it), then its members' instances; both go
//! only forward.
//!
//! The steps of a cluster's creation: store the cluster (`cluster_spec`), start its
//! template instance (`new_instances[0]`), add it as the active member and template;
//! `wait_serving` follows. Each undo removes what its step made, so a create that fails
//! anywhere, or is resumed after a controller died, leaves nothing behind.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use prost::Message;

use super::Step;
use super::engine::Engine;
use super::place::node_of;
use crate::platform::{OpError, gone_ok};

/// The cluster a create stores.
fn spec(op: &types::Operation) -> Result<state_pb::PutClusterRequest, OpError> {
    state_pb::PutClusterRequest::decode(op.cluster_spec.as_slice())
        .map_err(|e| OpError::new(format!("the operation's cluster_spec does not decode: {e}")))
}

fn template(op: &types::Operation) -> Result<String, OpError> {
    op.new_instances
        .first()
        .cloned()
        .ok_or_else(|| OpError::new("a create without its template's id"))
}

/// Deletes the cluster's record (already gone counts as done).
async fn delete_record(e: &Engine, op: &types::Operation) -> Result<(), OpError> {
    gone_ok(
        e.platform
            .state
            .clone()
            .delete_cluster(state_pb::DeleteClusterRequest {
                cluster_id: op.cluster_id.clone(),
            })
            .await,
        format!("deleting cluster {}", op.cluster_id),
    )
}

/// Runs `step` (one of this module's).
pub async fn forward(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::StoreCluster => {
            let spec = spec(op)?;
            e.platform
                .put_cluster(spec, format!("storing cluster {}", op.cluster_id))
                .await
        }
        Step::CreateTemplate => {
            let id = template(op)?;
            let spec = spec(op)?;
            let mut vmm = e.platform.vmm_on(&node_of(op, None, &id)).await?;
            // Made already (a resumed run): nothing to do.
            if let Ok(i) = vmm
                .get_instance(vmm_pb::InstanceRef {
                    instance_id: id.clone(),
                })
                .await
                && i.get_ref().status == vmm_pb::InstanceStatus::Running as i32
            {
                return Ok(());
            }
            let i = vmm
                .create_instance(vmm_pb::CreateInstanceRequest {
                    instance_id: id.clone(),
                    cluster_id: op.cluster_id.clone(),
                    workload: spec.workload,
                    resources: spec.resources,
                })
                .await
                .map_err(|s| OpError::rpc(format!("starting the template {id}"), &s))?
                .into_inner();
            if i.status != vmm_pb::InstanceStatus::Running as i32 {
                return Err(OpError::refused(format!(
                    "the template {id} did not start: {}",
                    i.failure
                )));
            }
            Ok(())
        }
        Step::AddTemplate => {
            let id = template(op)?;
            let i = e
                .platform
                .vmm_on(&node_of(op, None, &id))
                .await?
                .get_instance(vmm_pb::InstanceRef {
                    instance_id: id.clone(),
                })
                .await
                .map_err(|s| OpError::rpc(format!("reading the template {id}"), &s))?
                .into_inner();
            e.platform
                .state
                .clone()
                .add_member(state_pb::AddMemberRequest {
                    cluster_id: op.cluster_id.clone(),
                    member: Some(state_pb::Member {
                        instance_id: id.clone(),
                        node_id: i.node_id,
                        addresses: vec![i.address],
                        status: state_pb::MemberStatus::Active as i32,
                        generation: i.generation,
                        resources: i.resources,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|s| OpError::rpc(format!("adding the template {id}"), &s))?;
            e.platform
                .put_cluster(
                    state_pb::PutClusterRequest {
                        cluster_id: op.cluster_id.clone(),
                        template_instance_id: Some(id),
                        ..Default::default()
                    },
                    format!("setting the template of {}", op.cluster_id),
                )
                .await
        }
        Step::DeleteClusterRecord => delete_record(e, op).await,
        Step::DeleteClusterInstances => {
            for id in op.victims.clone() {
                let mut vmm = e.platform.vmm_on(&node_of(op, None, &id)).await?;
                gone_ok(
                    vmm.delete_instance(vmm_pb::InstanceRef {
                        instance_id: id.clone(),
                    })
                    .await,
                    format!("deleting instance {id}"),
                )?;
            }
            delete_cluster_snapshots(e, &op.cluster_id).await
        }
        _ => Err(OpError::new(format!(
            "{} is not a create or delete step",
            step.name()
        ))),
    }
}

/// Undoes `step`.
pub async fn undo(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::StoreCluster => delete_record(e, op).await,
        Step::CreateTemplate => {
            let id = template(op)?;
            gone_ok(
                e.platform
                    .vmm_on(&node_of(op, None, &id))
                    .await?
                    .delete_instance(vmm_pb::InstanceRef {
                        instance_id: id.clone(),
                    })
                    .await,
                format!("deleting the template {id}"),
            )
        }
        Step::AddTemplate => {
            let id = template(op)?;
            gone_ok(
                e.platform
                    .state
                    .clone()
                    .remove_member(state_pb::RemoveMemberRequest {
                        cluster_id: op.cluster_id.clone(),
                        instance_id: id.clone(),
                    })
                    .await,
                format!("removing the template {id}"),
            )
        }
        _ => Ok(()),
    }
}

/// Deletes every snapshot of `cluster` on every node that is not lost: its standby
/// snapshot's copies, and what an interrupted operation left (docs/standby.md).
async fn delete_cluster_snapshots(e: &Engine, cluster: &str) -> Result<(), OpError> {
    let p = &e.platform;
    let mut nodes: Vec<String> = p
        .fleet
        .records(&p.state, false)
        .await?
        .iter()
        .map(|r| r.node_id.clone())
        .collect();
    if nodes.is_empty() {
        nodes.push(String::new());
    }
    for node in nodes {
        if p.lost(&node, e.limits.node_timeout).await.is_some() {
            continue;
        }
        let mut vmm = p.vmm_on(&node).await?;
        for s in super::create::list_snapshots(&mut vmm, "").await? {
            if s.cluster_id == cluster {
                super::create::delete_snapshot(&mut vmm, &s.snapshot_id).await?;
            }
        }
    }
    Ok(())
}
