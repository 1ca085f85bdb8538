//! Operations against the real platform (form-state, form-vmm-service with the process
//! backend and form-demo-app, form-rplb): scale-out and scale-in through the API, with
//! clones carrying the template's keys; idempotent ids; refusals; a controller killed
//! mid-operation; a fault at every step.

mod common;

use std::time::Duration;

use common::*;
use form_proto::rplb::v1 as rplb_pb;
use form_proto::scaler::v1 as pb;
use form_proto::types::v1::OperationKind;
use form_testkit::{assert_eventually, probe};

const OP_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn scale_out_and_in_through_the_api_keep_state_members_and_balancer_in_agreement() {
    let mut stack = Stack::start("ops-out-in").await;
    let mut scaler = stack.start_scaler(&[]).await;
    stack.routed_template().await;

    let mut req = scale(OperationKind::ScaleOut, 3);
    req.operation_id = "grow-1".into();
    let reply = scaler
        .scale(req.clone())
        .await
        .expect("scale out")
        .into_inner();
    assert_eq!(reply.operation_id, "grow-1");
    let op = wait_op(&mut scaler, "grow-1", OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(op.new_instances.len(), 2);
    let cluster = stack.cluster().await;
    assert_eq!(cluster.members.len(), 3);
    for m in cluster.members.values() {
        assert_eq!(
            m.status,
            form_proto::state::v1::MemberStatus::Active as i32,
            "{m:?}"
        );
        for k in ["alpha", "beta"] {
            assert_eq!(
                key_on(&m.addresses[0], k).await.as_deref(),
                Some(format!("value-{k}").as_str()),
                "{} lacks the template's key {k}",
                m.instance_id
            );
        }
    }
    assert!(
        stack.agree().await,
        "members, instances and backends differ"
    );
    assert!(
        stack
            .backends()
            .await
            .iter()
            .all(|(_, s)| *s == rplb_pb::BackendState::Active as i32)
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (code, body, _) = via_lb(stack.http, "/whoami", None).await.expect("request");
        assert_eq!(code, 200, "{body}");
        seen.insert(body);
    }
    assert!(
        seen.len() >= 2,
        "new sessions reach the clones too: {seen:?}"
    );

    // The same id again: the same operation, nothing new.
    let again = scaler.scale(req).await.expect("repeat").into_inner();
    assert_eq!(again.operation_id, "grow-1");
    assert_eq!(stack.members().await.len(), 3);

    // Inside the scale-in cooldown a manual scale-in needs `immediate`.
    let mut policy = stack.cluster().await.scaling_policy.expect("policy");
    policy.scale_in_cooldown_seconds = 3600;
    scaler
        .set_policy(pb::SetPolicyRequest {
            cluster_id: CLUSTER.into(),
            policy: Some(policy),
        })
        .await
        .expect("policy");
    let e = scaler
        .scale(scale(OperationKind::ScaleIn, 1))
        .await
        .expect_err("cooldown");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("scale_in cooldown") && e.message().contains("immediate"),
        "{e:?}"
    );
    let reply = scaler
        .scale(pb::ScaleRequest {
            immediate: true,
            ..scale(OperationKind::ScaleIn, 1)
        })
        .await
        .expect("scale in")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(stack.members().await, vec![TEMPLATE.to_owned()]);
    assert_eventually!(
        stack.agree(),
        "after scale-in: {:?} {:?}",
        stack.members().await,
        stack.instances().await
    );

    let st = scaler
        .get_status(pb::GetStatusRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(st.instances, 1);
    assert_eq!(st.scaling_status, "stable");
    assert_eq!(
        st.last_operation.map(|o| o.operation_id),
        Some(reply.operation_id)
    );
    stack.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field_and_what_is_accepted() {
    let mut stack = Stack::start("ops-refuse").await;
    let mut scaler = stack.start_scaler(&[]).await;
    let e = scaler
        .scale(scale(OperationKind::ScaleOut, 9))
        .await
        .expect_err("above max");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("target_count 9") && e.message().contains("2 to 5"),
        "{e:?}"
    );
    let e = scaler
        .scale(scale(OperationKind::ScaleIn, 0))
        .await
        .expect_err("below min");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut req = scale(OperationKind::ScaleOut, 2);
    req.cluster_id = "nope".into();
    let e = scaler.scale(req).await.expect_err("unknown cluster");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let mut req = scale(OperationKind::ScaleOut, 2);
    req.operation_id = "bad id".into();
    let e = scaler.scale(req).await.expect_err("bad id");
    assert!(e.message().contains("operation_id"), "{e:?}");
    let e = scaler
        .scale(scale(OperationKind::Unspecified, 2))
        .await
        .expect_err("no kind");
    assert!(e.message().contains("SCALE_OUT"), "{e:?}");
    let e = scaler
        .set_policy(pb::SetPolicyRequest {
            cluster_id: CLUSTER.into(),
            policy: Some(form_proto::types::v1::ScalingPolicy {
                min_instances: 3,
                max_instances: 2,
                target_cpu_utilization: 0.5,
                ..Default::default()
            }),
        })
        .await
        .expect_err("min > max");
    assert!(e.message().contains("min_instances"), "{e:?}");
    assert_eq!(stack.members().await, vec![TEMPLATE.to_owned()]);
    stack.stop().await;
}

#[tokio::test]
async fn a_controller_killed_mid_scale_out_rolls_it_back_after_restart_and_refuses_a_second_meanwhile()
 {
    let mut stack = Stack::start("ops-kill").await;
    let mut scaler = stack
        .start_scaler(&["--inject-fault", "wait_serving=hang"])
        .await;
    stack.routed_template().await;
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 3))
        .await
        .expect("scale out")
        .into_inner();
    let id = reply.operation_id.clone();
    // The clones exist and are members when the controller dies.
    reaches(&mut scaler, &id, "wait_serving").await;
    assert_eq!(stack.members().await.len(), 3);
    let e = scaler
        .scale(scale(OperationKind::ScaleIn, 1))
        .await
        .expect_err("busy");
    assert_eq!(e.code(), tonic::Code::Aborted);
    assert!(
        e.message().contains(&id),
        "the refusal names the running operation: {e:?}"
    );

    stack.kill_scaler().await;
    let mut scaler = stack.start_scaler(&[]).await;
    let op = wait_op(&mut scaler, &id, OP_DEADLINE).await;
    assert!(status(&op).starts_with("rolled_back"), "{op:?}");
    assert_eventually!(
        stack.agree(),
        "after the restart nothing is left: members {:?}, instances {:?}, backends {:?}, snapshots {:?}",
        stack.members().await,
        stack.instances().await,
        stack.backends().await,
        stack.snapshots().await
    );
    assert_eq!(stack.members().await, vec![TEMPLATE.to_owned()]);
    stack.stop().await;
}

