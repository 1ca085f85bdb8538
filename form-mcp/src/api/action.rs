//! The one place requests are carried out. REST handlers and MCP tools build an
//! [`Action`]; [`Action::run`] checks it, calls the services and returns the JSON reply.

use axum::http::StatusCode;
use form_proto::scaler::v1 as scaler_pb;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::backends::Backends;
use super::clusters;
use super::model::{
    self, CreateCluster, Policy, PolicyUpdate, ScaleOperation, ScaleRequest, StateSync,
};
use crate::error::ApiError;

/// One request of the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Every cluster.
    ListClusters,
    /// One cluster.
    GetCluster(String),
    /// Create a cluster with its first instance.
    CreateCluster(Box<CreateCluster>),
    /// Delete a cluster and its instances.
    DeleteCluster(String),
    /// Change a cluster's scaling policy: the fields given; the others keep the values
    /// of the policy in force.
    SetPolicy(String, PolicyUpdate),
    /// Set how a cluster's instances share application state.
    SetStateSync(String, StateSync),
    /// Scale a cluster; the idempotency key makes a retry return the same operation.
    Scale(String, ScaleRequest, Option<String>),
    /// A cluster's status.
    Status(String),
    /// One operation.
    GetOperation(String),
    /// Start draining one instance of a cluster.
    DrainInstance(String, String),
    /// Make a draining instance serve again.
    UndrainInstance(String, String),
    /// Set how a cluster's scale-ins drain their victims.
    SetDrain(String, model::Drain),
    /// Every node.
    ListNodes,
    /// Cordon a node (true) or lift its cordon (false).
    CordonNode(String, bool),
}

