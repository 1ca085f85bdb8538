//! Two vmm nodes: a scale-out spreads the new instances over both (placement), the
//! snapshot is copied to the node that has none, every clone on either node has the
//! source's state; a scale-in hands the victims' writes from one node to the instance
//! that stays on the other; a request no node can hold is refused before anything is
//! made, naming what each node lacks.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1::OperationKind;
use form_proto::vmm::v1 as vmm_pb;
use form_testkit::probe;

const OP_DEADLINE: Duration = Duration::from_secs(90);

/// Members by node, from the cluster's record.
fn by_node(c: &state_pb::Cluster) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in c.members.values() {
        out.entry(m.node_id.clone())
            .or_default()
            .push(m.instance_id.clone());
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

#[tokio::test]
async fn instances_spread_over_two_nodes_and_carry_the_state_across() {
    let (mut stack, mut node2) = Stack::two_nodes("nodes").await;
    let mut scaler = stack.start_scaler(&[]).await;

    // 1 -> 4: two on each node, placed before anything is made, with reasons.
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 4))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    let placed: Vec<&str> = op
        .new_instances
        .iter()
        .map(|id| {
            op.placements
                .iter()
                .find(|p| p.instance_id == *id)
                .map(|p| p.node_id.as_str())
                .expect("every new instance is placed")
        })
        .collect();
    // node-2 has none of the cluster; then each has one and as much memory free, and
    // the smaller id wins; then node-1 has two.
    assert_eq!(
        placed,
        ["node-2", "node-1", "node-2"],
        "{:?}",
        op.placements
    );
    assert!(
        op.placements.iter().all(|p| !p.reason.is_empty()),
        "{:?}",
        op.placements
    );
    assert!(
        op.notes
            .iter()
            .any(|n| n.contains("copied from node node-1 to node node-2")),
        "{:?}",
        op.notes
    );
    let cluster = stack.cluster().await;
    let nodes = by_node(&cluster);
    assert_eq!(
        nodes.values().map(Vec::len).collect::<Vec<_>>(),
        [2, 2],
        "{nodes:?}"
    );
    // What node-2 itself runs is what form-state says it runs.
    let on_node2: Vec<String> = node2
        .list_instances(vmm_pb::ListInstancesRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .expect("node-2's instances")
        .into_inner()
        .instances
        .into_iter()
        .filter(|i| i.status == vmm_pb::InstanceStatus::Running as i32)
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(Some(&on_node2), nodes.get("node-2"));
    // Every member, on either node, has the template's keys.
    for m in cluster.members.values() {
        for k in ["alpha", "beta"] {
            assert_eq!(
                key_on(&m.addresses[0], k).await.as_deref(),
                Some(format!("value-{k}").as_str()),
                "{k} on {} ({})",
                m.instance_id,
                m.node_id
            );
        }
    }
    // The snapshot and its copy are gone from both nodes.
    assert!(stack.snapshots().await.is_empty());
    let left = node2
        .list_snapshots(vmm_pb::ListSnapshotsRequest::default())
        .await
        .expect("node-2's snapshots")
        .into_inner()
        .snapshots;
    assert!(left.is_empty(), "{left:?}");

    // Each clone takes a write of its own; a scale-in to the template alone hands
    // them over, from node-2 to node-1 too.
    for m in cluster
        .members
        .values()
        .filter(|m| m.instance_id != TEMPLATE)
    {
        let at: SocketAddr = m.addresses[0].parse().expect("address");
        let (code, _) = probe::http_request(
            at,
            "PUT",
            &format!("/kv/from-{}", m.instance_id),
            m.node_id.as_bytes(),
        )
        .await
        .expect("PUT");
        assert_eq!(code, 204);
    }
    let reply = scaler
        .scale(scale(OperationKind::ScaleIn, 1))
        .await
        .expect("scale in")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    let after = stack.cluster().await;
    let template = &after.members[TEMPLATE];
    for m in cluster
        .members
        .values()
        .filter(|m| m.instance_id != TEMPLATE)
    {
        assert_eq!(
            key_on(&template.addresses[0], &format!("from-{}", m.instance_id))
                .await
                .as_deref(),
            Some(m.node_id.as_str()),
            "the write of {} on {} was not handed over",
            m.instance_id,
            m.node_id
        );
    }

    // A size no node has is refused whole, before anything is made.
    let mut state = stack.state.clone();
    state
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            resources: Some(form_proto::types::v1::Resources {
                vcpus: 1,
                memory_mib: 4 * 1024 * 1024,
            }),
            ..Default::default()
        })
        .await
        .expect("huge resources");
    let e = scaler
        .scale(scale(OperationKind::ScaleOut, 2))
        .await
        .expect_err("no node can hold it");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    for n in ["node-1", "node-2"] {
        assert!(
            e.message().contains(&format!("{n} has")),
            "{n}: {}",
            e.message()
        );
    }
    assert_eq!(stack.instances().await, [TEMPLATE]);
    stack.stop().await;
}

