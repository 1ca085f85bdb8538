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

/// A vmm node beating every 100 ms into the replica of `replicas`, with `extra` flags.
async fn start_vmm(
    replicas: &Replicas,
    label: &str,
    extra: &[&str],
) -> (TestDir, form_testkit::ChildService) {
    let dir = TestDir::new(label);
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
        extra,
    ]
    .concat();
    let vmm = start(&dir, "vmm", Path::new(BIN), &args).await;
    (dir, vmm)
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

    let (_dir, _vmm) = start_vmm(&replicas, "hb-vmm", &[]).await;
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

#[tokio::test]
async fn the_node_records_itself_with_capacity_usage_and_labels_and_can_be_cordoned() {
    use form_runtime::tls::Kind;
    let replicas = Replicas::start(
        &workspace_bin("form-state"),
        "node-state",
        ReplicaOptions::new(1),
    )
    .await;
    let (_dir, mut vmm) = start_vmm(
        &replicas,
        "node-vmm",
        &[
            "--node-id",
            "node-7",
            "--labels",
            "zone=eu-1,disk=ssd",
            "--instance-slots",
            "12",
            "--capacity-memory-mib",
            "4096",
        ],
    )
    .await;
    let grpc = vmm.addr("grpc").expect("grpc");
    let nodes = async || {
        let mut c = replicas.client(0).await;
        c.list_nodes(state::ListNodesRequest {})
            .await
            .expect("list nodes")
            .into_inner()
            .nodes
    };
    assert_eventually!(
        async { nodes().await.len() == 1 },
        "the node's record arrives"
    );
    let n = nodes().await.remove(0);
    assert_eq!(n.node_id, "node-7");
    assert_eq!(n.addresses, [grpc.to_string()], "where its API is reached");
    assert_eq!(n.backend, "process");
    assert_eq!(n.labels["zone"], "eu-1");
    let cap = n.capacity.expect("capacity");
    assert_eq!((cap.instance_slots, cap.memory_mib), (12, 4096));
    assert!(cap.vcpus >= 1, "this host's CPUs");
    assert_eq!(n.used.map(|u| u.instance_slots), Some(0));

    // An instance shows in what the node uses.
    let mut v = VmmServiceClient::new(probe::channel(grpc).await.expect("connect"));
    v.create_instance(pb::CreateInstanceRequest {
        instance_id: "i-9".into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: workspace_bin("form-demo-app").display().to_string(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: Some(types::Resources {
            vcpus: 1,
            memory_mib: 256,
        }),
    })
    .await
    .expect("create");
    assert_eventually!(
        async {
            nodes().await[0]
                .used
                .is_some_and(|u| u.instance_slots == 1 && u.memory_mib == 256 && u.vcpus == 1)
        },
        "the instance counts in the node's usage"
    );

    // Operators cordon it; a vmm node may not (only its own record is its to write).
    let cordon = |on: bool| state::SetNodeCordonRequest {
        node_id: "node-7".into(),
        cordoned: on,
    };
    let mut as_vmm = form_proto::state::v1::state_service_client::StateServiceClient::new(
        probe::channel_as(replicas.addrs[0], Kind::Vmm)
            .await
            .expect("connect"),
    );
    let e = as_vmm
        .set_node_cordon(cordon(true))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Another vmm's certificate cannot take this node's record over.
    let e = as_vmm
        .node_heartbeat(state::NodeHeartbeatRequest {
            node_id: "node-7".into(),
            addresses: vec!["127.0.0.1:1".into()],
            backend: "process".into(),
            ..Default::default()
        })
        .await
        .expect_err("not its record");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("is recorded by vmm/"),
        "{}",
        e.message()
    );
    assert_eq!(nodes().await[0].addresses, [grpc.to_string()]);
    let mut op = form_proto::state::v1::state_service_client::StateServiceClient::new(
        probe::channel_as(replicas.addrs[0], Kind::Operator)
            .await
            .expect("connect"),
    );
    op.set_node_cordon(cordon(true)).await.expect("cordon");
    assert!(nodes().await[0].cordoned);
    // A heartbeat keeps the cordon.
    let seen = nodes().await[0].last_heartbeat_ms;
    assert_eventually!(
        async { nodes().await[0].last_heartbeat_ms > seen },
        "another heartbeat"
    );
    assert!(nodes().await[0].cordoned);
    op.set_node_cordon(cordon(false)).await.expect("uncordon");
    assert!(!nodes().await[0].cordoned);
    // Only a vmm node sends node heartbeats.
    let e = op
        .node_heartbeat(state::NodeHeartbeatRequest {
            node_id: "node-fake".into(),
            addresses: vec!["127.0.0.1:1".into()],
            backend: "process".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Stopped with SIGTERM, the node stops its instance (a kill would leave it).
    form_testkit::conformance::stop_gracefully(&mut vmm).await;
}
