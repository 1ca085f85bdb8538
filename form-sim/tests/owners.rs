//! Two controllers on the in-process platform: the owner of a cluster is cut off from
//! form-state in the middle of a scale-out, the other adopts the operation (rolls it
//! back, since it had not committed) under a higher epoch, and then the cut-off owner
//! goes on with its run. Every side effect it then tries is refused (docs/fencing.md),
//! and the cluster ends as the new owner left it, with nothing leaked.

use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_scaler::faults::Faults;
use form_sim::platform::run::{ENDS, SETTLES, members, nodes_match_state, scale, spec};
use form_sim::platform::{InProcess, Setup, replica};
use form_testkit::dir::TestDir;
use tokio::time::Instant;

async fn until(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn operation(p: &InProcess, id: &str) -> types::Operation {
    p.state()
        .get_operation(state_pb::GetOperationRequest {
            operation_id: id.into(),
        })
        .await
        .expect("operation")
        .into_inner()
}

/// Creates cluster `web` through `c`, then submits a scale-out to 3 to it and waits
/// until the operation is held before `step` (the setup's `hold` fault).
async fn scale_out_held_at(
    p: &InProcess,
    c: &form_sim::platform::Controller,
    step: &str,
) -> types::Operation {
    let created = c.create(spec("web"), "create-web").await.expect("create");
    p.ended(&created.operation_id, ENDS)
        .await
        .expect("create ends");
    let op = c
        .submit("web", scale(types::OperationKind::ScaleOut, 3, "out-3"))
        .await
        .expect("scale-out accepted");
    until(
        &format!("the scale-out held before {step}"),
        SETTLES,
        async || {
            form_scaler::ops::record::current_step(&operation(p, &op.operation_id).await)
                == Some(step)
        },
    )
    .await;
    op
}

/// Cluster `web`'s fence in form-state.
async fn fence_of_web(p: &InProcess) -> types::Fence {
    p.cluster("web")
        .await
        .expect("cluster")
        .fence
        .expect("a fence")
}

#[tokio::test(start_paused = true)]
async fn a_cut_off_owner_going_on_after_another_adopted_its_operation_does_no_harm() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("form_scaler=warn,form_vmm_service=warn")
        .with_test_writer()
        .try_init();
    let dir = TestDir::new("sim-owners");
    let go = dir.path().join("go");
    // Every controller holds a scale-out before its clones until the test says go.
    let faults =
        Faults::parse(&[format!("clone_instances=hold:{}", go.display())]).expect("faults");
    let setup = Setup {
        nodes: 2,
        controllers: 2,
        controller_ttl: Duration::from_secs(2),
        faults,
        ..Default::default()
    };
    let p = InProcess::with(dir.path(), setup).await.expect("platform");
    let c = |i: usize| p.controllers[i].as_ref().expect("runs");
    until("both controllers see each other", SETTLES, async || {
        c(0).shared.peers.is_live("controller-2") && c(1).shared.peers.is_live("controller-1")
    })
    .await;
    // The owner (by the controllers' view) takes the request.
    let owner = usize::from(!c(0).shared.peers.owns("web"));
    let (stale, adopter) = (c(owner), c(1 - owner));
    assert!(stale.shared.peers.owns("web") && !adopter.shared.peers.owns("web"));
    let op = scale_out_held_at(&p, stale, "clone_instances").await;
    // The owner loses form-state (it still reaches the nodes): after the ttl the other
    // controller takes the cluster and its unfinished operation.
    p.net.partition_between(&stale.name, &replica(1));
    let ended = p
        .ended(&op.operation_id, ENDS)
        .await
        .expect("adopted and ended");
    assert_eq!(
        ended.owner, adopter.shared.id,
        "the other controller ran it to its end"
    );
    assert_eq!(
        form_scaler::ops::status_name(&ended),
        "rolled_back",
        "{ended:?}"
    );

    // Its heartbeats were only late: it reaches form-state again, still holding its
    // old epoch and its run, and goes on. Its clones carry the old epoch, which the
    // nodes refuse after the adopter's calls; its writes to form-state are refused
    // by the cluster's fence there.
    p.net.heal_between(&stale.name, &replica(1));
    until(
        "the stale controller reads form-state again",
        ENDS,
        async || {
            stale.shared.peers.is_live("controller-1") && stale.shared.peers.is_live("controller-2")
        },
    )
    .await;
    std::fs::write(&go, b"").expect("go");
    until("the stale run gave up", ENDS, async || {
        stale.shared.running("web").is_none()
    })
    .await;
    nodes_match_state(&p, "web").await.expect("nothing leaked");
    assert_eq!(
        members(&p, "web").await.len(),
        1,
        "the cluster as the adopter left it"
    );
    // Its record was refused: the operation is exactly as the adopter ended it.
    let after = operation(&p, &op.operation_id).await;
    assert_eq!(
        after, ended,
        "the late owner changed nothing of the operation"
    );
    p.stop().await;
}

