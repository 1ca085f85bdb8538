//! Convergence time: from a write acknowledged on replica 0 until every other replica
//! streams it on `Watch` (durable there), for delta and full-state gossip.

use std::path::Path;
use std::time::{Duration, Instant};

use form_proto::state::v1 as pb;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use tokio::sync::mpsc;

use crate::quantile;

pub(crate) async fn run(bin_dir: &Path, writes: usize) -> anyhow::Result<()> {
    let bin = bin_dir.join("form-state");
    println!(
        "state-convergence: {writes} writes per row, sync interval 100 ms, one write at a time"
    );
    println!("| replicas | gossip | p50 ms | p99 ms | max ms | target |");
    println!("|---:|---|---:|---:|---:|---|");
    for n in [3, 5] {
        for policy in ["delta", "full"] {
            let mut samples = measure(&bin, n, policy, writes).await?;
            samples.sort_by(f64::total_cmp);
            let target = if n == 5 && policy == "delta" {
                "p99 <= 1000 ms"
            } else {
                "-"
            };
            println!(
                "| {n} | {policy} | {:.0} | {:.0} | {:.0} | {target} |",
                quantile(&samples, 0.5),
                quantile(&samples, 0.99),
                quantile(&samples, 1.0)
            );
        }
    }
    Ok(())
}

pub(crate) async fn measure(
    bin: &Path,
    n: usize,
    policy: &str,
    writes: usize,
) -> anyhow::Result<Vec<f64>> {
    let extra = ["--sync-interval-ms", "100", "--replication", policy]
        .map(String::from)
        .to_vec();
    let mut replicas = Replicas::start(
        bin,
        &format!("conv-{n}-{policy}"),
        ReplicaOptions {
            count: n,
            proxied: false,
            extra_args: extra,
            extra_peers: Vec::new(),
        },
    )
    .await;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, String, Instant)>();
    for i in 1..n {
        let mut c = replicas.client(i).await;
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(resp) = c
                .watch(pb::WatchRequest {
                    from_sequence: 0,
                    cluster_id: String::new(),
                })
                .await
            else {
                return;
            };
            let mut s = resp.into_inner();
            while let Ok(Some(e)) = s.message().await {
                if let Some(pb::watch_event::Change::Cluster(c)) = e.change {
                    let _ = tx.send((i, c.cluster_id, Instant::now()));
                }
            }
        });
    }
    let mut origin = replicas.client(0).await;
    let mut samples = Vec::with_capacity(writes);
    for k in 0..writes {
        let id = format!("c{k}");
        let t0 = Instant::now();
        origin
            .put_cluster(pb::PutClusterRequest {
                cluster_id: id.clone(),
                ..Default::default()
            })
            .await?;
        let mut seen = vec![false; n];
        seen[0] = true;
        let mut last = t0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.iter().any(|s| !s) {
            let (i, c, at) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| anyhow::anyhow!("write {id} did not reach every replica in 10 s"))?
                .ok_or_else(|| anyhow::anyhow!("watch streams ended"))?;
            if c == id && !seen[i] {
                seen[i] = true;
                last = last.max(at);
            }
        }
        samples.push(last.duration_since(t0).as_secs_f64() * 1000.0);
        // Desynchronise from the push ticks.
        tokio::time::sleep(Duration::from_millis((k as u64 * 37) % 50)).await;
    }
    replicas.stop().await;
    Ok(samples)
}
