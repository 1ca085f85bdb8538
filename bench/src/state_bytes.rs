//! Bytes on the wire for one member update in a cluster of many members, delta against
//! full-state gossip, with the same data (loaded once, then restarted per policy).

use std::path::Path;
use std::time::{Duration, Instant};

use form_proto::state::v1 as pb;
use form_testkit::replicas::{ReplicaOptions, Replicas, metric_sum};

pub(crate) async fn run(bin_dir: &Path, members: usize, n: usize) -> anyhow::Result<()> {
    let bin = bin_dir.join("form-state");
    let mut replicas = Replicas::start(
        &bin,
        "bytes",
        ReplicaOptions {
            count: n,
            proxied: false,
            extra_args: Vec::new(),
            extra_peers: Vec::new(),
        },
    )
    .await;
    let mut c = replicas.client(0).await;
    let started = Instant::now();
    crate::load::big_cluster(&replicas, members).await?;
    wait_converged(&replicas, Duration::from_secs(300)).await?;
    let digest = c.digest(pb::DigestRequest {}).await?.into_inner();
    println!(
        "state-bytes: {members} members in one cluster on {n} replicas (loaded in {:.1} s); full state = {} bytes",
        started.elapsed().as_secs_f64(),
        digest.state_bytes
    );
    println!(
        "| gossip | push bytes for one member update (all replicas) | anti-entropy bytes/s (background, all replicas) | target |"
    );
    println!("|---|---:|---:|---|");
    for policy in ["delta", "full"] {
        replicas.stop().await;
        replicas.set_extra_args(["--replication", policy].map(String::from).to_vec());
        for i in 0..n {
            replicas.procs[i] = Some(replicas.launch(i).await);
        }
        wait_converged(&replicas, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (push0, ae0, t0) = (
            sum(&replicas, n, "form_state_bytes_sent_total").await,
            sum(&replicas, n, "form_state_anti_entropy_bytes_total").await,
            Instant::now(),
        );
        let mut c = replicas.client(0).await;
        c.update_member(pb::UpdateMemberRequest {
            cluster_id: "big".into(),
            instance_id: crate::load::member_id(42),
            status: Some(pb::MemberStatus::Active as i32),
            ..Default::default()
        })
        .await?;
        wait_converged(&replicas, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let push = sum(&replicas, n, "form_state_bytes_sent_total").await - push0;
        let ae = (sum(&replicas, n, "form_state_anti_entropy_bytes_total").await - ae0)
            / t0.elapsed().as_secs_f64();
        let target = if policy == "delta" {
            "<= 10240 bytes"
        } else {
            "-"
        };
        println!("| {policy} | {push:.0} | {ae:.0} | {target} |");
    }
    replicas.stop().await;
    Ok(())
}

async fn sum(r: &Replicas, n: usize, metric: &str) -> f64 {
    let mut total = 0.0;
    for i in 0..n {
        total += metric_sum(r.metrics_addr(i), metric).await;
    }
    total
}

async fn wait_converged(r: &Replicas, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !r.converged().await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "replicas did not converge within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
