//! Snapshot time and clone-to-serving time of the backends: the demo app with `keys`
//! keys is snapshotted `runs` times (time of the Snapshot call) and cloned `runs` times
//! (from the Clone call until the clone's first HTTP 200 on a key). The process backend
//! runs always; the qemu backend (TCG here) when a guest directory is given, once per
//! guest memory size, with the proportional memory (PSS) of idle clones that run side
//! by side (read from /proc: what the host gives each clone, its share of the pages it
//! maps with its siblings counted once among them).

use std::path::Path;
use std::time::Instant;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::{TestDir, probe, start};

use crate::quantile;

/// Idle clones measured side by side for their PSS.
const SIDE_BY_SIDE: usize = 3;

pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    keys: usize,
    guest_dir: Option<&Path>,
    memory_mib: &[u64],
) -> anyhow::Result<()> {
    let process = measure(bin_dir, &[], runs, keys, 128).await?;
    println!(
        "vmm-clone: demo app holding {keys} keys; {runs} runs each (process), {} (qemu, TCG)",
        runs.min(5)
    );
    println!(
        "| backend | snapshot p50 ms | snapshot max ms | clone-to-serving p50 ms | clone-to-serving max ms | idle clone PSS MiB (% of RAM) | targets |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    row("process", &process, "snapshot <= 50, clone <= 150");
    let Some(g) = guest_dir else {
        println!(
            "| qemu | - | - | - | - | - | not measured: pass --guest-dir (deploy/guest/build.sh) |"
        );
        return Ok(());
    };
    let g = g.to_str().unwrap_or_default();
    for memory in ["stream", "file"] {
        let mut p50s = Vec::new();
        for &mib in memory_mib {
            let m = measure(
                bin_dir,
                &[
                    "--backend",
                    "qemu",
                    "--guest-dir",
                    g,
                    "--ready-timeout-ms",
                    "60000",
                    "--qemu-memory",
                    memory,
                ],
                runs.min(5),
                keys,
                mib,
            )
            .await?;
            p50s.push((mib, quantile(&m.clone_ms, 0.5)));
            row(
                &format!("qemu (TCG), {mib} MiB, --qemu-memory {memory}"),
                &m,
                "snapshot <= 30, clone <= 150, PSS <= 30%",
            );
        }
        if let (Some(first), Some(last)) = (p50s.first(), p50s.last())
            && p50s.len() > 1
        {
            println!(
                "--qemu-memory {memory}: clone-to-serving p50 at {} MiB is {:.2}x that at {} MiB (target: within 20%)",
                last.0,
                last.1 / first.1,
                first.0
            );
        }
    }
    Ok(())
}

/// What one backend measured.
struct Measured {
    snap_ms: Vec<f64>,
    clone_ms: Vec<f64>,
    /// Median PSS of idle clones side by side, MiB, and the guest's memory (qemu only).
    pss: Option<(f64, u64)>,
}

fn row(name: &str, m: &Measured, targets: &str) {
    let pss = match m.pss {
        Some((p, mib)) => format!("{p:.0} ({:.0}%)", 100.0 * p / mib as f64),
        None => "-".into(),
    };
    println!(
        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {pss} | {targets} |",
        quantile(&m.snap_ms, 0.5),
        quantile(&m.snap_ms, 1.0),
        quantile(&m.clone_ms, 0.5),
        quantile(&m.clone_ms, 1.0)
    );
}

/// The PSS in MiB of the QEMU process of instance `id` under `root` (its QMP socket is
/// in the instance's directory), from /proc.
fn qemu_pss_mib(root: &Path, id: &str) -> Option<f64> {
    let needle = root.join(id).join("qmp.sock");
    let needle = needle.to_str()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        let rollup = std::fs::read_to_string(e.path().join("smaps_rollup")).ok()?;
        let kib = form_vmm_service::procfs::kib(&rollup, "Pss")?;
        return Some(kib as f64 / 1024.0);
    }
    None
}

