//! The snapshot of an operation, on every node that clones from it: each node other
//! than the source's pulls it from the source's node (`PullSnapshot`,
//! docs/transfer.md), checked against the files the snapshot was reported with, before
//! any clone is asked for. Pulls of different nodes run at once; a pull already done
//! (a step run again) answers at once.

use std::collections::BTreeSet;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use tokio::task::JoinSet;

use super::engine::Engine;
use super::place::node_of;
use crate::platform::OpError;

/// Copies `op`'s snapshot to the nodes of its new instances; returns what each copy
/// took, for the operation's notes.
pub async fn copy_snapshot(
    e: &Engine,
    op: &types::Operation,
    cluster: &state_pb::Cluster,
) -> Result<Vec<String>, OpError> {
    let source = super::place::snapshot_node(op, Some(cluster));
    let targets: BTreeSet<String> = op
        .new_instances
        .iter()
        .map(|id| node_of(op, Some(cluster), id))
        .filter(|n| *n != source)
        .collect();
    if targets.is_empty() || op.snapshot_id.is_empty() {
        return Ok(Vec::new());
    }
    let p = &e.platform;
    let from_address = p.fleet.address(&p.state, &source).await?;
    let expected_files = p
        .vmm_on(&source)
        .await?
        .list_snapshots(vmm_pb::ListSnapshotsRequest {
            source_instance_id: op.source_instance_id.clone(),
        })
        .await
        .map_err(|s| OpError::rpc(format!("listing the snapshots of node {source}"), &s))?
        .into_inner()
        .snapshots
        .into_iter()
        .find(|s| s.snapshot_id == op.snapshot_id)
        .map(|s| s.files)
        .ok_or_else(|| {
            OpError::new(format!(
                "snapshot {} is not on node {source} any more",
                op.snapshot_id
            ))
        })?;
    let mut set = JoinSet::new();
    for node in targets {
        let mut vmm = p.vmm_on(&node).await?;
        let req = vmm_pb::PullSnapshotRequest {
            snapshot_id: op.snapshot_id.clone(),
            from_address: from_address.clone(),
            expected_files: expected_files.clone(),
            max_bytes_per_second: 0,
        };
        let (id, source) = (op.snapshot_id.clone(), source.clone());
        set.spawn(crate::fencing::scoped(async move {
            let r = vmm
                .pull_snapshot(req)
                .await
                .map_err(|s| OpError::rpc(format!("copying snapshot {id} to node {node}"), &s))?
                .into_inner();
            metrics::counter!("form_scaler_snapshot_bytes_copied_total")
                .increment(r.bytes_received);
            Ok(if r.already_present {
                None
            } else {
                Some(format!(
                    "snapshot {id} copied from node {source} to node {node}: {} bytes in {} ms ({} resumed, {} reconnects, {} chunks refused)",
                    r.bytes_received, r.duration_ms, r.bytes_resumed, r.reconnects, r.chunks_refused
                ))
            })
        }));
    }
    let mut notes = Vec::new();
    let mut first = None;
    while let Some(r) = set.join_next().await {
        match r.unwrap_or_else(|j| Err(OpError::new(format!("task failed: {j}")))) {
            Ok(note) => notes.extend(note),
            Err(err) => {
                first.get_or_insert(err);
            }
        }
    }
    first.map_or(Ok(notes), Err)
}
