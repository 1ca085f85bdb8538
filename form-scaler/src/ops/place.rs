//! Where an operation's instances are: each new one placed on a node by
//! [`crate::placement::place`] when the operation is accepted (before anything is
//! made, so a request no node can hold is refused whole), each victim on the node its
//! member records. Both go on the operation (`placements`), so every step, undo and
//! controller that resumes it acts on the same nodes.

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;

use crate::placement::{self, Amount, Node, Request, Shortfall};

/// Reasons kept word for word; the rest are cut (an operation record stays small).
const REASONS: usize = 16;

/// Resources of a new instance when neither the request nor the cluster sets them
/// (those a vmm node gives an instance without any).
const DEFAULT_RESOURCES: types::Resources = types::Resources {
    vcpus: 1,
    memory_mib: 512,
};

/// The node of `id` for `op`: where the operation placed it, else what its member in
/// `cluster` records, else "" (the `--vmm` node).
pub fn node_of(op: &types::Operation, cluster: Option<&state_pb::Cluster>, id: &str) -> String {
    op.placements
        .iter()
        .find(|p| p.instance_id == id)
        .map(|p| p.node_id.clone())
        .or_else(|| {
            cluster
                .and_then(|c| c.members.get(id))
                .map(|m| m.node_id.clone())
        })
        .unwrap_or_default()
}

/// The node that holds the operation's snapshot: the one recorded when it was made
/// from the cluster's standby snapshot (docs/standby.md), else the source's.
pub fn snapshot_node(op: &types::Operation, cluster: Option<&state_pb::Cluster>) -> String {
    if op.snapshot_node_id.is_empty() {
        node_of(op, cluster, &op.source_instance_id)
    } else {
        op.snapshot_node_id.clone()
    }
}

/// A replacement whose source is on a lost node too is made from another active member
/// on a live node (the first by id), else from the cluster's standby snapshot when it
/// keeps one (docs/standby.md; `snapshot_node_id` is then a node that holds it, chosen by
/// [`standby_node`]). Anything else is left as planned.
pub fn away_from_lost_source(
    op: &mut types::Operation,
    cluster: Option<&state_pb::Cluster>,
    nodes: &[state_pb::NodeInfo],
    now_ms: u64,
    lost_after_ms: u64,
) {
    let lost = |id: &str| {
        nodes
            .iter()
            .find(|r| r.node_id == id)
            .is_some_and(|r| node(r, now_ms, lost_after_ms).lost)
    };
    let Some(c) = cluster else {
        return;
    };
    if op.kind != types::OperationKind::ReplaceInstance as i32
        || !op.snapshot_id.is_empty()
        || !lost(&node_of(op, cluster, &op.source_instance_id))
    {
        return;
    }
    let live = c
        .members
        .values()
        .filter(|m| {
            !op.victims.contains(&m.instance_id)
                && m.status == state_pb::MemberStatus::Active as i32
                && !lost(&m.node_id)
        })
        .min_by(|a, b| a.instance_id.cmp(&b.instance_id));
    if let Some(m) = live {
        op.source_instance_id = m.instance_id.clone();
    } else if let Some(sb) = &c.standby {
        op.source_instance_id = sb.source_instance_id.clone();
        op.snapshot_id = sb.snapshot_id.clone();
        op.state_cursor = sb.state_cursor.clone();
        op.snapshot_node_id = sb.node_ids.first().cloned().unwrap_or_default();
    }
}