#[tokio::test]
async fn a_lost_node_s_instances_are_replaced_elsewhere_and_stopped_when_it_returns() {
    const NODE_TIMEOUT_MS: u64 = 2000;
    let (mut stack, mut node2) = Stack::two_nodes("nodes-lost").await;
    let timeout = NODE_TIMEOUT_MS.to_string();
    let mut scaler = stack
        .start_scaler(&["--node-timeout-ms", &timeout, "--replace-after-ms", "1000"])
        .await;
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 4))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    stack
        .state
        .clone()
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            state_sync: Some(form_proto::types::v1::StateSync {
                mode: Some(form_proto::types::v1::state_sync::Mode::Continuous(
                    form_proto::types::v1::StateSyncContinuous {
                        interval_ms: 100,
                        ..Default::default()
                    },
                )),
                refuse_unsynced_scale_in: false,
            }),
            ..Default::default()
        })
        .await
        .expect("continuous sync");

    // Writes acknowledged by node-2's instances, carried to node-1 by continuous sync.
    let before = by_node(&stack.cluster().await);
    let on_node2 = before["node-2"].clone();
    let cluster = stack.cluster().await;
    for id in &on_node2 {
        let at: SocketAddr = cluster.members[id].addresses[0].parse().expect("address");
        let (code, _) = probe::http_request(at, "PUT", &format!("/kv/w-{id}"), id.as_bytes())
            .await
            .expect("PUT");
        assert_eq!(code, 204);
    }
    let template_at = cluster.members[TEMPLATE].addresses[0].clone();
    for id in &on_node2 {
        form_testkit::assert_eventually!(
            async {
                key_on(&template_at, &format!("w-{id}")).await.as_deref() == Some(id.as_str())
            },
            "continuous sync carries node-2's writes to node-1"
        );
    }

    // node-2 stops answering (its vmm frozen; its instances still run).
    let node2_svc = stack.nodes.pop().expect("node-2");
    node2_svc
        .signal(form_testkit::Signal::SIGSTOP)
        .expect("SIGSTOP");
    let t0 = tokio::time::Instant::now();
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(60),
        async {
            let c = stack.cluster().await;
            c.members.len() == 4 && c.members.values().all(|m| m.node_id == "node-1")
        },
        "node-2's instances are replaced on node-1"
    );
    let took = t0.elapsed();
    assert!(
        took <= Duration::from_millis(NODE_TIMEOUT_MS + 10_000),
        "replaced after {took:?}"
    );
    let after = stack.cluster().await;
    for m in after.members.values() {
        for id in &on_node2 {
            assert_eq!(
                key_on(&m.addresses[0], &format!("w-{id}")).await.as_deref(),
                Some(id.as_str()),
                "the write acknowledged by {id} is missing on {}",
                m.instance_id
            );
        }
    }
    // Their members are gone: the operations end soon after (the snapshot's deletion).
    let replacements = async |stack: &mut Stack| -> Vec<_> {
        stack
            .operations()
            .await
            .into_iter()
            .filter(|o| o.kind == OperationKind::ReplaceInstance as i32)
            .collect()
    };
    form_testkit::assert_eventually!(
        async {
            let ops = replacements(&mut stack).await;
            ops.len() == on_node2.len() && ops.iter().all(terminal)
        },
        "the replacements end"
    );
    let replaced = replacements(&mut stack).await;
    for o in &replaced {
        assert_eq!(status(o), "completed", "{o:?}");
        assert!(
            o.notes.iter().any(|n| n.contains("node-2 is lost")),
            "{:?}",
            o.notes
        );
    }

    // node-2 comes back: it stops the instances its cluster no longer has.
    node2_svc
        .signal(form_testkit::Signal::SIGCONT)
        .expect("SIGCONT");
    stack.nodes.push(node2_svc);
    form_testkit::assert_eventually!(
        deadline = Duration::from_secs(60),
        async {
            node2
                .list_instances(vmm_pb::ListInstancesRequest {
                    cluster_id: CLUSTER.into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().instances.is_empty())
        },
        "node-2 stops its replaced instances"
    );
    for id in &on_node2 {
        assert!(
            probe::pids_with_env("FORM_INSTANCE_ID", id).is_empty(),
            "{id} still runs on node-2"
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_node_selector_keeps_a_cluster_s_instances_on_the_nodes_with_its_labels() {
    let (mut stack, _node2) = Stack::two_nodes_with("nodes-labels", &["--labels", "zone=b"]).await;
    let mut scaler = stack.start_scaler(&[]).await;
    let select = |zone: &str| state_pb::PutClusterRequest {
        cluster_id: CLUSTER.into(),
        node_selector: Some(state_pb::NodeSelector {
            labels: [("zone".to_owned(), zone.to_owned())].into(),
        }),
        ..Default::default()
    };
    stack
        .state
        .clone()
        .put_cluster(select("b"))
        .await
        .expect("selector");
    // Spread would put one of the two on node-1: it lacks the label.
    let reply = scaler
        .scale(scale(OperationKind::ScaleOut, 3))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    let placed = by_node(&stack.cluster().await);
    assert_eq!(placed["node-2"].len(), 2, "{placed:?}");
    assert_eq!(placed["node-1"], [TEMPLATE], "{placed:?}");
    // No node has zone=c: refused before anything is made, naming each node's lack.
    stack
        .state
        .clone()
        .put_cluster(select("c"))
        .await
        .expect("selector");
    let e = scaler
        .scale(scale(OperationKind::ScaleOut, 4))
        .await
        .expect_err("no node");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    for says in [
        "node-1 lacks label zone=c",
        "node-2 has label zone=b, needs zone=c",
    ] {
        assert!(
            e.message().contains(says),
            "'{says}' not in {}",
            e.message()
        );
    }
    // A cluster made with a selector: its template goes to a node with the label.
    let reply = scaler
        .create_cluster({
            let mut r = create_request("pinned");
            if let Some(c) = r.cluster.as_mut() {
                c.node_selector = select("b").node_selector;
            }
            r
        })
        .await
        .expect("create")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, OP_DEADLINE).await;
    assert_eq!(status(&op), "completed", "{op:?}");
    let pinned = stack
        .state
        .clone()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: "pinned".into(),
        })
        .await
        .expect("pinned")
        .into_inner();
    assert_eq!(pinned.node_selector.expect("kept").labels["zone"], "b");
    assert_eq!(
        pinned.members[&pinned.template_instance_id].node_id,
        "node-2"
    );
    // A selector is checked like a node's labels.
    let mut bad = select("b");
    bad.node_selector = Some(state_pb::NodeSelector {
        labels: [(String::new(), "x".to_owned())].into(),
    });
    let e = stack
        .state
        .clone()
        .put_cluster(bad)
        .await
        .expect_err("empty key");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("node_selector.labels"),
        "{}",
        e.message()
    );
    stack.stop().await;
}
