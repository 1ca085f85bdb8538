//! Application state through scaling (the workload state contract).
//!
//! 1. Handoff: `keys` keys of 1 KiB written to one demo-app instance are read from it
//!    and merged into 3 fresh instances through form-vmm-service, with the code
//!    form-scaler's handoff runs (`ops::sync::carry`). Beside it, in the same run, a
//!    snapshot of the same instance: the other way this state travels.
//! 2. What the state steps add to operations, on the full stack (process backend): a
//!    scale-out 1 -> 2 and a scale-in 2 -> 1 (the clone holding `op_keys` keys of its
//!    own), request to completion, with `state_sync: on_scale` against `none`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_scaler::ops::plan::new_instance_id;
use form_scaler::ops::sync::{BATCH_BYTES, On, carry};
use form_testkit::{TestDir, probe, start};

use crate::quantile;
use crate::scaler_scale_out::{self as stack, CLUSTER};

/// Size of each value.
const VALUE: usize = 1024;

pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    keys: usize,
    op_runs: usize,
    op_keys: usize,
) -> anyhow::Result<()> {
    let h = handoff(bin_dir, runs, keys).await?;
    println!(
        "state-handoff: {keys} keys of {VALUE} B ({:.1} MiB of batches) from one instance to 3, {runs} runs",
        h.bytes as f64 / (1024.0 * 1024.0)
    );
    println!("| what | p50 ms | max ms | target |");
    println!("|---|---:|---:|---|");
    for (what, v, target) in [
        (
            format!(
                "handoff to 3 survivors (read + merge, batches of {} MiB)",
                BATCH_BYTES / (1024 * 1024)
            ),
            &h.handoff,
            "p50 <= 100",
        ),
        ("  part: reading every batch".to_owned(), &h.read_only, "-"),
        (
            "  part: merging every batch into one instance".to_owned(),
            &h.merge_one,
            "-",
        ),
        (
            "peer: snapshot of the same instance (process backend)".to_owned(),
            &h.snapshot,
            "-",
        ),
    ] {
        println!(
            "| {what} | {:.0} | {:.0} | {target} |",
            quantile(v, 0.5),
            quantile(v, 1.0)
        );
    }
    if op_runs == 0 {
        return Ok(());
    }
    println!(
        "\nstate-handoff: operations request -> completed, process backend, {op_runs} runs each; the clone holds {op_keys} keys of {VALUE} B at scale-in"
    );
    println!("| operation | state_sync | p50 ms | p99 ms |");
    println!("|---|---|---:|---:|");
    for mode in ["none", "on_scale"] {
        let (out, inn) = operations(bin_dir, mode, op_runs, op_keys).await?;
        println!(
            "| scale-out 1 -> 2 | {mode} | {:.0} | {:.0} |",
            quantile(&out, 0.5),
            quantile(&out, 0.99)
        );
        println!(
            "| scale-in 2 -> 1 | {mode} | {:.0} | {:.0} |",
            quantile(&inn, 0.5),
            quantile(&inn, 0.99)
        );
    }
    Ok(())
}

async fn create(
    c: &mut VmmServiceClient<form_scaler::fencing::Ch>,
    bin_dir: &Path,
    id: &str,
) -> anyhow::Result<pb::Instance> {
    let i = c
        .create_instance(crate::demo_instance(bin_dir, id, None))
        .await?
        .into_inner();
    anyhow::ensure!(
        i.status == pb::InstanceStatus::Running as i32 && i.state_contract == "supported",
        "instance {id}: {} {}",
        i.failure,
        i.state_contract
    );
    Ok(i)
}

