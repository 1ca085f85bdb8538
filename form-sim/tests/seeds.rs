//! The simulator on CI's fixed seeds: every invariant holds on every seed, a run
//! replays exactly from its seed, and a deliberately broken protocol is caught.
//! A failing seed replays alone with `FORM_SIM_SEED=<seed> cargo test -p form-sim`.

use form_sim::{CI_SEEDS, Options, REGRESSIONS, run};

fn seeds() -> Vec<u64> {
    match std::env::var("FORM_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("FORM_SIM_SEED is a number")],
        Err(_) => CI_SEEDS.chain(REGRESSIONS.iter().copied()).collect(),
    }
}

#[test]
fn every_invariant_holds_under_faults_on_the_ci_seeds() {
    let opts = Options::faulty();
    let mut failed = Vec::new();
    let mut total = form_sim::Stats::default();
    let mut setups = Vec::new();
    for seed in seeds() {
        let o = run(seed, &opts);
        setups.push(o.setup.clone());
        total.acked += o.stats.acked;
        total.acked_deletes += o.stats.acked_deletes;
        total.crashes += o.stats.crashes;
        total.partitions += o.stats.partitions;
        total.full_states += o.stats.full_states;
        total.dropped += o.stats.dropped;
        total.duplicated += o.stats.duplicated;
        total.timeouts += o.stats.timeouts;
        total.wakes += o.stats.wakes;
        eprintln!(
            "seed {seed} ({}): converged {:?} ms after the faults, {:?}",
            o.setup, o.converged_after_ms, o.stats
        );
        if !o.violations.is_empty() {
            failed.push(format!(
                "seed {seed} ({}):\n  {}",
                o.setup,
                o.violations.join("\n  ")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "replay one with FORM_SIM_SEED=<seed> cargo test -p form-sim --test seeds\n{}",
        failed.join("\n")
    );
    // The checks were exercised: without these a run could pass by doing nothing.
    if std::env::var("FORM_SIM_SEED").is_err() {
        eprintln!("over the CI seeds: {total:?}");
        for (what, n) in [
            ("acknowledged writes", total.acked),
            ("acknowledged deletes", total.acked_deletes),
            ("crashes", total.crashes),
            ("partitions", total.partitions),
            ("full states sent", total.full_states),
            ("messages lost", total.dropped),
            ("messages duplicated", total.duplicated),
            ("calls timed out", total.timeouts),
            ("pushes woken by urgent writes", total.wakes),
        ] {
            assert!(n > 0, "no {what} over the CI seeds");
        }
        for drawn in [
            "peers Mesh",
            "peers Ring(1)",
            "policy delta",
            "policy full",
            "policy prioritized",
            "buffer 32",
            "buffer 10000",
        ] {
            assert!(
                setups.iter().any(|s| s.contains(drawn)),
                "no CI seed drew {drawn}"
            );
        }
    }
}

/// The durability checks can fail: a disk that acknowledges writes before syncing
/// them loses acknowledged writes in crashes, and the CI seeds catch it.
#[test]
fn a_disk_that_acknowledges_before_it_syncs_is_caught() {
    let opts = Options {
        ack_before_sync: true,
        ..Options::faulty()
    };
    let caught: Vec<u64> = CI_SEEDS
        .filter(|seed| {
            run(*seed, &opts)
                .violations
                .iter()
                .any(|v| v.contains("acknowledged"))
        })
        .collect();
    assert!(
        !caught.is_empty(),
        "no CI seed caught acknowledged writes lost in a crash"
    );
    eprintln!("caught by seeds {caught:?}");
}

#[test]
fn a_run_replays_exactly_from_its_seed() {
    let opts = Options::faulty();
    let a = run(11, &opts);
    let b = run(11, &opts);
    assert_eq!(a.stats, b.stats);
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.converged_after_ms, b.converged_after_ms);
    assert_eq!(a.convergence.latencies, b.convergence.latencies);
    let c = run(12, &opts);
    assert_ne!(a.stats, c.stats, "another seed, another run");
}

/// The checker can fail: gossip that never forwards another replica's deltas is
/// caught on the CI seeds (wherever a delta must be relayed to reach a replica).
#[test]
fn gossip_that_forgets_to_forward_is_caught() {
    let opts = Options {
        broken: form_state::gossip::protocol::Broken { no_forward: true },
        ..Options::faulty()
    };
    let caught: Vec<u64> = CI_SEEDS
        .filter(|seed| !run(*seed, &opts).violations.is_empty())
        .collect();
    assert!(
        !caught.is_empty(),
        "no CI seed caught gossip that does not forward"
    );
    eprintln!("caught by seeds {caught:?}");
}

/// One peer address that never answers (each call to it waits the 5 s timeout) does
/// not slow the others: writes still reach every replica within a few sync intervals.
#[test]
fn a_black_holed_peer_does_not_delay_convergence_among_the_others() {
    let calm = Options::calm(5);
    let holed = Options {
        black_hole: true,
        ..calm.clone()
    };
    let a = run(5, &calm);
    let b = run(5, &holed);
    assert!(a.violations.is_empty(), "{:?}", a.violations);
    assert!(b.violations.is_empty(), "{:?}", b.violations);
    let (pa, pb) = (a.convergence.quantile(0.99), b.convergence.quantile(0.99));
    eprintln!("convergence p99: {pa} ms without the black hole, {pb} ms with it");
    assert!(
        b.convergence.latencies.len() > 100,
        "{} writes measured",
        b.convergence.latencies.len()
    );
    assert!(
        pb <= pa + calm.sync_ms,
        "a black hole delayed convergence: p99 {pb} ms against {pa} ms"
    );
}

/// A link slower than the anti-entropy interval (each pull over it takes 3 s against a
/// 1 s interval) still carries pushes. In a chain nobody pulls from replica 0, so its
/// writes leave it only by its pushes to replica 1, over the slow link. A schedule
/// that always ran the due anti-entropy first never pushed there, and this run did not
/// converge (checked by reverting the fix in `gossip/link.rs`).
#[test]
fn a_permanently_slow_link_does_not_starve_pushes() {
    let opts = Options {
        peers: form_sim::Peers::Chain,
        slow_link: true,
        fault_ms: 20_000,
        // Each pull over the slow link takes 3 s: catching up takes a few.
        settle_ms: 60_000,
        ..Options::calm(3)
    };
    let o = run(3, &opts);
    assert!(
        o.violations.is_empty(),
        "{} violations, the first: {:?}",
        o.violations.len(),
        o.violations.first()
    );
    assert!(o.stats.acked > 100, "{} writes acknowledged", o.stats.acked);
}
