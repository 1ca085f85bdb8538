//! Planning an operation, before any step runs: the steps of its kind, the ids of the
//! instances it will create (fixed now, so an undo after a crash knows what to delete),
//! its victims and the instance clones are made from. Pure: the caller reads the
//! cluster and the balancer's figures and passes them in.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::Step;
use crate::policy;
use crate::victims::{self, Candidate};

/// The steps of an operation of `kind`, in order.
pub fn steps(kind: types::OperationKind) -> &'static [Step] {
    use Step::*;
    const OUT: [Step; 9] = [
        SnapshotSource,
        CloneInstances,
        WaitHealthy,
        SyncClones,
        AddMembers,
        ActivateMembers,
        WaitServing,
        FinalSyncClones,
        DeleteSnapshot,
    ];
    const IN: [Step; 4] = [
        DrainVictims,
        HandoffVictims,
        RemoveVictimMembers,
        DeleteVictimInstances,
    ];
    // The steps of a scale-out but the last, the template's promotion, the steps of a
    // scale-in, then the snapshot's deletion.
    const REPLACE: [Step; 14] = [
        OUT[0],
        OUT[1],
        OUT[2],
        OUT[3],
        OUT[4],
        OUT[5],
        OUT[6],
        OUT[7],
        PromoteReplacement,
        IN[0],
        IN[1],
        IN[2],
        IN[3],
        DeleteSnapshot,
    ];
    // In place only: a size a member cannot take in place fails the operation (a
    // memory snapshot cannot change a VM's shape).
    const RESIZE: [Step; 2] = [ResizeInPlace, StoreResources];
    // Every step undoable: a create that fails anywhere leaves nothing.
    const CREATE: [Step; 4] = [StoreCluster, CreateTemplate, AddTemplate, TemplateServing];
    const DELETE: [Step; 2] = [DeleteClusterRecord, DeleteClusterInstances];
    match kind {
        types::OperationKind::DeleteCluster => &DELETE,
        types::OperationKind::CreateCluster => &CREATE,
        types::OperationKind::ScaleOut => &OUT,
        types::OperationKind::ScaleIn => &IN,
        types::OperationKind::ReplaceInstance => &REPLACE,
        types::OperationKind::Resize => &RESIZE,
        types::OperationKind::Unspecified => &[],
    }
}

/// The id of the `k`-th (0-based) instance created by operation `op_id` of `cluster`:
/// the same on every controller and after every restart.
pub fn new_instance_id(cluster: &str, op_id: &str, k: usize) -> String {
    let h = Sha256::digest(op_id.as_bytes());
    let prefix: String = cluster.chars().take(100).collect();
    format!(
        "{prefix}-{:02x}{:02x}{:02x}{:02x}-{}",
        h[0],
        h[1],
        h[2],
        h[3],
        k + 1
    )
}

/// A request, as the API or the autoscaler makes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Operation id (already chosen).
    pub operation_id: String,
    /// What to do.
    pub kind: i32,
    /// Instances wanted; 0 means one more (scale-out) or one fewer (scale-in).
    pub target_count: u32,
    /// New resources (resize).
    pub target_resources: Option<types::Resources>,
    /// Instance to replace (replace).
    pub instance_id: String,
    /// Drain victims before removing them.
    pub drain_connections: bool,
    /// Skip cooldowns.
    pub immediate: bool,
    /// Why, e.g. "api" or a decision's reason.
    pub reason: String,
    /// Scale-in: the instances to remove (empty: the controller chooses).
    pub remove: Vec<String>,
    /// How to drain the victims (unset: the cluster's settings).
    pub drain: Option<types::DrainSettings>,
}

