//! No flapping, in the running controller: the form-scaler binary decides on a cluster
//! whose members' heartbeats (written by this test into form-state, as a vmm node
//! would) carry a CPU load that sits at the target with bursts of ±36% around it. With
//! its metric window the controller makes no operation; the same load with a window
//! of one or two samples makes it scale, which shows the window is what holds it.

use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{Signal, TestDir, start, workspace_bin};

const CLUSTER: &str = "noisy";
const MEMBERS: [&str; 2] = ["noisy-0", "noisy-1"];
const HEARTBEAT_MS: u64 = 100;

/// Runs the controller with `--metric-window-ms window` for `run` (or until its first
/// operation) and returns the operations it recorded.
async fn operations_with_window(label: &str, window: u64, run: Duration) -> usize {
    let mut replicas = Replicas::start(
        &workspace_bin("form-state"),
        &format!("{label}-state"),
        ReplicaOptions::new(1),
    )
    .await;
    let mut state = replicas.client(0).await;
    state
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            domain: Some("noisy.fog".into()),
            workload: Some(types::Workload {
                command: "form-demo-app".into(),
                ..Default::default()
            }),
            scaling_policy: Some(types::ScalingPolicy {
                min_instances: 1,
                max_instances: 10,
                target_cpu_utilization: 0.5,
                tolerance: 0.1,
                ..Default::default()
            }),
            template_instance_id: Some(MEMBERS[0].into()),
            ..Default::default()
        })
        .await
        .expect("cluster");
    for id in MEMBERS {
        state
            .add_member(state_pb::AddMemberRequest {
                cluster_id: CLUSTER.into(),
                member: Some(state_pb::Member {
                    instance_id: id.into(),
                    node_id: "node-1".into(),
                    addresses: vec!["127.0.0.1:9".into()],
                    status: state_pb::MemberStatus::Active as i32,
                    ..Default::default()
                }),
            })
            .await
            .expect("member");
    }
    // Heartbeats as a node sends them: three samples at 0.68, three at 0.32, ...
    // (as a vmm node: only nodes send instance heartbeats).
    let mut beats = form_proto::state::v1::state_service_client::StateServiceClient::new(
        form_testkit::probe::channel_as(replicas.addrs[0], form_runtime::tls::Kind::Vmm)
            .await
            .expect("connect as a node"),
    );
    let writer = tokio::spawn(async move {
        for n in 0u64.. {
            let cpu = if (n / 3) % 2 == 0 { 0.68 } else { 0.32 };
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("time")
                .as_millis() as u64;
            for id in MEMBERS {
                let _ = beats
                    .heartbeat(state_pb::HeartbeatRequest {
                        cluster_id: CLUSTER.into(),
                        instance_id: id.into(),
                        at_ms: at,
                        cpu_utilization: cpu,
                        state_writes: None,
                        usage: Some(state_pb::InstanceUsage {
                            memory_bytes: 64 << 20,
                            uptime_seconds: 3600.0,
                        }),
                        state_contract: String::new(),
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS)).await;
        }
    });
    let dir = TestDir::new(label);
    let window = window.to_string();
    let heartbeat = HEARTBEAT_MS.to_string();
    let state_addr = replicas.addrs[0].to_string();
    let args: Vec<&str> = PORT0_ARGS
        .iter()
        .copied()
        .chain([
            "--state",
            &state_addr,
            "--autoscale",
            "true",
            "--evaluate-interval-ms",
            "50",
            "--heartbeat-interval-ms",
            &heartbeat,
            "--metric-window-ms",
            &window,
        ])
        .collect();
    let mut scaler = start(&dir, "scaler", workspace_bin("form-scaler"), &args).await;
    let deadline = tokio::time::Instant::now() + run;
    let mut ops = 0;
    while tokio::time::Instant::now() < deadline && ops == 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ops = state
            .list_operations(state_pb::ListOperationsRequest {
                cluster_id: CLUSTER.into(),
                limit: 0,
                unfinished_only: false,
            })
            .await
            .expect("operations")
            .into_inner()
            .operations
            .len();
    }
    writer.abort();
    let _ = scaler.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
    replicas.stop().await;
    ops
}

#[tokio::test]
async fn the_running_controller_holds_a_noisy_load_at_target_and_scales_without_its_window() {
    let held = operations_with_window("flap-window", 3000, Duration::from_secs(8)).await;
    assert_eq!(held, 0, "with a 3 s window the noisy load made operations");
    let control = operations_with_window("flap-control", 150, Duration::from_secs(20)).await;
    assert!(
        control > 0,
        "without the window the same load made no operation: the window is not shown to matter"
    );
}