/// A reply: status and JSON body.
pub type Reply = (StatusCode, Value);

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Result<Reply, ApiError> {
    serde_json::to_value(v)
        .map(|v| (status, v))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// Checks an id from a path or body; the error names the field.
pub fn check_id(field: &str, value: &str) -> Result<(), ApiError> {
    form_runtime::ids::check(value).map_err(|e| ApiError::invalid(format!("{field} {e}")))
}

/// Every node, from form-state.
async fn nodes(b: &Backends) -> Result<model::NodeList, ApiError> {
    let list = b
        .state()?
        .list_nodes(state_pb::ListNodesRequest {})
        .await
        .map_err(|s| ApiError::upstream("listing nodes", &s))?
        .into_inner();
    Ok(model::NodeList {
        nodes: list.nodes.into_iter().map(model::Node::from).collect(),
    })
}

/// The operation id an idempotency key stands for on `cluster`.
pub fn idempotent_id(cluster: &str, key: &str) -> String {
    let h = Sha256::digest(format!("{cluster}\0{key}").as_bytes());
    let hex: String = h.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("idem-{hex}")
}

impl Action {
    /// Whether it changes anything (needs an admin token).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Action::CreateCluster(_)
                | Action::DeleteCluster(_)
                | Action::SetPolicy(..)
                | Action::SetStateSync(..)
                | Action::Scale(..)
                | Action::DrainInstance(..)
                | Action::UndrainInstance(..)
                | Action::SetDrain(..)
                | Action::CordonNode(..)
        )
    }

    /// A short name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Action::ListClusters => "list_clusters",
            Action::GetCluster(_) => "get_cluster",
            Action::CreateCluster(_) => "create_cluster",
            Action::DeleteCluster(_) => "delete_cluster",
            Action::SetPolicy(..) => "set_scaling_policy",
            Action::SetStateSync(..) => "set_state_sync",
            Action::Scale(..) => "scale_cluster",
            Action::Status(_) => "get_cluster_status",
            Action::GetOperation(_) => "get_operation",
            Action::DrainInstance(..) => "drain_instance",
            Action::UndrainInstance(..) => "undrain_instance",
            Action::SetDrain(..) => "set_drain",
            Action::ListNodes => "list_nodes",
            Action::CordonNode(_, true) => "cordon_node",
            Action::CordonNode(_, false) => "uncordon_node",
        }
    }

    /// Carries the action out.
    pub async fn run(self, b: &Backends) -> Result<Reply, ApiError> {
        match self {
            Action::ListClusters => {
                let list = b
                    .state()?
                    .list_clusters(state_pb::ListClustersRequest {})
                    .await
                    .map_err(|s| ApiError::upstream("listing clusters", &s))?
                    .into_inner();
                let clusters = list.clusters.into_iter().map(model::cluster).collect();
                json(StatusCode::OK, &model::ClusterList { clusters })
            }
            Action::GetCluster(id) => {
                check_id("cluster_id", &id)?;
                let c = clusters::get(b, &id).await?;
                json(StatusCode::OK, &model::cluster(c))
            }
            Action::CreateCluster(req) => {
                let c = clusters::create(b, *req).await?;
                json(StatusCode::CREATED, &model::cluster(c))
            }
            Action::DeleteCluster(id) => {
                check_id("cluster_id", &id)?;
                json(StatusCode::OK, &clusters::delete(b, &id).await?)
            }
            Action::SetPolicy(id, update) => {
                check_id("cluster_id", &id)?;
                // The policy in force, as the controller applies it (defaults included).
                let current: Policy = b
                    .scaler()?
                    .get_status(scaler_pb::GetStatusRequest {
                        cluster_id: id.clone(),
                    })
                    .await
                    .map_err(|s| ApiError::upstream("reading the policy in force", &s))?
                    .into_inner()
                    .policy
                    .unwrap_or_default()
                    .into();
                let policy = update.apply(current);
                let reply = b
                    .scaler()?
                    .set_policy(scaler_pb::SetPolicyRequest {
                        cluster_id: id,
                        policy: Some(policy.into()),
                    })
                    .await
                    .map_err(|s| ApiError::upstream("setting the policy", &s))?
                    .into_inner();
                let p: Policy = reply.policy.unwrap_or_default().into();
                json(StatusCode::OK, &p)
            }
            Action::SetStateSync(id, sync) => {
                check_id("cluster_id", &id)?;
                // A missing cluster is 404 (a write would create it).
                clusters::get(b, &id).await?;
                b.state()?
                    .put_cluster(state_pb::PutClusterRequest {
                        cluster_id: id.clone(),
                        state_sync: Some(sync.into()),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| ApiError::upstream("setting state_sync", &s))?;
                let c = clusters::get(b, &id).await?;
                json(StatusCode::OK, &model::StateSync::from(c.state_sync))
            }
            Action::Scale(id, req, key) => {
                check_id("cluster_id", &id)?;
                scale(b, id, req, key).await
            }
            Action::Status(id) => {
                check_id("cluster_id", &id)?;
                let s = b
                    .scaler()?
                    .get_status(scaler_pb::GetStatusRequest { cluster_id: id })
                    .await
                    .map_err(|s| ApiError::upstream("reading the status", &s))?
                    .into_inner();
                let cluster = model::cluster(clusters::get(b, &s.cluster_id).await?);
                let sync = clusters::state_sync(&cluster);
                json(StatusCode::OK, &status(s, cluster.members, sync))
            }
            Action::ListNodes => json(StatusCode::OK, &nodes(b).await?),
            Action::CordonNode(id, on) => {
                check_id("node_id", &id)?;
                b.state()?
                    .set_node_cordon(state_pb::SetNodeCordonRequest {
                        node_id: id.clone(),
                        cordoned: on,
                    })
                    .await
                    .map_err(|s| ApiError::upstream("cordoning the node", &s))?;
                let node = nodes(b)
                    .await?
                    .nodes
                    .into_iter()
                    .find(|n| n.node_id == id)
                    .ok_or_else(|| ApiError::not_found(format!("node '{id}' not found")))?;
                json(StatusCode::OK, &node)
            }
            Action::GetOperation(id) => {
                check_id("operation_id", &id)?;
                let op = b
                    .state()?
                    .get_operation(state_pb::GetOperationRequest { operation_id: id })
                    .await
                    .map_err(|s| ApiError::upstream("reading the operation", &s))?
                    .into_inner();
                json(StatusCode::OK, &model::operation(op))
            }
            Action::DrainInstance(cluster, instance) => {
                check_id("cluster_id", &cluster)?;
                check_id("instance_id", &instance)?;
                clusters::drain_member(b, &cluster, &instance, true).await?;
                json(
                    StatusCode::ACCEPTED,
                    &model::Drained {
                        cluster_id: cluster,
                        instance_id: instance,
                    },
                )
            }
            Action::UndrainInstance(cluster, instance) => {
                check_id("cluster_id", &cluster)?;
                check_id("instance_id", &instance)?;
                clusters::drain_member(b, &cluster, &instance, false).await?;
                json(
                    StatusCode::OK,
                    &model::Drained {
                        cluster_id: cluster,
                        instance_id: instance,
                    },
                )
            }
            Action::SetDrain(id, drain) => {
                check_id("cluster_id", &id)?;
                clusters::get(b, &id).await?;
                b.state()?
                    .put_cluster(state_pb::PutClusterRequest {
                        cluster_id: id.clone(),
                        drain: Some(drain.into()),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| ApiError::upstream("setting the drain settings", &s))?;
                let c = clusters::get(b, &id).await?;
                json(StatusCode::OK, &model::Drain::from(c.drain))
            }
        }
    }
}

async fn scale(
    b: &Backends,
    cluster: String,
    req: ScaleRequest,
    key: Option<String>,
) -> Result<Reply, ApiError> {
    let kind = match req.operation {
        ScaleOperation::ScaleOut => types::OperationKind::ScaleOut,
        ScaleOperation::ScaleIn => types::OperationKind::ScaleIn,
        ScaleOperation::Resize => types::OperationKind::Resize,
        ScaleOperation::ReplaceInstance => types::OperationKind::ReplaceInstance,
    };
    if kind == types::OperationKind::Resize && req.resources.is_none() {
        return Err(ApiError::invalid(
            "resources is missing; resize needs {\"vcpus\": 1-256, \"memory_mib\": 16-4194304}",
        ));
    }
    if kind == types::OperationKind::ReplaceInstance && req.instance_id.is_none() {
        return Err(ApiError::invalid(
            "instance_id is missing; replace_instance needs the instance to replace",
        ));
    }
    if let Some(k) = &key
        && (k.is_empty() || k.len() > 256)
    {
        return Err(ApiError::invalid(
            "Idempotency-Key must be 1 to 256 characters",
        ));
    }
    let request = scaler_pb::ScaleRequest {
        operation_id: key.map(|k| idempotent_id(&cluster, &k)).unwrap_or_default(),
        cluster_id: cluster,
        kind: kind as i32,
        target_count: req.target_count,
        target_resources: req.resources.map(Into::into),
        immediate: req.immediate,
        drain_connections: req.drain_connections,
        instance_id: req.instance_id.unwrap_or_default(),
        drain: req.drain.map(Into::into),
        instance_ids_to_remove: req.instance_ids_to_remove,
    };
    let reply = b
        .scaler()?
        .scale(request)
        .await
        .map_err(|s| ApiError::upstream("scaling", &s))?
        .into_inner();
    let operation = model::operation(reply.operation.unwrap_or_default());
    json(
        StatusCode::ACCEPTED,
        &model::ScaleAccepted {
            operation_id: reply.operation_id,
            operation,
        },
    )
}

fn status(
    s: scaler_pb::ClusterStatus,
    members: Vec<model::Member>,
    state_sync: String,
) -> model::Status {
    model::Status {
        cluster_id: s.cluster_id,
        instances: s.instances,
        ready_instances: s.ready_instances,
        scaling_status: s.scaling_status,
        health_status: s.health_status,
        last_operation: s.last_operation.map(|o| {
            let o = model::operation(o);
            model::LastOperation {
                operation_id: o.operation_id,
                kind: o.kind,
                completed_at: o.completed_at,
                status: o.status,
                not_handed_off: o
                    .state_transfer
                    .map(|t| t.not_handed_off)
                    .unwrap_or_default(),
            }
        }),
        members,
        last_decision: s.last_decision.map(|d| model::Decision {
            desired: d.desired,
            current: d.current,
            reason: d.reason,
            at: crate::time::rfc3339(d.at_ms),
        }),
        policy: s.policy.map(Into::into),
        owner: s.owner,
        state_sync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_names_one_operation_per_cluster() {
        let a = idempotent_id("web", "key-1");
        assert_eq!(a, idempotent_id("web", "key-1"));
        assert_ne!(a, idempotent_id("db", "key-1"));
        assert!(form_runtime::ids::check(&a).is_ok());
    }
}
