//! Creating and deleting whole clusters. A new cluster gets its first instance, which
//! becomes its template and an active member (the balancer serves it); a failure on the
//! way removes what was made. Deleting a cluster deletes its instances first, and is
//! refused while an operation runs on it.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;

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

/// Drains a member (`drain`) or makes a draining one serve again. Draining is refused
/// when no other member would serve; undraining, for a member that is not draining or
/// active. Draining twice, or undraining an active member, changes nothing.
pub async fn drain_member(
    b: &Backends,
    cluster: &str,
    instance: &str,
    drain: bool,
) -> Result<(), ApiError> {
    use state_pb::MemberStatus as S;
    let c = get(b, cluster).await?;
    let Some(m) = c.members.get(instance) else {
        let mut ids: Vec<&String> = c.members.keys().collect();
        ids.sort();
        return Err(ApiError::not_found(format!(
            "instance {instance} is not a member of cluster {cluster}; its members are {ids:?}"
        )));
    };
    let now = S::try_from(m.status).unwrap_or(S::Unspecified);
    let (want, what) = match (drain, now) {
        (true, S::Draining) | (false, S::Active) => return Ok(()),
        (true, S::Active) => {
            let others = c
                .members
                .values()
                .filter(|o| o.instance_id != instance && o.status == S::Active as i32)
                .count();
            if others == 0 {
                return Err(ApiError::conflict(format!(
                    "draining {instance} would leave cluster {cluster} with no serving instance; scale out first"
                )));
            }
            (S::Draining, "draining the instance")
        }
        (false, S::Draining) => (S::Active, "undraining the instance"),
        (_, other) => {
            return Err(ApiError::conflict(format!(
                "instance {instance} is {}; only an active instance can be drained and only a draining one undrained",
                other
                    .as_str_name()
                    .trim_start_matches("MEMBER_STATUS_")
                    .to_lowercase()
            )));
        }
    };
    b.state()?
        .update_member(state_pb::UpdateMemberRequest {
            cluster_id: cluster.to_owned(),
            instance_id: instance.to_owned(),
            status: Some(want as i32),
            ..Default::default()
        })
        .await
        .map_err(|s| ApiError::upstream(what, &s))?;
    Ok(())
}

/// The cluster's state sync as the status shows it: its mode, or `unsupported` when
/// a member's workload does not implement the state contract (as its node saw it
/// start and reported with its heartbeats, whichever node runs it), since then a
/// scale-in loses the removed instances' writes.
pub fn state_sync(c: &super::model::Cluster) -> String {
    let mode = super::model::state_sync_mode(&c.state_sync);
    let unsupported = c
        .members
        .iter()
        .any(|m| m.state_contract.starts_with("unsupported"));
    if mode != "none" && unsupported {
        "unsupported".into()
    } else {
        mode.into()
    }
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
    let workload: types::Workload = req.workload.into();
    let resources = req.resources.map(Into::into);
    // Stored whole, defaults filled in: what GET shows is what the controller applies.
    let policy: types::ScalingPolicy = req
        .policy
        .unwrap_or_default()
        .apply(form_proto::default_scaling_policy().into())
        .into();
    // The controller creates it as an operation: checked (its policy against its cap),
    // recorded, resumed by any controller if this one dies, rolled back as a whole if
    // a step fails. The gateway waits for its end.
    let accepted = b
        .scaler()?
        .create_cluster(form_proto::scaler::v1::CreateClusterRequest {
            operation_id: String::new(),
            cluster: Some(state_pb::PutClusterRequest {
                cluster_id: id.clone(),
                domain: req.domain,
                workload: Some(workload),
                scaling_policy: Some(policy),
                affinity: req.affinity.map(Into::into),
                resources,
                template_instance_id: None,
                state_sync: req.state_sync.map(Into::into),
                drain: req.drain.map(Into::into),
                standby: None,
                node_selector: req.node_selector.map(|labels| state_pb::NodeSelector {
                    labels: labels.into_iter().collect(),
                }),
            }),
        })
        .await
        .map_err(|s| ApiError::upstream("creating the cluster", &s))?
        .into_inner();
    let op = wait_end(b, &accepted.operation_id).await?;
    let outcome = super::model::operation(op);
    if outcome.status != "completed" {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "failed_precondition",
            format!(
                "cluster {id} was not created ({}, operation {}): {}",
                outcome.status, outcome.operation_id, outcome.error
            ),
        ));
    }
    tracing::info!(cluster = %id, operation = %outcome.operation_id, "cluster created");
    get(b, &id).await
}

