//! One backend pick of the balancer's selector (form-rplb `balance::select`), per
//! affinity method, with 100 backends: each pick timed alone, p50 and p99.

use std::time::Instant;

use form_rplb::balance::cookie::CookieSigner;
use form_rplb::balance::p2c::Rng;
use form_rplb::balance::select::{Affinity, RequestKey, Selector};
use form_rplb::balance::{Backend, State};

use crate::quantile;

const BACKENDS: usize = 100;

pub(crate) fn run(picks: usize) -> anyhow::Result<()> {
    let selector = Selector::new(
        (0..BACKENDS)
            .map(|i| Backend {
                id: format!("i-{i:03}"),
                weight: 1,
                state: State::Active,
            })
            .collect(),
    );
    let signer = CookieSigner::new([7; 32]);
    let in_flight: Vec<u64> = (0..BACKENDS as u64).map(|i| i % 7).collect();
    let cookie = signer.issue("i-042", 1_000, 3_600);
    let cookie_affinity = Affinity::Cookie {
        name: "FORM".into(),
        ttl_seconds: 3600,
    };
    let methods: [(&str, Affinity); 4] = [
        ("none (power of two choices)", Affinity::None),
        ("client IP (ring)", Affinity::ClientIp),
        (
            "hash of a parameter (ring)",
            Affinity::Hash {
                parameter: "user".into(),
            },
        ),
        ("cookie, a session's later request", cookie_affinity),
    ];
    let mut rng = Rng::new(11);
    let now = tokio::time::Instant::now();
    println!("rplb-pick: {BACKENDS} backends, {picks} picks per method, each timed alone");
    println!(
        "cookie values: {}",
        if signer.remembers_verified() {
            "remembered once verified (SHA-256 in software here)"
        } else {
            "MAC computed at every pick (SHA-256 instructions here)"
        }
    );
    println!("| affinity | p50 ns | p99 ns | target |");
    println!("|---|---:|---:|---|");
    for (name, affinity) in &methods {
        let mut samples = Vec::with_capacity(picks);
        for n in 0..picks {
            let ip = std::net::IpAddr::from([10, 0, (n >> 8) as u8, n as u8]);
            let value = n.to_le_bytes();
            let key = RequestKey {
                client_ip: Some(ip),
                hash_value: Some(&value),
                cookie: Some(&cookie),
            };
            let t0 = Instant::now();
            let d = selector.select(
                affinity, key, &in_flight, None, &signer, now, 1_000, &mut rng,
            );
            samples.push(t0.elapsed().as_nanos() as f64);
            anyhow::ensure!(d.is_some(), "no backend picked");
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.0} | {:.0} | p99 <= 1000 |",
            quantile(&samples, 0.5),
            quantile(&samples, 0.99)
        );
    }
    // A session's first request: its cookie has not been verified before.
    let fresh: Vec<String> = (0..picks.min(50_000))
        .map(|n| signer.issue(&format!("i-{:03}", n % BACKENDS), n as u64, 3_600))
        .collect();
    let mut samples = Vec::with_capacity(fresh.len());
    let affinity = Affinity::Cookie {
        name: "FORM".into(),
        ttl_seconds: 3600,
    };
    for c in &fresh {
        let key = RequestKey {
            cookie: Some(c),
            ..Default::default()
        };
        let t0 = Instant::now();
        let d = selector.select(
            &affinity, key, &in_flight, None, &signer, now, 1_000, &mut rng,
        );
        samples.push(t0.elapsed().as_nanos() as f64);
        anyhow::ensure!(d.is_some_and(|d| d.pinned), "the cookie did not pin");
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "| cookie, first request of a session | {:.0} | {:.0} | p99 <= 1000 |",
        quantile(&samples, 0.5),
        quantile(&samples, 0.99)
    );
    Ok(())
}
