//! A seeded run of operations on the in-process platform, under faults, with its
//! checks (used by `form-sim/tests/platform.rs` and `form-bench sim-platform`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use form_scaler::ops::plan::Request;

use super::draw::{Cluster, Drawn};
use super::{InProcess, Setup};
use crate::rng::Rng;

/// What a run saw: operations by outcome, and faults by kind.
pub type Outcomes = BTreeMap<&'static str, usize>;

/// An operation ends within this.
pub const ENDS: Duration = Duration::from_secs(60);
/// Once an operation has ended, the nodes agree with form-state within this (its
/// steps and undos have run before its end was recorded).
pub const SETTLES: Duration = Duration::from_secs(10);
/// With node crashes, the controller has replaced what a crash lost within this: six
/// heartbeats missed, [`super::REPLACE_AFTER`], and the replacements, one at a time.
/// It also covers a standby snapshot the node made while the answer to the call was
/// lost: the controller never learnt its id, and the sweep of a later standby round
/// takes it once it is a minute (the clock slack) older than the kept one, which is
/// taken every 10 s here (docs/standby.md).
pub const HEALS: Duration = Duration::from_secs(90);

/// Cluster `id`'s spec: instances of 1 vCPU and 256 MiB, up to 10.
pub fn spec(id: &str) -> state_pb::PutClusterRequest {
    state_pb::PutClusterRequest {
        cluster_id: id.into(),
        domain: Some(format!("{id}.sim.test")),
        workload: Some(types::Workload {
            command: "/bin/true".into(),
            ..Default::default()
        }),
        resources: Some(types::Resources {
            vcpus: 1,
            memory_mib: 256,
        }),
        scaling_policy: Some(types::ScalingPolicy {
            min_instances: 1,
            max_instances: 10,
            target_cpu_utilization: 0.5,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A scale of `kind` to `to` instances, named `id`, outside any cooldown.
pub fn scale(kind: types::OperationKind, to: u32, id: &str) -> Request {
    Request {
        operation_id: id.into(),
        kind: kind as i32,
        target_count: to,
        immediate: true,
        ..Default::default()
    }
}

/// Members of `cluster` by node, as form-state records them.
pub async fn members(p: &InProcess, cluster: &str) -> BTreeSet<(String, String)> {
    let c = p
        .state()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: cluster.into(),
        })
        .await
        .expect("cluster")
        .into_inner();
    c.members
        .into_iter()
        .map(|(id, m)| (m.node_id, id))
        .collect()
}

/// Waits until every balancer's route of `cluster` has exactly its active and draining
/// members as backends: none removed from form-state is still routed to, and none
/// serving is missing.
pub async fn balancers_match_state(p: &InProcess, cluster: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SETTLES;
    loop {
        let c = p
            .state()
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: cluster.into(),
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let routed: BTreeSet<String> = c
            .members
            .iter()
            .filter(|(_, m)| {
                m.status == state_pb::MemberStatus::Active as i32
                    || m.status == state_pb::MemberStatus::Draining as i32
            })
            .map(|(id, _)| id.clone())
            .collect();
        let wrong: Vec<(String, BTreeSet<String>)> = p
            .balancers
            .iter()
            .map(|b| (b.name.clone(), b.backends(&c.domain)))
            .filter(|(_, backends)| *backends != routed)
            .collect();
        if wrong.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "balancers route {wrong:?} but form-state's serving members are {routed:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Instances by node, as the nodes run them.
pub async fn running(p: &InProcess) -> BTreeSet<(String, String)> {
    p.instances()
        .await
        .into_iter()
        .flat_map(|(node, ids)| ids.into_iter().map(move |i| (node.clone(), i)))
        .collect()
}

/// How the nodes differ from form-state's record of `cluster`: instances run that are
/// not members or members not run (leaked or lost), or snapshots left (an operation
/// deletes those it took or pulled). `None`: they agree.
async fn nodes_differ(p: &InProcess, cluster: &str) -> Result<Option<String>, String> {
    let (m, r) = (members(p, cluster).await, running(p).await);
    // The standby snapshot its policy keeps (docs/standby.md) stays, where recorded.
    let standby: BTreeSet<(String, String)> = p
        .state()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: cluster.into(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .standby
        .map(|s| {
            s.node_ids
                .into_iter()
                .map(|n| (n, s.snapshot_id.clone()))
                .collect()
        })
        .unwrap_or_default();
    let left: Vec<(String, String)> = p
        .snapshots()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|s| !standby.contains(s))
        .collect();
    Ok(if m != r {
        Some(format!("the nodes run {r:?} but form-state records {m:?}"))
    } else if !left.is_empty() {
        Some(format!("snapshots left on the nodes: {left:?}"))
    } else {
        None
    })
}

/// Waits until the nodes run exactly the members form-state records (nothing leaked,
/// nothing lost) and hold no snapshot (an operation deletes those it took or pulled).
pub async fn nodes_match_state(p: &InProcess, cluster: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SETTLES;
    loop {
        let differ = nodes_differ(p, cluster).await?;
        let Some(why) = differ else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With node crashes: a crashed node comes back without its instances, and the
/// controller replaces the members it ran once they have missed their heartbeats
/// (its own operations). Waits until no operation of `cluster` is unfinished and the
/// nodes run exactly its members, at most [`HEALS`].
async fn healed(p: &InProcess, cluster: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + HEALS;
    loop {
        let unfinished = p
            .state()
            .list_operations(state_pb::ListOperationsRequest {
                cluster_id: cluster.into(),
                unfinished_only: true,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().operations)
            .map_err(|e| e.to_string());
        let why = match unfinished {
            Ok(ops) if ops.is_empty() => nodes_differ(p, cluster).await?,
            Ok(ops) => Some(format!(
                "operations unfinished: {:?}",
                ops.iter()
                    .map(|o| format!("{} {}", o.operation_id, form_scaler::ops::status_name(o)))
                    .collect::<Vec<_>>()
            )),
            Err(e) => Some(e),
        };
        let Some(why) = why else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("not healed within {HEALS:?}: {why}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Crashes a drawn node a drawn moment from now (0-15 ms) for a drawn time (1 ms to
/// 1.5 s), unless it runs every member while the cluster has no standby snapshot yet
/// (the cluster could then not be made again): the crash goes into the history
/// `line`. The controller then replaces the members it ran.
async fn crash_a_node(
    p: &mut InProcess,
    rng: &mut Rng,
    line: &mut String,
    outcomes: &mut Outcomes,
) -> Result<(), String> {
    let k = rng.below(p.nodes().len());
    let (at, down) = (rng.range(0, 15), rng.range(1, 1_500));
    tokio::time::sleep(Duration::from_millis(at)).await;
    let id = p.nodes()[k].id.clone();
    let web = p
        .state()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: "web".into(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    if web.standby.is_none() && web.members.values().all(|m| m.node_id == id) {
        *line += &format!(" no crash of {id}: it runs every member, and no standby is kept yet;");
        return Ok(());
    }
    *line += &format!(" crash {id} at {at} ms for {down} ms;");
    p.crash_node(k).await.map_err(|e| e.to_string())?;
    *outcomes.entry("node crashes").or_default() += 1;
    tokio::time::sleep(Duration::from_millis(down)).await;
    p.restart_node(k)
        .map_err(|e| format!("restarting {id}: {e}"))
}

/// Submits `drawn` as operation `id`. With node crashes, the controller may be
/// replacing a lost member when the request comes: the request then waits for the
/// cluster to heal and is made again (at most 5 times).
async fn submit(
    p: &InProcess,
    drawn: &Drawn,
    cluster: &Cluster,
    id: &str,
    crashes_nodes: bool,
) -> Result<types::Operation, String> {
    for _ in 0..5 {
        if crashes_nodes {
            healed(p, "web").await?;
        }
        match p
            .controller()
            .submit("web", drawn.request(cluster, id))
            .await
        {
            Err(e) if crashes_nodes && e.code() == tonic::Code::Aborted => continue,
            r => return r.map_err(|e| e.to_string()),
        }
    }
    Err("the cluster was busy at each of 5 tries".into())
}

/// Partitions `name` a drawn moment from now (0-15 ms) for a drawn time (1-400 ms),
/// then heals it; the cut goes into the operation's history `line`.
async fn cut_for_a_while(p: &InProcess, rng: &mut Rng, name: &str, line: &mut String) {
    let (at, cut) = (rng.range(0, 15), rng.range(1, 400));
    *line += &format!(" cut {name} at {at} ms for {cut} ms;");
    tokio::time::sleep(Duration::from_millis(at)).await;
    p.net.partition(name);
    tokio::time::sleep(Duration::from_millis(cut)).await;
    p.net.heal(name);
}

/// Deletes cluster `web` (with no fault drawn) and checks that nothing of it is left:
/// no record, no instance, no snapshot, no route.
async fn deleted(p: &InProcess, history: &mut Vec<String>) -> Result<(), String> {
    let req = Request {
        operation_id: "delete-web".into(),
        kind: types::OperationKind::DeleteCluster as i32,
        immediate: true,
        ..Default::default()
    };
    let op = p
        .controller()
        .submit("web", req)
        .await
        .map_err(|e| format!("refused: {e}"))?;
    let op = p
        .ended(&op.operation_id, ENDS)
        .await
        .map_err(|e| e.to_string())?;
    let status = form_scaler::ops::status_name(&op);
    history.push(format!("delete-web: {status} by {}", op.owner));
    if status != "completed" {
        return Err(format!("it ended {status}: {op:?}"));
    }
    match p
        .state()
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: "web".into(),
        })
        .await
    {
        Err(s) if s.code() == tonic::Code::NotFound => {}
        other => return Err(format!("form-state still has it: {other:?}")),
    }
    let deadline = tokio::time::Instant::now() + SETTLES;
    loop {
        let (running, snapshots) = (running(p).await, p.snapshots().await);
        let routed: Vec<(String, BTreeSet<String>)> = p
            .balancers
            .iter()
            .map(|b| (b.name.clone(), b.backends("web.sim.test")))
            .filter(|(_, b)| !b.is_empty())
            .collect();
        let left = !running.is_empty()
            || snapshots.as_ref().is_ok_and(|s| !s.is_empty())
            || !routed.is_empty();
        if !left {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "left behind: instances {running:?}, snapshots {snapshots:?}, routes {routed:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Operations drawn from `seed` (scale-outs and scale-ins to drawn counts, and one
/// time in ten each a resize or the replacement of a drawn member), on the platform
/// `setup` describes, then the cluster's deletion. Under each, with drawn chances: a node's links cut at a drawn moment and
/// healed a drawn time later, the same for a replica's and a balancer's, and the
/// controller killed at a drawn moment and started again (it adopts what it left).
/// Every operation must end; after each, it must have done what it reports, the nodes
/// must run exactly what form-state records, every balancer must route to exactly
/// the serving members, and the replicas must converge (each gets what any had);
/// at the end, with the writers stopped, the replicas must reach one state.
pub async fn seeded(dir: &Path, seed: u64, ops: usize, setup: Setup) -> Result<Report, String> {
    run(dir, seed, Budget::Operations(ops), setup).await
}

/// As [`seeded`], with operations drawn until `lasting` of simulated time has passed
/// (on a runtime with paused time; otherwise of the host's time).
pub async fn seeded_for(
    dir: &Path,
    seed: u64,
    lasting: Duration,
    setup: Setup,
) -> Result<Report, String> {
    run(dir, seed, Budget::Lasting(lasting), setup).await
}

/// When a seeded run stops drawing operations.
#[derive(Debug, Clone, Copy)]
enum Budget {
    Operations(usize),
    Lasting(Duration),
}

/// What a seeded run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Operations by outcome, and faults by kind.
    pub outcomes: Outcomes,
    /// One line per operation: what was asked, the faults drawn under it, how it
    /// ended and the members it left (by node), in order. Two runs of one seed that
    /// replay exactly have the same history.
    pub history: Vec<String>,
    /// The time the run took on its clock (simulated, on paused time).
    pub took: Duration,
}

async fn run(dir: &Path, seed: u64, budget: Budget, mut setup: Setup) -> Result<Report, String> {
    let started = tokio::time::Instant::now();
    // Every connection's latency each way: none, or drawn up to 1, 5 or 20 ms.
    let most = [0, 1, 5, 20][Rng::new(seed ^ 0x6c61_7465).below(4)];
    setup.latency = (Duration::from_millis(most), seed);
    // Each replica's disk: syncs no slower than the real one, or up to 2, 20 or 100
    // ms slower (each drawn). Each machine's clock: one for all, or each off by up to
    // 5, 50 or 500 ms either way.
    let disk = [0, 2, 20, 100][Rng::new(seed ^ 0x6469_736b).below(4)];
    setup.disk_latency = (Duration::from_millis(disk), seed);
    let skew = [0, 5, 50, 500][Rng::new(seed ^ 0x736b_6577).below(4)];
    setup.clock_skew = (Duration::from_millis(skew), seed);
    let crashes_nodes = setup.node_crashes;
    let mut p = InProcess::with(dir, setup)
        .await
        .map_err(|e| format!("seed {seed}: the platform did not start: {e}"))?;
    let mut rng = Rng::new(seed);
    let mut web = spec("web");
    if crashes_nodes && let Some(policy) = web.scaling_policy.as_mut() {
        // A crash may take every member with it (a scale-in that kept only the
        // members of the node that crashed under it): the cluster is then made
        // again from its standby snapshot.
        policy.standby_snapshot_seconds = 10;
    }
    let op = p
        .controller()
        .create(web, "create-web")
        .await
        .map_err(|e| format!("seed {seed}: create refused: {e}"))?;
    p.ended(&op.operation_id, ENDS)
        .await
        .map_err(|e| format!("seed {seed}: {e}"))?;
    let mut cluster = Cluster {
        count: 1,
        size: (1, 256),
    };
    if crashes_nodes {
        // Two members at least, so that a node's crash leaves one to clone from.
        let two = scale(types::OperationKind::ScaleOut, 2, "op-start");
        let op = p
            .controller()
            .submit("web", two)
            .await
            .map_err(|e| format!("seed {seed}: scaling to 2 refused: {e}"))?;
        p.ended(&op.operation_id, ENDS)
            .await
            .map_err(|e| format!("seed {seed}: {e}"))?;
        cluster.count = 2;
    }
    let traffic = p.send_traffic("web.sim.test", Duration::from_millis(5));
    let mut outcomes = BTreeMap::new();
    if most > 0 {
        outcomes.insert("runs with delayed links", 1);
    }
    if disk > 0 {
        outcomes.insert("runs with slow disks", 1);
    }
    if skew > 0 {
        outcomes.insert("runs with skewed clocks", 1);
    }
    let mut history = vec![format!(
        "links: up to {most} ms each way; disks: syncs up to {disk} ms slower; clocks: up to {skew} ms apart either way"
    )];
    // Which kind of operation is drawn comes from a stream of its own, and so do the
    // node crashes.
    let mut kinds = Rng::new(seed ^ 0x6b69_6e64);
    let mut crashes = Rng::new(seed ^ 0x6e6f_6465);
    let mut result = Ok(());
    for i in 0.. {
        let more = match budget {
            Budget::Operations(n) => i < n,
            Budget::Lasting(d) => started.elapsed() < d,
        };
        if !more {
            break;
        }
        let to = rng.range(if crashes_nodes { 2 } else { 1 }, 6) as u32;
        let Some(drawn) = Drawn::draw(&p, &cluster, to, &mut kinds).await else {
            continue;
        };
        let mut line = format!("op-{i} {}:", drawn.describe(&cluster));
        *outcomes.entry(drawn.kind()).or_default() += 1;
        let op = match submit(&p, &drawn, &cluster, &format!("op-{i}"), crashes_nodes).await {
            Ok(op) => op,
            Err(e) => {
                result = Err(format!("seed {seed}: operation {i} refused: {e}"));
                history.push(line + " refused");
                break;
            }
        };
        let crashed = crashes_nodes && crashes.chance(0.3);
        if crashed
            && let Err(e) = crash_a_node(&mut p, &mut crashes, &mut line, &mut outcomes).await
        {
            result = Err(format!("seed {seed}: operation {i}: {e}"));
            history.push(line);
            break;
        }
        if rng.chance(0.5) {
            let node = p.nodes()[rng.below(p.nodes().len())].address.clone();
            cut_for_a_while(&p, &mut rng, &node, &mut line).await;
        }
        if rng.chance(0.3) {
            let replica = p.replicas[rng.below(p.replicas.len())].clone();
            *outcomes.entry("replica cuts").or_default() += 1;
            cut_for_a_while(&p, &mut rng, &replica, &mut line).await;
        }
        // A replica killed and started again from its files: whatever it acknowledged
        // of its own writes must still be there.
        if kinds.chance(0.2) {
            let k = kinds.below(p.replicas.len());
            let (at, down) = (kinds.range(0, 15), kinds.range(1, 1_000));
            line += &format!(" crash {} at {at} ms for {down} ms;", p.replicas[k]);
            tokio::time::sleep(Duration::from_millis(at)).await;
            // Where its unsynced log is cut comes from a stream of its own. What
            // there is to cut depends on the writer thread's batches, which are the
            // host's (docs/simulation.md), so it stays out of the history.
            let mut cut = Rng::new(seed ^ 0x6375_7473 ^ i as u64);
            if cut.chance(0.5) {
                // The worst moment: while a write waits for the disk.
                p.until_unsynced(k, Duration::from_millis(100)).await;
            }
            let (before, dropped) = p.crash_replica(k, &mut cut).await;
            *outcomes.entry("replica crashes").or_default() += 1;
            if dropped > 0 {
                *outcomes
                    .entry("crashes that dropped unsynced writes")
                    .or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(down)).await;
            let after = match p.restart_replica(k) {
                Ok(recovered) => recovered,
                Err(e) => {
                    result = Err(format!("seed {seed}: restarting {}: {e}", p.replicas[k]));
                    history.push(line);
                    break;
                }
            };
            if after < before {
                result = Err(format!(
                    "seed {seed}: {} had its own writes durable up to {before} (its version \
                     vector's own entry; each may have been acknowledged) at its crash, and \
                     recovered them up to {after}",
                    p.replicas[k]
                ));
                history.push(line);
                break;
            }
        }
        if !p.balancers.is_empty() && rng.chance(0.3) {
            let b = p.balancers[rng.below(p.balancers.len())].name.clone();
            *outcomes.entry("balancer cuts").or_default() += 1;
            cut_for_a_while(&p, &mut rng, &b, &mut line).await;
        }
        // With several controllers: one loses form-state (and so its heartbeats) for a
        // drawn time, often longer than the controllers' ttl, so the other takes its
        // clusters and operations while it still runs them.
        if p.controllers.len() > 1 && rng.chance(0.4) {
            let k = rng.below(p.controllers.len());
            let id = p.controllers[k]
                .as_ref()
                .map_or_else(String::new, |c| c.name.clone());
            let (at, cut) = (rng.range(0, 15), rng.range(1, 3_000));
            line += &format!(" cut {id} from form-state at {at} ms for {cut} ms;");
            tokio::time::sleep(Duration::from_millis(at)).await;
            p.net.partition_between(&id, &super::replica(1));
            *outcomes.entry("controller cuts").or_default() += 1;
            tokio::time::sleep(Duration::from_millis(cut)).await;
            p.net.heal_between(&id, &super::replica(1));
        }
        if rng.chance(0.3) {
            let (at, down) = (rng.range(0, 15), rng.range(0, 200));
            line += &format!(" crash controller-1 at {at} ms for {down} ms;");
            tokio::time::sleep(Duration::from_millis(at)).await;
            p.crash_controller();
            *outcomes.entry("controller crashes").or_default() += 1;
            tokio::time::sleep(Duration::from_millis(down)).await;
            p.restart_controller()
                .map_err(|e| format!("seed {seed}: restart: {e}"))?;
        }
        let op = match p.ended(&op.operation_id, ENDS).await {
            Ok(op) => op,
            Err(e) => {
                result = Err(format!("seed {seed}: {e}"));
                history.push(line + " did not end");
                break;
            }
        };
        let status = form_scaler::ops::status_name(&op);
        *outcomes.entry(status).or_default() += 1;
        let left: Vec<String> = members(&p, "web")
            .await
            .into_iter()
            .map(|(node, id)| format!("{id}@{node}"))
            .collect();
        line += &format!(" {status} by {}, leaving {left:?}", op.owner);
        history.push(line);
        if crashes_nodes && let Err(e) = healed(&p, "web").await {
            result = Err(format!("seed {seed}: after operation {i} ({status}): {e}"));
            break;
        }
        if let Err(e) = nodes_match_state(&p, "web").await {
            result = Err(format!("seed {seed}: after operation {i} ({status}): {e}"));
            break;
        }
        if let Err(e) = balancers_match_state(&p, "web").await {
            result = Err(format!("seed {seed}: after operation {i} ({status}): {e}"));
            break;
        }
        if let Err(e) = p.converged(SETTLES).await {
            result = Err(format!("seed {seed}: after operation {i} ({status}): {e}"));
            break;
        }
        let wrong = traffic.violations();
        if !wrong.is_empty() {
            result = Err(format!(
                "seed {seed}: by operation {i} ({status}), the balancers' picks: {wrong:?}"
            ));
            break;
        }
        // It did what it reports: completed as asked, rolled back as it was.
        match drawn.check(&p, &cluster, status, crashed).await {
            Ok(now) => cluster = now,
            Err(e) => {
                result = Err(format!(
                    "seed {seed}: operation {i} ({}) {status}: {e}: {op:?}",
                    drawn.describe(&cluster)
                ));
                break;
            }
        }
    }
    if result.is_ok() {
        match deleted(&p, &mut history).await {
            Ok(()) => *outcomes.entry("deletes").or_default() += 1,
            Err(e) => result = Err(format!("seed {seed}: deleting the cluster: {e}")),
        }
    }
    outcomes.insert("picks", traffic.picks() as usize);
    if result.is_ok() {
        // Quiet: with no writer left, the replicas reach one state.
        p.quiesce();
        if let Err(e) = p.identical(SETTLES).await {
            result = Err(format!("seed {seed}: at the end: {e}"));
        }
    }
    let took = started.elapsed();
    p.stop().await;
    let result = result.map_err(|e| {
        format!(
            "{e}\nthe run's history (the same draws again: FORM_SIM_PLATFORM_SEED={seed}):\n  {}",
            history.join("\n  ")
        )
    });
    result.map(|()| Report {
        outcomes,
        history,
        took,
    })
}
