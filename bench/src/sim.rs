//! The simulator's benchmarks (form-sim, docs/simulation.md): `sim` runs many seeds of
//! the faulty 5-replica platform and prints runs per second and every failing seed;
//! `sim-fleet` compares convergence at fleet scale against a small platform;
//! `sim-platform` runs operations under faults on the in-process platform
//! (`form_sim::platform`) and prints operations per second and every failing seed.

use std::time::{Duration, Instant};

use form_sim::{Faults, Options, Peers, run};

/// `form-bench sim --seeds N --from S`: runs seeds `S..S+N`.
pub(crate) fn seeds(from: u64, count: u64, replicas: usize, seconds: u64) -> anyhow::Result<()> {
    let opts = Options {
        replicas,
        fault_ms: seconds * 1_000,
        ..Options::faulty()
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut simulated_ms = 0;
    for seed in from..from + count {
        let o = run(seed, &opts);
        simulated_ms += opts.fault_ms + o.converged_after_ms.unwrap_or(opts.settle_ms);
        if !o.violations.is_empty() {
            println!("seed {seed} FAILED:\n  {}", o.violations.join("\n  "));
            failed.push(seed);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sim: {count} runs of {replicas} replicas, {seconds} simulated s of faults each, in {secs:.1} s: {:.2} runs/s, {:.0} simulated s per wall s",
        count as f64 / secs,
        simulated_ms as f64 / 1_000.0 / secs
    );
    if failed.is_empty() {
        println!("every seed passed");
        Ok(())
    } else {
        anyhow::bail!(
            "failing seeds (replay: FORM_SIM_SEED=<seed> cargo test -p form-sim --test seeds): {failed:?}"
        )
    }
}

/// `form-bench sim-fleet`: write-to-every-replica convergence and the wall time of a
/// simulated second, 9 replicas holding `clusters` clusters of 10 members against 3
/// replicas holding 10 clusters, no faults.
pub(crate) fn fleet(clusters: usize, seconds: u64) -> anyhow::Result<()> {
    let case = |replicas: usize, clusters: usize| Options {
        clusters,
        members: 10,
        fault_ms: seconds * 1_000,
        peers: Peers::Mesh,
        faults: Faults::none(),
        ..Options::calm(replicas)
    };
    println!(
        "sim-fleet: {seconds} simulated s, 20 writes/s, no faults, sync 100 ms (simulated ms)"
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>14}",
        "case", "p50 ms", "p99 ms", "writes", "wall ms/sim s"
    );
    let mut p99s = Vec::new();
    for (replicas, clusters) in [(3, 10), (9, clusters)] {
        let opts = case(replicas, clusters);
        let t = Instant::now();
        let o = run(1, &opts);
        let wall = t.elapsed().as_secs_f64() * 1e3;
        if !o.violations.is_empty() {
            anyhow::bail!("the fleet run broke invariants: {:?}", o.violations);
        }
        let sim_s = (opts.fault_ms + o.converged_after_ms.unwrap_or(0)) as f64 / 1e3;
        let (p50, p99) = (o.convergence.quantile(0.5), o.convergence.quantile(0.99));
        println!(
            "{:<34} {:>8} {:>8} {:>8} {:>14.1}",
            format!("{replicas} replicas, {clusters} clusters x 10"),
            p50,
            p99,
            o.convergence.latencies.len(),
            wall / sim_s
        );
        p99s.push(p99);
    }
    let ratio = p99s[1] as f64 / p99s[0].max(1) as f64;
    println!(
        "convergence p99 at fleet scale: {ratio:.2}x the small case (target <= 2x): {}",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// `form-bench sim-platform --seeds N --from S`: seeded runs of `seconds` simulated
/// seconds each on `replicas` replicas, `nodes` nodes and `balancers` balancers, on a
/// runtime of its own with paused time (a thread of its own, since the caller is
/// already in a runtime).
#[cfg(feature = "sim")]
pub(crate) fn platform(runs: PlatformRuns) -> anyhow::Result<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()?;
        rt.block_on(platform_runs(runs))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the simulation's thread panicked"))?
}

/// Without the `sim` feature (tokio's paused time), says how to build it.
#[cfg(not(feature = "sim"))]
pub(crate) fn platform(runs: PlatformRuns) -> anyhow::Result<()> {
    drop(platform_runs(runs));
    anyhow::bail!(
        "form-bench sim-platform runs on simulated time, which this build left out: build it with `cargo build --release -p form-bench --features sim` (a build of its own, so that no other binary gets tokio's test-util)"
    )
}

/// What `form-bench sim-platform` runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlatformRuns {
    /// The first seed.
    pub from: u64,
    /// Seeds.
    pub count: u64,
    pub replicas: usize,
    pub nodes: usize,
    pub balancers: usize,
    /// Simulated seconds of operations per run.
    pub seconds: u64,
}

async fn platform_runs(runs: PlatformRuns) -> anyhow::Result<()> {
    let PlatformRuns {
        from,
        count,
        replicas,
        nodes,
        balancers,
        seconds,
    } = runs;
    use form_sim::platform::{Setup, run};
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut all = run::Outcomes::new();
    let mut simulated = Duration::ZERO;
    for seed in from..from + count {
        let dir = form_testkit::dir::TestDir::new(&format!("bench-sim-platform-{seed}"));
        let setup = Setup {
            nodes,
            replicas,
            balancers,
            ..Default::default()
        };
        let lasting = Duration::from_secs(seconds);
        match run::seeded_for(dir.path(), seed, lasting, setup).await {
            Ok(r) => {
                simulated += r.took;
                for (k, n) in r.outcomes {
                    *all.entry(k).or_default() += n;
                }
            }
            Err(e) => {
                println!("seed {seed} FAILED: {e}");
                failed.push(seed);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let ended: usize = ["completed", "rolled_back"]
        .iter()
        .filter_map(|k| all.get(k))
        .sum();
    println!(
        "sim-platform: {count} runs of {replicas} replicas, {nodes} nodes and {balancers} balancers, {seconds} simulated seconds of operations each ({:.1} s simulated in all, with the checks), in {secs:.1} s: {:.2} runs/s, {:.1} simulated s per s, {:.1} operations/s; {all:?}",
        simulated.as_secs_f64(),
        count as f64 / secs,
        simulated.as_secs_f64() / secs,
        ended as f64 / secs
    );
    if failed.is_empty() {
        println!("every seed passed");
        Ok(())
    } else {
        anyhow::bail!(
            "failing seeds (the same draws again, in a debug build: FORM_SIM_PLATFORM_SEED=<seed> cargo test -p form-sim --test platform seeded): {failed:?}"
        )
    }
}

/// One case of `sim-platform-fleet`: the controller's evaluation rounds, in ms, sorted.
async fn round_times(
    replicas: usize,
    nodes: usize,
    clusters: usize,
    rounds: u64,
) -> anyhow::Result<(f64, Vec<f64>)> {
    use form_sim::platform::{InProcess, Setup, run};
    use std::time::Duration;
    let dir = form_testkit::dir::TestDir::new("bench-sim-platform-fleet");
    let setup = Setup {
        nodes,
        replicas,
        act: true,
        evaluate: Duration::from_millis(500),
        node_heartbeat: Duration::from_secs(1),
        ..Default::default()
    };
    let p = std::sync::Arc::new(InProcess::with(dir.path(), setup).await?);
    let started = Instant::now();
    let mut made = tokio::task::JoinSet::new();
    for c in 0..clusters {
        if made.len() >= 8
            && let Some(r) = made.join_next().await
        {
            r??;
        }
        let p = p.clone();
        made.spawn(async move {
            let id = format!("c{c}");
            let mut spec = run::spec(&id);
            // Held at 10: the rounds observe and decide, and change nothing.
            if let Some(pol) = spec.scaling_policy.as_mut() {
                pol.min_instances = 10;
                pol.max_instances = 10;
            }
            let op = p
                .controller()
                .create(spec, &format!("create-{id}"))
                .await
                .map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
            p.ended(&op.operation_id, run::ENDS).await?;
            let out = run::scale(
                form_proto::types::v1::OperationKind::ScaleOut,
                10,
                &format!("out-{id}"),
            );
            match p.controller().submit(&id, out).await {
                Ok(op) => p.ended(&op.operation_id, run::ENDS).await.map(|_| ()),
                // The controller's own round may have scaled it to its minimum first.
                Err(e)
                    if e.code() == tonic::Code::Aborted
                        || e.code() == tonic::Code::FailedPrecondition =>
                {
                    Ok(())
                }
                Err(e) => Err(anyhow::anyhow!("{id}: {e}")),
            }
        });
    }
    while let Some(r) = made.join_next().await {
        r??;
    }
    let setup_s = started.elapsed().as_secs_f64();
    let shared = p.controller().shared.clone();
    let (mut seen, _) = shared.rounds.last();
    let mut times = Vec::new();
    while (times.len() as u64) < rounds {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (n, last) = shared.rounds.last();
        if n != seen {
            seen = n;
            times.push(last.as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    if let Ok(p) = std::sync::Arc::try_unwrap(p) {
        p.stop().await;
    }
    Ok((setup_s, times))
}

/// `form-bench sim-platform-fleet`: the controller's evaluation round on the
/// in-process platform at fleet scale against a small platform.
pub(crate) async fn platform_fleet(clusters: usize, rounds: u64) -> anyhow::Result<()> {
    let cases = [(3, 10, 10), (9, 100, clusters)];
    let mut rows = Vec::new();
    for (replicas, nodes, clusters) in cases {
        let (setup_s, times) = round_times(replicas, nodes, clusters, rounds).await?;
        rows.push((replicas, nodes, clusters, setup_s, times));
    }
    println!(
        "sim-platform-fleet: the controller's evaluation round (every cluster: health, standby, observe, decide) on the in-process platform, clusters of 10"
    );
    println!(
        "| replicas | nodes | clusters | setup s | rounds | p50 ms | p99 ms | p50 µs per cluster |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (r, n, c, s, t) in &rows {
        println!(
            "| {r} | {n} | {c} | {s:.0} | {} | {:.2} | {:.2} | {:.1} |",
            t.len(),
            crate::quantile(t, 0.5),
            crate::quantile(t, 0.99),
            crate::quantile(t, 0.5) * 1e3 / *c as f64
        );
    }
    let (small, fleet) = (&rows[0], &rows[1]);
    let per =
        |row: &(usize, usize, usize, f64, Vec<f64>)| crate::quantile(&row.4, 0.5) / row.2 as f64;
    println!(
        "fleet / small: whole round p50 {:.1}x, p99 {:.1}x (the round visits every cluster: {}x the clusters); per cluster p50 {:.2}x (target <= 2x)",
        crate::quantile(&fleet.4, 0.5) / crate::quantile(&small.4, 0.5),
        crate::quantile(&fleet.4, 0.99) / crate::quantile(&small.4, 0.99),
        fleet.2 / small.2,
        per(fleet) / per(small)
    );
    Ok(())
}
