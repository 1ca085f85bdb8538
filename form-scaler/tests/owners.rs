//! Two controllers at once, without consensus: each cluster is handled by exactly
//! one (both agree which), a request sent to the other is run by the owner, and when
//! the owner dies its clusters move to the survivor, which then runs their requests.

mod common;

use std::time::Duration;

use common::*;
use form_proto::scaler::v1 as pb;
use form_proto::scaler::v1::scaler_service_client::ScalerServiceClient;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1::OperationKind;
use form_testkit::{Signal, assert_eventually, probe, start};
use tonic::transport::Channel;

const BEAT: &[&str] = &[
    "--controller-heartbeat-ms",
    "100",
    "--controller-ttl-ms",
    "600",
];

async fn owner(c: &mut ScalerServiceClient<Channel>, cluster: &str) -> String {
    c.get_status(pb::GetStatusRequest {
        cluster_id: cluster.into(),
    })
    .await
    .map(|s| s.into_inner().owner)
    .unwrap_or_default()
}

#[tokio::test]
async fn each_cluster_has_one_controller_and_a_dead_ones_clusters_move() {
    let mut stack = Stack::start("owners").await;
    let extra: Vec<String> = (0..7).map(|i| format!("extra-{i}")).collect();
    for id in &extra {
        stack
            .state
            .put_cluster(state_pb::PutClusterRequest {
                cluster_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("cluster");
    }
    let mut a = stack
        .start_scaler(&[&["--id", "ctl-a"], BEAT].concat())
        .await;
    let b_args: Vec<&str> = form_testkit::conformance::PORT0_ARGS
        .iter()
        .copied()
        .chain(stack.scaler_args().iter().map(String::as_str))
        .chain(["--autoscale", "false", "--id", "ctl-b"])
        .chain(BEAT.iter().copied())
        .collect();
    let mut b_svc = start(&stack.dir, "scaler-b", std::path::Path::new(BIN), &b_args).await;
    let mut b = ScalerServiceClient::new(
        probe::channel(b_svc.addr("grpc").expect("grpc"))
            .await
            .expect("b"),
    );

    let mut all = extra.clone();
    all.push(CLUSTER.into());
    assert_eventually!(
        deadline = Duration::from_secs(10),
        async {
            let mut owners = Vec::new();
            for id in &all {
                let (oa, ob) = (owner(&mut a, id).await, owner(&mut b, id).await);
                if oa != ob || oa.is_empty() {
                    return false;
                }
                owners.push(oa);
            }
            owners.contains(&"ctl-a".to_owned()) && owners.contains(&"ctl-b".to_owned())
        },
        "both controllers agree on one owner per cluster, and both own some"
    );

    // A request sent to the controller that does not own the cluster is run by the one
    // that does.
    let demo_owner = owner(&mut a, CLUSTER).await;
    let (other, mut other_client) = if demo_owner == "ctl-a" {
        ("ctl-b", b.clone())
    } else {
        ("ctl-a", a.clone())
    };
    let reply = other_client
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("accepted")
        .into_inner();
    let op = wait_op(
        &mut other_client,
        &reply.operation_id,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(op.owner, demo_owner, "run by the owner, not by {other}");

    // The owner of the demo cluster dies: its clusters move to the survivor.
    let survivor = other.to_owned();
    if demo_owner == "ctl-a" {
        stack.kill_scaler().await;
    } else {
        let _ = b_svc.stop(Signal::SIGKILL, Duration::from_secs(5)).await;
    }
    let mut s = other_client;
    assert_eventually!(
        deadline = Duration::from_secs(10),
        async {
            for id in &all {
                if owner(&mut s, id).await != survivor {
                    return false;
                }
            }
            true
        },
        "every cluster moves to {survivor}"
    );
    let reply = s
        .scale(scale(OperationKind::ScaleIn, 1))
        .await
        .expect("accepted")
        .into_inner();
    let op = wait_op(&mut s, &reply.operation_id, Duration::from_secs(60)).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(op.owner, survivor);
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    let _ = b_svc.stop(Signal::SIGTERM, Duration::from_secs(5)).await;
    stack.stop().await;
}