impl Request {
    /// SHA-256 (hex) of every field of the request but its reason: two requests with
    /// one operation id must be the same request.
    pub fn digest(&self) -> String {
        let r = self.target_resources.unwrap_or_default();
        let d = self.drain.unwrap_or_default();
        let canonical = format!(
            "kind={}\ntarget={}\nresources={}/{}/{}\ninstance={}\ndrain_connections={}\nimmediate={}\nremove={}\ndrain={}/{}/{}/{}",
            self.kind,
            self.target_count,
            self.target_resources.is_some(),
            r.vcpus,
            r.memory_mib,
            self.instance_id,
            self.drain_connections,
            self.immediate,
            self.remove.join(","),
            self.drain.is_some(),
            d.grace_period_seconds,
            d.wait_for_connections,
            d.notify_clients,
        );
        Sha256::digest(canonical.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Whether a member counts as healthy (no health event, or a healthy one last).
pub fn member_healthy(m: &state_pb::Member) -> bool {
    m.health_history
        .last()
        .is_none_or(|e| e.state != state_pb::HealthState::Unhealthy as i32)
        && m.status != state_pb::MemberStatus::Stopped as i32
}

/// The members that count: every member that is not on its way out.
pub fn counted_members(c: &state_pb::Cluster) -> Vec<&state_pb::Member> {
    let mut v: Vec<&state_pb::Member> = c
        .members
        .values()
        .filter(|m| {
            m.status != state_pb::MemberStatus::Draining as i32
                && m.status != state_pb::MemberStatus::Stopped as i32
        })
        .collect();
    v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    v
}

/// The policy in force for `c`.
pub fn policy_of(c: &state_pb::Cluster) -> types::ScalingPolicy {
    c.scaling_policy.unwrap_or_else(policy::default_policy)
}

/// The operation that creates the cluster of `spec` with its template instance.
pub fn create_cluster(
    operation_id: &str,
    spec: &state_pb::PutClusterRequest,
    owner: &str,
    now_ms: u64,
) -> types::Operation {
    let kind = types::OperationKind::CreateCluster;
    let id = spec.cluster_id.as_str();
    let mut op = types::Operation {
        operation_id: operation_id.to_owned(),
        cluster_id: id.to_owned(),
        kind: kind as i32,
        status: Some(types::OperationStatus {
            state: Some(types::operation_status::State::Requested(
                types::Requested {},
            )),
        }),
        owner: owner.to_owned(),
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        reason: "api".into(),
        target_count: 1,
        steps: steps(kind).iter().map(|s| s.name().to_owned()).collect(),
        // The template's id is fixed before anything is made, so an undo after a crash
        // knows what to delete; the operation id makes it the same on every controller.
        new_instances: vec![new_instance_id(id, operation_id, 0)],
        cluster_spec: prost::Message::encode_to_vec(spec),
        request_digest: Sha256::digest(prost::Message::encode_to_vec(spec))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        ..Default::default()
    };
    op.affected_instances = affected(&op);
    op
}

/// A scale-in of the instances the request names: each a member other than the
/// template, once; the counted ones lower the count (within the policy's minimum), a
/// drained one is removed without changing it.
fn named_victims(
    op: &mut types::Operation,
    req: &Request,
    cluster: &state_pb::Cluster,
    policy: &types::ScalingPolicy,
    current: u32,
) -> Result<(), Status> {
    let id = cluster.cluster_id.as_str();
    let mut counted = 0u32;
    for (k, v) in req.remove.iter().enumerate() {
        let Some(m) = cluster.members.get(v) else {
            return Err(Status::invalid_argument(format!(
                "instance_ids_to_remove[{k}] '{v}' is not a member of cluster {id}; expected some of: {}",
                member_list(cluster)
            )));
        };
        if req.remove[..k].contains(v) {
            return Err(Status::invalid_argument(format!(
                "instance_ids_to_remove[{k}] '{v}' is named twice"
            )));
        }
        if *v == cluster.template_instance_id {
            return Err(Status::invalid_argument(format!(
                "instance_ids_to_remove[{k}] '{v}' is the template of cluster {id}, which a scale-in never removes; replace it instead"
            )));
        }
        if counted_members(cluster).contains(&m) {
            counted += 1;
        }
    }
    let target = current - counted;
    if req.target_count != 0 && req.target_count != target {
        return Err(Status::invalid_argument(format!(
            "target_count {} does not agree with instance_ids_to_remove: removing them leaves {target} of {current} instances",
            req.target_count
        )));
    }
    if counted > 0 && target < policy.min_instances {
        return Err(Status::invalid_argument(format!(
            "removing {counted} serving instances leaves {target}, below the policy's min_instances {}",
            policy.min_instances
        )));
    }
    op.target_count = target;
    op.victims = req.remove.clone();
    Ok(())
}

/// The operation for `req` on `cluster`, or an error naming what is wrong and what is
/// accepted. `candidates` are the members as a scale-in sees them.
pub fn build(
    req: &Request,
    cluster: &state_pb::Cluster,
    candidates: &[Candidate],
    owner: &str,
    now_ms: u64,
) -> Result<types::Operation, Status> {
    let kind =
        types::OperationKind::try_from(req.kind).unwrap_or(types::OperationKind::Unspecified);
    let policy = policy_of(cluster);
    let counted = counted_members(cluster);
    let current = counted.len() as u32;
    let id = cluster.cluster_id.as_str();
    let mut op = types::Operation {
        operation_id: req.operation_id.clone(),
        cluster_id: cluster.cluster_id.clone(),
        kind: kind as i32,
        status: Some(types::OperationStatus {
            state: Some(types::operation_status::State::Requested(
                types::Requested {},
            )),
        }),
        drain_connections: req.drain_connections,
        immediate: req.immediate,
        owner: owner.to_owned(),
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        reason: req.reason.clone(),
        previous_resources: cluster.resources,
        drain: Some(
            req.drain
                .or(cluster.drain)
                .unwrap_or_else(form_proto::default_drain_settings),
        ),
        request_digest: req.digest(),
        steps: steps(kind).iter().map(|s| s.name().to_owned()).collect(),
        ..Default::default()
    };
    let new_ids = |n: usize| -> Vec<String> {
        (0..n)
            .map(|k| new_instance_id(id, &req.operation_id, k))
            .collect()
    };
    match kind {
        types::OperationKind::ScaleOut => {
            let target = if req.target_count == 0 {
                current + 1
            } else {
                req.target_count
            };
            if target <= current || target > policy.max_instances {
                return Err(Status::invalid_argument(format!(
                    "target_count {target} is not accepted for scale_out of cluster {id}: it has {current} instances; expected {} to {} (the policy's max_instances)",
                    current + 1,
                    policy.max_instances
                )));
            }
            op.target_count = target;
            op.source_instance_id = source(cluster, &[])?;
            op.new_instances = new_ids((target - current) as usize);
        }
        types::OperationKind::ScaleIn if !req.remove.is_empty() => {
            named_victims(&mut op, req, cluster, &policy, current)?;
        }
        types::OperationKind::ScaleIn => {
            let target = if req.target_count == 0 {
                current.saturating_sub(1)
            } else {
                req.target_count
            };
            if target >= current || target < policy.min_instances {
                return Err(Status::invalid_argument(format!(
                    "target_count {target} is not accepted for scale_in of cluster {id}: it has {current} instances; expected {} to {} (the policy's min_instances up to one fewer than now)",
                    policy.min_instances,
                    current.saturating_sub(1)
                )));
            }
            op.target_count = target;
            op.victims = victims::choose(candidates, (current - target) as usize, target);
            if op.victims.len() < (current - target) as usize {
                return Err(Status::failed_precondition(format!(
                    "cluster {id} cannot lose {} instances: only {} are not the template",
                    current - target,
                    op.victims.len()
                )));
            }
        }
        types::OperationKind::ReplaceInstance => {
            if !cluster.members.contains_key(&req.instance_id) {
                return Err(Status::invalid_argument(format!(
                    "instance_id '{}' is not a member of cluster {id}; expected one of: {}",
                    req.instance_id,
                    member_list(cluster)
                )));
            }
            op.instance_id = req.instance_id.clone();
            op.target_count = current;
            op.victims = vec![req.instance_id.clone()];
            if req.instance_id == cluster.template_instance_id {
                op.previous_template_instance_id = req.instance_id.clone();
            }
            match (source(cluster, &op.victims), &cluster.standby) {
                (Ok(s), _) => op.source_instance_id = s,
                // No member to clone from (every one on a lost node, say): the standby
                // snapshot (docs/standby.md); the controller picks which of its nodes.
                (Err(_), Some(sb)) if !sb.node_ids.is_empty() => {
                    op.source_instance_id = sb.source_instance_id.clone();
                    op.snapshot_id = sb.snapshot_id.clone();
                    op.state_cursor = sb.state_cursor.clone();
                    op.snapshot_node_id = sb.node_ids[0].clone();
                }
                (Err(e), _) => {
                    return Err(Status::failed_precondition(format!(
                        "{}; and it keeps no standby snapshot (scaling_policy.standby_snapshot_seconds)",
                        e.message()
                    )));
                }
            }
            op.new_instances = new_ids(1);
        }
        types::OperationKind::Resize => {
            let r = req.target_resources.ok_or_else(|| {
                Status::invalid_argument(
                    "target_resources is missing; expected {vcpus: 1-256, memory_mib: 16-4194304} for resize",
                )
            })?;
            if !(1..=256).contains(&r.vcpus) || !(16..=4 * 1024 * 1024).contains(&r.memory_mib) {
                return Err(Status::invalid_argument(format!(
                    "target_resources {{vcpus: {}, memory_mib: {}}} is not accepted; expected vcpus 1-256 and memory_mib 16-4194304",
                    r.vcpus, r.memory_mib
                )));
            }
            op.target_resources = Some(r);
            // A cluster that never recorded resources: its members' are what an undo
            // restores.
            op.previous_resources = cluster
                .resources
                .or_else(|| counted.iter().find_map(|m| m.resources));
            op.target_count = current;
            op.source_instance_id = source(cluster, &[])?;
        }
        types::OperationKind::DeleteCluster => {
            let mut ids: Vec<String> = cluster.members.keys().cloned().collect();
            ids.sort();
            op.victims = ids;
        }
        types::OperationKind::Unspecified | types::OperationKind::CreateCluster => {
            return Err(Status::invalid_argument(format!(
                "kind {} is not accepted; expected SCALE_OUT, SCALE_IN, REPLACE_INSTANCE or RESIZE (CreateCluster makes clusters)",
                req.kind
            )));
        }
    }
    op.affected_instances = affected(&op);
    Ok(op)
}

/// Whether an operation planned earlier (and not started) still fits `cluster`: a
/// request accepted by one controller while another ran an operation may have been
/// planned from a count that has changed since.
pub fn still_valid(op: &types::Operation, cluster: &state_pb::Cluster) -> Result<(), String> {
    let policy = policy_of(cluster);
    let counted = counted_members(cluster);
    let current = counted.len() as u32;
    let member = |id: &String| counted.iter().any(|m| m.instance_id == *id);
    let kind = types::OperationKind::try_from(op.kind).unwrap_or(types::OperationKind::Unspecified);
    match kind {
        types::OperationKind::ScaleOut
            if current + op.new_instances.len() as u32 > policy.max_instances =>
        {
            Err(format!(
                "{current} instances now; {} more would pass max_instances {}",
                op.new_instances.len(),
                policy.max_instances
            ))
        }
        // A drained victim (named by the request) is a member that does not count.
        types::OperationKind::ScaleIn
            if !op.victims.iter().all(|v| cluster.members.contains_key(v))
                || current
                    .saturating_sub(op.victims.iter().filter(|v| member(v)).count() as u32)
                    < policy.min_instances =>
        {
            Err(format!(
                "the victims {:?} are no longer all members, or removing them would go below min_instances {}",
                op.victims, policy.min_instances
            ))
        }
        types::OperationKind::ReplaceInstance
            if !op.victims.iter().all(|v| cluster.members.contains_key(v)) =>
        {
            Err(format!("{:?} is no longer a member", op.victims))
        }
        _ => Ok(()),
    }
}

/// `new_instances` and `victims` together.
pub fn affected(op: &types::Operation) -> Vec<String> {
    let mut v = op.new_instances.clone();
    v.extend(op.victims.iter().cloned());
    v
}

fn member_list(c: &state_pb::Cluster) -> String {
    let mut ids: Vec<&str> = c.members.keys().map(String::as_str).collect();
    ids.sort_unstable();
    if ids.is_empty() {
        "(no members)".into()
    } else {
        ids.join(", ")
    }
}

/// The instance clones are made from: the template when it is healthy and not leaving,
/// otherwise the first healthy member that is not leaving, otherwise the template if
/// it is active and not leaving.
fn source(c: &state_pb::Cluster, leaving: &[String]) -> Result<String, Status> {
    let usable = |m: &state_pb::Member| {
        member_healthy(m)
            && !leaving.contains(&m.instance_id)
            && m.status != state_pb::MemberStatus::Draining as i32
    };
    if let Some(t) = c.members.get(&c.template_instance_id)
        && usable(t)
    {
        return Ok(t.instance_id.clone());
    }
    // When every member looks unhealthy (heartbeats lost, say), a running template is
    // still the best source.
    let running_template = c.members.get(&c.template_instance_id).filter(|t| {
        !leaving.contains(&t.instance_id) && t.status == state_pb::MemberStatus::Active as i32
    });
    counted_members(c)
        .into_iter()
        .find(|m| usable(m))
        .or(running_template)
        .map(|m| m.instance_id.clone())
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "cluster {} has no healthy member to clone from (template: '{}')",
                c.cluster_id, c.template_instance_id
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(members: usize) -> state_pb::Cluster {
        state_pb::Cluster {
            cluster_id: "web".into(),
            template_instance_id: "m0".into(),
            scaling_policy: Some(types::ScalingPolicy {
                min_instances: 1,
                max_instances: 3,
                target_cpu_utilization: 0.5,
                ..Default::default()
            }),
            members: (0..members)
                .map(|i| {
                    let id = format!("m{i}");
                    let m = state_pb::Member {
                        instance_id: id.clone(),
                        status: state_pb::MemberStatus::Active as i32,
                        ..Default::default()
                    };
                    (id, m)
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_operation_planned_from_an_older_count_is_refused_before_it_starts() {
        let out = types::Operation {
            kind: types::OperationKind::ScaleOut as i32,
            new_instances: vec!["n1".into()],
            ..Default::default()
        };
        assert!(still_valid(&out, &cluster(2)).is_ok());
        let e = still_valid(&out, &cluster(3)).expect_err("over max");
        assert!(e.contains("max_instances 3"), "{e}");
        let scale_in = types::Operation {
            kind: types::OperationKind::ScaleIn as i32,
            victims: vec!["m1".into()],
            ..Default::default()
        };
        assert!(still_valid(&scale_in, &cluster(2)).is_ok());
        assert!(still_valid(&scale_in, &cluster(1)).is_err(), "victim gone");
    }

    #[test]
    fn instance_ids_are_fixed_by_the_operation_id() {
        assert_eq!(
            new_instance_id("web", "op-1", 0),
            new_instance_id("web", "op-1", 0)
        );
        assert_ne!(
            new_instance_id("web", "op-1", 0),
            new_instance_id("web", "op-2", 0)
        );
        assert!(form_runtime::ids::check(&new_instance_id(&"c".repeat(128), "op", 9)).is_ok());
    }
}
