//! `form-bench scaler-fleet`: the operations of a simulated fleet against a single
//! node. The vmm nodes run in this process (`VmmApi` over the in-memory backend of
//! `form_sim::platform::memory`, each on its own gRPC port with the vmm certificate,
//! each writing its node record to form-state every second); form-state and
//! form-scaler are the real binaries. The fleet: `nodes` nodes, `clusters` clusters of `members` instances,
//! made through the controller; then one scale-out by one per cluster, each timed
//! from the request until the operation completed. The single-node case runs the same
//! on one node with 10 clusters. Since the backend does nothing, the times are what
//! the platform adds to a backend: placement, form-state, fencing, the calls.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use form_proto::scaler::v1 as scaler_pb;
use form_proto::scaler::v1::scaler_service_client::ScalerServiceClient;
use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_proto::types::v1 as types;
use form_proto::vmm::v1::vmm_service_server::VmmServiceServer;
use form_runtime::grpc::GrpcServer;
use form_runtime::shutdown::{self, ShutdownKind};
use form_runtime::tls::Kind;
use form_testkit::dir::TestDir;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{ChildService, pki, probe, start};
use form_vmm_service::hypervisor::Hypervisor;
use form_vmm_service::node::Record;
use form_vmm_service::service::VmmApi;
use form_vmm_service::snapshots::SnapshotStore;
use tokio::task::JoinSet;

use crate::quantile;
use form_sim::platform::memory::{self, Memory};

mod steps;

/// One case's figures.
struct Figures {
    nodes: usize,
    clusters: usize,
    instances: usize,
    setup_s: f64,
    /// Scale-out request -> completed, ms, sorted.
    ops: Vec<f64>,
    /// Of which: request -> accepted (checked, placed, recorded), ms, sorted.
    accepted: Vec<f64>,
    /// Each scale-out's steps.
    timelines: Vec<steps::Timeline>,
    /// What ran meanwhile.
    during: During,
}

/// What ran during a case's timed scale-outs (or, read from the services' metrics,
/// since they started).
#[derive(Debug, Default)]
struct During {
    /// The controller's evaluation rounds, and their seconds.
    rounds: f64,
    rounds_s: f64,
    /// form-state's log syncs, and their seconds.
    syncs: f64,
    syncs_s: f64,
    /// Snapshots form-state wrote (beside its log: no write waits for one), and their
    /// seconds (encode, write, sync, compaction).
    snapshots: f64,
    snapshots_s: f64,
}

impl During {
    /// The totals so far, from the controller's and form-state's `/metrics`.
    async fn read(
        scaler: std::net::SocketAddr,
        state: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let scaler = metrics_page(scaler).await?;
        let state = metrics_page(state).await?;
        let sum = form_testkit::replicas::sum_in;
        Ok(Self {
            rounds: sum(&scaler, "form_scaler_evaluation_round_seconds_count"),
            rounds_s: sum(&scaler, "form_scaler_evaluation_round_seconds_sum"),
            syncs: sum(&state, "form_state_wal_fsync_seconds_count"),
            syncs_s: sum(&state, "form_state_wal_fsync_seconds_sum"),
            snapshots: sum(&state, "form_state_snapshots_total"),
            snapshots_s: sum(&state, "form_state_snapshot_seconds_sum"),
        })
    }

    /// What came between `before` and these totals.
    fn since(self, before: &Self) -> Self {
        let d = |a: f64, b: f64| (a - b).max(0.0);
        Self {
            rounds: d(self.rounds, before.rounds),
            rounds_s: d(self.rounds_s, before.rounds_s),
            syncs: d(self.syncs, before.syncs),
            syncs_s: d(self.syncs_s, before.syncs_s),
            snapshots: d(self.snapshots, before.snapshots),
            snapshots_s: d(self.snapshots_s, before.snapshots_s),
        }
    }
}

/// Mean ms of `n` events that took `s` seconds in all.
fn mean_ms(n: f64, s: f64) -> f64 {
    s * 1e3 / n.max(1.0)
}