async fn measure(
    bin_dir: &Path,
    backend: &[&str],
    runs: usize,
    keys: usize,
    memory_mib: u64,
) -> anyhow::Result<Measured> {
    let dir = TestDir::new("bench-vmm");
    let data = dir.path().join("data");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap_or("data"),
    ];
    args.extend_from_slice(backend);
    let mut svc = start(&dir, "vmm", bin_dir.join("form-vmm-service"), &args).await;
    let mut c = VmmServiceClient::new(
        probe::channel_with_timeout(
            svc.addr("grpc").unwrap_or_else(|| unreachable!()),
            std::time::Duration::from_secs(120),
        )
        .await?,
    );
    let primary = c
        .create_instance(crate::demo_instance(
            bin_dir,
            "primary",
            Some(types::Resources {
                vcpus: 1,
                memory_mib,
            }),
        ))
        .await?
        .into_inner();
    anyhow::ensure!(
        primary.status == pb::InstanceStatus::Running as i32,
        "primary failed: {}",
        primary.failure
    );
    let addr: std::net::SocketAddr = primary.address.parse()?;
    for k in 0..keys {
        probe::http_request(
            addr,
            "PUT",
            &format!("/kv/k{k}"),
            format!("value-{k}").as_bytes(),
        )
        .await?;
    }
    let mut snaps = Vec::new();
    let mut snap_ms = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let s = c
            .snapshot(pb::SnapshotRequest {
                instance_id: "primary".into(),
                resume: None,
            })
            .await?
            .into_inner();
        snap_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        snaps.push(s);
    }
    let mut clone_ms = Vec::new();
    for (n, s) in snaps.iter().enumerate() {
        let t0 = Instant::now();
        let req = pb::CloneRequest {
            snapshot_id: s.snapshot_id.clone(),
            instance_id: format!("clone-{n}"),
            resources: None,
        };
        let clone = VmmServiceClient::clone(&mut c, req).await?.into_inner();
        let a: std::net::SocketAddr = clone.address.parse()?;
        let (code, body) = probe::http_get(a, "/kv/k0").await?;
        anyhow::ensure!(
            code == 200 && body == "value-0",
            "clone {n} answered {code} {body}"
        );
        clone_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        c.delete_instance(pb::InstanceRef {
            instance_id: clone.instance_id,
        })
        .await?;
    }
    snap_ms.sort_by(f64::total_cmp);
    clone_ms.sort_by(f64::total_cmp);
    // Idle clones of one snapshot side by side (qemu): what each costs the host.
    let mut pss = None;
    if let (true, Some(s)) = (backend.contains(&"qemu"), snaps.last()) {
        let ids: Vec<String> = (0..SIDE_BY_SIDE).map(|k| format!("idle-{k}")).collect();
        for id in &ids {
            let req = pb::CloneRequest {
                snapshot_id: s.snapshot_id.clone(),
                instance_id: id.clone(),
                resources: None,
            };
            VmmServiceClient::clone(&mut c, req).await?;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let root = data.join("instances");
        let mut each: Vec<f64> = ids
            .iter()
            .filter_map(|id| qemu_pss_mib(&root, id))
            .collect();
        each.sort_by(f64::total_cmp);
        anyhow::ensure!(
            each.len() == SIDE_BY_SIDE,
            "found {} of the {SIDE_BY_SIDE} clones' QEMU processes",
            each.len()
        );
        pss = Some((quantile(&each, 0.5), memory_mib));
        for id in ids {
            c.delete_instance(pb::InstanceRef { instance_id: id })
                .await?;
        }
    }
    c.delete_instance(pb::InstanceRef {
        instance_id: "primary".into(),
    })
    .await?;
    form_testkit::conformance::stop_gracefully(&mut svc).await;
    Ok(Measured {
        snap_ms,
        clone_ms,
        pss,
    })
}
