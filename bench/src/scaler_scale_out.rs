//! Scale-to-serving: from a `Scale` request to the controller until a request through
//! the balancer is answered by the new instance, with the real services (one form-state
//! replica, form-vmm-service, form-rplb following the state, form-scaler). Beside it,
//! in the same run, the bare path without controller or balancer: Snapshot + Clone +
//! first answer of the clone, so the controller's share is the difference.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use form_proto::scaler::v1 as scaler_pb;
use form_proto::scaler::v1::scaler_service_client::ScalerServiceClient;
use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_scaler::ops::plan::new_instance_id;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{ChildService, TestDir, probe, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::quantile;

pub(crate) const CLUSTER: &str = "bench";
const DOMAIN: &str = "bench.test";

pub(crate) async fn run(
    bin_dir: &Path,
    runs: usize,
    guest_dir: Option<&Path>,
) -> anyhow::Result<()> {
    println!(
        "scaler-scale-out: scale-out by one instance, {runs} runs per backend (qemu: at most 5, TCG)"
    );
    println!(
        "| backend | request -> serving through the balancer p50 ms | p99 ms | max ms | bare snapshot+clone+first answer p50 ms | target |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    let (s, bare, process) = measure_steps(bin_dir, &[], runs).await?;
    row("process", &s, &bare, "p50 <= 30, p99 <= 60");
    let mut qemu = None;
    match guest_dir {
        Some(g) => {
            let args = qemu_args(g.to_str().unwrap_or_default());
            let (s, bare, t) = measure_steps(bin_dir, &args, runs.min(5)).await?;
            row("qemu (TCG)", &s, &bare, "p50 <= 1500");
            qemu = Some(t);
        }
        None => println!(
            "| qemu | - | - | - | - | not measured: pass --guest-dir (deploy/guest/build.sh) |"
        ),
    }
    breakdown("process", &process);
    if let Some(t) = qemu {
        breakdown("qemu (TCG)", &t);
    }
    Ok(())
}

/// The vmm node's arguments for the qemu backend with the guest in `guest_dir`.
pub(crate) fn qemu_args(guest_dir: &str) -> [&str; 6] {
    [
        "--backend",
        "qemu",
        "--guest-dir",
        guest_dir,
        "--ready-timeout-ms",
        "60000",
    ]
}

fn row(name: &str, s: &[f64], bare: &[f64], target: &str) {
    println!(
        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {target} |",
        quantile(s, 0.5),
        quantile(s, 0.99),
        quantile(s, 1.0),
        quantile(bare, 0.5)
    );
}

/// The services of one measurement: one form-state replica, form-vmm-service,
/// form-rplb and form-scaler.
pub(crate) struct Stack {
    _dir: TestDir,
    pub(crate) replicas: Replicas,
    pub(crate) services: Vec<ChildService>,
    http: SocketAddr,
    pub(crate) vmm: VmmServiceClient<tonic::transport::Channel>,
    pub(crate) scaler: ScalerServiceClient<tonic::transport::Channel>,
    /// Every step the bench cluster's operations recorded, as form-state's Watch
    /// streamed it: (operation, step, when it arrived).
    recorded: Arc<Mutex<Vec<(String, String, Instant)>>>,
    watching: tokio::task::AbortHandle,
    /// Per scale-out measured: when each of its steps was recorded and when the new
    /// instance first answered through the balancer ("serving"), ms after the request.
    pub(crate) timelines: Vec<Vec<(String, f64)>>,
}

/// Follows form-state's Watch of `cluster` (empty: every cluster) into `recorded`:
/// every time an operation's current step changes.
pub(crate) fn watch_steps(
    mut state: form_proto::state::v1::state_service_client::StateServiceClient<
        tonic::transport::Channel,
    >,
    cluster: &str,
    recorded: Arc<Mutex<Vec<(String, String, Instant)>>>,
) -> tokio::task::AbortHandle {
    let cluster = cluster.to_owned();
    tokio::spawn(async move {
        let Ok(resp) = state
            .watch(state_pb::WatchRequest {
                from_sequence: 0,
                cluster_id: cluster,
            })
            .await
        else {
            return;
        };
        let mut stream = resp.into_inner();
        let mut last: std::collections::HashMap<String, String> = Default::default();
        while let Ok(Some(e)) = stream.message().await {
            let Some(state_pb::watch_event::Change::Operation(op)) = e.change else {
                continue;
            };
            let step = if form_proto::operation_is_terminal(&op) {
                "ended".to_owned()
            } else {
                form_scaler::ops::record::current_step(&op)
                    .unwrap_or("requested")
                    .to_owned()
            };
            if last.get(&op.operation_id) != Some(&step) {
                last.insert(op.operation_id.clone(), step.clone());
                recorded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((op.operation_id, step, Instant::now()));
            }
        }
    })
    .abort_handle()
}

impl Stack {
    /// Stops every service gracefully (a vmm node then deletes its instances) and the
    /// replicas.
    pub(crate) async fn stop(mut self) {
        self.watching.abort();
        for mut svc in self.services.drain(..) {
            form_testkit::conformance::stop_gracefully(&mut svc).await;
        }
        self.replicas.stop().await;
    }
}

pub(crate) async fn stack(bin_dir: &Path, backend: &[&str]) -> anyhow::Result<Stack> {
    stack_on(bin_dir, backend, 1).await
}

/// The services with `nodes` vmm nodes (`node-1`, `node-2`, ...); `Stack::vmm` is
/// node-1's, and the controller finds the others in their node records.
pub(crate) async fn stack_on(
    bin_dir: &Path,
    backend: &[&str],
    nodes: usize,
) -> anyhow::Result<Stack> {
    let replicas = Replicas::start(
        &bin_dir.join("form-state"),
        "bench-scale-state",
        ReplicaOptions::new(1),
    )
    .await;
    let state_addr = replicas.addrs[0].to_string();
    let dir = TestDir::new("bench-scale");
    let port0 = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let mut vmm_svcs = Vec::new();
    for i in 1..=nodes {
        let (id, data) = (format!("node-{i}"), dir.path().join(format!("vmm-{i}")));
        let mut vmm_args: Vec<&str> = port0.to_vec();
        vmm_args.extend([
            "--node-id",
            &id,
            "--state",
            &state_addr,
            "--data-dir",
            data.to_str().unwrap_or("vmm"),
        ]);
        vmm_args.extend(backend);
        vmm_svcs.push(start(&dir, &id, bin_dir.join("form-vmm-service"), &vmm_args).await);
    }
    let vmm_svc = &vmm_svcs[0];
    let vmm_addr = vmm_svc
        .addr("grpc")
        .unwrap_or_else(|| unreachable!())
        .to_string();
    let mut rplb_args: Vec<&str> = port0.to_vec();
    rplb_args.extend(["--listen-http", "127.0.0.1:0", "--state", &state_addr]);
    let rplb_svc = start(&dir, "rplb", bin_dir.join("form-rplb"), &rplb_args).await;
    let rplb_addr = rplb_svc
        .addr("grpc")
        .unwrap_or_else(|| unreachable!())
        .to_string();
    let http = rplb_svc.addr("http").unwrap_or_else(|| unreachable!());
    let mut scaler_args: Vec<&str> = port0.to_vec();
    scaler_args.extend([
        "--state",
        &state_addr,
        "--vmm",
        &vmm_addr,
        "--rplb",
        &rplb_addr,
        "--autoscale",
        "false",
        "--ready-timeout-ms",
        "120000",
    ]);
    let scaler_svc = start(&dir, "scaler", bin_dir.join("form-scaler"), &scaler_args).await;
    let scaler = ScalerServiceClient::new(
        probe::channel(scaler_svc.addr("grpc").unwrap_or_else(|| unreachable!())).await?,
    );
    let vmm = VmmServiceClient::new(
        probe::channel_with_timeout(
            vmm_svc.addr("grpc").unwrap_or_else(|| unreachable!()),
            Duration::from_secs(120),
        )
        .await?,
    );
    let mut services = vec![scaler_svc, rplb_svc];
    services.extend(vmm_svcs);
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let watching = watch_steps(replicas.client(0).await, CLUSTER, recorded.clone());
    Ok(Stack {
        _dir: dir,
        replicas,
        services,
        recorded,
        watching,
        timelines: Vec::new(),
        http,
        vmm,
        scaler,
    })
}

pub(crate) async fn demo(s: &mut Stack, bin_dir: &Path) -> anyhow::Result<()> {
    let mut state = s.replicas.client(0).await;
    let resources = types::Resources {
        vcpus: 1,
        memory_mib: 128,
    };
    let workload = crate::demo_workload(bin_dir);
    state
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            domain: Some(DOMAIN.into()),
            workload: Some(workload.clone()),
            resources: Some(resources),
            scaling_policy: Some(types::ScalingPolicy {
                min_instances: 1,
                max_instances: 10,
                target_cpu_utilization: 0.5,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let t = s
        .vmm
        .create_instance(vmm_pb::CreateInstanceRequest {
            instance_id: "bench-0".into(),
            cluster_id: CLUSTER.into(),
            workload: Some(workload),
            resources: Some(resources),
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        t.status == vmm_pb::InstanceStatus::Running as i32,
        "template failed: {}",
        t.failure
    );
    let addr: SocketAddr = t.address.parse()?;
    for k in 0..100 {
        probe::http_request(addr, "PUT", &format!("/kv/k{k}"), b"v").await?;
    }
    state
        .add_member(state_pb::AddMemberRequest {
            cluster_id: CLUSTER.into(),
            member: Some(state_pb::Member {
                instance_id: "bench-0".into(),
                node_id: t.node_id,
                addresses: vec![t.address],
                status: state_pb::MemberStatus::Active as i32,
                ..Default::default()
            }),
        })
        .await?;
    state
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            template_instance_id: Some("bench-0".into()),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Sets the bench cluster's state sync `mode`.
pub(crate) async fn set_state_sync(
    s: &mut Stack,
    mode: types::state_sync::Mode,
) -> anyhow::Result<()> {
    s.replicas
        .client(0)
        .await
        .put_cluster(state_pb::PutClusterRequest {
            cluster_id: CLUSTER.into(),
            state_sync: Some(types::StateSync {
                mode: Some(mode),
                refuse_unsynced_scale_in: false,
            }),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// `GET /whoami` through the balancer; the body.
async fn whoami(http: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
    let req = format!("GET /whoami HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.starts_with("HTTP/1.1 200").then_some(text)
}

pub(crate) async fn scale(
    s: &mut Stack,
    kind: types::OperationKind,
    to: u32,
    id: &str,
) -> anyhow::Result<()> {
    s.scaler
        .scale(scaler_pb::ScaleRequest {
            cluster_id: CLUSTER.into(),
            operation_id: id.into(),
            kind: kind as i32,
            target_count: to,
            immediate: true,
            drain_connections: false,
            ..Default::default()
        })
        .await?;
    Ok(())
}

pub(crate) async fn wait_done(s: &mut Stack, id: &str) -> anyhow::Result<()> {
    wait_operation(&mut s.scaler, id, Duration::from_millis(5)).await
}

/// Waits until operation `id` completed (polling every `poll`); an error if it failed,
/// rolled back or did not end within 300 s.
pub(crate) async fn wait_operation(
    scaler: &mut ScalerServiceClient<tonic::transport::Channel>,
    id: &str,
    poll: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let op = scaler
            .get_operation(scaler_pb::GetOperationRequest {
                operation_id: id.into(),
            })
            .await?
            .into_inner();
        use types::operation_status::State as S;
        match op.status.and_then(|s| s.state) {
            Some(S::Completed(_)) => return Ok(()),
            Some(S::Failed(f)) => anyhow::bail!("operation {id} failed: {}", f.error),
            Some(S::RolledBack(r)) => anyhow::bail!("operation {id} rolled back: {}", r.reason),
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "operation {id} did not end");
        tokio::time::sleep(poll).await;
    }
}

/// Scales the bench cluster out to 2 and back to 1 (operations `out-TAG`, `in-TAG`);
/// milliseconds from the scale-out request until the balancer answers from the new
/// instance.
pub(crate) async fn out_and_back(s: &mut Stack, tag: &str) -> anyhow::Result<f64> {
    let ms = out_to_serving(s, tag).await?;
    back(s, tag).await?;
    Ok(ms)
}

/// Scales the bench cluster out to 2 (operation `out-TAG`) and waits for it to end;
/// milliseconds from the request until the balancer answers from the new instance.
pub(crate) async fn out_to_serving(s: &mut Stack, tag: &str) -> anyhow::Result<f64> {
    let id = format!("out-{tag}");
    let new = new_instance_id(CLUSTER, &id, 0);
    let t0 = Instant::now();
    scale(s, types::OperationKind::ScaleOut, 2, &id).await?;
    loop {
        if whoami(s.http).await.is_some_and(|b| b.contains(&new)) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(180),
            "{new} never served"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    wait_done(s, &id).await?;
    // The end is streamed a moment after wait_done reads it, at most.
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut timeline = loop {
        let t: Vec<(String, f64)> = s
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(op, _, _)| *op == id)
            .map(|(_, step, at)| {
                let after = at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                (step.clone(), after)
            })
            .collect();
        if t.iter().any(|(step, _)| step == "ended") || Instant::now() >= deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    timeline.push(("serving".to_owned(), ms));
    s.timelines.push(timeline);
    Ok(ms)
}

/// Scales the bench cluster back to 1 (operation `in-TAG`) and waits for it to end.
pub(crate) async fn back(s: &mut Stack, tag: &str) -> anyhow::Result<()> {
    let id = format!("in-{tag}");
    scale(s, types::OperationKind::ScaleIn, 1, &id).await?;
    wait_done(s, &id).await
}

pub(crate) async fn measure(
    bin_dir: &Path,
    backend: &[&str],
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    measure_steps(bin_dir, backend, runs)
        .await
        .map(|(serving, bare, _)| (serving, bare))
}

/// As [`measure`], with each scale-out's timeline ([`Stack::timelines`]).
async fn measure_steps(
    bin_dir: &Path,
    backend: &[&str],
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<Vec<(String, f64)>>)> {
    let mut s = stack(bin_dir, backend).await?;
    // Stopped however the rounds end: a vmm node killed would leave its instances.
    let r = rounds(&mut s, bin_dir, runs).await;
    let timelines = std::mem::take(&mut s.timelines);
    s.stop().await;
    let (mut serving, mut bare) = r?;
    serving.sort_by(f64::total_cmp);
    bare.sort_by(f64::total_cmp);
    Ok((serving, bare, timelines))
}

/// Where a scale-out's time goes: for each step (in the order recorded) and for the
/// first answer through the balancer, when it came after the request, p50 and max.
fn breakdown(name: &str, timelines: &[Vec<(String, f64)>]) {
    let mut order: Vec<String> = Vec::new();
    for t in timelines {
        for (step, _) in t {
            if !order.contains(step) {
                order.push(step.clone());
            }
        }
    }
    println!();
    println!(
        "{name}: when each step was recorded (form-state's Watch) and when the new instance first answered through the balancer, ms after the request, over {} scale-outs:",
        timelines.len()
    );
    println!("| step | p50 ms | max ms |");
    println!("|---|---:|---:|");
    let mut rows: Vec<(f64, String, f64)> = order
        .iter()
        .map(|step| {
            let mut at: Vec<f64> = timelines
                .iter()
                .filter_map(|t| t.iter().find(|(s, _)| s == step).map(|(_, ms)| *ms))
                .collect();
            at.sort_by(f64::total_cmp);
            (quantile(&at, 0.5), step.clone(), quantile(&at, 1.0))
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (p50, step, max) in rows {
        println!("| {step} | {p50:.1} | {max:.1} |");
    }
}

async fn rounds(
    s: &mut Stack,
    bin_dir: &Path,
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let s = &mut *s;
    demo(s, bin_dir).await?;
    let mut serving = Vec::new();
    let mut bare = Vec::new();
    for n in 0..runs {
        serving.push(out_and_back(s, &format!("{n}")).await?);

        let t0 = Instant::now();
        let snap = s
            .vmm
            .snapshot(vmm_pb::SnapshotRequest {
                instance_id: "bench-0".into(),
                resume: Some(true),
            })
            .await?
            .into_inner();
        let clone = VmmServiceClient::clone(
            &mut s.vmm,
            vmm_pb::CloneRequest {
                snapshot_id: snap.snapshot_id.clone(),
                instance_id: format!("bare-{n}"),
                resources: None,
            },
        )
        .await?
        .into_inner();
        let (code, _) = probe::http_get(clone.address.parse()?, "/kv/k0").await?;
        anyhow::ensure!(code == 200, "bare clone answered {code}");
        bare.push(t0.elapsed().as_secs_f64() * 1000.0);
        s.vmm
            .delete_instance(vmm_pb::InstanceRef {
                instance_id: clone.instance_id,
            })
            .await?;
        s.vmm
            .delete_snapshot(vmm_pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
            })
            .await?;
    }
    Ok((serving, bare))
}