pub(crate) async fn run(
    bin_dir: &Path,
    nodes: usize,
    clusters: usize,
    members: u32,
) -> anyhow::Result<()> {
    // The in-process nodes serve, and write their records, as vmm nodes.
    let tls = form_runtime::tls::Tls::load(&pki::tls_dir(Kind::Vmm, "sim-fleet"))
        .map_err(anyhow::Error::msg)?;
    form_runtime::tls::install(form_runtime::tls::Mode::Mutual(tls));
    println!(
        "scaler-fleet: in-process vmm nodes (in-memory backend), real form-state and form-scaler; one scale-out by one per cluster, request -> completed"
    );
    // Ten scale-outs per cluster: 100 timed, so its p99 is not simply the largest of
    // a few (as it was with 30) but comparable with the fleet's, of 1,000.
    let single = case(bin_dir, 1, 10, members, 10).await?;
    // The fleet's nodes with few clusters: what crossing nodes adds (a clone's
    // snapshot is pulled from its source's node), apart from the fleet's size.
    let spread = case(bin_dir, nodes, 30, members, 1).await?;
    let fleet = case(bin_dir, nodes, clusters, members, 1).await?;
    let cases = [
        ("single node", &single),
        ("many nodes, few clusters", &spread),
        ("fleet", &fleet),
    ];
    for (name, f) in cases {
        steps::print(name, &f.timelines);
    }
    println!();
    println!(
        "| case | nodes | clusters | instances | setup s | scale-outs | p50 ms | p99 ms | accepted p50 ms | accepted p99 ms | evaluation rounds meanwhile | round mean ms | form-state syncs | sync mean ms | snapshots | snapshot mean ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, f) in cases {
        println!(
            "| {name} | {} | {} | {} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {} | {:.2} | {} | {:.1} |",
            f.nodes,
            f.clusters,
            f.instances,
            f.setup_s,
            f.ops.len(),
            quantile(&f.ops, 0.5),
            quantile(&f.ops, 0.99),
            quantile(&f.accepted, 0.5),
            quantile(&f.accepted, 0.99),
            f.during.rounds,
            mean_ms(f.during.rounds, f.during.rounds_s),
            f.during.syncs,
            mean_ms(f.during.syncs, f.during.syncs_s),
            f.during.snapshots,
            mean_ms(f.during.snapshots, f.during.snapshots_s)
        );
    }
    let (r50, r99) = (
        quantile(&fleet.ops, 0.5) / quantile(&single.ops, 0.5),
        quantile(&fleet.ops, 0.99) / quantile(&single.ops, 0.99),
    );
    println!(
        "fleet / single node: p50 {r50:.2}x, p99 {r99:.2}x (target <= 2x): {}",
        if r50 <= 2.0 && r99 <= 2.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

/// A platform of `nodes` in-process nodes, `clusters` clusters of `members`; each
/// cluster scaled out by one `rounds` times, timed.
async fn case(
    bin_dir: &Path,
    nodes: usize,
    clusters: usize,
    members: u32,
    rounds: u32,
) -> anyhow::Result<Figures> {
    let mut replicas = Replicas::start(
        &bin_dir.join("form-state"),
        "bench-fleet-state",
        ReplicaOptions::new(1),
    )
    .await;
    let dir = TestDir::new("bench-fleet");
    let (stop, stopped) = shutdown::channel();
    let fleet = Fleet::start(&dir, nodes, replicas.addrs[0], stopped).await?;
    let recorded = steps::Recorded::default();
    let watching =
        crate::scaler_scale_out::watch_steps(replicas.client(0).await, "", recorded.clone());
    let scaler = start_scaler(&dir, bin_dir, &replicas, &fleet.addrs[0]).await;
    let r = async {
        let mut client = ScalerServiceClient::new(
            probe::channel(scaler.addr("grpc").unwrap_or_else(|| unreachable!())).await?,
        );
        let t = Instant::now();
        setup(&client, clusters, members, rounds).await?;
        let setup_s = t.elapsed().as_secs_f64();
        let metrics = scaler.addr("metrics").unwrap_or_else(|| unreachable!());
        let state_metrics = replicas.metrics_addr(0);
        let before = During::read(metrics, state_metrics).await?;
        let (mut ops, mut accepted, mut timed) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            for c in 0..clusters {
                let t0 = Instant::now();
                let tag = format!("out-{round}");
                let (id, a, d) = scale_out(&mut client, c, members + round, &tag).await?;
                accepted.push(a);
                ops.push(d);
                timed.push((id, t0, d));
            }
        }
        let during = During::read(metrics, state_metrics).await?.since(&before);
        // The end of the last is streamed a moment after the poll read it; the
        // operations ran one after another and Watch keeps their order, so the others
        // came before it.
        let deadline = Instant::now() + Duration::from_secs(2);
        let last_ended = |r: &steps::Recorded| {
            let r = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            timed.last().is_none_or(|(id, _, _)| {
                r.iter()
                    .rev()
                    .any(|(op, step, _)| op == id && step == "ended")
            })
        };
        while !last_ended(&recorded) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ops.sort_by(f64::total_cmp);
        accepted.sort_by(f64::total_cmp);
        Ok::<_, anyhow::Error>(Figures {
            nodes,
            clusters,
            instances: fleet.instances().await,
            setup_s,
            ops,
            accepted,
            timelines: steps::timelines(&recorded, &timed),
            during,
        })
    }
    .await;
    watching.abort();
    let mut scaler = scaler;
    form_testkit::conformance::stop_gracefully(&mut scaler).await;
    stop.trigger(ShutdownKind::Fast);
    fleet.join().await;
    replicas.stop().await;
    r
}

/// A service's `/metrics` page.
async fn metrics_page(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let (status, body) = probe::http_get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics on {addr} answered {status}");
    Ok(body)
}

async fn start_scaler(
    dir: &TestDir,
    bin_dir: &Path,
    replicas: &Replicas,
    first_node: &str,
) -> ChildService {
    let state = replicas.addrs[0].to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--state",
        &state,
        "--vmm",
        first_node,
        "--autoscale",
        "false",
        // The simulated instances send no heartbeats: no member is judged on them.
        "--heartbeat-interval-ms",
        "3600000",
        "--replace-after-ms",
        "3600000",
        "--ready-timeout-ms",
        "120000",
    ];
    start(dir, "scaler", bin_dir.join("form-scaler"), &args).await
}

