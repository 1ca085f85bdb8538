//! Deltas signed by a key outside the authorized set, or with a flipped byte, are
//! rejected and counted; a replayed delta changes nothing.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use form_proto::state::v1 as pb;
use form_proto::state::v1::gossip_service_client::GossipServiceClient;
use form_state::crdt::State;
use form_state::{envelope, keys, model};
use form_testkit::probe;

fn delta_signed_by(
    key: &ed25519_dalek::SigningKey,
    actor: &str,
    cluster: &str,
) -> Arc<pb::SignedDelta> {
    let req = pb::PutClusterRequest {
        cluster_id: cluster.into(),
        ..Default::default()
    };
    let d = model::write::put_cluster(&State::default(), actor, 1, &req)
        .expect("valid")
        .expect("delta");
    envelope::sign(key, d, BTreeMap::new(), 1).signed
}

async fn rejected(metrics: std::net::SocketAddr, reason: &str) -> u64 {
    let (_, body) = probe::http_get(metrics, "/metrics").await.expect("metrics");
    let prefix = format!("form_state_rejected_deltas_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn forged_and_tampered_deltas_are_rejected_and_counted() {
    // Two authorized replicas; the test holds state-1's key and sends as state-1.
    let pair = replicas("security", 2, false).await;
    let addr = pair.addrs[0];
    let metrics = pair.metrics_addr(0);
    // A replica's certificate: what is shown is that the signatures, not the
    // connection, decide which deltas are taken.
    let mut gossip = GossipServiceClient::new(
        probe::channel_as(addr, form_runtime::tls::Kind::State)
            .await
            .expect("connect"),
    );
    let mut state = form_proto::state::v1::state_service_client::StateServiceClient::new(
        probe::channel(addr).await.expect("connect"),
    );

    let key1 = keys::load_or_create_node_key(&pair.data_dir(1).join("node.key")).expect("key");
    let evil = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let push = |deltas: Vec<Arc<pb::SignedDelta>>| pb::DeltaBatch {
        sender_id: "test".into(),
        deltas: deltas.iter().map(|d| (**d).clone()).collect(),
        full_state: None,
    };

    let forged = delta_signed_by(&evil, "state-1@feed", "forged");
    let ack = gossip
        .push_deltas(push(vec![forged]))
        .await
        .expect("push")
        .into_inner();
    assert_eq!((ack.applied, ack.rejected), (0, 1));
    assert_eq!(rejected(metrics, "unknown_key").await, 1);

    let good = delta_signed_by(&key1, "state-1@feed", "real");
    let mut flipped = (*good).clone();
    let n = flipped.envelope.len() - 1;
    flipped.envelope[n] ^= 0x01;
    let ack = gossip
        .push_deltas(push(vec![Arc::new(flipped)]))
        .await
        .expect("push")
        .into_inner();
    assert_eq!((ack.applied, ack.rejected), (0, 1));
    assert_eq!(rejected(metrics, "bad_signature").await, 1);

    // Signed by state-1's key but claiming to come from state-0: impersonation.
    let impostor = delta_signed_by(&key1, "state-0@feed", "impostor");
    let ack = gossip
        .push_deltas(push(vec![impostor]))
        .await
        .expect("push")
        .into_inner();
    assert_eq!(ack.rejected, 1);
    assert_eq!(rejected(metrics, "wrong_origin").await, 1);

    let ack = gossip
        .push_deltas(push(vec![good.clone()]))
        .await
        .expect("push")
        .into_inner();
    assert_eq!((ack.applied, ack.rejected), (1, 0));
    let before = digest(&mut state).await;
    let ack = gossip
        .push_deltas(push(vec![good]))
        .await
        .expect("push")
        .into_inner();
    assert_eq!(
        (ack.applied, ack.duplicates),
        (0, 1),
        "a replay is a duplicate"
    );
    assert_eq!(digest(&mut state).await, before, "a replay changes nothing");

    let clusters = state
        .list_clusters(pb::ListClustersRequest {})
        .await
        .expect("list")
        .into_inner()
        .clusters;
    let ids: Vec<String> = clusters.into_iter().map(|c| c.cluster_id).collect();
    assert_eq!(ids, ["real"], "only the genuine delta was applied");
}

/// The attack of issue 17: controllers with heartbeats dated in the year 5138 took the
/// ownership of every cluster. A replica keeps no heartbeat later than its own clock.
#[tokio::test]
async fn a_heartbeat_from_the_future_is_kept_at_the_replicas_time() {
    let solo = replicas("future-beat", 1, false).await;
    let addr = solo.addrs[0];
    let year_5138 = 99_999_999_999_999u64;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis() as u64
    };
    let mut ctl = pb::state_service_client::StateServiceClient::new(
        probe::channel_as(addr, form_runtime::tls::Kind::Scaler)
            .await
            .expect("connect"),
    );
    ctl.controller_heartbeat(pb::ControllerHeartbeatRequest {
        controller_id: "intruder".into(),
        at_ms: year_5138,
        address: "intruder:3006".into(),
    })
    .await
    .expect("a heartbeat");
    let listed = ctl
        .list_controllers(pb::ListControllersRequest {})
        .await
        .expect("list")
        .into_inner()
        .controllers;
    let beat = listed
        .iter()
        .find(|c| c.controller_id == "intruder")
        .expect("listed")
        .last_heartbeat_ms;
    assert!(beat <= now(), "kept at {beat}, after the replica's clock");
    // The same for an instance's heartbeat, sent by a node.
    ctl.put_cluster(pb::PutClusterRequest {
        cluster_id: "web".into(),
        ..Default::default()
    })
    .await
    .expect("cluster");
    ctl.add_member(pb::AddMemberRequest {
        cluster_id: "web".into(),
        member: Some(pb::Member {
            instance_id: "i1".into(),
            ..Default::default()
        }),
    })
    .await
    .expect("member");
    let mut node = pb::state_service_client::StateServiceClient::new(
        probe::channel_as(addr, form_runtime::tls::Kind::Vmm)
            .await
            .expect("connect"),
    );
    node.heartbeat(pb::HeartbeatRequest {
        cluster_id: "web".into(),
        instance_id: "i1".into(),
        at_ms: year_5138,
        cpu_utilization: 0.1,
        ..Default::default()
    })
    .await
    .expect("a heartbeat");
    let c = ctl
        .get_cluster(pb::GetClusterRequest {
            cluster_id: "web".into(),
        })
        .await
        .expect("cluster")
        .into_inner();
    let beat = c.members["i1"].last_heartbeat_ms;
    assert!(beat > 0 && beat <= now(), "kept at {beat}");
}
