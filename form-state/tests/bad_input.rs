//! Bad requests get a gRPC status naming the problem, and the replica keeps serving.

mod common;

use common::*;
use form_proto::state::v1 as pb;
use form_proto::types::v1 as types;
use form_testkit::probe;
use tonic::Code;

#[tokio::test]
async fn bad_requests_get_clear_errors_and_nothing_changes() {
    let solo = replicas("bad-input", 1, false).await;
    let addr = solo.addrs[0];
    let mut c = form_proto::state::v1::state_service_client::StateServiceClient::new(
        probe::channel(addr).await.expect("connect"),
    );
    c.put_cluster(cluster("web")).await.expect("valid write");
    let before = digest(&mut c).await;

    let expect =
        |r: Result<tonic::Response<pb::WriteReply>, tonic::Status>, code: Code, words: &[&str]| {
            let s = r.expect_err("must fail");
            assert_eq!(s.code(), code, "{s:?}");
            for w in words {
                assert!(s.message().contains(w), "'{w}' not in '{}'", s.message());
            }
        };
    // An instance address where cloud metadata answers is never a member.
    let mut metadata = member("web", "i-meta");
    if let Some(m) = metadata.member.as_mut() {
        m.addresses = vec!["169.254.169.254:80".into()];
    }
    expect(
        c.add_member(metadata).await,
        Code::InvalidArgument,
        &["member.addresses", "169.254.169.254:80", "link-local"],
    );
    expect(
        c.add_member(member("nope", "i1")).await,
        Code::NotFound,
        &["cluster", "nope"],
    );
    expect(
        c.put_cluster(cluster("")).await,
        Code::InvalidArgument,
        &["cluster_id", "empty"],
    );
    expect(
        c.add_member(member("web", "")).await,
        Code::InvalidArgument,
        &["member.instance_id"],
    );
    let big = pb::PutClusterRequest {
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: "x".repeat(20_000),
            ..Default::default()
        }),
        ..Default::default()
    };
    expect(
        c.put_cluster(big).await,
        Code::InvalidArgument,
        &["workload", "16384"],
    );
    let policy = pb::PutClusterRequest {
        cluster_id: "web".into(),
        scaling_policy: Some(types::ScalingPolicy {
            min_instances: 3,
            max_instances: 2,
            target_cpu_utilization: 0.5,
            ..Default::default()
        }),
        ..Default::default()
    };
    expect(
        c.put_cluster(policy).await,
        Code::InvalidArgument,
        &["scaling_policy.max_instances", "min"],
    );
    let hb = pb::HeartbeatRequest {
        cluster_id: "web".into(),
        instance_id: "ghost".into(),
        ..Default::default()
    };
    // Instance heartbeats come from vmm nodes.
    let mut node = form_proto::state::v1::state_service_client::StateServiceClient::new(
        probe::channel_as(addr, form_runtime::tls::Kind::Vmm)
            .await
            .expect("connect"),
    );
    expect(
        node.heartbeat(hb).await,
        Code::NotFound,
        &["member", "web/ghost"],
    );
    let e = c
        .get_cluster(pb::GetClusterRequest {
            cluster_id: "missing".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Code::NotFound);

    assert_eq!(
        digest(&mut c).await,
        before,
        "no bad request changed the state"
    );
    let health = probe::health(addr, "").await.expect("health");
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

/// Limits: a request over 1 MiB is refused before the replica holds it, and a replica
/// takes no more clusters than its quota; it serves on after both.
#[tokio::test]
async fn oversized_writes_and_clusters_past_the_quota_are_refused() {
    let mut extra = fast_gossip();
    extra.extend(["--max-clusters".to_owned(), "2".to_owned()]);
    let solo = form_testkit::replicas::Replicas::start(
        std::path::Path::new(BIN),
        "limits",
        form_testkit::replicas::ReplicaOptions {
            count: 1,
            proxied: false,
            extra_args: extra,
            extra_peers: Vec::new(),
        },
    )
    .await;
    let addr = solo.addrs[0];
    let mut c = form_proto::state::v1::state_service_client::StateServiceClient::new(
        probe::channel(addr).await.expect("connect"),
    );
    let mut big = cluster("big");
    big.workload = Some(types::Workload {
        command: "x".repeat(2 * 1024 * 1024),
        ..Default::default()
    });
    let s = c.put_cluster(big).await.expect_err("2 MiB");
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{s:?}"
    );
    assert!(s.message().contains("too large"), "{}", s.message());
    c.put_cluster(cluster("one")).await.expect("first");
    c.put_cluster(cluster("two")).await.expect("second");
    let s = c.put_cluster(cluster("three")).await.expect_err("quota");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("--max-clusters"), "{}", s.message());
    // Changing a cluster that exists is not a new one.
    c.put_cluster(cluster("two")).await.expect("an update");
    assert_eq!(
        probe::health(addr, "").await.expect("health"),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn members_outside_the_member_networks_are_refused_naming_them() {
    let mut extra = fast_gossip();
    extra.extend([
        "--member-networks".to_owned(),
        "10.9.0.0/16,fd00::/8".to_owned(),
    ]);
    let solo = form_testkit::replicas::Replicas::start(
        std::path::Path::new(BIN),
        "member-networks",
        form_testkit::replicas::ReplicaOptions {
            count: 1,
            proxied: false,
            extra_args: extra,
            extra_peers: Vec::new(),
        },
    )
    .await;
    let mut c = solo.client(0).await;
    c.put_cluster(cluster("web")).await.expect("valid write");
    // Loopback: a real address, but not one of this platform's instance networks.
    let s = c
        .add_member(member("web", "i-out"))
        .await
        .expect_err("outside the networks");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    for w in ["member.addresses", "127.0.0.1", "10.9.0.0/16", "fd00::/8"] {
        assert!(s.message().contains(w), "'{w}' not in '{}'", s.message());
    }
    let mut inside = member("web", "i-in");
    if let Some(m) = inside.member.as_mut() {
        m.addresses = vec!["10.9.3.4:8080".into(), "[fd00::5]:8080".into()];
    }
    c.add_member(inside).await.expect("inside the networks");
    // An update cannot move it out either.
    let s = c
        .update_member(pb::UpdateMemberRequest {
            cluster_id: "web".into(),
            instance_id: "i-in".into(),
            addresses: vec!["192.168.1.1:80".into()],
            ..Default::default()
        })
        .await
        .expect_err("moved outside");
    assert!(s.message().contains("192.168.1.1"), "{}", s.message());
    assert_eq!(members(&mut c, "web").await, ["i-in"]);
    // A bad setting stops the replica at start, naming it.
    form_testkit::conformance::rejects_args(
        std::path::Path::new(BIN),
        &["--member-networks", "10.9.0.0/33"],
        &["member-networks", "10.9.0.0/33", "prefix length"],
    );
}
