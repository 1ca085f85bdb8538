//! Vertical scaling: members are resized in place one at a time, each checked by the
//! node (a VM by hot-plug within the room it was started with, a process by cgroup
//! limits read back). A member the node cannot resize fails the operation with the
//! node's reason, and the members already resized go back to the earlier size.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;

use super::Step;
use super::engine::Engine;
use super::plan;
use crate::platform::OpError;

/// Runs `step` (one of this module's).
pub async fn forward(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::ResizeInPlace => in_place(e, op).await,
        Step::StoreResources => store(e, op, op.target_resources).await,
        _ => Err(OpError::new(format!(
            "{} is not a resize step",
            step.name()
        ))),
    }
}

/// Undoes `step`: members back to the earlier resources; the cluster's too.
pub async fn undo(e: &Engine, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
    match step {
        Step::ResizeInPlace => match op.previous_resources {
            Some(prev) => {
                let done: Vec<String> =
                    plan::counted_members(&e.platform.cluster(&op.cluster_id).await?)
                        .into_iter()
                        .map(|m| m.instance_id.clone())
                        .collect();
                for id in done {
                    resize_one(e, op, &id, prev, Gone::Undone).await?;
                }
                Ok(())
            }
            // The cluster had no recorded resources: nothing to go back to.
            None => Ok(()),
        },
        Step::StoreResources => match op.previous_resources {
            Some(prev) => store(e, op, Some(prev)).await,
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

async fn in_place(e: &Engine, op: &mut types::Operation) -> Result<(), OpError> {
    let target = op
        .target_resources
        .ok_or_else(|| OpError::new("resize without target_resources"))?;
    let cluster = e.platform.cluster(&op.cluster_id).await?;
    let ids: Vec<String> = plan::counted_members(&cluster)
        .into_iter()
        .map(|m| m.instance_id.clone())
        .collect();
    for id in ids {
        resize_one(e, op, &id, target, Gone::Refused).await?;
    }
    Ok(())
}

/// What a member whose node no longer has its instance (lost with a crashed node)
/// means for a resize.
#[derive(Clone, Copy, PartialEq)]
enum Gone {
    /// Forward: the member cannot be resized; the operation fails at once and rolls
    /// back (retrying cannot bring the instance back; the health round replaces it).
    Refused,
    /// Undo: there is nothing to take back to the earlier size.
    Undone,
}

/// Resizes one member and records what the node reports it has.
async fn resize_one(
    e: &Engine,
    op: &types::Operation,
    id: &str,
    to: types::Resources,
    gone: Gone,
) -> Result<(), OpError> {
    let node = super::place::node_of(op, Some(&e.platform.cluster(&op.cluster_id).await?), id);
    let reply = match e
        .platform
        .vmm_on(&node)
        .await?
        .resize(vmm_pb::ResizeRequest {
            instance_id: id.to_owned(),
            resources: Some(to),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if crate::platform::not_found(&s) && gone == Gone::Undone => return Ok(()),
        Err(s) if crate::platform::not_found(&s) => {
            return Err(OpError::refused(format!(
                "instance {id} is gone from node {node} (lost with it?): {}",
                s.message()
            )));
        }
        Err(s) => return Err(OpError::rpc(format!("resizing {id}"), &s)),
    };
    if !reply.enforced {
        return Err(OpError::refused(format!(
            "instance {id} cannot be resized to {} vCPUs and {} MiB: {}",
            to.vcpus, to.memory_mib, reply.message
        )));
    }
    let req = state_pb::UpdateMemberRequest {
        cluster_id: op.cluster_id.clone(),
        instance_id: id.to_owned(),
        // What the node says the instance has, not what was asked.
        resources: reply.instance.and_then(|i| i.resources).or(Some(to)),
        ..Default::default()
    };
    e.platform
        .state
        .clone()
        .update_member(req)
        .await
        .map_err(|s| OpError::rpc(format!("recording the resources of {id}"), &s))?;
    Ok(())
}

async fn store(
    e: &Engine,
    op: &types::Operation,
    resources: Option<types::Resources>,
) -> Result<(), OpError> {
    let req = state_pb::PutClusterRequest {
        cluster_id: op.cluster_id.clone(),
        resources,
        ..Default::default()
    };
    e.platform
        .put_cluster(
            req,
            format!("storing the resources of cluster {}", op.cluster_id),
        )
        .await
}
