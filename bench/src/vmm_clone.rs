//! Snapshot time and clone-to-serving time of the process backend: the demo app with
//! `keys` keys is snapshotted `runs` times (time of the Snapshot call) and cloned
//! `runs` times (from the Clone call until the clone's first HTTP 200 on a key).

use std::path::Path;
use std::time::Instant;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::{TestDir, probe, start};

use crate::quantile;

pub(crate) async fn run(bin_dir: &Path, runs: usize, keys: usize) -> anyhow::Result<()> {
    let dir = TestDir::new("bench-vmm");
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
    let mut c = VmmServiceClient::new(
        probe::channel(svc.addr("grpc").unwrap_or_else(|| unreachable!())).await?,
    );
    let primary = c
        .create_instance(pb::CreateInstanceRequest {
            instance_id: "primary".into(),
            cluster_id: "bench".into(),
            workload: Some(types::Workload {
                command: bin_dir.join("form-demo-app").display().to_string(),
                health_path: "/healthz".into(),
                ..Default::default()
            }),
            resources: None,
        })
        .await?
        .into_inner();
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
    println!("vmm-clone: process backend, demo app holding {keys} keys, {runs} runs each");
    println!(
        "| backend | snapshot p50 ms | snapshot max ms | clone-to-serving p50 ms | clone-to-serving max ms | targets |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    println!(
        "| process | {:.1} | {:.1} | {:.1} | {:.1} | snapshot <= 50, clone <= 150 |",
        quantile(&snap_ms, 0.5),
        quantile(&snap_ms, 1.0),
        quantile(&clone_ms, 0.5),
        quantile(&clone_ms, 1.0)
    );
    println!("| qemu | - | - | - | - | not built yet: see the note on issue 4 |");
    form_testkit::conformance::stop_gracefully(&mut svc).await;
    Ok(())
}