/// Resizes the cluster and waits for the operation's end.
async fn resize_to(
    scaler: &mut pb::scaler_service_client::ScalerServiceClient<tonic::transport::Channel>,
    target: form_proto::types::v1::Resources,
) -> form_proto::types::v1::Operation {
    let reply = scaler
        .scale(pb::ScaleRequest {
            target_resources: Some(target),
            ..scale(OperationKind::Resize, 0)
        })
        .await
        .expect("resize")
        .into_inner();
    wait_op(scaler, &reply.operation_id, OP_DEADLINE).await
}

#[tokio::test]
async fn resize_gives_every_member_the_new_limits_as_the_instances_see_them() {
    let mut stack = Stack::start("ops-resize").await;
    let mut scaler = stack.start_scaler(&[]).await;
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out")
        .into_inner();
    assert_eq!(
        status(&wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await),
        "completed"
    );
    let target = form_proto::types::v1::Resources {
        vcpus: 1,
        memory_mib: 192,
    };
    let op = resize_to(&mut scaler, target).await;
    let cluster = stack.cluster().await;
    if status(&op).starts_with("failed") {
        // This machine cannot write cgroups: the failure says so and nothing changed.
        assert!(status(&op).contains("cannot be enforced"), "{op:?}");
        assert_ne!(cluster.resources, Some(target));
        stack.stop().await;
        return;
    }
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(cluster.resources, Some(target));
    assert_eq!(cluster.members.len(), 2);
    for m in cluster.members.values() {
        // Read from inside the instance: the limits of its cgroup.
        let seen = probe::resources_seen(m.addresses[0].parse().expect("addr"))
            .await
            .expect("seen");
        assert_eq!(seen["cpu_limit"], 1.0, "{}: {seen}", m.instance_id);
        assert_eq!(seen["memory_limit_mib"], 192, "{}: {seen}", m.instance_id);
        assert_eq!(m.resources, Some(target));
        assert_eq!(
            key_on(&m.addresses[0], "alpha").await.as_deref(),
            Some("value-alpha")
        );
    }
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    stack.stop().await;
}