/// Which node holding the cluster's standby snapshot an operation made from it reads
/// it on: one that is not lost, the new instance's own when it is one of them.
pub fn standby_node(
    op: &types::Operation,
    cluster: Option<&state_pb::Cluster>,
    nodes: &[state_pb::NodeInfo],
    now_ms: u64,
    lost_after_ms: u64,
) -> Result<String, String> {
    let held = cluster
        .and_then(|c| c.standby.as_ref())
        .map(|s| s.node_ids.clone())
        .unwrap_or_default();
    let live: Vec<&String> = held
        .iter()
        .filter(|id| {
            nodes
                .iter()
                .any(|r| r.node_id == **id && !node(r, now_ms, lost_after_ms).lost)
        })
        .collect();
    let target = op.new_instances.first().map(|id| node_of(op, cluster, id));
    live.iter()
        .find(|n| Some((**n).clone()) == target)
        .or(live.first())
        .map(|n| (*n).clone())
        .ok_or_else(|| {
            format!(
                "cluster {} has no healthy member to clone from, and every node holding its standby snapshot {} ({}) is lost",
                op.cluster_id,
                op.snapshot_id,
                held.join(", ")
            )
        })
}

/// A node record as placement sees it: lost when its last heartbeat (as this
/// controller heard it: `crate::arrivals`) is more than `lost_after_ms` old at
/// `now_ms`.
pub fn node(r: &state_pb::NodeInfo, now_ms: u64, lost_after_ms: u64) -> Node {
    let amount = |c: Option<&state_pb::NodeCapacity>| {
        c.map(|c| Amount {
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            slots: c.instance_slots,
        })
        .unwrap_or_default()
    };
    Node {
        id: r.node_id.clone(),
        capacity: amount(r.capacity.as_ref()),
        used: amount(r.used.as_ref()),
        labels: r.labels.clone().into_iter().collect(),
        cordoned: r.cordoned,
        lost: now_ms.saturating_sub(r.last_heartbeat_ms) > lost_after_ms,
    }
}

