//! Convergence time: from a write sent to replica 0 until every other replica streams
//! it on `Watch` (durable there), each write pushed at once or left to the rounds, and
//! what pushing at once costs in CPU and bytes per write at 1,000 writes/s.

use std::path::Path;
use std::time::{Duration, Instant};

use form_proto::state::v1 as pb;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use tokio::sync::mpsc;

use crate::quantile;

pub(crate) async fn run(
    bin_dir: &Path,
    writes: usize,
    gather_ms: u64,
    cpu_only: bool,
) -> anyhow::Result<()> {
    let bin = bin_dir.join("form-state");
    if !cpu_only {
        rows(&bin, writes, gather_ms).await?;
    }
    println!(
        "CPU per write at {CPU_RATE} writes/s to one of 5 replicas for {CPU_SECONDS} s (every replica's CPU, user and system, over the writes acknowledged):"
    );
    println!("| gossip | writes | CPU ms | CPU µs per write | bytes sent per write |");
    println!("|---|---:|---:|---:|---:|");
    let mut per = Vec::new();
    for at_once in [false, true] {
        let c = cpu_per_write(&bin, at_once, gather_ms).await?;
        println!(
            "| delta, {} | {} | {:.0} | {:.1} | {:.0} |",
            if at_once {
                format!("pushed at once (gathered {gather_ms} ms)")
            } else {
                "rounds only".to_owned()
            },
            c.writes,
            c.cpu_ms,
            c.cpu_ms * 1000.0 / c.writes as f64,
            c.bytes / c.writes as f64
        );
        per.push(c.cpu_ms / c.writes as f64);
    }
    println!(
        "pushed at once / rounds only, CPU per write: {:.2}x (target <= 1.20x)",
        per[1] / per[0]
    );
    Ok(())
}

/// form-state's arguments for a row: rounds every 100 ms, `policy`, and each write
/// pushed at once after `gather_ms` or not.
fn args(policy: &str, at_once: bool, gather_ms: u64) -> Vec<String> {
    [
        "--sync-interval-ms",
        "100",
        "--replication",
        policy,
        "--push-at-once",
        &at_once.to_string(),
        "--push-gather-ms",
        &gather_ms.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

async fn rows(bin: &Path, writes: usize, gather_ms: u64) -> anyhow::Result<()> {
    println!(
        "state-convergence: {writes} writes per row, one at a time; rounds every 100 ms, and each write pushed at once (gathered for {gather_ms} ms) unless the row says rounds only"
    );
    println!("| replicas | gossip | p50 ms | p99 ms | max ms | target |");
    println!("|---:|---|---:|---:|---:|---|");
    let rows: [(usize, &str, bool, &str); 5] = [
        (5, "delta", true, "p99 <= 20 ms"),
        (5, "delta", false, "-"),
        (5, "full", false, "-"),
        (9, "delta", true, "p99 <= 50 ms"),
        (9, "delta", false, "-"),
    ];
    for (n, policy, at_once, target) in rows {
        let mut samples = measure(bin, n, &args(policy, at_once, gather_ms), writes).await?;
        samples.sort_by(f64::total_cmp);
        let how = if at_once {
            format!("{policy}, pushed at once")
        } else {
            format!("{policy}, rounds only")
        };
        println!(
            "| {n} | {how} | {:.1} | {:.1} | {:.1} | {target} |",
            quantile(&samples, 0.5),
            quantile(&samples, 0.99),
            quantile(&samples, 1.0)
        );
    }
    println!();
    Ok(())
}

/// Writes per second and seconds of the CPU measure.
const CPU_RATE: u64 = 1_000;
const CPU_SECONDS: u64 = 5;

/// What the replicas spent on a stream of writes.
struct Cost {
    writes: u64,
    cpu_ms: f64,
    bytes: f64,
}

/// Five replicas; `CPU_RATE` writes a second to the first for `CPU_SECONDS` (16
/// writers, each at its share of the rate); the CPU all five used meanwhile, and the
/// gossip bytes they sent.
async fn cpu_per_write(bin: &Path, at_once: bool, gather_ms: u64) -> anyhow::Result<Cost> {
    let extra = args("delta", at_once, gather_ms);
    let mut replicas = Replicas::start(
        bin,
        &format!("conv-cpu-{at_once}"),
        ReplicaOptions {
            count: 5,
            proxied: false,
            extra_args: extra,
            extra_peers: Vec::new(),
        },
    )
    .await;
    let pids: Vec<u32> = replicas
        .procs
        .iter()
        .flatten()
        .filter_map(|p| p.pid())
        .collect();
    let sent = |r: &Replicas| {
        let addrs: Vec<_> = (0..5).map(|i| r.metrics_addr(i)).collect();
        async move {
            let mut b = 0.0;
            for a in addrs {
                b += form_testkit::replicas::metric_sum(a, "form_state_bytes_sent_total").await;
            }
            b
        }
    };
    let (bytes0, ticks0) = (sent(&replicas).await, crate::proc_cost::cpu_ticks(&pids));
    const WRITERS: u64 = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut c = replicas.client(0).await;
        tasks.spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * WRITERS / CPU_RATE));
            let mut done = 0u64;
            for k in 0..CPU_RATE * CPU_SECONDS / WRITERS {
                tick.tick().await;
                let put = c
                    .put_cluster(pb::PutClusterRequest {
                        cluster_id: format!("w{w}-{k}"),
                        ..Default::default()
                    })
                    .await;
                done += u64::from(put.is_ok());
            }
            done
        });
    }
    let mut writes = 0;
    while let Some(n) = tasks.join_next().await {
        writes += n?;
    }
    // What the last writes cost to send lands within the next round.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ticks1 = crate::proc_cost::cpu_ticks(&pids);
    let bytes1 = sent(&replicas).await;
    replicas.stop().await;
    let ticks = ticks1.since(ticks0).total();
    Ok(Cost {
        writes,
        cpu_ms: ticks as f64 * 1000.0 / crate::proc_cost::TICKS_PER_SECOND,
        bytes: bytes1 - bytes0,
    })
}

/// Convergence of `writes` writes on `n` replicas started with `extra` arguments, ms.
pub(crate) async fn measure(
    bin: &Path,
    n: usize,
    extra: &[String],
    writes: usize,
) -> anyhow::Result<Vec<f64>> {
    let extra = extra.to_vec();
    let mut replicas = Replicas::start(
        bin,
        &format!("conv-{n}"),
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
