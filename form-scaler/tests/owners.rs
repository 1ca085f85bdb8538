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
use form_testkit::{ChildService, Signal, assert_eventually, probe, start};
use tonic::transport::Channel;

const BEAT: &[&str] = &[
    "--controller-heartbeat-ms",
    "200",
    "--controller-ttl-ms",
    "2000",
];

/// Starts a second controller named `id` beside the stack's.
async fn second(
    stack: &Stack,
    id: &str,
    extra: &[&str],
) -> (ChildService, ScalerServiceClient<Channel>) {
    let args: Vec<&str> = form_testkit::conformance::PORT0_ARGS
        .iter()
        .copied()
        .chain(stack.scaler_args().iter().map(String::as_str))
        .chain(["--autoscale", "false", "--id", id])
        .chain(BEAT.iter().copied())
        .chain(extra.iter().copied())
        .collect();
    let svc = start(&stack.dir, id, std::path::Path::new(BIN), &args).await;
    let client = ScalerServiceClient::new(
        probe::channel(svc.addr("grpc").expect("grpc"))
            .await
            .expect("second controller"),
    );
    (svc, client)
}

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
    let (mut b_svc, mut b) = second(&stack, "ctl-b", &[]).await;

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

#[tokio::test]
async fn a_starting_controller_leaves_a_live_ones_operation_alone_and_adopts_it_once_that_one_dies()
{
    let mut stack = Stack::start("owners-adopt").await;
    let mut a = stack
        .start_scaler(
            &[
                &["--id", "ctl-a", "--inject-fault", "wait_serving=hang"],
                BEAT,
            ]
            .concat(),
        )
        .await;
    let reply = a
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect("accepted")
        .into_inner();
    let id = reply.operation_id;
    let at_wait_serving =
        |op: &form_proto::types::v1::Operation| status(op) == "in_progress: wait_serving";
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            a.get_operation(pb::GetOperationRequest {
                operation_id: id.clone(),
            })
            .await
            .is_ok_and(|o| at_wait_serving(o.get_ref()))
        },
        "ctl-a runs the operation up to wait_serving"
    );
    let (mut b_svc, mut b) = second(&stack, "ctl-b", &[]).await;
    // ctl-b starts, reads the controllers, and leaves ctl-a's operation alone over
    // three rounds (each looks for operations to adopt first).
    let rounds = b_svc.addr("metrics").expect("metrics");
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            form_testkit::replicas::metric_sum(rounds, "form_scaler_evaluation_rounds_total").await
                >= 3.0
        },
        "ctl-b runs three rounds"
    );
    let op = b
        .get_operation(pb::GetOperationRequest {
            operation_id: id.clone(),
        })
        .await
        .expect("op")
        .into_inner();
    assert!(
        at_wait_serving(&op),
        "a live controller's operation is not adopted: {op:?}"
    );
    assert_eq!(stack.members().await.len(), 2);

    stack.kill_scaler().await;
    let op = wait_op(&mut b, &id, Duration::from_secs(60)).await;
    assert!(status(&op).starts_with("rolled_back"), "{op:?}");
    assert_eventually!(stack.agree(), "nothing of the operation is left");
    assert_eq!(stack.members().await, vec![TEMPLATE.to_owned()]);
    let _ = b_svc.stop(Signal::SIGTERM, Duration::from_secs(5)).await;
    stack.stop().await;
}
