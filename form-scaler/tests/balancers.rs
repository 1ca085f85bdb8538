//! Several balancers: a new instance's operation waits until every balancer serves
//! it, a scale-in until every one has drained its victim; a balancer that is gone
//! holds an operation up for the balancer timeout only, and the operation says which
//! one it stopped waiting for.

mod common;

use std::time::Duration;

use common::*;
use form_proto::rplb::v1 as rplb_pb;
use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_proto::types::v1::OperationKind;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::{Signal, probe, start, workspace_bin};

const OP_DEADLINE: Duration = Duration::from_secs(60);

/// The backends of the demo domain on a balancer, with their states.
async fn backends_on(
    rplb: &mut RplbControlClient<tonic::transport::Channel>,
) -> Vec<(String, i32)> {
    let stats = rplb
        .get_stats(rplb_pb::GetStatsRequest {
            domain: DOMAIN.into(),
        })
        .await
        .expect("the balancer's statistics");
    let mut v: Vec<(String, i32)> = stats
        .into_inner()
        .routes
        .iter()
        .flat_map(|r| &r.backends)
        .map(|b| (b.id.clone(), b.state))
        .collect();
    v.sort();
    v
}

/// The operation `id` as form-state has it.
async fn scaler_op(stack: &mut Stack, id: &str) -> form_proto::types::v1::Operation {
    stack
        .operations()
        .await
        .into_iter()
        .find(|o| o.operation_id == id)
        .expect("the operation")
}

#[tokio::test]
async fn operations_follow_every_balancer_and_go_on_without_a_dead_one() {
    let mut stack = Stack::start("balancers").await;
    let state_addr = stack.replicas.addrs[0].to_string();
    let args: Vec<&str> = PORT0_ARGS
        .iter()
        .copied()
        .chain(["--listen-http", "127.0.0.1:0", "--state", &state_addr])
        .collect();
    let mut second = start(&stack.dir, "rplb-2", workspace_bin("form-rplb"), &args).await;
    let second_addr = second.addr("grpc").expect("grpc").to_string();
    let mut second_client = RplbControlClient::new(
        probe::channel(second.addr("grpc").expect("grpc"))
            .await
            .expect("rplb 2"),
    );
    // Scale-ins stop before their victims leave the members, until `go` exists: the
    // test then sees what each balancer made of the drain.
    let go = stack.dir.path().join("go");
    let hold = format!("remove_victim_members=hold:{}", go.display());
    let mut scaler = stack
        .start_scaler(&[
            "--rplb",
            &second_addr,
            "--balancer-timeout-ms",
            "1500",
            "--inject-fault",
            &hold,
        ])
        .await;

    // Scale out: when the operation completes, both balancers serve the clone.
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert!(op.notes.is_empty(), "{:?}", op.notes);
    let clone = op.new_instances[0].clone();
    let active = rplb_pb::BackendState::Active as i32;
    for (name, backends) in [
        ("first", stack.backends().await),
        ("second", backends_on(&mut second_client).await),
    ] {
        assert!(
            backends.contains(&(clone.clone(), active)),
            "the {name} balancer does not serve {clone}: {backends:?}"
        );
    }

    // Scale in: once its drain step is done, both balancers have drained the victim.
    let reply = scaler
        .scale(scale(OperationKind::ScaleIn, 1))
        .await
        .expect("scale in")
        .into_inner();
    form_testkit::assert_eventually!(
        async {
            status(&scaler_op(&mut stack, &reply.operation_id).await)
                == "in_progress: remove_victim_members"
        },
        "the scale-in reaches remove_victim_members"
    );
    let victim = scaler_op(&mut stack, &reply.operation_id).await.victims[0].clone();
    let drained = rplb_pb::BackendState::Drained as i32;
    for (name, backends) in [
        ("first", stack.backends().await),
        ("second", backends_on(&mut second_client).await),
    ] {
        assert!(
            backends.contains(&(victim.clone(), drained)),
            "the {name} balancer has not drained {victim}: {backends:?}"
        );
    }
    std::fs::write(&go, "").expect("release the hold");
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert!(op.notes.is_empty(), "{:?}", op.notes);

    // The second balancer dies: operations still complete, after the timeout, and say
    // which balancer they stopped waiting for.
    let _ = second.stop(Signal::SIGKILL, Duration::from_secs(5)).await;
    for (kind, to) in [(OperationKind::ScaleOut, 2), (OperationKind::ScaleIn, 1)] {
        let reply = scaler
            .scale(scale(kind, to))
            .await
            .expect("scale")
            .into_inner();
        let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
        assert_eq!(status(&op), "completed", "{op:?}");
        assert!(
            op.notes
                .iter()
                .any(|n| n.contains(&format!("stopped waiting for balancer {second_addr}"))),
            "{kind:?}: {:?}",
            op.notes
        );
    }
    stack.stop().await;
}