#[tokio::test]
async fn a_resize_the_node_cannot_enforce_fails_with_its_reason_and_changes_nothing() {
    let mut stack = Stack::start_on("ops-resize-refused", Backend::ProcessWithoutCgroups).await;
    let mut scaler = stack.start_scaler(&[]).await;
    let before = stack.cluster().await;
    let target = form_proto::types::v1::Resources {
        vcpus: 1,
        memory_mib: 192,
    };
    let op = resize_to(&mut scaler, target).await;
    let s = status(&op);
    assert!(
        s.starts_with("failed") && s.contains("cannot be enforced") && s.contains("undone"),
        "{s}"
    );
    let after = stack.cluster().await;
    assert_eq!(
        after.resources, before.resources,
        "the cluster keeps its size"
    );
    for (id, m) in &after.members {
        assert_eq!(m.resources, before.members[id].resources, "{id}");
        let seen = probe::resources_seen(m.addresses[0].parse().expect("addr"))
            .await
            .expect("seen");
        assert_eq!(seen["memory_limit_mib"], serde_json::Value::Null, "{seen}");
    }
    // The cluster takes the next operation.
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out after the failure")
        .into_inner();
    assert_eq!(
        status(&wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await),
        "completed"
    );
    stack.stop().await;
}

#[tokio::test]
async fn an_operation_past_its_deadline_is_rolled_back_and_fails_naming_the_step() {
    let mut stack = Stack::start("ops-deadline").await;
    let never = stack.dir.path().join("never");
    let hold = format!("wait_healthy=hold:{}", never.display());
    let mut scaler = stack
        .start_scaler(&["--operation-timeout-ms", "1500", "--inject-fault", &hold])
        .await;
    stack.routed_template().await;
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    let s = status(&op);
    assert!(
        s.starts_with("failed") && s.contains("deadline") && s.contains("wait_healthy"),
        "{s}"
    );
    assert_eventually!(
        stack.agree(),
        "nothing of the failed operation is left: members {:?}, instances {:?}",
        stack.members().await,
        stack.instances().await
    );
    assert_eq!(stack.members().await, vec![TEMPLATE.to_owned()]);
    stack.stop().await;
}

#[tokio::test]
async fn a_lost_template_is_replaced_by_a_clone_of_a_healthy_member_which_becomes_the_template() {
    let mut stack = Stack::start("ops-template").await;
    let mut scaler = stack
        .start_scaler(&["--replace-after-ms", "200", "--evaluate-interval-ms", "100"])
        .await;
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out")
        .into_inner();
    assert_eq!(
        status(&wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await),
        "completed"
    );
    let healthy = op_new(&stack.members().await);
    stack.kill_member(TEMPLATE).await;
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            let c = stack.cluster().await;
            c.members.len() == 2
                && !c.members.contains_key(TEMPLATE)
                && c.template_instance_id != TEMPLATE
                && c.members.contains_key(&c.template_instance_id)
        },
        "the template is replaced and its replacement promoted: {:?}",
        stack.cluster().await
    );
    let c = stack.cluster().await;
    assert_eq!(
        c.template_instance_id, healthy,
        "the healthy member is promoted"
    );
    let t = &c.members[&c.template_instance_id];
    assert_eq!(
        key_on(&t.addresses[0], "beta").await.as_deref(),
        Some("value-beta")
    );
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    stack.stop().await;
}

