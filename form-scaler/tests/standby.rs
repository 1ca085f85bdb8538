//! The standby snapshot (docs/standby.md): a cluster whose policy asks for one keeps a
//! snapshot of its template on its node and on another; when the template's node is
//! lost with every member on it, the cluster is made again on the other node from that
//! snapshot, with the writes made before it; the standby goes when the policy no
//! longer asks for it, and with the cluster; a bad interval is refused naming the
//! field.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use form_proto::scaler::v1 as pb;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1::{OperationKind, ScalingPolicy};
use form_proto::vmm::v1 as vmm_pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::probe;
use tonic::transport::Channel;

const NODE_TIMEOUT_MS: u64 = 2000;

fn policy(standby_snapshot_seconds: u32) -> pb::SetPolicyRequest {
    pb::SetPolicyRequest {
        cluster_id: CLUSTER.into(),
        policy: Some(ScalingPolicy {
            min_instances: 1,
            max_instances: 1,
            target_cpu_utilization: 0.6,
            standby_snapshot_seconds,
            ..Default::default()
        }),
    }
}

async fn snapshots_on(vmm: &mut VmmServiceClient<Channel>) -> Vec<String> {
    vmm.list_snapshots(vmm_pb::ListSnapshotsRequest::default())
        .await
        .map(|r| {
            r.into_inner()
                .snapshots
                .into_iter()
                .map(|s| s.snapshot_id)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_cluster_whose_only_node_is_lost_is_made_again_from_its_standby_snapshot() {
    let (mut stack, mut node2) = Stack::two_nodes("standby").await;
    let timeout = NODE_TIMEOUT_MS.to_string();
    let mut scaler = stack
        .start_scaler(&["--node-timeout-ms", &timeout, "--replace-after-ms", "1000"])
        .await;
    // An interval out of range is refused, naming the field and what is accepted.
    let e = scaler.set_policy(policy(5)).await.expect_err("5 s");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("standby_snapshot_seconds") && e.message().contains("10-86400"),
        "{}",
        e.message()
    );
    assert!(stack.cluster().await.standby.is_none());
    // So is a cluster created with one, or with a standby record of its own.
    let mut bad = create_request("bad-standby");
    if let Some(c) = bad.cluster.as_mut() {
        c.scaling_policy = policy(5).policy;
    }
    let e = scaler.create_cluster(bad).await.expect_err("5 s");
    assert!(
        e.code() == tonic::Code::InvalidArgument
            && e.message().contains("standby_snapshot_seconds"),
        "{e:?}"
    );
    let mut bad = create_request("bad-standby");
    if let Some(c) = bad.cluster.as_mut() {
        c.standby = Some(state_pb::StandbySnapshot::default());
    }
    let e = scaler
        .create_cluster(bad)
        .await
        .expect_err("a standby record");
    assert!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("cluster.standby"),
        "{e:?}"
    );

    // A write acknowledged by the template before the standby snapshot.
    let cluster = stack.cluster().await;
    let template: SocketAddr = cluster.members[TEMPLATE].addresses[0]
        .parse()
        .expect("address");
    let (code, _) = probe::http_request(template, "PUT", "/kv/before", b"kept")
        .await
        .expect("PUT");
    assert_eq!(code, 204);
    scaler.set_policy(policy(10)).await.expect("policy");
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            stack
                .cluster()
                .await
                .standby
                .is_some_and(|s| s.node_ids == ["node-1", "node-2"])
        },
        "a standby snapshot is kept on node-1 and node-2"
    );
    let standby = stack.cluster().await.standby.expect("standby");
    assert_eq!(standby.source_instance_id, TEMPLATE);
    assert!(
        snapshots_on(&mut stack.vmm_client)
            .await
            .contains(&standby.snapshot_id)
    );
    assert!(
        snapshots_on(&mut node2)
            .await
            .contains(&standby.snapshot_id)
    );

    // node-1, with the cluster's only member, stops answering.
    stack
        .vmm
        .signal(form_testkit::Signal::SIGSTOP)
        .expect("SIGSTOP");
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(60),
        async {
            let c = stack.cluster().await;
            c.template_instance_id != TEMPLATE
                && c.members.len() == 1
                && c.members.values().all(|m| {
                    m.node_id == "node-2" && m.status == state_pb::MemberStatus::Active as i32
                })
        },
        "the template is made again on node-2"
    );
    let c = stack.cluster().await;
    let new = &c.members[&c.template_instance_id];
    assert_eq!(
        key_on(&new.addresses[0], "before").await.as_deref(),
        Some("kept"),
        "the write made before the standby snapshot is on the new template"
    );
    let replaced: Vec<_> = stack
        .operations()
        .await
        .into_iter()
        .filter(|o| o.kind == OperationKind::ReplaceInstance as i32)
        .collect();
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(replaced[0].snapshot_id, standby.snapshot_id);
    assert_eq!(replaced[0].snapshot_node_id, "node-2");
    assert_eq!(
        replaced[0]
            .notes
            .iter()
            .filter(|n| n.contains("made from the standby snapshot"))
            .count(),
        1,
        "one note, from both sync steps: {:?}",
        replaced[0].notes
    );

    // node-1 comes back: it stops the replaced template.
    stack
        .vmm
        .signal(form_testkit::Signal::SIGCONT)
        .expect("SIGCONT");
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(60),
        async {
            stack
                .vmm_client
                .list_instances(vmm_pb::ListInstancesRequest {
                    cluster_id: CLUSTER.into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().instances.is_empty())
        },
        "node-1 stops the replaced template"
    );
    stack.wait_node_beating("node-1").await;
    // The new template gets its own standby snapshot, on node-2 and node-1; the one
    // it was made from is deleted where it was.
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            stack.cluster().await.standby.is_some_and(|s| {
                s.source_instance_id != TEMPLATE && s.node_ids == ["node-2", "node-1"]
            })
        },
        "the new template's standby snapshot"
    );
    form_testkit::assert_eventually!(
        async {
            !snapshots_on(&mut node2)
                .await
                .contains(&standby.snapshot_id)
        },
        "the old standby snapshot is deleted on node-2"
    );

    // No longer asked for: cleared, and deleted on both nodes.
    let kept = stack.cluster().await.standby.expect("standby");
    scaler.set_policy(policy(0)).await.expect("policy");
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(30),
        async { stack.cluster().await.standby.is_none() },
        "the standby snapshot is cleared"
    );
    form_testkit::assert_eventually!(
        async {
            !snapshots_on(&mut node2).await.contains(&kept.snapshot_id)
                && !snapshots_on(&mut stack.vmm_client)
                    .await
                    .contains(&kept.snapshot_id)
        },
        "and deleted on both nodes"
    );

    // Kept again, then the cluster is deleted: so is every snapshot of it.
    scaler.set_policy(policy(10)).await.expect("policy");
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(30),
        async { stack.cluster().await.standby.is_some() },
        "a standby snapshot again"
    );
    let reply = scaler
        .delete_cluster(pb::DeleteClusterRequest {
            cluster_id: CLUSTER.into(),
            operation_id: String::new(),
        })
        .await
        .expect("delete")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, Duration::from_secs(60)).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    assert!(snapshots_on(&mut node2).await.is_empty());
    assert!(snapshots_on(&mut stack.vmm_client).await.is_empty());
    stack.stop().await;
}