/// The placements of `op` on `cluster` (its `resources` those of each new instance):
/// its new instances placed on `nodes`, its victims where they run. With no node
/// records at all, new instances go to the `--vmm` node ("").
pub fn placements(
    op: &types::Operation,
    cluster: Option<&state_pb::Cluster>,
    resources: Option<types::Resources>,
    nodes: &[state_pb::NodeInfo],
    now_ms: u64,
    lost_after_ms: u64,
) -> Result<Vec<types::Placement>, Shortfall> {
    let mut out = Vec::new();
    if !op.new_instances.is_empty() {
        if nodes.is_empty() {
            out.extend(op.new_instances.iter().map(|id| types::Placement {
                instance_id: id.clone(),
                node_id: String::new(),
                reason: "no vmm node has a record in form-state: the --vmm node".into(),
            }));
        } else {
            let r = resources
                .or_else(|| cluster.and_then(|c| c.resources))
                .unwrap_or(DEFAULT_RESOURCES);
            let existing_nodes = cluster
                .map(|c| {
                    c.members
                        .values()
                        .filter(|m| !op.victims.contains(&m.instance_id))
                        .map(|m| m.node_id.clone())
                        .collect()
                })
                .unwrap_or_default();
            let req = Request {
                cluster_id: op.cluster_id.clone(),
                count: op.new_instances.len() as u32,
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                labels: cluster
                    .and_then(|c| c.node_selector.as_ref())
                    .map(|s| s.labels.clone().into_iter().collect())
                    .unwrap_or_default(),
                existing_nodes,
            };
            let fleet: Vec<Node> = nodes
                .iter()
                .map(|n| node(n, now_ms, lost_after_ms))
                .collect();
            let placed = placement::place(&fleet, &req)?;
            for (k, (id, p)) in op.new_instances.iter().zip(placed).enumerate() {
                out.push(types::Placement {
                    instance_id: id.clone(),
                    node_id: p.node_id,
                    reason: if k < REASONS {
                        p.reason
                    } else {
                        "placed as the ones before".into()
                    },
                });
            }
        }
    }
    for v in &op.victims {
        if let Some(m) = cluster.and_then(|c| c.members.get(v)) {
            out.push(types::Placement {
                instance_id: v.clone(),
                node_id: m.node_id.clone(),
                reason: "runs there (to be removed)".into(),
            });
        }
    }
    let source = &op.source_instance_id;
    if !op.new_instances.is_empty()
        && !op.victims.contains(source)
        && let Some(m) = cluster.and_then(|c| c.members.get(source))
    {
        out.push(types::Placement {
            instance_id: source.clone(),
            node_id: m.node_id.clone(),
            reason: "runs there (the clones' source: its snapshot is taken there)".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, memory_mib: u64, heartbeat_ms: u64) -> state_pb::NodeInfo {
        state_pb::NodeInfo {
            node_id: id.into(),
            addresses: vec![format!("{id}:3002")],
            capacity: Some(state_pb::NodeCapacity {
                vcpus: 8,
                memory_mib,
                instance_slots: 10,
            }),
            used: Some(state_pb::NodeCapacity::default()),
            last_heartbeat_ms: heartbeat_ms,
            ..Default::default()
        }
    }

    fn member(id: &str, node: &str) -> (String, state_pb::Member) {
        (
            id.into(),
            state_pb::Member {
                instance_id: id.into(),
                node_id: node.into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn new_instances_spread_victims_stay_where_they_run_and_lost_nodes_take_nothing() {
        let cluster = state_pb::Cluster {
            cluster_id: "web".into(),
            members: [member("web-0", "n1"), member("web-1", "n1")]
                .into_iter()
                .collect(),
            resources: Some(types::Resources {
                vcpus: 1,
                memory_mib: 256,
            }),
            ..Default::default()
        };
        let op = types::Operation {
            cluster_id: "web".into(),
            new_instances: vec!["a".into(), "b".into()],
            victims: vec!["web-1".into()],
            ..Default::default()
        };
        let now = 100_000;
        let nodes = [
            record("n1", 4096, now),
            record("n2", 4096, now),
            record("n3", 65536, now - 60_000),
        ];
        let p = placements(&op, Some(&cluster), None, &nodes, now, 10_000).expect("placed");
        let at: Vec<(&str, &str)> = p
            .iter()
            .map(|p| (p.instance_id.as_str(), p.node_id.as_str()))
            .collect();
        // web-1 goes away: n1 keeps one, so n2 takes the first and both then tie.
        assert_eq!(at, [("a", "n2"), ("b", "n1"), ("web-1", "n1")]);
        assert!(p[0].reason.contains("n2"), "{}", p[0].reason);
        let op = types::Operation {
            placements: p,
            ..op
        };
        assert_eq!(node_of(&op, Some(&cluster), "a"), "n2");
        assert_eq!(node_of(&op, Some(&cluster), "web-0"), "n1");
        assert_eq!(node_of(&op, None, "unknown"), "");
    }

    #[test]
    fn a_standby_snapshot_is_read_on_a_live_node_holding_it_the_new_instance_s_first() {
        let now = 100_000;
        let cluster = |held: &[&str]| state_pb::Cluster {
            cluster_id: "web".into(),
            standby: Some(state_pb::StandbySnapshot {
                snapshot_id: "snap-1".into(),
                source_instance_id: "web-0".into(),
                node_ids: held.iter().map(|n| (*n).to_owned()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let op = |new_on: &str| types::Operation {
            cluster_id: "web".into(),
            snapshot_id: "snap-1".into(),
            new_instances: vec!["a".into()],
            placements: vec![types::Placement {
                instance_id: "a".into(),
                node_id: new_on.into(),
                reason: String::new(),
            }],
            ..Default::default()
        };
        let nodes = [
            record("n1", 4096, now - 60_000),
            record("n2", 4096, now),
            record("n3", 4096, now),
        ];
        let pick = |held: &[&str], new_on: &str| {
            standby_node(&op(new_on), Some(&cluster(held)), &nodes, now, 10_000)
        };
        assert_eq!(pick(&["n1", "n2"], "n3").as_deref(), Ok("n2"), "n1 is lost");
        assert_eq!(
            pick(&["n2", "n3"], "n3").as_deref(),
            Ok("n3"),
            "the new one's"
        );
        assert_eq!(pick(&["n2", "n3"], "n1").as_deref(), Ok("n2"), "the first");
        let e = pick(&["n1", "n4"], "n2").expect_err("none live");
        assert!(e.contains("snap-1") && e.contains("n1, n4"), "{e}");
        let mut op = op("n2");
        assert_eq!(snapshot_node(&op, None), "");
        op.snapshot_node_id = "n3".into();
        assert_eq!(snapshot_node(&op, None), "n3");
    }

    #[test]
    fn a_replacement_leaves_a_lost_source_for_a_live_member_else_the_standby() {
        let now = 100_000;
        let nodes = [record("n1", 4096, now - 60_000), record("n2", 4096, now)];
        let active = |id: &str, node: &str| {
            let (k, mut m) = member(id, node);
            m.status = state_pb::MemberStatus::Active as i32;
            (k, m)
        };
        let cluster = |members: Vec<(String, state_pb::Member)>| state_pb::Cluster {
            cluster_id: "web".into(),
            members: members.into_iter().collect(),
            standby: Some(state_pb::StandbySnapshot {
                snapshot_id: "snap-1".into(),
                source_instance_id: "web-0".into(),
                node_ids: vec!["n1".into(), "n2".into()],
                state_cursor: "c7".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let replace = |victim: &str, source: &str| types::Operation {
            cluster_id: "web".into(),
            kind: types::OperationKind::ReplaceInstance as i32,
            victims: vec![victim.into()],
            source_instance_id: source.into(),
            new_instances: vec!["new".into()],
            ..Default::default()
        };
        // web-0 (the planned source) is on lost n1; web-2 on n2 is active.
        let c = cluster(vec![
            active("web-0", "n1"),
            active("web-1", "n1"),
            active("web-2", "n2"),
        ]);
        let mut op = replace("web-1", "web-0");
        away_from_lost_source(&mut op, Some(&c), &nodes, now, 10_000);
        assert_eq!(op.source_instance_id, "web-2");
        assert!(op.snapshot_id.is_empty() && op.snapshot_node_id.is_empty());
        // Every member on n1: the standby snapshot.
        let c = cluster(vec![active("web-0", "n1")]);
        let mut op = replace("web-0", "web-0");
        away_from_lost_source(&mut op, Some(&c), &nodes, now, 10_000);
        assert_eq!(
            (
                op.snapshot_id.as_str(),
                op.state_cursor.as_str(),
                op.snapshot_node_id.as_str()
            ),
            ("snap-1", "c7", "n1"),
            "standby_node then picks a live holder"
        );
        // A source on a live node, or another kind of operation: as planned.
        let c = cluster(vec![active("web-0", "n2"), active("web-1", "n1")]);
        let mut op = replace("web-1", "web-0");
        away_from_lost_source(&mut op, Some(&c), &nodes, now, 10_000);
        assert_eq!(
            (op.source_instance_id.as_str(), op.snapshot_id.as_str()),
            ("web-0", "")
        );
        let c = cluster(vec![active("web-0", "n1")]);
        let mut op = replace("web-0", "web-0");
        op.kind = types::OperationKind::ScaleOut as i32;
        away_from_lost_source(&mut op, Some(&c), &nodes, now, 10_000);
        assert!(
            op.snapshot_id.is_empty(),
            "a scale-out never uses the standby"
        );
    }

    #[test]
    fn no_room_is_a_shortfall_and_no_records_mean_the_given_node() {
        let op = types::Operation {
            cluster_id: "web".into(),
            new_instances: vec!["a".into()],
            ..Default::default()
        };
        let big = Some(types::Resources {
            vcpus: 1,
            memory_mib: 8192,
        });
        let e =
            placements(&op, None, big, &[record("n1", 4096, 5)], 5, 10_000).expect_err("no room");
        assert!(
            e.to_string().contains("n1 has 4096 MiB free, needs 8192"),
            "{e}"
        );
        let p = placements(&op, None, big, &[], 5, 10_000).expect("given node");
        assert_eq!(p[0].node_id, "");
    }
}
