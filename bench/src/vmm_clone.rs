//! Snapshot time and clone-to-serving time of the backends: the demo app with `keys`
//! keys is snapshotted `runs` times (time of the Snapshot call) and cloned `runs` times
//! (from the Clone call until the clone's first HTTP 200 on a key). The process backend
//! runs always; the qemu backend (TCG here) when a guest directory is given.

use std::path::Path;
use std::time::Instant;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::{TestDir, probe, start};

use crate::quantile;

pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    keys: usize,
    guest_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let (ps, pc) = measure(bin_dir, &[], runs, keys).await?;
    println!(
        "vmm-clone: demo app holding {keys} keys; {runs} runs each (process), 5 (qemu, TCG, 128 MiB)"
    );
    println!(
        "| backend | snapshot p50 ms | snapshot max ms | clone-to-serving p50 ms | clone-to-serving max ms | targets |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    row("process", &ps, &pc, "snapshot <= 50, clone <= 150");
    match guest_dir {
        Some(g) => {
            let g = g.to_str().unwrap_or_default();
            let (qs, qc) = measure(
                bin_dir,
                &[
                    "--backend",
                    "qemu",
                    "--guest-dir",
                    g,
                    "--ready-timeout-ms",
                    "60000",
                ],
                runs.min(5),
                keys,
            )
            .await?;
            row("qemu (TCG)", &qs, &qc, "snapshot <= 150, clone <= 1000");
        }
        None => println!(
            "| qemu | - | - | - | - | not measured: pass --guest-dir (deploy/guest/build.sh) |"
        ),
    }
    Ok(())
}

fn row(name: &str, snap: &[f64], clone: &[f64], targets: &str) {
    println!(
        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {targets} |",
        quantile(snap, 0.5),
        quantile(snap, 1.0),
        quantile(clone, 0.5),
        quantile(clone, 1.0)
    );
}

async fn measure(
    bin_dir: &Path,
    backend: &[&str],
    runs: usize,
    keys: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
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
                memory_mib: 128,
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
    c.delete_instance(pb::InstanceRef {
        instance_id: "primary".into(),
    })
    .await?;
    form_testkit::conformance::stop_gracefully(&mut svc).await;
    Ok((snap_ms, clone_ms))
}
