//! A whole platform in one process: a form-state replica, vmm nodes over the
//! in-memory backend ([`memory`]) and a controller, each the production service or
//! library, talking gRPC over an in-memory network (`form_testkit::memnet`) whose
//! links a test cuts and heals. Only the sockets and the backend's work are not the
//! real ones; every call is encoded, fenced and answered as in production. Time is
//! the wall clock (the services read it directly), so runs are driven by conditions
//! with deadlines, not by simulated time.

pub mod memory;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_proto::state::v1::state_service_server::StateServiceServer;
use form_proto::types::v1 as types;
use form_proto::vmm::v1::vmm_service_server::VmmServiceServer;
use form_runtime::shutdown::{self, Shutdown, ShutdownHandle, ShutdownKind};
use form_scaler::controller::Shared;
use form_scaler::fleet::{Dialer, Fleet};
use form_scaler::ops::engine::{Engine, Limits};
use form_state::service::StateApi;
use form_state::store::{Store, StoreConfig};
use form_testkit::memnet::Net;
use form_vmm_service::hypervisor::Hypervisor;
use form_vmm_service::node::Record;
use form_vmm_service::service::VmmApi;
use form_vmm_service::snapshots::SnapshotStore;
use tonic::transport::{Channel, Server};

use memory::Memory;

/// The name form-state serves under.
pub const STATE: &str = "state:1";

/// One vmm node: its id, the address it is reached at, its instances.
#[derive(Debug, Clone)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Its address on the in-memory network.
    pub address: String,
    /// Its instances.
    pub backend: Arc<Memory>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct InProcess {
    /// The network between the services.
    pub net: Net,
    /// The vmm nodes.
    pub nodes: Vec<Node>,
    /// The controller.
    pub controller: Arc<Shared>,
    stop: Option<ShutdownHandle>,
    tasks: tokio::task::JoinSet<()>,
}

impl InProcess {
    /// A platform of `nodes` nodes with its data under `dir`.
    pub async fn start(dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        Self::with_faults(dir, nodes, Default::default()).await
    }

    /// [`InProcess::start`] with faults injected into the controller's steps.
    pub async fn with_faults(
        dir: &Path,
        nodes: usize,
        faults: form_scaler::faults::Faults,
    ) -> anyhow::Result<Self> {
        let net = Net::default();
        let (stop, stopped) = shutdown::channel();
        let mut tasks = tokio::task::JoinSet::new();
        let store = Store::open(&StoreConfig {
            replica_id: "s1".into(),
            data_dir: dir.join("state"),
            node_key: dir.join("state-node.key"),
            authorized_keys: None,
            snapshot_every: 10_000,
            limits: Default::default(),
        })?;
        let state = Server::builder()
            .add_service(StateServiceServer::new(StateApi::new(store, 10, 100_000)));
        serve(&net, &mut tasks, STATE, state, stopped.clone());

        let addresses: Vec<String> = (1..=nodes).map(|i| format!("node-{i}:1")).collect();
        let mut out = Vec::new();
        for (i, address) in addresses.iter().enumerate() {
            let id = format!("node-{}", i + 1);
            let backend = Arc::new(Memory::default());
            let mut transfer = form_vmm_service::transfer::Settings::default();
            for a in &addresses {
                transfer =
                    transfer.with_source(a.parse().map_err(anyhow::Error::msg)?, net.channel(a));
            }
            let api = VmmApi::new(
                backend.clone(),
                SnapshotStore::open(dir.join(&id))?,
                id.clone(),
                form_vmm_service::allow::Allowed::Any,
            )
            .with_transfer(transfer);
            serve(
                &net,
                &mut tasks,
                address,
                Server::builder().add_service(VmmServiceServer::new(api)),
                stopped.clone(),
            );
            out.push(Node {
                id,
                address: address.clone(),
                backend,
            });
        }
        tasks.spawn(heartbeats(
            StateServiceClient::new(net.channel(STATE)),
            out.clone(),
            stopped.clone(),
        ));

        let dial = net.clone();
        let platform = form_scaler::platform::Platform::over(
            net.channel(STATE),
            Fleet::dialing(Dialer(Arc::new(move |a: &str| dial.channel(a)))),
            Vec::new(),
        );
        let engine = Engine {
            platform,
            limits: Limits {
                ready_timeout: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(10),
                balancer_timeout: Duration::from_secs(5),
                poll: Duration::from_millis(10),
                operation_timeout: Duration::from_secs(60),
                node_timeout: Duration::from_secs(15),
            },
            faults,
            taking_standby: Default::default(),
        };
        let controller = Arc::new(Shared::new(
            "controller-1".into(),
            engine,
            100,
            Duration::from_secs(10),
        ));
        {
            let c = controller.clone();
            let client = c.engine.platform.state.clone();
            let s = stopped.clone();
            tasks.spawn(async move {
                c.peers
                    .run(
                        client,
                        "controller-1:1".into(),
                        Duration::from_millis(200),
                        s,
                    )
                    .await
            });
        }
        tasks.spawn(
            controller
                .clusters
                .clone()
                .follow(controller.engine.platform.state.clone(), stopped.clone()),
        );
        // Rounds that only adopt and resume operations (a suspended run goes on here).
        tasks.spawn(form_scaler::autoscale::run(
            controller.clone(),
            form_scaler::autoscale::Settings {
                interval: Duration::from_millis(200),
                heartbeat: Duration::from_secs(3600),
                act: false,
                replace_after: Duration::from_secs(3600),
                metric_window: Duration::from_secs(10),
            },
            stopped,
        ));
        Ok(Self {
            net,
            nodes: out,
            controller,
            stop: Some(stop),
            tasks,
        })
    }

    /// A client of form-state.
    pub fn state(&self) -> StateServiceClient<Channel> {
        StateServiceClient::new(self.net.channel(STATE))
    }

    /// The instances of every node, by node id.
    pub async fn instances(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
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

    /// Stops every service.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            s.trigger(ShutdownKind::Fast);
        }
        while self.tasks.join_next().await.is_some() {}
    }
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

/// Each node's record every 200 ms (what a node's heartbeat loop writes).
async fn heartbeats(mut state: StateServiceClient<Channel>, nodes: Vec<Node>, mut stop: Shutdown) {
    let records: Vec<Record> = nodes
        .iter()
        .map(|n| {
            Record::of(
                n.id.clone(),
                n.address.clone(),
                state_pb::NodeCapacity {
                    vcpus: 64,
                    memory_mib: 64 * 1024,
                    instance_slots: 100,
                },
                Default::default(),
                "simulated".into(),
            )
        })
        .collect();
    loop {
        for (r, n) in records.iter().zip(&nodes) {
            let req = r.heartbeat(&n.backend.list().await, form_state::store::now_ms());
            let _ = state.node_heartbeat(req).await;
        }
        tokio::select! {
            _ = stop.requested() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