/// The case of CI's seed 3 (docs/simulation.md, "Bugs found"): another controller
/// claimed the cluster's fence and crashed before it recorded anything of the owner's
/// operation. The owner's next record is refused as stale and its run suspended; the
/// owner, alive and still the operation's owner, must resume it at its next round
/// (before, it remembered the suspended run as ended and never ran it again, and no
/// other controller may take an operation of a live one).
#[tokio::test(start_paused = true)]
async fn a_run_refused_as_stale_is_resumed_by_its_owner() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("form_scaler=warn,form_vmm_service=warn")
        .with_test_writer()
        .try_init();
    let dir = TestDir::new("sim-owners-resumed");
    let go = dir.path().join("go");
    let faults = Faults::parse(&[format!("wait_healthy=hold:{}", go.display())]).expect("faults");
    let setup = Setup {
        nodes: 2,
        faults,
        ..Default::default()
    };
    let p = InProcess::with(dir.path(), setup).await.expect("platform");
    let op = scale_out_held_at(&p, p.controller(), "wait_healthy").await;

    // A controller that claims the cluster and is gone before it does anything more.
    let before = fence_of_web(&p).await;
    p.state()
        .claim_cluster(state_pb::ClaimClusterRequest {
            cluster_id: "web".into(),
            fence: Some(types::Fence {
                epoch: before.epoch + 1,
                owner: "controller-gone".into(),
            }),
        })
        .await
        .expect("claimed");
    std::fs::write(&go, b"").expect("go");

    let ended = p
        .ended(&op.operation_id, ENDS)
        .await
        .expect("resumed and ended");
    assert_eq!(ended.owner, "controller-1", "{ended:?}");
    let status = form_scaler::ops::status_name(&ended);
    let expected = if status == "completed" { 3 } else { 1 };
    assert!(matches!(status, "completed" | "rolled_back"), "{ended:?}");
    nodes_match_state(&p, "web").await.expect("nothing leaked");
    assert_eq!(members(&p, "web").await.len(), expected, "{ended:?}");
    let now = fence_of_web(&p).await;
    assert!(
        now.epoch > before.epoch + 1 && now.owner == "controller-1",
        "the owner claimed the cluster again above the gone one's epoch: {now:?}"
    );
    p.stop().await;
}

/// `msg` carrying `fence` in its header, as a controller's calls do.
fn fenced<T>(msg: T, fence: &form_runtime::fence::Fence) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        form_runtime::fence::HEADER,
        fence.header().parse().expect("header"),
    );
    r
}

/// The case of seed 17 of the two-controller runs (docs/simulation.md, "Bugs found"):
/// an adopter's rollback deletes clones a stale run has not made yet (they are absent,
/// so the node could not tell their cluster, and learnt no epoch from the delete);
/// the stale run's clones then came, and were left running. A node now remembers the
/// newer epoch that found an id absent and refuses to make that id under an older one.
#[tokio::test(start_paused = true)]
async fn an_undo_that_found_a_clone_absent_keeps_a_stale_run_from_making_it() {
    use form_proto::vmm::v1 as vmm_pb;
    use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
    use form_runtime::fence::{Fence, is_stale};
    let dir = TestDir::new("sim-owners-absent");
    let p = InProcess::start(dir.path(), 1).await.expect("platform");
    let mut node = VmmServiceClient::new(p.net.channel(&p.nodes()[0].address));
    let (old, new) = (
        Fence::next(0, "controller-1"),
        Fence::next(1 << 30, "controller-2"),
    );
    let undo = node
        .delete_instance(fenced(
            vmm_pb::InstanceRef {
                instance_id: "web-x-1".into(),
            },
            &new,
        ))
        .await
        .expect_err("nothing to delete");
    assert_eq!(undo.code(), tonic::Code::NotFound, "{undo:?}");
    let create = |f: &Fence| {
        fenced(
            vmm_pb::CreateInstanceRequest {
                instance_id: "web-x-1".into(),
                cluster_id: "web".into(),
                workload: Some(types::Workload {
                    command: "/bin/true".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            f,
        )
    };
    let stale = node
        .create_instance(create(&old))
        .await
        .expect_err("the stale run may not make it");
    assert!(is_stale(&stale), "{stale:?}");
    assert!(
        p.instances().await.values().all(Vec::is_empty),
        "nothing was made"
    );
    let pulled = node
        .pull_snapshot(fenced(
            vmm_pb::PullSnapshotRequest {
                snapshot_id: "web-x-1".into(),
                from_address: "node-9:1".into(),
                ..Default::default()
            },
            &old,
        ))
        .await
        .expect_err("nor pull a snapshot of that id");
    assert!(is_stale(&pulled), "{pulled:?}");
    node.create_instance(create(&new))
        .await
        .expect("the newer epoch may");
    // An id that is no id found absent poisons nothing: a create whose id the node
    // chooses is not refused for it.
    let _ = node
        .delete_instance(fenced(
            vmm_pb::InstanceRef {
                instance_id: String::new(),
            },
            &new,
        ))
        .await;
    let mut auto = create(&old);
    auto.get_mut().instance_id.clear();
    auto.get_mut().cluster_id = "other".into();
    node.create_instance(auto)
        .await
        .expect("an id the node chooses is not refused for an empty one");
    p.stop().await;
}
