//! A whole platform in one process: form-state replicas gossiping (`state.rs`), vmm
//! nodes over the in-memory backend ([`memory`]), balancers ([`balancer`]) and
//! controllers ([`Controller`]), each the production service or library, talking
//! gRPC over an in-memory network (`form_testkit::memnet`) whose links a test cuts
//! and heals. Only the sockets and the backend's work are not the
//! real ones; every call is encoded, fenced and answered as in production. The services
//! read their time from `form_runtime::clock`: on a runtime with paused time (the
//! seeded runs), after `form_runtime::clock::simulate`, everything here runs on
//! simulated time, a wait costs nothing of the host's, and a deadline is one of
//! simulated time. Every service runs on the caller's runtime.

pub mod balancer;
mod controller;
pub mod draw;
pub mod memory;
mod node;
pub mod run;
mod state;
pub mod traffic;

pub use controller::{Controller, Settings as ControllerSettings};
pub use node::Node;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_proto::types::v1 as types;
use form_runtime::shutdown::{self, Shutdown, ShutdownHandle, ShutdownKind};
use form_testkit::memnet::Net;
use form_vmm_service::hypervisor::Hypervisor;
use tonic::transport::Channel;

/// The name of form-state replica `i` (from 1); the controller uses the first.
pub fn replica(i: usize) -> String {
    format!("state-{i}:1")
}

/// With node crashes, a member without heartbeats is replaced this long after it was
/// judged unhealthy (six heartbeats missed).
pub const REPLACE_AFTER: Duration = Duration::from_secs(2);

/// What an in-process platform runs.
#[derive(Debug, Clone)]
pub struct Setup {
    /// vmm nodes.
    pub nodes: usize,
    /// form-state replicas, gossiping with each other.
    pub replicas: usize,
    /// Balancers, each following a replica's watch (in turn), each drained and
    /// waited on by the controller.
    pub balancers: usize,
    /// Controllers (`controller-1`, ...), each owning the clusters the others' view
    /// of the live controllers gives it.
    pub controllers: usize,
    /// A controller without a heartbeat this long is dead to the others.
    pub controller_ttl: Duration,
    /// Whether the controllers act on their decisions (false: their rounds only
    /// judge health and adopt operations).
    pub act: bool,
    /// Time between two evaluation rounds.
    pub evaluate: Duration,
    /// Time between two node records of each node.
    pub node_heartbeat: Duration,
    /// Faults injected into the controllers' steps.
    pub faults: form_scaler::faults::Faults,
    /// The most one way of a connection takes, and the seed its draws come from
    /// (`memnet::Net::delay`); zero: no delay.
    pub latency: (Duration, u64),
    /// Whether seeded runs crash vmm nodes under operations (machine crashes: their
    /// instances are gone). The controllers then judge members by their heartbeats
    /// and replace those lost.
    pub node_crashes: bool,
    /// The most a replica's disk takes to sync on top of the real one (each sync drawn
    /// up to it), and the seed of the draws; zero: no more than the real one.
    pub disk_latency: (Duration, u64),
    /// The most any machine's clock is off either way (each machine's drawn up to it),
    /// and the seed of the draws; zero: one clock for all.
    pub clock_skew: (Duration, u64),
    /// Broken on purpose, to show the checks can fail: the replicas' slow disks
    /// acknowledge a write once written, before they synced it.
    pub ack_before_sync: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            nodes: 2,
            replicas: 1,
            balancers: 0,
            controllers: 1,
            controller_ttl: Duration::from_secs(10),
            act: false,
            evaluate: Duration::from_millis(200),
            node_heartbeat: Duration::from_millis(200),
            faults: Default::default(),
            latency: (Duration::ZERO, 0),
            node_crashes: false,
            disk_latency: (Duration::ZERO, 0),
            clock_skew: (Duration::ZERO, 0),
            ack_before_sync: false,
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct InProcess {
    /// The network between the services.
    pub net: Net,
    /// The form-state replicas' names (the controller uses the first).
    pub replicas: Vec<String>,
    /// The replicas, each stopped and started again on its files by a crash.
    stores: state::Replicas,
    /// The vmm nodes.
    nodes: node::Nodes,
    /// The balancers.
    pub balancers: Vec<balancer::Balancer>,
    /// The controllers (the first is none between a crash and its restart).
    pub controllers: Vec<Option<Controller>>,
    /// How each controller was started.
    settings: Vec<ControllerSettings>,
    /// How many times the first controller was started.
    starts: u32,
    stop: Option<ShutdownHandle>,
    /// Stops the traffic (see [`InProcess::send_traffic`]).
    stopped: Shutdown,
    tasks: tokio::task::JoinSet<()>,
}

impl InProcess {
    /// A platform of one replica and `nodes` nodes with its data under `dir`.
    pub async fn start(dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        Self::with(
            dir,
            Setup {
                nodes,
                ..Default::default()
            },
        )
        .await
    }

