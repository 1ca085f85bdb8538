//! Restart recovery: time from starting a replica until it is ready, with its data
//! mostly in a snapshot (default compaction) or all in the write-ahead log.

use std::path::Path;
use std::time::Instant;

use form_testkit::replicas::{ReplicaOptions, Replicas, metric_sum};

const RUNS: usize = 3;

pub(crate) async fn run(bin_dir: &Path, members: usize) -> anyhow::Result<()> {
    let bin = bin_dir.join("form-state");
    println!(
        "state-recovery: {members} member adds, start to ready of the real binary, median of {RUNS}"
    );
    println!("| layout | entries | start to ready ms | target |");
    println!("|---|---:|---:|---|");
    for (layout, every) in [
        ("snapshot + log (snapshot every 10000 records)", "10000"),
        ("log only", "100000000"),
    ] {
        let extra = ["--snapshot-every", every].map(String::from).to_vec();
        let mut r = Replicas::start(
            &bin,
            "recovery",
            ReplicaOptions {
                count: 1,
                proxied: false,
                extra_args: extra,
                extra_peers: Vec::new(),
            },
        )
        .await;
        crate::load::big_cluster(&r, members).await?;
        let entries = metric_sum(r.metrics_addr(0), "form_state_entries").await;
        let mut times = Vec::new();
        for _ in 0..RUNS {
            r.stop().await;
            let t0 = Instant::now();
            r.procs[0] = Some(r.launch(0).await);
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {layout} | {entries:.0} | {:.0} | <= 2000 ms |",
            times[RUNS / 2]
        );
        r.stop().await;
    }
    Ok(())
}
