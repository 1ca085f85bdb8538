//! Fencing, tried from outside against the real services: once a newer epoch of a
//! cluster was claimed, form-state, the vmm node and the balancer each refuse a call
//! carrying an older one, and change nothing; a controller frozen in the middle of an
//! operation, whose operation another controller adopted and finished, is refused
//! when it wakes and leaves the cluster as the other one made it.

mod common;

use std::time::Duration;

use common::*;
use form_proto::rplb::v1 as rplb_pb;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::types::v1::OperationKind;
use form_proto::vmm::v1 as vmm_pb;
use form_runtime::fence::{Fence, HEADER, is_stale};
use form_testkit::{Signal, assert_eventually, start};

/// `msg` as a request carrying `fence`.
fn fenced<T>(msg: T, fence: &Fence) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(HEADER, fence.header().parse().expect("header"));
    r
}

#[tokio::test]
async fn every_service_refuses_an_older_epoch() {
    let mut stack = Stack::start("fencing").await;
    let old = Fence::next(0, "ctl-old");
    let new = Fence::next(old.epoch, "ctl-new");
    let claim = |f: &Fence| state_pb::ClaimClusterRequest {
        cluster_id: CLUSTER.into(),
        fence: Some(types::Fence {
            epoch: f.epoch,
            owner: f.owner.clone(),
        }),
    };
    stack
        .state
        .claim_cluster(claim(&old))
        .await
        .expect("old claim");
    // Calls with the old epoch pass while it is the highest, and reach the vmm node.
    let workload = stack.cluster().await.workload;
    let made = stack
        .vmm_client
        .create_instance(fenced(
            vmm_pb::CreateInstanceRequest {
                instance_id: "fenced-1".into(),
                cluster_id: CLUSTER.into(),
                workload,
                resources: None,
            },
            &old,
        ))
        .await;
    assert!(made.is_ok(), "{made:?}");
    // A newer claim wins, in form-state and, by a call that carries it, on the node.
    stack
        .state
        .claim_cluster(claim(&new))
        .await
        .expect("new claim");
    assert_eq!(
        stack.cluster().await.fence.map(|f| f.epoch),
        Some(new.epoch)
    );
    for pause in [true, false] {
        let r = fenced(
            vmm_pb::InstanceRef {
                instance_id: "fenced-1".into(),
            },
            &new,
        );
        let done = if pause {
            stack.vmm_client.pause(r).await
        } else {
            stack.vmm_client.resume(r).await
        };
        done.expect("a call with the new epoch");
    }

    // form-state: the old epoch cannot claim again, nor write the cluster's members.
    let e = stack
        .state
        .claim_cluster(claim(&old))
        .await
        .expect_err("stale claim");
    assert!(is_stale(&e), "{e:?}");
    assert!(e.message().contains("ctl-new"), "{}", e.message());
    let e = stack
        .state
        .remove_member(fenced(
            state_pb::RemoveMemberRequest {
                cluster_id: CLUSTER.into(),
                instance_id: TEMPLATE.into(),
            },
            &old,
        ))
        .await
        .expect_err("stale remove");
    assert!(is_stale(&e), "{e:?}");
    assert!(stack.cluster().await.members.contains_key(TEMPLATE));

    // The vmm node: the old epoch cannot delete the instance.
    let e = stack
        .vmm_client
        .delete_instance(fenced(
            vmm_pb::InstanceRef {
                instance_id: "fenced-1".into(),
            },
            &old,
        ))
        .await
        .expect_err("stale delete");
    assert!(is_stale(&e), "{e:?}");
    assert!(stack.instances().await.contains(&"fenced-1".to_owned()));

    // The balancer learnt the new epoch from form-state: an old drain is refused.
    stack.routed_template().await;
    assert_eventually!(
        async {
            let r = stack
                .rplb_client
                .drain_backend(fenced(
                    rplb_pb::DrainBackendRequest {
                        domain: DOMAIN.into(),
                        backend_id: TEMPLATE.into(),
                        ..Default::default()
                    },
                    &old,
                ))
                .await;
            matches!(r, Err(e) if is_stale(&e))
        },
        "the balancer refuses the old epoch"
    );
    let backends = stack.backends().await;
    assert!(
        backends.contains(&(TEMPLATE.into(), rplb_pb::BackendState::Active as i32)),
        "{backends:?}"
    );
    // A malformed fence is refused, naming what is accepted.
    let mut bad = tonic::Request::new(vmm_pb::InstanceRef {
        instance_id: "fenced-1".into(),
    });
    bad.metadata_mut()
        .insert(HEADER, "soon/ctl".parse().expect("header"));
    let e = stack
        .vmm_client
        .delete_instance(bad)
        .await
        .expect_err("bad");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("EPOCH/OWNER") || e.message().contains("not a number"));
    // Calls without a fence (an operator's) are not fenced.
    stack
        .vmm_client
        .delete_instance(vmm_pb::InstanceRef {
            instance_id: "fenced-1".into(),
        })
        .await
        .expect("unfenced delete");
    stack.stop().await;
}

