//! The scaling decision's cost: one `decide()` for a cluster of 10 instances with a
//! full stabilization history (300 s of 15 s evaluations), and one evaluation round
//! over many clusters, as one controller runs it every second.

use std::time::Instant;

use form_scaler::decide::{History, Observation, decide};
use form_scaler::policy::default_policy;

use crate::quantile;

/// Runs the benchmark.
pub(crate) fn run(calls: usize, clusters: usize) -> anyhow::Result<()> {
    let policy = form_proto::types::v1::ScalingPolicy {
        target_requests_per_instance: Some(50.0),
        ..default_policy()
    };
    let observations: Vec<Observation> = (0..10)
        .map(|i| Observation {
            instance_id: format!("i-{i}"),
            ready: true,
            cpu: Some(0.2 + 0.01 * f64::from(i)),
            requests_per_second: Some(10.0),
        })
        .collect();
    let mut history = History::default();
    for k in 0..20u64 {
        history.record(1_000_000 + k * 15_000, 10, 3_600_000);
    }
    let now = 1_000_000 + 20 * 15_000;
    let mut times = Vec::with_capacity(calls);
    let mut changed = 0;
    for _ in 0..calls {
        let t = Instant::now();
        let d = decide(&policy, std::hint::black_box(&observations), &history, now);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        changed += usize::from(d.changes());
    }
    times.sort_by(f64::total_cmp);
    let t = Instant::now();
    for c in 0..clusters {
        let d = decide(
            &policy,
            std::hint::black_box(&observations),
            &history,
            now + c as u64,
        );
        std::hint::black_box(d);
    }
    let round = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "scaler-decide: 10 instances, 2 signals, 20 recommendations of history; {calls} calls ({changed} changes)"
    );
    println!("| measure | value | target |");
    println!("|---|---:|---|");
    let p50 = quantile(&times, 0.5);
    let p99 = quantile(&times, 0.99);
    let mark = |ok: bool| if ok { "✓" } else { "✗ missed" };
    println!(
        "| decide() p50 | {p50:.2} µs | <= 10 µs {} |",
        mark(p50 <= 10.0)
    );
    println!("| decide() p99 | {p99:.2} µs | - |");
    println!(
        "| one round over {clusters} clusters | {round:.1} ms | < 1000 ms (1 s interval) {} |",
        mark(round < 1000.0)
    );
    Ok(())
}