/// Every cluster made through the controller (its template), then scaled out to
/// `members`; at most 8 at a time.
async fn setup(
    client: &ScalerServiceClient<tonic::transport::Channel>,
    clusters: usize,
    members: u32,
    rounds: u32,
) -> anyhow::Result<()> {
    let mut running = JoinSet::new();
    for c in 0..clusters {
        if running.len() >= 8
            && let Some(r) = running.join_next().await
        {
            r??;
        }
        let mut client = client.clone();
        running.spawn(async move {
            let id = format!("c{c}");
            let reply = client
                .create_cluster(scaler_pb::CreateClusterRequest {
                    operation_id: format!("create-{id}"),
                    cluster: Some(cluster(&id, members + rounds)),
                })
                .await?
                .into_inner();
            wait_done(&mut client, &operation_id(reply)?).await?;
            let reply = client
                .scale(scale_request(&id, members, "setup"))
                .await?
                .into_inner();
            wait_done(&mut client, &operation_id(reply)?).await
        });
    }
    while let Some(r) = running.join_next().await {
        r??;
    }
    Ok(())
}

fn operation_id(r: scaler_pb::ScaleReply) -> anyhow::Result<String> {
    r.operation
        .map(|o| o.operation_id)
        .ok_or_else(|| anyhow::anyhow!("the controller accepted no operation"))
}

