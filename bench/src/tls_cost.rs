//! What mutual TLS costs the control plane: the same measurements with every gRPC
//! connection in mutual TLS (as the platform runs) and in plaintext
//! (`--insecure-plaintext`), alternated in one run so that the machine's drift
//! touches both alike: a write's gossip convergence on 5 replicas (delta gossip,
//! 100 ms interval), and a process-backend scale-out from request to serving through
//! the balancer.

use std::path::Path;

use crate::{quantile, scaler_scale_out, state_convergence};

pub(crate) async fn run(
    bin_dir: &Path,
    rounds: usize,
    writes: usize,
    scale_outs: usize,
) -> anyhow::Result<()> {
    let state = bin_dir.join("form-state");
    let mut conv = [Vec::new(), Vec::new()];
    let mut scale = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, plain) in [false, true].into_iter().enumerate() {
            form_testkit::pki::use_plaintext(plain);
            let mode = if plain { "plaintext" } else { "mutual TLS" };
            let c = state_convergence::measure(&state, 5, &[], writes).await?;
            let (s, _) = scaler_scale_out::measure(bin_dir, &[], scale_outs).await?;
            eprintln!(
                "round {}/{rounds} {mode:<10}: convergence p99 {:.1} ms, scale-out p50 {:.1} ms",
                round + 1,
                sorted_quantile(&c, 0.99),
                sorted_quantile(&s, 0.5)
            );
            conv[i].extend(c);
            scale[i].extend(s);
        }
    }
    form_testkit::pki::use_plaintext(false);
    println!(
        "tls-cost: {rounds} rounds alternating mutual TLS and plaintext; {writes} writes and {scale_outs} scale-outs per round and mode"
    );
    println!("| measure | mutual TLS | plaintext | TLS costs | target |");
    println!("|---|---:|---:|---:|---|");
    let row = |name: &str, tls: &[f64], plain: &[f64], q: f64| {
        let (t, p) = (sorted_quantile(tls, q), sorted_quantile(plain, q));
        let cost = (t - p) / p * 100.0;
        println!(
            "| {name} | {t:.1} ms | {p:.1} ms | {cost:+.1}% | <= +10%: {} |",
            if cost <= 10.0 { "met" } else { "MISSED" }
        );
    };
    row(
        "gossip convergence p99, 5 replicas, delta",
        &conv[0],
        &conv[1],
        0.99,
    );
    row(
        "scale-out request to serving p50, process backend",
        &scale[0],
        &scale[1],
        0.5,
    );
    Ok(())
}

fn sorted_quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    quantile(&s, q)
}