    /// The platform `setup` describes, with its data under `dir`.
    pub async fn with(dir: &Path, setup: Setup) -> anyhow::Result<Self> {
        form_runtime::clock::simulate();
        let nodes = setup.nodes;
        let faults = setup.faults.clone();
        let net = Net::default();
        net.delay(setup.latency.1, setup.latency.0);
        let (stop, stopped) = shutdown::channel();
        let mut tasks = tokio::task::JoinSet::new();
        let mut skews = Skews::new(setup.clock_skew);
        let machines = state::Machines {
            skews: (0..setup.replicas).map(|_| skews.next()).collect(),
            sync_most: setup.disk_latency.0,
            seed: setup.disk_latency.1,
            ack_before_sync: setup.ack_before_sync,
        };
        let stores = state::Replicas::start(&net, &mut tasks, dir, setup.replicas, machines)?;
        let replicas = stores.names.clone();
        // The nodes write to the last replica, the controller uses the first: node
        // records reach the controller through gossip.
        let last = replicas.last().cloned().unwrap_or_default();
        let clocks: Vec<_> = (0..nodes).map(|_| skews.next()).collect();
        let out = node::Nodes::start(
            &net,
            &mut tasks,
            dir,
            nodes,
            &last,
            setup.node_heartbeat,
            &clocks,
        )?;
        // Ready when the controller's replica has every node's record (through gossip
        // from the replica the nodes write to).
        let mut first = StateServiceClient::new(net.channel(&replica(1)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let known = first
                .list_nodes(state_pb::ListNodesRequest {})
                .await
                .map_or(0, |r| r.into_inner().nodes.len());
            if known == nodes {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("replica 1 knows {known} of {nodes} nodes after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let balancers: Vec<balancer::Balancer> = (1..=setup.balancers)
            .map(|i| {
                let follows = &replicas[(i - 1) % replicas.len()];
                balancer::start(&net, &mut tasks, i, follows, &stopped)
            })
            .collect();
        let names: Vec<String> = balancers.iter().map(|b| b.name.clone()).collect();
        let settings: Vec<ControllerSettings> = (1..=setup.controllers.max(1))
            .map(|i| ControllerSettings {
                id: format!("controller-{i}"),
                state: replica(1),
                balancers: names.clone(),
                faults: faults.clone(),
                ttl: setup.controller_ttl,
                act: setup.act,
                evaluate: setup.evaluate,
                judge: setup
                    .node_crashes
                    .then_some((setup.node_heartbeat, REPLACE_AFTER)),
            })
            .collect();
        let controllers = settings
            .iter()
            .map(|s| Controller::start(&net, s, 1).map(Some))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            net,
            replicas,
            stores,
            balancers,
            nodes: out,
            controllers,
            settings,
            starts: 1,
            stop: Some(stop),
            stopped,
            tasks,
        })
    }

    /// A client of the first form-state replica (the controller's).
    pub fn state(&self) -> StateServiceClient<Channel> {
        StateServiceClient::new(self.net.channel(&replica(1)))
    }

    /// Cluster `id` as the first replica (the controller's) records it.
    pub async fn cluster(&self, id: &str) -> Result<state_pb::Cluster, tonic::Status> {
        self.state()
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Each replica's digest and version vector (`None`: unreachable), in order.
    async fn digests(&self) -> Vec<Option<state_pb::DigestReply>> {
        let mut out = Vec::new();
        for r in &self.replicas {
            let d = StateServiceClient::new(self.net.channel(r))
                .digest(state_pb::DigestRequest::default())
                .await
                .map(tonic::Response::into_inner);
            out.push(d.ok());
        }
        out
    }

    /// Waits until every replica has everything any replica had when it was called,
    /// at most `within`: the replicas converge while the platform keeps writing (node
    /// and controller heartbeats never stop, so their states need not be equal at any
    /// one moment).
    pub async fn converged(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let mut target: BTreeMap<String, u64> = BTreeMap::new();
        for d in self.digests().await.into_iter().flatten() {
            for (actor, seq) in d.version.unwrap_or_default().entries {
                let t = target.entry(actor).or_default();
                *t = (*t).max(seq);
            }
        }
        loop {
            let behind: Vec<(String, Vec<String>)> = self
                .replicas
                .iter()
                .zip(self.digests().await)
                .filter_map(|(r, d)| {
                    let have = d.map(|d| d.version.unwrap_or_default().entries);
                    let missing: Vec<String> = target
                        .iter()
                        .filter(|(a, s)| {
                            have.as_ref()
                                .is_none_or(|h| h.get(*a).copied().unwrap_or(0) < **s)
                        })
                        .map(|(a, s)| format!("{a} up to {s}"))
                        .collect();
                    (!missing.is_empty()).then(|| (r.clone(), missing))
                })
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the replicas did not converge within {within:?}: missing {behind:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Crashes form-state replica `i`'s machine (from 0) where it is, dropping a drawn
    /// part of what its disk had not synced (see `state::Replicas::crash`); returns
    /// once nothing of it runs, with how many of its own writes were durable then and
    /// how many bytes the crash dropped.
    pub async fn crash_replica(&mut self, i: usize, rng: &mut crate::rng::Rng) -> (u64, u64) {
        let c = self.stores.crash(&self.net, i, rng).await;
        (c.own_durable, c.dropped)
    }

    /// Waits until replica `i` (from 0) has applied a change its disk has not kept
    /// yet, at most `within` (a crash's worst moment).
    pub async fn until_unsynced(&self, i: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.stores.unsynced(i) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Starts form-state replica `i` again from its files (what it made durable);
    /// returns its version vector's own entry as recovered, before any new write.
    pub fn restart_replica(&mut self, i: usize) -> anyhow::Result<u64> {
        self.stores.restart(&self.net, &mut self.tasks, i)
    }

    /// Starts picking a backend for `domain` on every balancer every `every`, as the
    /// data plane picks for each request, with every pick checked (see [`traffic`]).
    pub fn send_traffic(&mut self, domain: &str, every: Duration) -> traffic::Traffic {
        let t = traffic::Traffic::default();
        t.start(
            &self.balancers,
            domain,
            every,
            &mut self.tasks,
            &self.stopped,
        );
        t
    }

    /// Stops every writer of the platform: the controllers (as crashes) and the
    /// nodes' records. The replicas must then reach one state ([`InProcess::identical`]).
    pub fn quiesce(&mut self) {
        for c in self.controllers.iter_mut().filter_map(Option::take) {
            c.crash();
        }
        self.nodes.quiesce();
    }

    /// Waits until every replica has the same state (digest), at most `within`.
    pub async fn identical(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let digests: Vec<Option<Vec<u8>>> = self
                .digests()
                .await
                .into_iter()
                .map(|d| d.map(|d| d.sha256))
                .collect();
            if digests.windows(2).all(|w| w[0].is_some() && w[0] == w[1]) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let short: Vec<String> = digests
                    .iter()
                    .map(|d| d.as_ref().map_or("unreachable".into(), |d| hex8(d)))
                    .collect();
                anyhow::bail!(
                    "the replicas did not reach one state within {within:?} of quiet: digests {short:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The vmm nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes.list
    }

    /// Crashes vmm node `i` (from 0) as a machine crashes: its service and heartbeats
    /// stop, its connections break, its instances are gone. Returns once nothing of
    /// it runs.
    pub async fn crash_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes.crash(&self.net, i).await
    }

    /// Starts vmm node `i` again on its files (snapshots, fences), with no instance.
    pub fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes.restart(&self.net, &mut self.tasks, i)
    }

    /// The instances of every node, by node id.
    pub async fn instances(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for n in self.nodes() {
            let ids = n
                .backend
                .list()
                .await
                .into_iter()
                .map(|i| i.spec.instance_id)
                .collect();
            out.insert(n.id.clone(), ids);
        }
        out
    }

    /// The snapshots every node holds, as (node id, snapshot id), read through each
    /// node's API.
    pub async fn snapshots(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for n in self.nodes() {
            let mut c = form_proto::vmm::v1::vmm_service_client::VmmServiceClient::new(
                self.net.channel(&n.address),
            );
            let listed = c
                .list_snapshots(form_proto::vmm::v1::ListSnapshotsRequest::default())
                .await?
                .into_inner();
            out.extend(
                listed
                    .snapshots
                    .into_iter()
                    .map(|s| (n.id.clone(), s.snapshot_id)),
            );
        }
        Ok(out)
    }

    /// Waits until operation `id` has ended, at most `within`; its last record.
    pub async fn ended(&self, id: &str, within: Duration) -> anyhow::Result<types::Operation> {
        let deadline = tokio::time::Instant::now() + within;
        let mut state = self.state();
        loop {
            let op = state
                .get_operation(state_pb::GetOperationRequest {
                    operation_id: id.to_owned(),
                })
                .await
                .map(tonic::Response::into_inner);
            if let Ok(op) = &op
                && form_proto::operation_is_terminal(op)
            {
                return Ok(op.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("operation {id} has not ended within {within:?}: {op:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The first controller.
    pub fn controller(&self) -> &Controller {
        self.controllers[0].as_ref().expect("a controller runs")
    }

    /// Kills the first controller where it is: every task of it (requests, running
    /// operations, rounds) stops at once, and its connections break.
    pub fn crash_controller(&mut self) {
        if let Some(c) = self.controllers[0].take() {
            c.crash();
        }
    }

    /// Starts the first controller again, under the same id and settings: it adopts
    /// the operations left unfinished.
    pub fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.crash_controller();
        self.starts += 1;
        self.controllers[0] = Some(Controller::start(
            &self.net,
            &self.settings[0],
            self.starts,
        )?);
        Ok(())
    }

    /// Stops every service.
    pub async fn stop(mut self) {
        self.quiesce();
        self.nodes.stop();
        self.stores.stop();
        if let Some(s) = self.stop.take() {
            s.trigger(ShutdownKind::Fast);
        }
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The first 4 bytes of `d` in hex.
fn hex8(d: &[u8]) -> String {
    d.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

fn serve(
    net: &Net,
    tasks: &mut tokio::task::JoinSet<()>,
    name: &str,
    router: tonic::transport::server::Router,
    mut stopped: Shutdown,
) {
    let served = net.serve(name, router, async move {
        stopped.requested().await;
    });
    tasks.spawn(async move {
        let _ = served.await;
    });
}

/// Each machine's clock offset in turn, drawn up to the most either way.
#[derive(Debug)]
struct Skews {
    most: i64,
    rng: crate::rng::Rng,
}

impl Skews {
    fn new((most, seed): (Duration, u64)) -> Self {
        Self {
            most: most.as_millis() as i64,
            rng: crate::rng::Rng::new(seed ^ 0x636c_6f63),
        }
    }

    fn next(&mut self) -> form_runtime::clock::Skew {
        if self.most == 0 {
            return form_runtime::clock::Skew(0);
        }
        let drawn = self.rng.range(0, 2 * self.most as u64) as i64;
        form_runtime::clock::Skew(drawn - self.most)
    }
}