/// Writes `keys` keys of [`VALUE`] bytes to the instance at `addr`, 8 at a time.
async fn fill(addr: SocketAddr, prefix: &str, keys: usize) -> anyhow::Result<()> {
    let value = vec![b'x'; VALUE];
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (value, prefix) = (value.clone(), prefix.to_owned());
        tasks.spawn(async move {
            for k in (w..keys).step_by(8) {
                let (code, _) =
                    probe::http_request(addr, "PUT", &format!("/kv/{prefix}{k}"), &value).await?;
                anyhow::ensure!(code == 204, "PUT answered {code}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// Milliseconds of each run, sorted.
struct Handoff {
    handoff: Vec<f64>,
    snapshot: Vec<f64>,
    /// Reading every batch, nothing merged.
    read_only: Vec<f64>,
    /// Merging every batch into one instance (it already has them: duplicates).
    merge_one: Vec<f64>,
    bytes: u64,
}

async fn handoff(bin_dir: &Path, runs: usize, keys: usize) -> anyhow::Result<Handoff> {
    let dir = TestDir::new("bench-handoff");
    let data = dir.path().join("data");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap_or("data"),
    ];
    let mut svc = start(&dir, "vmm", bin_dir.join("form-vmm-service"), &args).await;
    let mut c = VmmServiceClient::new(form_scaler::fencing::fenced(
        probe::channel(svc.addr("grpc").unwrap_or_else(|| unreachable!())).await?,
    ))
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let victim = create(&mut c, bin_dir, "victim").await?;
    fill(victim.address.parse()?, "k", keys).await?;
    let (mut handoff, mut snapshot, mut bytes) = (Vec::new(), Vec::new(), 0);
    let (mut read_only, mut merge_one) = (Vec::new(), Vec::new());
    for n in 0..runs {
        let mut survivors = Vec::new();
        for s in 0..3 {
            survivors.push(
                create(&mut c, bin_dir, &format!("s{n}-{s}"))
                    .await?
                    .instance_id,
            );
        }
        // The parts: reading alone, then merging into one survivor alone.
        let t0 = Instant::now();
        let mut batches = Vec::new();
        let mut cursor = String::new();
        loop {
            let b = c
                .read_changes(pb::ReadChangesRequest {
                    instance_id: "victim".into(),
                    since: cursor.clone(),
                    max_bytes: BATCH_BYTES,
                    own: false,
                    prefixes: Vec::new(),
                })
                .await?
                .into_inner();
            cursor = b.next_cursor.clone();
            let more = b.more;
            batches.push(b.batch);
            if !more {
                break;
            }
        }
        read_only.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        for b in batches {
            c.merge_changes(pb::MergeChangesRequest {
                instance_id: survivors[0].clone(),
                batch: b,
            })
            .await?;
        }
        merge_one.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        let on = |id: &str| On {
            id: id.to_owned(),
            node: String::new(),
            vmm: c.clone(),
        };
        let to: Vec<On> = survivors.iter().map(|s| on(s)).collect();
        let carried = carry(&on("victim"), "", &to, BATCH_BYTES, false)
            .await
            .map_err(|e| anyhow::anyhow!("handoff: {e:?}"))?;
        handoff.push(t0.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            carried.changes as usize == keys,
            "{} changes",
            carried.changes
        );
        bytes = carried.bytes;
        for id in &survivors {
            let i = c
                .get_instance(pb::InstanceRef {
                    instance_id: id.clone(),
                })
                .await?
                .into_inner();
            let (code, body) =
                probe::http_get(i.address.parse()?, &format!("/kv/k{}", keys - 1)).await?;
            anyhow::ensure!(
                code == 200 && body.len() == VALUE,
                "{id} lacks the last key"
            );
            c.delete_instance(pb::InstanceRef {
                instance_id: id.clone(),
            })
            .await?;
        }
        let t0 = Instant::now();
        let snap = c
            .snapshot(pb::SnapshotRequest {
                instance_id: "victim".into(),
                resume: Some(true),
            })
            .await?
            .into_inner();
        snapshot.push(t0.elapsed().as_secs_f64() * 1000.0);
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
        })
        .await?;
    }
    form_testkit::conformance::stop_gracefully(&mut svc).await;
    for v in [&mut handoff, &mut snapshot, &mut read_only, &mut merge_one] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Handoff {
        handoff,
        snapshot,
        read_only,
        merge_one,
        bytes,
    })
}

async fn operations(
    bin_dir: &Path,
    mode: &str,
    runs: usize,
    keys: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut s = stack::stack(bin_dir, &[]).await?;
    stack::demo(&mut s, bin_dir).await?;
    let m = if mode == "none" {
        types::state_sync::Mode::None(types::StateSyncNone {})
    } else {
        types::state_sync::Mode::OnScale(types::StateSyncOnScale {})
    };
    stack::set_state_sync(&mut s, m).await?;
    let (mut out, mut inn) = (Vec::new(), Vec::new());
    for n in 0..runs {
        let id = format!("{mode}-out-{n}");
        let t0 = Instant::now();
        stack::scale(&mut s, types::OperationKind::ScaleOut, 2, &id).await?;
        stack::wait_done(&mut s, &id).await?;
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        let clone = s
            .vmm
            .get_instance(pb::InstanceRef {
                instance_id: new_instance_id(CLUSTER, &id, 0),
            })
            .await?
            .into_inner();
        fill(clone.address.parse()?, &format!("c{n}-"), keys).await?;
        let back = format!("{mode}-in-{n}");
        let t0 = Instant::now();
        stack::scale(&mut s, types::OperationKind::ScaleIn, 1, &back).await?;
        stack::wait_done(&mut s, &back).await?;
        inn.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    for mut svc in s.services.drain(..) {
        form_testkit::conformance::stop_gracefully(&mut svc).await;
    }
    s.replicas.stop().await;
    out.sort_by(f64::total_cmp);
    inn.sort_by(f64::total_cmp);
    Ok((out, inn))
}
