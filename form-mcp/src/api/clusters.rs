//! Creating and deleting whole clusters. A new cluster gets its first instance, which
//! becomes its template and an active member (the balancer serves it); a failure on the
//! way removes what was made. Deleting a cluster deletes its instances first, and is
//! refused while an operation runs on it.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;

use super::action::check_id;
use super::backends::Backends;
use super::model::{CreateCluster, Deleted};
use crate::error::ApiError;

/// The cluster `id`, or 404.
pub async fn get(b: &Backends, id: &str) -> Result<state_pb::Cluster, ApiError> {
    b.state()?
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: id.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| ApiError::upstream("reading the cluster", &s))
}

/// Creates the cluster and its first instance.
pub async fn create(b: &Backends, req: CreateCluster) -> Result<state_pb::Cluster, ApiError> {
    check_id("cluster_id", &req.cluster_id)?;
    if req.workload.command.trim().is_empty() {
        return Err(ApiError::invalid(
            "workload.command is empty; expected the program every instance runs",
        ));
    }
    if !req.workload.health_path.is_empty() && !req.workload.health_path.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "workload.health_path '{}' must start with '/', e.g. /healthz",
            req.workload.health_path
        )));
    }
    let id = req.cluster_id.clone();
    let mut state = b.state()?;
    match get(b, &id).await {
        Ok(_) => {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "already_exists",
                format!("cluster {id} exists; delete it first or choose another id"),
            ));
        }
        Err(e) if e.code == "not_found" => {}
        Err(e) => return Err(e),
    }
    let mut vmm = b.vmm()?;
    let workload: types::Workload = req.workload.into();
    let resources = req.resources.map(Into::into);
    state
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: id.clone(),
            domain: req.domain,
            workload: Some(workload.clone()),
            scaling_policy: req.policy.map(Into::into),
            affinity: req.affinity.map(Into::into),
            resources,
            template_instance_id: None,
        })
        .await
        .map_err(|s| ApiError::upstream("creating the cluster", &s))?;
    let template = format!("{}-0", id.chars().take(120).collect::<String>());
    let made = async {
        let i = vmm
            .create_instance(vmm_pb::CreateInstanceRequest {
                instance_id: template.clone(),
                cluster_id: id.clone(),
                workload: Some(workload),
                resources,
            })
            .await
            .map_err(|s| ApiError::upstream("starting the first instance", &s))?
            .into_inner();
        state
            .add_member(state_pb::AddMemberRequest {
                cluster_id: id.clone(),
                member: Some(state_pb::Member {
                    instance_id: template.clone(),
                    node_id: i.node_id,
                    addresses: vec![i.address],
                    status: state_pb::MemberStatus::Active as i32,
                    generation: i.generation,
                    resources: i.resources,
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| ApiError::upstream("adding the first member", &s))?;
        state
            .put_cluster(state_pb::PutClusterRequest {
                cluster_id: id.clone(),
                template_instance_id: Some(template.clone()),
                ..Default::default()
            })
            .await
            .map_err(|s| ApiError::upstream("setting the template", &s))?;
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = made {
        let _ = vmm
            .delete_instance(vmm_pb::InstanceRef {
                instance_id: template,
            })
            .await;
        let _ = state
            .delete_cluster(state_pb::DeleteClusterRequest {
                cluster_id: id.clone(),
            })
            .await;
        return Err(e);
    }
    tracing::info!(cluster = %id, "cluster created");
    get(b, &id).await
}

/// Deletes the cluster's instances, then the cluster.
pub async fn delete(b: &Backends, id: &str) -> Result<Deleted, ApiError> {
    let c = get(b, id).await?;
    let mut state = b.state()?;
    let ops = state
        .list_operations(state_pb::ListOperationsRequest {
            cluster_id: id.to_owned(),
            limit: 0,
        })
        .await
        .map_err(|s| ApiError::upstream("reading operations", &s))?
        .into_inner()
        .operations;
    if let Some(op) = ops.iter().find(|o| {
        use types::operation_status::State as S;
        !matches!(
            o.status.as_ref().and_then(|s| s.state.as_ref()),
            Some(S::Completed(_) | S::Failed(_) | S::RolledBack(_))
        )
    }) {
        return Err(ApiError::conflict(format!(
            "cluster {id} has an operation in progress: {}; delete it when the operation ends",
            op.operation_id
        )));
    }
    let mut deleted = Vec::new();
    if !c.members.is_empty() {
        let mut vmm = b.vmm()?;
        let mut ids: Vec<&String> = c.members.keys().collect();
        ids.sort();
        for m in ids {
            match vmm
                .delete_instance(vmm_pb::InstanceRef {
                    instance_id: m.clone(),
                })
                .await
            {
                Ok(_) => deleted.push(m.clone()),
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(ApiError::upstream(&format!("deleting instance {m}"), &s)),
            }
        }
    }
    state
        .delete_cluster(state_pb::DeleteClusterRequest {
            cluster_id: id.to_owned(),
        })
        .await
        .map_err(|s| ApiError::upstream("deleting the cluster", &s))?;
    tracing::info!(cluster = id, instances = deleted.len(), "cluster deleted");
    Ok(Deleted {
        cluster_id: id.to_owned(),
        instances_deleted: deleted,
    })
}
