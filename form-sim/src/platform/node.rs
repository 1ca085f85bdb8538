//! The in-process platform's vmm nodes. Each is the node's gRPC service (`VmmApi`,
//! with its fences kept in a file and its snapshot store on disk, as a node keeps them
//! under its data directory) over the in-memory backend, and the node's own heartbeat
//! loop (`form_vmm_service::heartbeat::run`: its record, its instances' heartbeats,
//! the orphans it stops), writing to one replica over its own connections.
//!
//! A crash is a machine's: the node's service and heartbeats stop, every connection
//! to or from it breaks, and its instances are gone; what it kept on disk (snapshots,
//! fences) is still there when it starts again, with no instance.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use form_proto::vmm::v1::vmm_service_server::VmmServiceServer;
use form_runtime::shutdown::{self, ShutdownHandle, ShutdownKind};
use form_testkit::memnet::Net;
use form_vmm_service::service::VmmApi;
use form_vmm_service::snapshots::SnapshotStore;
use tonic::transport::Server;

use super::memory::{self, Memory};
use super::serve;

/// One vmm node: its id, the address it is reached at, its instances.
#[derive(Debug, Clone)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Its address on the in-memory network.
    pub address: String,
    /// Its instances (the running incarnation's; empty while it is down).
    pub backend: Arc<Memory>,
    /// Its machine's clock (the times its heartbeats carry).
    pub clock: form_runtime::clock::Skew,
}

/// The nodes of a platform, and how each is stopped and started again.
#[derive(Debug)]
pub(super) struct Nodes {
    /// The nodes, in order (`node-1`, ...).
    pub list: Vec<Node>,
    dir: PathBuf,
    /// The replica the nodes write their records and heartbeats to.
    state: String,
    /// Time between two heartbeat rounds of a node.
    every: Duration,
    /// Per node: what stops its service and its heartbeats, while it runs.
    running: Vec<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    serve: ShutdownHandle,
    beat: ShutdownHandle,
}

impl Nodes {
    /// Starts `count` nodes with their data under `dir`, beating every `every` into
    /// replica `state`.
    pub(super) fn start(
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        dir: &Path,
        count: usize,
        state: &str,
        every: Duration,
        clocks: &[form_runtime::clock::Skew],
    ) -> anyhow::Result<Self> {
        let list = (1..=count)
            .map(|i| Node {
                id: format!("node-{i}"),
                address: format!("node-{i}:1"),
                backend: Arc::default(),
                clock: clocks.get(i - 1).copied().unwrap_or_default(),
            })
            .collect();
        let mut n = Self {
            list,
            dir: dir.to_owned(),
            state: state.to_owned(),
            every,
            running: (0..count).map(|_| None).collect(),
        };
        for i in 0..count {
            n.run(net, tasks, i)?;
        }
        Ok(n)
    }

    /// Starts node `i` (from 0) on its files, with the instances of its backend.
    fn run(
        &mut self,
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        i: usize,
    ) -> anyhow::Result<()> {
        let node = &self.list[i];
        let mut transfer = form_vmm_service::transfer::Settings::default();
        for other in &self.list {
            let source = net.channel_from(&node.address, &other.address);
            transfer =
                transfer.with_source(other.address.parse().map_err(anyhow::Error::msg)?, source);
        }
        let fences =
            form_runtime::fence::Fences::in_file(self.dir.join(format!("{}.fences", node.id)))
                .map_err(anyhow::Error::msg)?;
        let api = VmmApi::new(
            node.backend.clone(),
            SnapshotStore::open(self.dir.join(&node.id))?,
            node.id.clone(),
            form_vmm_service::allow::Allowed::Any,
        )
        .with_transfer(transfer)
        .with_fences(fences);
        let contracts = api.contracts();
        let (serving, served) = shutdown::channel();
        serve(
            net,
            tasks,
            &node.address,
            Server::builder().add_service(VmmServiceServer::new(api)),
            served,
        );
        let (beat, beating) = shutdown::channel();
        tasks.spawn(form_vmm_service::heartbeat::run(
            node.backend.clone(),
            contracts,
            net.channel_from(&node.address, &self.state),
            memory::record(node.id.clone(), node.address.clone()),
            self.every,
            node.clock,
            beating,
        ));
        self.running[i] = Some(Running {
            serve: serving,
            beat,
        });
        Ok(())
    }

    /// Stops every node's heartbeats (their services go on).
    pub(super) fn quiesce(&mut self) {
        for r in self.running.iter().flatten() {
            r.beat.trigger(ShutdownKind::Fast);
        }
    }

    /// Crashes node `i` (from 0) as a machine crashes: see the module documentation.
    /// Returns once nothing of it runs, so it can be started again on the same files.
    pub(super) async fn crash(&mut self, net: &Net, i: usize) -> anyhow::Result<()> {
        let Some(r) = self.running[i].take() else {
            return Ok(());
        };
        r.serve.trigger(ShutdownKind::Fast);
        r.beat.trigger(ShutdownKind::Fast);
        net.partition(&self.list[i].address);
        // Its instances die with it: what its handlers still running make goes into
        // the old backend, which nothing reads any more.
        let old: Weak<Memory> = Arc::downgrade(&std::mem::take(&mut self.list[i].backend));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while old.strong_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{} still runs 10 s after its crash ({} holders of its backend)",
                    self.list[i].id,
                    old.strong_count()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Starts node `i` again from its files, with no instance, and lets connections
    /// reach it.
    pub(super) fn restart(
        &mut self,
        net: &Net,
        tasks: &mut tokio::task::JoinSet<()>,
        i: usize,
    ) -> anyhow::Result<()> {
        self.run(net, tasks, i)?;
        net.heal(&self.list[i].address);
        Ok(())
    }

    /// Stops every node.
    pub(super) fn stop(&mut self) {
        for r in self.running.iter_mut().filter_map(Option::take) {
            r.serve.trigger(ShutdownKind::Fast);
            r.beat.trigger(ShutdownKind::Fast);
        }
    }
}
