//! `ScalerService`: manual scaling, status, operations and policies over gRPC. Scale
//! requests go through [`Shared::submit`], like the autoscaler's decisions.

use std::sync::Arc;

use form_proto::scaler::v1 as pb;
use form_proto::scaler::v1::scaler_service_server::ScalerService;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use tonic::{Request, Response, Status};

use crate::controller::Shared;
use crate::ops::plan;
use crate::policy;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    /// The service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn cluster(&self, id: &str) -> Result<state_pb::Cluster, Status> {
        form_runtime::ids::check(id)
            .map_err(|e| Status::invalid_argument(format!("cluster_id {e}")))?;
        self.shared
            .engine
            .platform
            .state
            .clone()
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: id.to_owned(),
            })
            .await
            .map(Response::into_inner)
    }

    async fn operations(&self, cluster: &str, limit: u32) -> Result<Vec<types::Operation>, Status> {
        self.shared.operations(cluster, limit).await
    }
}

#[tonic::async_trait]
impl ScalerService for Api {
    async fn scale(
        &self,
        req: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ScaleReply>, Status> {
        let r = req.into_inner();
        let request = plan::Request {
            operation_id: r.operation_id,
            kind: r.kind,
            target_count: r.target_count,
            target_resources: r.target_resources,
            instance_id: r.instance_id,
            drain_connections: r.drain_connections,
            immediate: r.immediate,
            reason: "api".into(),
            remove: r.instance_ids_to_remove,
            drain: r.drain,
        };
        let op = self.shared.submit(&r.cluster_id, request, true).await?;
        Ok(Response::new(pb::ScaleReply {
            operation_id: op.operation_id.clone(),
            operation: Some(op),
        }))
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let id = req.into_inner().cluster_id;
        let c = self.cluster(&id).await?;
        let last_operation = self.operations(&id, 1).await?.into_iter().next();
        let mut members: Vec<pb::MemberHealth> = c
            .members
            .values()
            .map(|m| {
                let (health, reason) = form_proto::member_health(m);
                pb::MemberHealth {
                    instance_id: m.instance_id.clone(),
                    health: health.into(),
                    reason,
                    cpu_utilization: m.cpu_utilization,
                    template: m.instance_id == c.template_instance_id,
                }
            })
            .collect();
        members.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let ready = c
            .members
            .values()
            .filter(|m| m.status == state_pb::MemberStatus::Active as i32)
            .count() as u32;
        let unhealthy = members.iter().filter(|m| m.health == "unhealthy").count();
        let degraded = members.iter().filter(|m| m.health != "healthy").count();
        let health_status = if !members.is_empty() && unhealthy == members.len() {
            "unhealthy"
        } else if degraded > 0 {
            "degraded"
        } else {
            "healthy"
        };
        // From form-state, so any controller answers the same as the owner.
        let running = last_operation
            .as_ref()
            .filter(|o| !crate::ops::is_terminal(o))
            .map(|o| o.kind)
            .or_else(|| self.shared.running(&id).map(|(_, k)| k));
        let scaling_status = match running.map(types::OperationKind::try_from) {
            Some(Ok(types::OperationKind::ScaleOut)) => "scaling_out",
            Some(Ok(types::OperationKind::ScaleIn)) => "scaling_in",
            Some(Ok(types::OperationKind::Resize)) => "resizing",
            Some(Ok(types::OperationKind::ReplaceInstance)) => "replacing",
            Some(Ok(types::OperationKind::CreateCluster)) => "creating",
            Some(Ok(types::OperationKind::DeleteCluster)) => "deleting",
            _ => "stable",
        };
        let last_decision = self
            .shared
            .decisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|d| pb::Decision {
                desired: d.decision.desired,
                current: d.decision.current,
                reason: d.decision.reason.clone(),
                at_ms: d.at_ms,
            });
        Ok(Response::new(pb::ClusterStatus {
            cluster_id: id,
            instances: plan::counted_members(&c).len() as u32,
            ready_instances: ready,
            scaling_status: scaling_status.into(),
            health_status: health_status.into(),
            last_operation,
            members,
            last_decision,
            policy: Some(plan::policy_of(&c)),
            owner: self.shared.peers.owner_of(&c.cluster_id),
        }))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<types::Operation>, Status> {
        let id = req.into_inner().operation_id;
        form_runtime::ids::check(&id)
            .map_err(|e| Status::invalid_argument(format!("operation_id {e}")))?;
        self.shared
            .engine
            .platform
            .state
            .clone()
            .get_operation(state_pb::GetOperationRequest { operation_id: id })
            .await
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsReply>, Status> {
        let r = req.into_inner();
        if !r.cluster_id.is_empty() {
            form_runtime::ids::check(&r.cluster_id)
                .map_err(|e| Status::invalid_argument(format!("cluster_id {e}")))?;
        }
        Ok(Response::new(pb::ListOperationsReply {
            operations: self.operations(&r.cluster_id, r.limit).await?,
        }))
    }

    async fn create_cluster(
        &self,
        req: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::ScaleReply>, Status> {
        let r = req.into_inner();
        let spec = r.cluster.ok_or_else(|| {
            Status::invalid_argument("cluster is missing; expected the cluster to create")
        })?;
        let op = self.shared.submit_create(spec, r.operation_id).await?;
        Ok(Response::new(pb::ScaleReply {
            operation_id: op.operation_id.clone(),
            operation: Some(op),
        }))
    }

    async fn delete_cluster(
        &self,
        req: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::ScaleReply>, Status> {
        let r = req.into_inner();
        let request = plan::Request {
            operation_id: r.operation_id,
            kind: types::OperationKind::DeleteCluster as i32,
            reason: "api".into(),
            ..Default::default()
        };
        let op = self.shared.submit(&r.cluster_id, request, false).await?;
        Ok(Response::new(pb::ScaleReply {
            operation_id: op.operation_id.clone(),
            operation: Some(op),
        }))
    }

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyReply>, Status> {
        let r = req.into_inner();
        let p = r.policy.ok_or_else(|| {
            Status::invalid_argument("policy is missing; expected a ScalingPolicy")
        })?;
        policy::validate(&p, self.shared.cap)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.cluster(&r.cluster_id).await?;
        self.shared
            .engine
            .platform
            .state
            .clone()
            .put_cluster(state_pb::PutClusterRequest {
                cluster_id: r.cluster_id.clone(),
                scaling_policy: Some(p),
                ..Default::default()
            })
            .await?;
        tracing::info!(cluster = %r.cluster_id, "policy set");
        Ok(Response::new(pb::SetPolicyReply { policy: Some(p) }))
    }
}