/// Waits for operation `id` to end (as long as a template may take to start, with
/// the controller's margin); returns it.
async fn wait_end(b: &Backends, id: &str) -> Result<types::Operation, ApiError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let op = b
            .state()?
            .get_operation(state_pb::GetOperationRequest {
                operation_id: id.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner);
        match op {
            Ok(op) if form_proto::operation_is_terminal(&op) => return Ok(op),
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(ApiError::upstream("following the operation", &s)),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "unavailable",
                format!(
                    "operation {id} did not end in time; follow it with GET /api/v1/operations/{id}"
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Deletes the cluster and its instances through the controller's delete operation
/// (its record first: the balancer stops routing to it and no operation starts on it;
/// then its members' instances), refused while another operation runs on it.
pub async fn delete(b: &Backends, id: &str) -> Result<Deleted, ApiError> {
    get(b, id).await?;
    let accepted = b
        .scaler()?
        .delete_cluster(form_proto::scaler::v1::DeleteClusterRequest {
            cluster_id: id.to_owned(),
            operation_id: String::new(),
        })
        .await
        .map_err(|s| ApiError::upstream("deleting the cluster", &s))?
        .into_inner();
    let op = wait_end(b, &accepted.operation_id).await?;
    let outcome = super::model::operation(op.clone());
    if outcome.status != "completed" {
        return Err(ApiError::upstream(
            "deleting the cluster",
            &tonic::Status::unavailable(format!(
                "cluster {id} is not wholly deleted ({}, operation {}): {}; left: {}",
                outcome.status,
                outcome.operation_id,
                outcome.error,
                outcome.left_behind.join(", ")
            )),
        ));
    }
    tracing::info!(
        cluster = id,
        instances = op.victims.len(),
        "cluster deleted"
    );
    Ok(Deleted {
        cluster_id: id.to_owned(),
        instances_deleted: op.victims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model;

    fn member(id: &str, node: &str, contract: &str) -> (String, state_pb::Member) {
        let m = state_pb::Member {
            instance_id: id.into(),
            node_id: node.into(),
            state_contract: contract.into(),
            ..Default::default()
        };
        (id.into(), m)
    }

    #[test]
    fn one_member_without_the_contract_on_any_node_makes_the_cluster_unsupported() {
        let mut c = state_pb::Cluster {
            cluster_id: "web".into(),
            members: [
                member("i-1", "node-a", "supported"),
                member(
                    "i-2",
                    "node-b",
                    "unsupported: GET /_form/cursor answered 404",
                ),
                member("i-3", "node-b", ""),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(state_sync(&model::cluster(c.clone())), "unsupported");
        // Before its node said (a heartbeat), a member promises nothing either way.
        c.members.remove("i-2");
        assert_eq!(state_sync(&model::cluster(c.clone())), "on_scale");
        // With state sync off there is nothing to support.
        c.members
            .extend([member("i-2", "node-b", "unsupported: 404")]);
        c.state_sync = Some(form_proto::types::v1::StateSync {
            mode: Some(form_proto::types::v1::state_sync::Mode::None(
                Default::default(),
            )),
            ..Default::default()
        });
        assert_eq!(state_sync(&model::cluster(c)), "none");
    }
}
