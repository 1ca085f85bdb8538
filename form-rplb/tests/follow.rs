//! The balancer follows form-state: each cluster's route equals its active and
//! draining members without anyone pushing routes; a draining member is drained; a
//! removed member or cluster leaves; with the state unreachable the last known routes
//! stay, and changes made meanwhile arrive once it is back.

mod common;

use common::{Http, Lb};
use form_proto::rplb::v1 as rpb;
use form_proto::state::v1 as pb;
use form_proto::types::v1 as types;
use form_testkit::assert_eventually;
use form_testkit::backend::HttpBackend;
use form_testkit::conformance::stop_gracefully;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::workspace_bin;

fn member(id: &str, b: &HttpBackend, status: pb::MemberStatus) -> pb::AddMemberRequest {
    pb::AddMemberRequest {
        cluster_id: "demo".into(),
        member: Some(pb::Member {
            instance_id: id.into(),
            node_id: "node-1".into(),
            addresses: vec![b.addr.to_string()],
            status: status.into(),
            ..Default::default()
        }),
    }
}

async fn answers(http: &Http, host: &str, n: usize) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        match http.get(host, "/whoami", &[]).await {
            Ok(r) if r.status == 200 => {
                seen.insert(r.body);
            }
            Ok(r) => {
                seen.insert(format!("status {}", r.status.as_u16()));
            }
            Err(e) => {
                seen.insert(format!("error {e}"));
            }
        }
    }
    seen
}

fn set(items: &[&str]) -> std::collections::BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn routes_follow_the_clusters_members_and_survive_the_state_going_away() {
    let mut replicas = Replicas::start(
        &workspace_bin("form-state"),
        "follow-state",
        ReplicaOptions::new(2),
    )
    .await;
    let watched = replicas.addrs[0].to_string();
    let mut lb = Lb::start("follow", &["--state", &watched]).await;
    let http = Http::new(lb.http);
    let (b0, b1) = (
        HttpBackend::start("b0").await,
        HttpBackend::start("b1").await,
    );
    let mut s = replicas.client(0).await;

    s.put_cluster(pb::PutClusterRequest {
        cluster_id: "demo".into(),
        domain: Some("demo.fog".into()),
        workload: Some(types::Workload {
            command: "demo".into(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("put cluster");
    s.add_member(member("m0", &b0, pb::MemberStatus::Active))
        .await
        .expect("m0");
    s.add_member(member("m1", &b1, pb::MemberStatus::Starting))
        .await
        .expect("m1");
    assert_eventually!(
        async { answers(&http, "demo.fog", 10).await == set(&["b0"]) },
        "only the active member serves"
    );
    let route = lb.listed("demo.fog").await;
    assert_eq!(route.cluster_id, "demo");
    assert_eq!(
        route.health_check.expect("checks").path,
        "/healthz",
        "checks come from the workload"
    );

    s.update_member(pb::UpdateMemberRequest {
        cluster_id: "demo".into(),
        instance_id: "m1".into(),
        status: Some(pb::MemberStatus::Active.into()),
        ..Default::default()
    })
    .await
    .expect("m1 active");
    assert_eventually!(
        async { answers(&http, "demo.fog", 20).await == set(&["b0", "b1"]) },
        "both serve"
    );

    // A draining member is drained (idle: at once), then it takes nothing.
    s.update_member(pb::UpdateMemberRequest {
        cluster_id: "demo".into(),
        instance_id: "m0".into(),
        status: Some(pb::MemberStatus::Draining.into()),
        ..Default::default()
    })
    .await
    .expect("m0 draining");
    assert_eventually!(
        async {
            lb.states("demo.fog")
                .await
                .contains(&("m0".into(), rpb::BackendState::Drained))
        },
        "m0 drained"
    );
    assert_eq!(answers(&http, "demo.fog", 10).await, set(&["b1"]));
    s.remove_member(pb::RemoveMemberRequest {
        cluster_id: "demo".into(),
        instance_id: "m0".into(),
    })
    .await
    .expect("remove m0");
    assert_eventually!(
        async { lb.states("demo.fog").await.len() == 1 },
        "m0 left the route"
    );

    // A cluster without a domain is routed as <id>.fog.
    s.put_cluster(pb::PutClusterRequest {
        cluster_id: "other".into(),
        ..Default::default()
    })
    .await
    .expect("other");
    s.add_member(pb::AddMemberRequest {
        cluster_id: "other".into(),
        ..member("o0", &b0, pb::MemberStatus::Active)
    })
    .await
    .expect("o0");
    assert_eventually!(
        async { answers(&http, "other.fog", 5).await == set(&["b0"]) },
        "other.fog routed"
    );

    // The watched replica goes away (once the other has its writes): the routes stay.
    assert_eventually!(replicas.converged(), "replicas converged");
    let mut gone = replicas.procs[0].take().expect("replica 0 runs");
    stop_gracefully(&mut gone).await;
    assert_eq!(answers(&http, "demo.fog", 10).await, set(&["b1"]));
    assert_eq!(answers(&http, "other.fog", 5).await, set(&["b0"]));
    // Meanwhile the other replica deletes a cluster; the balancer learns it on return.
    let mut s1 = replicas.client(1).await;
    assert_eventually!(
        async {
            s1.get_cluster(pb::GetClusterRequest {
                cluster_id: "other".into(),
            })
            .await
            .is_ok()
        },
        "replica 1 has 'other'"
    );
    s1.delete_cluster(pb::DeleteClusterRequest {
        cluster_id: "other".into(),
    })
    .await
    .expect("delete other");
    replicas.procs[0] = Some(replicas.launch(0).await);
    assert_eventually!(
        deadline = std::time::Duration::from_secs(20),
        async { answers(&http, "other.fog", 1).await == set(&["status 404"]) },
        "the deleted cluster's route is gone; balancer log:\n{}",
        lb.svc.log_tail()
    );
    assert_eq!(answers(&http, "demo.fog", 10).await, set(&["b1"]));
    stop_gracefully(&mut lb.svc).await;
    replicas.stop().await;
}
