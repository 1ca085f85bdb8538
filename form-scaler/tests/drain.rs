//! Draining as the cluster and the request ask: a scale-in removes the instances it is
//! told to (a drained one among them), and its drain keeps a pinned session on its
//! instance for the grace period when the settings say so, while by default the
//! session moves once nothing is in flight.

mod common;

use std::time::Duration;

use common::*;
use form_proto::scaler::v1 as pb;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1::{DrainSettings, OperationKind};
use form_testkit::assert_eventually;
use tonic::Code;

const OP_DEADLINE: Duration = Duration::from_secs(60);

type Scaler = pb::scaler_service_client::ScalerServiceClient<tonic::transport::Channel>;

/// Scales out to `n` and returns the new instances.
async fn scaled_out(scaler: &mut Scaler, n: u32) -> Vec<String> {
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, n))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    op.new_instances
}

fn remove(ids: &[&str]) -> pb::ScaleRequest {
    pb::ScaleRequest {
        instance_ids_to_remove: ids.iter().map(|s| (*s).to_owned()).collect(),
        drain_connections: true,
        ..scale(OperationKind::ScaleIn, 0)
    }
}

#[tokio::test]
async fn a_scale_in_removes_the_instances_it_names_a_drained_one_included() {
    let mut stack = Stack::start("drain-named").await;
    let mut scaler = stack.start_scaler(&[]).await;
    let clones = scaled_out(&mut scaler, 4).await;
    // The template, an unknown id and a repeated id are refused, naming the entry.
    for (ids, says) in [
        (vec![TEMPLATE], "template"),
        (vec!["ghost"], "not a member"),
        (vec![clones[0].as_str(), clones[0].as_str()], "twice"),
    ] {
        let e = scaler.scale(remove(&ids)).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    let mut bad = remove(&[clones[2].as_str()]);
    bad.target_count = 1;
    let e = scaler.scale(bad).await.expect_err("disagrees");
    assert!(e.message().contains("does not agree"), "{}", e.message());

    // One drained by hand (out of the count), one serving: both go.
    stack
        .state
        .update_member(state_pb::UpdateMemberRequest {
            cluster_id: CLUSTER.into(),
            instance_id: clones[1].clone(),
            status: Some(state_pb::MemberStatus::Draining as i32),
            ..Default::default()
        })
        .await
        .expect("drain by hand");
    let reply = scaler
        .scale(remove(&[clones[1].as_str(), clones[2].as_str()]))
        .await
        .expect("named scale-in")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert_eq!(op.victims, [clones[1].clone(), clones[2].clone()]);
    let mut left = vec![TEMPLATE.to_owned(), clones[0].clone()];
    left.sort();
    assert_eq!(stack.members().await, left);
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    stack.stop().await;
}

/// A session cookie pinned to `instance`, found by asking through the balancer.
async fn session_on(stack: &Stack, instance: &str) -> String {
    for _ in 0..200 {
        let (code, body, head) = via_lb(stack.http, "/whoami", None).await.expect("whoami");
        assert_eq!(code, 200);
        let who: serde_json::Value = serde_json::from_str(&body).expect("json");
        if who["instance_id"] == instance {
            return session_cookie(&head).expect("a session cookie");
        }
    }
    panic!("no session landed on {instance}");
}

/// Where `cookie`'s requests go while `victim` is draining: the instances seen in the
/// first `look` after the member turned DRAINING, and the operation at its end.
async fn pinned_during_drain(
    stack: &mut Stack,
    scaler: &mut Scaler,
    req: pb::ScaleRequest,
    victim: &str,
    look: Duration,
) -> (Vec<String>, form_proto::types::v1::Operation) {
    let cookie = session_on(stack, victim).await;
    let reply = scaler.scale(req).await.expect("scale in").into_inner();
    assert_eventually!(
        async {
            stack.cluster().await.members.get(victim).map(|m| m.status)
                != Some(state_pb::MemberStatus::Active as i32)
        },
        "{victim} starts draining"
    );
    let until = tokio::time::Instant::now() + look;
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < until {
        let (_, body, _) = via_lb(stack.http, "/whoami", Some(&cookie))
            .await
            .expect("pinned request");
        let who: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        seen.push(who["instance_id"].as_str().unwrap_or("?").to_owned());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let op = wait_op(scaler, &reply.operation_id, OP_DEADLINE).await;
    (seen, op)
}

#[tokio::test]
async fn the_drain_settings_keep_pinned_sessions_for_the_grace_period_or_move_them_at_once() {
    let mut stack = Stack::start("drain-grace").await;
    let mut scaler = stack.start_scaler(&[]).await;
    let clones = scaled_out(&mut scaler, 3).await;

    // The cluster keeps pinned sessions for 6 s.
    stack
        .state
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            drain: Some(DrainSettings {
                grace_period_seconds: 6,
                wait_for_connections: false,
                notify_clients: true,
            }),
            ..Default::default()
        })
        .await
        .expect("drain settings");
    let (seen, op) = pinned_during_drain(
        &mut stack,
        &mut scaler,
        remove(&[clones[0].as_str()]),
        &clones[0],
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert!(
        !seen.is_empty() && seen.iter().all(|i| *i == clones[0]),
        "the pinned session stayed on its draining instance: {seen:?}"
    );
    assert!(
        op.completed_at_ms - op.created_at_ms >= 6000,
        "the drain held the grace period"
    );

    // The request's settings win over the cluster's: sessions move once nothing is in
    // flight.
    let mut req = remove(&[clones[1].as_str()]);
    req.drain = Some(DrainSettings {
        grace_period_seconds: 30,
        wait_for_connections: true,
        notify_clients: true,
    });
    let (seen, op) = pinned_during_drain(
        &mut stack,
        &mut scaler,
        req,
        &clones[1],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert!(
        seen.iter().any(|i| *i != clones[1]),
        "the pinned session moved during the drain: {seen:?}"
    );
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    stack.stop().await;
}
