//! Continuous state sync on the full stack (process backend): `instances` demo-app
//! instances each take `rate` writes/s. Measured, with `state_sync: continuous`: the
//! time from a write's acknowledgement until every instance answers it (probe writes
//! on each instance in turn, every instance polled); and, against `state_sync: none`
//! in the same run, the throughput of one instance driven flat out by 4 connections
//! (reads of one key, then writes of new keys, which the sync must carry too) while
//! the background writes (and the sync) run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_testkit::probe;

use crate::quantile;
use crate::scaler_scale_out::{self as stack, CLUSTER};

pub(crate) async fn run(
    bin_dir: &Path,
    instances: u32,
    rate: u64,
    interval_ms: u32,
    seconds: u64,
) -> anyhow::Result<()> {
    let mut s = stack::stack(bin_dir, &[]).await?;
    stack::demo(&mut s, bin_dir).await?;
    stack::scale(&mut s, types::OperationKind::ScaleOut, instances, "grow").await?;
    stack::wait_done(&mut s, "grow").await?;
    let mut state = s.replicas.client(0).await;
    let addrs: Vec<SocketAddr> = state
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: CLUSTER.into(),
        })
        .await?
        .into_inner()
        .members
        .values()
        .filter_map(|m| m.addresses.first()?.parse().ok())
        .collect();
    anyhow::ensure!(
        addrs.len() == instances as usize,
        "{} instances",
        addrs.len()
    );
    let mut results = Vec::new();
    for mode in ["none", "continuous"] {
        let m = if mode == "none" {
            types::state_sync::Mode::None(types::StateSyncNone {})
        } else {
            types::state_sync::Mode::Continuous(types::StateSyncContinuous {
                interval_ms,
                ..Default::default()
            })
        };
        stack::set_state_sync(&mut s, m).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let background = writers(&addrs, rate, stop.clone());
        probe::http_request(addrs[0], "PUT", "/kv/read-me", b"r").await?;
        let reads = flat_out(addrs[0], Duration::from_secs(seconds), true).await;
        let writes = flat_out(addrs[0], Duration::from_secs(seconds), false).await;
        let spread = if mode == "continuous" {
            spread(&addrs, Duration::from_secs(seconds)).await?
        } else {
            Vec::new()
        };
        stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for t in background {
            sent += t.await.unwrap_or(0);
        }
        results.push((mode, reads, writes, spread, sent));
    }
    println!(
        "state-continuous: {instances} instances x {rate} writes/s, interval {interval_ms} ms, {seconds} s per measurement"
    );
    println!(
        "| state_sync | flat-out reads/s on one instance | flat-out writes/s on one instance | write -> on every instance p50 ms | p99 ms | background writes sent | targets |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let (base_reads, base_writes) = (results[0].1, results[0].2);
    for (mode, reads, writes, spread, sent) in &results {
        let (p50, p99) = if spread.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.0}", quantile(spread, 0.5)),
                format!("{:.0}", quantile(spread, 0.99)),
            )
        };
        let target = if *mode == "none" {
            "peer".to_owned()
        } else {
            format!(
                "p99 <= {} ms; throughput >= 90% of none (reads {:.0}%, writes {:.0}%)",
                interval_ms + 50,
                reads / base_reads * 100.0,
                writes / base_writes * 100.0
            )
        };
        println!("| {mode} | {reads:.0} | {writes:.0} | {p50} | {p99} | {sent} | {target} |");
    }
    for mut svc in s.services.drain(..) {
        form_testkit::conformance::stop_gracefully(&mut svc).await;
    }
    s.replicas.stop().await;
    Ok(())
}

/// One paced writer per instance at `rate` writes/s; each returns how many it sent.
fn writers(
    addrs: &[SocketAddr],
    rate: u64,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (a, stop) = (*a, stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let _ = probe::http_request(a, "PUT", &format!("/kv/bg-{i}-{n}"), b"v").await;
                }
                n
            })
        })
        .collect()
}

/// Requests per second one instance answers from 4 connections sending as fast as they
/// can: writes of new keys, or reads of one key.
async fn flat_out(addr: SocketAddr, d: Duration, read: bool) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + d;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let ok = if read {
                    matches!(probe::http_get(addr, "/kv/read-me").await, Ok((200, _)))
                } else {
                    let path = format!("/kv/flat-{w}-{n}");
                    matches!(
                        probe::http_request(addr, "PUT", &path, b"v").await,
                        Ok((204, _))
                    )
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / d.as_secs_f64()
}

/// Probe writes, one instance after another, each timed until every instance has it.
async fn spread(addrs: &[SocketAddr], d: Duration) -> anyhow::Result<Vec<f64>> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    let mut n = 0usize;
    while Instant::now() < end {
        let from = addrs[n % addrs.len()];
        let key = format!("/kv/probe-{n}");
        n += 1;
        let (code, _) = probe::http_request(from, "PUT", &key, b"p").await?;
        anyhow::ensure!(code == 204, "probe write answered {code}");
        let t0 = Instant::now();
        let mut missing: Vec<SocketAddr> = addrs.to_vec();
        while !missing.is_empty() {
            let mut still = Vec::new();
            for a in missing {
                if !matches!(probe::http_get(a, &key).await, Ok((200, _))) {
                    still.push(a);
                }
            }
            missing = still;
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "{key} never reached every instance"
            );
            if !missing.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}