#[tokio::test]
async fn a_controller_that_wakes_after_its_operation_was_adopted_changes_nothing() {
    let mut stack = Stack::start("fencing-wake").await;
    let beat = [
        "--controller-heartbeat-ms",
        "200",
        "--controller-ttl-ms",
        "2000",
    ];
    // Controller A holds its scale-outs before clone_instances until `go` exists.
    let go = stack.dir.path().join("go");
    let hold = format!("clone_instances=hold:{}", go.display());
    let mut a = stack
        .start_scaler(
            &[
                &["--id", "ctl-a", "--inject-fault", hold.as_str()],
                &beat[..],
            ]
            .concat(),
        )
        .await;
    let reply = a
        .scale(scale(OperationKind::ScaleOut, 3))
        .await
        .expect("scale out")
        .into_inner();
    let id = reply.operation_id.clone();
    let op_of = async |stack: &mut Stack| {
        stack
            .operations()
            .await
            .into_iter()
            .find(|o| o.operation_id == id)
            .expect("the operation")
    };
    assert_eventually!(
        async { status(&op_of(&mut stack).await) == "in_progress: clone_instances" },
        "A holds before clone_instances"
    );
    // A freezes (its heartbeats stop); B adopts the operation and ends it (an operation
    // adopted before its commit is rolled back).
    let a_svc = stack.scaler.take().expect("A");
    a_svc.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let args: Vec<&str> = form_testkit::conformance::PORT0_ARGS
        .iter()
        .copied()
        .chain(stack.scaler_args().iter().map(String::as_str))
        .chain(["--autoscale", "false", "--id", "ctl-b"])
        .chain(beat)
        .collect();
    let mut b = start(&stack.dir, "ctl-b", std::path::Path::new(BIN), &args).await;
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async { terminal(&op_of(&mut stack).await) },
        "B ends A's operation"
    );
    let ended = status(&op_of(&mut stack).await);
    assert!(ended.starts_with("rolled_back"), "{ended}");
    let fence = stack.cluster().await.fence.expect("a fence");
    assert_eq!(fence.owner, "ctl-b", "B claimed the cluster");
    let members = stack.members().await;
    assert_eq!(members, [TEMPLATE]);

    // A wakes and goes on where it was: every change it tries is refused.
    a_svc.signal(Signal::SIGCONT).expect("SIGCONT");
    std::fs::write(&go, "").expect("release A's hold");
    let mut a_svc = a_svc;
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async { a_svc.log_tail().contains("stale fence") },
        "A is refused as stale"
    );
    assert_eq!(stack.members().await, members);
    assert_eq!(stack.instances().await, members);
    assert_eq!(status(&op_of(&mut stack).await), ended);
    assert!(stack.snapshots().await.is_empty());
    assert!(stack.agree().await, "members, instances and backends agree");
    drop(a);
    let _ = a_svc.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
    let _ = b.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
    stack.stop().await;
}
