//! Scale-out to serving across nodes against the same node, in one run: the services
//! of `scaler-scale-out` with two vmm nodes, the bench cluster's primary on node-1.
//! Each round scales out by one twice: once with node-2 cordoned (the clone is made on
//! node-1, beside its snapshot) and once with node-1 cordoned (the snapshot is pulled to
//! node-2 first, docs/transfer.md). Where each clone went is read back from the
//! operation's placements, not assumed.

use std::path::Path;
use std::time::{Duration, Instant};

use form_proto::scaler::v1 as scaler_pb;
use form_proto::state::v1 as state_pb;

use form_scaler::ops::plan::new_instance_id;

use crate::quantile;
use crate::scaler_scale_out::{CLUSTER, Stack, back, demo, out_to_serving, qemu_args, stack_on};

pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    guest_dir: Option<&Path>,
) -> anyhow::Result<()> {
    println!(
        "scaler-nodes: scale-out by one, request -> serving through the balancer, {runs} runs per placement (qemu: at most 5, TCG)"
    );
    println!(
        "| backend | same node p50 ms | same node p99 ms | other node p50 ms | other node p99 ms | other / same p50 |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let (same, other) = measure(bin_dir, &[], runs).await?;
    row("process", &same, &other);
    match guest_dir {
        Some(g) => {
            let args = qemu_args(g.to_str().unwrap_or_default());
            let (same, other) = measure(bin_dir, &args, runs.min(5)).await?;
            row("qemu (TCG)", &same, &other);
        }
        None => println!(
            "| qemu | - | - | - | - | not measured: pass --guest-dir (deploy/guest/build.sh) |"
        ),
    }
    Ok(())
}

fn row(name: &str, same: &[f64], other: &[f64]) {
    println!(
        "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
        quantile(same, 0.5),
        quantile(same, 0.99),
        quantile(other, 0.5),
        quantile(other, 0.99),
        quantile(other, 0.5) / quantile(same, 0.5)
    );
}

async fn measure(
    bin_dir: &Path,
    backend: &[&str],
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut s = stack_on(bin_dir, backend, 2).await?;
    // Stopped however the rounds end: a vmm node killed would leave its instances.
    let r = rounds(&mut s, bin_dir, runs).await;
    s.stop().await;
    let (mut same, mut other) = r?;
    same.sort_by(f64::total_cmp);
    other.sort_by(f64::total_cmp);
    Ok((same, other))
}

async fn rounds(
    s: &mut Stack,
    bin_dir: &Path,
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    wait_for_nodes(s, 2).await?;
    demo(s, bin_dir).await?;
    let (mut same, mut other) = (Vec::new(), Vec::new());
    for n in 0..runs {
        for (cordoned, on, times) in [
            ("node-2", "node-1", &mut same),
            ("node-1", "node-2", &mut other),
        ] {
            let tag = format!("{on}-{n}");
            cordon(s, cordoned, true).await?;
            let ms = out_to_serving(s, &tag).await;
            // Lifted before anything else: a scale-in prefers a cordoned node's members.
            cordon(s, cordoned, false).await?;
            times.push(ms?);
            let placed = placed_on(s, &format!("out-{tag}")).await?;
            anyhow::ensure!(placed == on, "out-{tag} placed its clone on {placed}");
            back(s, &tag).await?;
        }
    }
    Ok((same, other))
}

async fn cordon(s: &mut Stack, node: &str, cordoned: bool) -> anyhow::Result<()> {
    // Cordoning is an operator's call (docs/security.md).
    let ch =
        form_testkit::probe::channel_as(s.replicas.addrs[0], form_runtime::tls::Kind::Operator)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    state_pb::state_service_client::StateServiceClient::new(ch)
        .set_node_cordon(state_pb::SetNodeCordonRequest {
            node_id: node.into(),
            cordoned,
        })
        .await?;
    Ok(())
}

/// The node operation `id` placed its one new instance on (its placements also name
/// the node of the clones' source).
async fn placed_on(s: &mut Stack, id: &str) -> anyhow::Result<String> {
    let op = s
        .scaler
        .get_operation(scaler_pb::GetOperationRequest {
            operation_id: id.into(),
        })
        .await?
        .into_inner();
    let new = new_instance_id(CLUSTER, id, 0);
    op.placements
        .iter()
        .find(|p| p.instance_id == new)
        .map(|p| p.node_id.clone())
        .ok_or_else(|| anyhow::anyhow!("{id} has no placement for {new}"))
}

async fn wait_for_nodes(s: &mut Stack, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut state = s.replicas.client(0).await;
    loop {
        let nodes = state
            .list_nodes(state_pb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        if nodes.len() >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {n} nodes registered",
            nodes.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