/// The member that is not the template.
fn op_new(members: &[String]) -> String {
    members
        .iter()
        .find(|m| *m != TEMPLATE)
        .expect("a member besides the template")
        .clone()
}

#[tokio::test]
async fn a_cluster_made_again_with_its_id_starts_with_no_history_and_no_cooldown() {
    let mut stack = Stack::start("ops-recreate").await;
    let mut scaler = stack.start_scaler(&[]).await;
    let mut policy = stack.cluster().await.scaling_policy.expect("policy");
    policy.scale_out_cooldown_seconds = 600;
    stack
        .state
        .put_cluster(form_proto::state::v1::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            scaling_policy: Some(policy),
            ..Default::default()
        })
        .await
        .expect("policy");
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed");
    let e = scaler
        .scale(scale(OperationKind::ScaleOut, 3))
        .await
        .expect_err("cooldown");
    assert!(e.message().contains("cooldown"), "{e:?}");

    // Deleted (its clone too) and made again with the same id and template.
    let old = stack.cluster().await;
    stack
        .state
        .delete_cluster(form_proto::state::v1::DeleteClusterRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .expect("delete");
    for id in &op.new_instances {
        let _ = stack
            .vmm_client
            .delete_instance(form_proto::vmm::v1::InstanceRef {
                instance_id: id.clone(),
            })
            .await;
    }
    assert!(
        stack.operations().await.is_empty(),
        "its operations went with it"
    );
    stack
        .state
        .put_cluster(form_proto::state::v1::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            domain: Some(old.domain.clone()),
            workload: old.workload.clone(),
            scaling_policy: old.scaling_policy,
            affinity: old.affinity.clone(),
            resources: old.resources,
            ..Default::default()
        })
        .await
        .expect("made again");
    let mut template = old.members[TEMPLATE].clone();
    template.health_history.clear();
    stack
        .state
        .add_member(form_proto::state::v1::AddMemberRequest {
            cluster_id: CLUSTER.into(),
            member: Some(template),
        })
        .await
        .expect("template member");
    stack
        .state
        .put_cluster(form_proto::state::v1::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            template_instance_id: Some(TEMPLATE.into()),
            ..Default::default()
        })
        .await
        .expect("template");
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("the new cluster is in no cooldown")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    stack.stop().await;
}

/// Waits until operation `id` runs `step` (a fault holds it there).
async fn reaches(
    scaler: &mut pb::scaler_service_client::ScalerServiceClient<tonic::transport::Channel>,
    id: &str,
    step: &str,
) {
    let want = format!("in_progress: {step}");
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            scaler
                .get_operation(pb::GetOperationRequest {
                    operation_id: id.to_owned(),
                })
                .await
                .is_ok_and(|o| status(o.get_ref()) == want)
        },
        "operation {id} reaches {step}"
    );
}