fn cluster(id: &str, max: u32) -> state_pb::PutClusterRequest {
    state_pb::PutClusterRequest {
        cluster_id: id.into(),
        domain: Some(format!("{id}.fleet.test")),
        workload: Some(types::Workload {
            command: "/bin/true".into(),
            // No health path: nothing listens at a simulated instance's address.
            ..Default::default()
        }),
        resources: Some(types::Resources {
            vcpus: 1,
            memory_mib: 512,
        }),
        scaling_policy: Some(types::ScalingPolicy {
            min_instances: 1,
            max_instances: max,
            target_cpu_utilization: 0.5,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn scale_request(cluster: &str, to: u32, tag: &str) -> scaler_pb::ScaleRequest {
    scaler_pb::ScaleRequest {
        cluster_id: cluster.into(),
        operation_id: format!("{tag}-{cluster}"),
        kind: types::OperationKind::ScaleOut as i32,
        target_count: to,
        immediate: true,
        drain_connections: false,
        ..Default::default()
    }
}

/// Scales cluster `c` out to `to`; the operation's id, and ms from the request until
/// it was accepted and until the operation completed.
async fn scale_out(
    client: &mut ScalerServiceClient<tonic::transport::Channel>,
    c: usize,
    to: u32,
    tag: &str,
) -> anyhow::Result<(String, f64, f64)> {
    let t = Instant::now();
    let reply = client
        .scale(scale_request(&format!("c{c}"), to, tag))
        .await?
        .into_inner();
    let accepted = t.elapsed().as_secs_f64() * 1e3;
    let id = operation_id(reply)?;
    wait_done(client, &id).await?;
    Ok((id, accepted, t.elapsed().as_secs_f64() * 1e3))
}

async fn wait_done(
    client: &mut ScalerServiceClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<()> {
    crate::scaler_scale_out::wait_operation(client, id, Duration::from_millis(2)).await
}

/// The in-process nodes.
struct Fleet {
    addrs: Vec<String>,
    backends: Vec<Arc<Memory>>,
    tasks: JoinSet<()>,
}

impl Fleet {
    async fn start(
        dir: &TestDir,
        nodes: usize,
        state: std::net::SocketAddr,
        stopped: form_runtime::shutdown::Shutdown,
    ) -> anyhow::Result<Self> {
        let mut fleet = Fleet {
            addrs: Vec::new(),
            backends: Vec::new(),
            tasks: JoinSet::new(),
        };
        let mut records = Vec::new();
        for i in 1..=nodes {
            let id = format!("node-{i:03}");
            let hv = Arc::new(Memory::default());
            let snapshots = SnapshotStore::open(dir.path().join(&id))?;
            let api = VmmApi::new(
                hv.clone(),
                snapshots,
                id.clone(),
                form_vmm_service::allow::Allowed::Any,
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?.to_string();
            let server = GrpcServer::new().add_service(VmmServiceServer::new(api));
            let stop = stopped.clone();
            fleet.tasks.spawn(async move {
                if let Err(e) = server.serve(listener, stop, || {}).await {
                    eprintln!("simulated node: {e}");
                }
            });
            let record = memory::record(id, addr.clone());
            records.push((record, hv.clone()));
            fleet.addrs.push(addr);
            fleet.backends.push(hv);
        }
        let channel = form_runtime::tls::client::channel(
            Kind::State,
            &[state.to_string().parse().map_err(anyhow::Error::msg)?],
            |e| e,
        )
        .map_err(anyhow::Error::msg)?;
        let client = StateServiceClient::new(channel);
        // Every node's record at once, then every second on the node's own phase:
        // nodes start at different moments, so their heartbeats spread over the
        // second rather than arriving together (what the nodes' heartbeat loop does,
        // without the member heartbeats).
        beat(&client, &records).await?;
        let n = records.len() as u32;
        for (i, (record, hv)) in records.into_iter().enumerate() {
            let (mut stop, mut client) = (stopped.clone(), client.clone());
            // The first beats went out above: each node's next comes within a second.
            let phase = Duration::from_secs(1) * (i as u32 + 1) / n;
            fleet.tasks.spawn(async move {
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + phase,
                    Duration::from_secs(1),
                );
                // A late beat is not made up for, as a node's loop does not.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.requested() => return,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = client.node_heartbeat(heartbeat(&record, &hv).await).await {
                        eprintln!("simulated node heartbeat: {e}");
                    }
                }
            });
        }
        Ok(fleet)
    }

    async fn instances(&self) -> usize {
        let mut n = 0;
        for b in &self.backends {
            n += b.list().await.len();
        }
        n
    }

    async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn beat(
    client: &StateServiceClient<tonic::transport::Channel>,
    nodes: &[(Record, Arc<Memory>)],
) -> anyhow::Result<()> {
    let mut calls = JoinSet::new();
    for (record, hv) in nodes {
        let req = heartbeat(record, hv).await;
        let mut client = client.clone();
        calls.spawn(async move { client.node_heartbeat(req).await });
    }
    while let Some(r) = calls.join_next().await {
        r??;
    }
    Ok(())
}

/// Node `record`'s heartbeat now, with the instances of its backend `hv`.
async fn heartbeat(record: &Record, hv: &Memory) -> state_pb::NodeHeartbeatRequest {
    record.heartbeat(&hv.list().await, form_scaler::ops::record::now_ms())
}
