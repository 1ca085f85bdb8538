//! Instances are heartbeaten into form-state; a paused instance shows there as paused,
//! and a crashed one as stopped and unhealthy, with the reason.

use std::path::Path;

use form_proto::state::v1 as state;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{TestDir, assert_eventually, probe, start, workspace_bin};

const BIN: &str = env!("CARGO_BIN_EXE_form-vmm-service");

async fn member(r: &Replicas) -> Option<state::Member> {
    let mut c = r.client(0).await;
    let cluster = c
        .get_cluster(state::GetClusterRequest {
            cluster_id: "web".into(),
        })
        .await
        .ok()?
        .into_inner();
    cluster.members.get("i-1").cloned()
}

#[tokio::test]
async fn heartbeats_reach_form_state_and_a_crash_is_visible_there() {
    let replicas = Replicas::start(
        &workspace_bin("form-state"),
        "hb-state",
        ReplicaOptions::new(1),
    )
    .await;
    let mut s = replicas.client(0).await;
    s.put_cluster(state::PutClusterRequest {
        cluster_id: "web".into(),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let m = state::Member {
        instance_id: "i-1".into(),
        node_id: "node-1".into(),
        ..Default::default()
    };
    s.add_member(state::AddMemberRequest {
        cluster_id: "web".into(),
        member: Some(m),
    })
    .await
    .expect("member");

    let dir = TestDir::new("hb-vmm");
    let data = dir.path().join("data");
    let state_addr = replicas.addrs[0].to_string();
    let args = [
        PORT0_ARGS,
        &[
            "--state",
            &state_addr,
            "--heartbeat-interval-ms",
            "100",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
    ]
    .concat();
    let _vmm = start(&dir, "vmm", Path::new(BIN), &args).await;
    let mut v = VmmServiceClient::new(
        probe::channel(_vmm.addr("grpc").expect("grpc"))
            .await
            .expect("connect"),
    );
    let req = pb::CreateInstanceRequest {
        instance_id: "i-1".into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: workspace_bin("form-demo-app").display().to_string(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: None,
    };
    let inst = v.create_instance(req).await.expect("create").into_inner();
    assert_eventually!(
        async {
            member(&replicas)
                .await
                .is_some_and(|m| m.last_heartbeat_ms > 0)
        },
        "a heartbeat arrives"
    );

    // Paused, the member says so (the balancer leaves it out, the controller neither
    // counts its load nor replaces it); running again, it is active.
    let status = async || member(&replicas).await.map_or(0, |m| m.status);
    let iref = || pb::InstanceRef {
        instance_id: "i-1".into(),
    };
    v.pause(iref()).await.expect("pause");
    assert_eventually!(
        async { status().await == state::MemberStatus::Paused as i32 },
        "a paused instance is PAUSED in form-state"
    );
    v.resume(iref()).await.expect("resume");
    assert_eventually!(
        async { status().await == state::MemberStatus::Active as i32 },
        "a resumed instance is ACTIVE again"
    );

    // Crash the workload: the next round reports it.
    let pid = *probe::pids_with_env("FORM_INSTANCE_ID", "i-1")
        .first()
        .expect("the instance's process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert_eventually!(
        async {
            member(&replicas).await.is_some_and(|m| {
                m.status == state::MemberStatus::Stopped as i32
                    && m.health_history
                        .last()
                        .is_some_and(|h| h.reason.contains("signal: 9"))
            })
        },
        "the crash of {} shows in form-state",
        inst.instance_id
    );
}