/// Cluster `id` as form-state has it.
async fn cluster_named(
    stack: &mut Stack,
    id: &str,
) -> Result<form_proto::state::v1::Cluster, tonic::Status> {
    stack
        .state
        .get_cluster(form_proto::state::v1::GetClusterRequest {
            cluster_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The request that creates cluster `id` running the demo app.
#[tokio::test]
async fn clusters_are_created_and_deleted_by_operations_and_a_killed_create_rolls_back() {
    let mut stack = Stack::start("ops-create").await;
    let mut scaler = stack.start_scaler(&[]).await;
    // Created as an operation: the cluster with its template serving, the defaults of
    // the policy stored.
    let reply = scaler
        .create_cluster(create_request("second"))
        .await
        .expect("create")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    let c = cluster_named(&mut stack, "second").await.expect("cluster");
    assert_eq!(c.template_instance_id, op.new_instances[0]);
    assert_eq!(
        c.members[&c.template_instance_id].status,
        form_proto::state::v1::MemberStatus::Active as i32
    );
    assert_eq!(c.scaling_policy, Some(form_proto::default_scaling_policy()));
    let e = scaler
        .create_cluster(pb::CreateClusterRequest {
            operation_id: String::new(),
            ..create_request("second")
        })
        .await
        .expect_err("exists");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    // Deleted by an operation too: the record, then the instances; the operation
    // stays readable after its cluster is gone.
    let template = c.template_instance_id.clone();
    let reply = scaler
        .delete_cluster(pb::DeleteClusterRequest {
            cluster_id: "second".into(),
            operation_id: String::new(),
        })
        .await
        .expect("delete")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(op.victims, std::slice::from_ref(&template));
    assert!(!stack.instances().await.contains(&template));
    let gone = cluster_named(&mut stack, "second")
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);

    // A controller killed in the middle of a create: after its restart the create is
    // rolled back as a whole, the template instance deleted.
    stack.kill_scaler().await;
    let mut scaler = stack
        .start_scaler(&["--inject-fault", "template_serving=hang"])
        .await;
    let reply = scaler
        .create_cluster(create_request("third"))
        .await
        .expect("create")
        .into_inner();
    let id = reply.operation_id.clone();
    let template = reply.operation.expect("op").new_instances[0].clone();
    reaches(&mut scaler, &id, "template_serving").await;
    assert!(stack.instances().await.contains(&template));
    stack.kill_scaler().await;
    let mut scaler = stack.start_scaler(&[]).await;
    let op = wait_op(&mut scaler, &id, OP_DEADLINE).await;
    assert!(status(&op).starts_with("rolled_back"), "{op:?}");
    assert!(
        !stack.instances().await.contains(&template),
        "the template is deleted"
    );
    let gone = cluster_named(&mut stack, "third")
        .await
        .expect_err("no cluster");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    stack.stop().await;
}

#[tokio::test]
async fn an_undo_that_cannot_finish_by_the_deadline_is_listed_and_the_cluster_goes_on() {
    let mut stack = Stack::start("ops-left-behind").await;
    let never = stack.dir.path().join("never");
    let hold = format!("wait_healthy=hold:{}", never.display());
    let mut scaler = stack
        .start_scaler(&[
            "--operation-timeout-ms",
            "3000",
            "--replace-after-ms",
            "600000",
            "--inject-fault",
            &hold,
        ])
        .await;
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out")
        .into_inner();
    reaches(&mut scaler, &reply.operation_id, "wait_healthy").await;
    // The node freezes: the undos of the rollback (delete the clone, the snapshot)
    // cannot be done before the deadline.
    stack
        .vmm
        .signal(nix::sys::signal::Signal::SIGSTOP)
        .expect("SIGSTOP");
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    stack
        .vmm
        .signal(nix::sys::signal::Signal::SIGCONT)
        .expect("SIGCONT");
    let s = status(&op);
    assert!(s.starts_with("failed") && s.contains("left_behind"), "{s}");
    let Some(form_proto::types::v1::operation_status::State::Failed(f)) =
        op.status.as_ref().and_then(|s| s.state.clone())
    else {
        panic!("{op:?}")
    };
    assert!(
        f.left_behind.iter().any(|l| l.contains("clone_instances")),
        "{:?}",
        f.left_behind
    );
    // The cluster is usable: no operation holds it, the next one is accepted (once the
    // node, frozen longer than the node timeout, is no longer lost).
    stack.wait_node_beating("node-1").await;
    let reply = scaler
        .scale(pb::ScaleRequest {
            immediate: true,
            ..scale(OperationKind::ScaleOut, 2)
        })
        .await
        .expect("the next operation is accepted");
    assert_ne!(reply.into_inner().operation_id, op.operation_id);
    stack.stop().await;
}
