//! form-vmm-service: instance lifecycle on one node. Creates, pauses, resumes,
//! snapshots, clones, resizes and deletes instances through a hypervisor backend, and
//! heartbeats them into form-state.

pub mod allow;
pub mod config;
pub mod contract;
pub mod error;
pub mod heartbeat;
mod http;
pub mod hypervisor;
pub mod node;
pub mod orphans;
pub mod process;
pub mod procfs;
pub mod qemu;
pub mod ramfile;
pub mod service;
pub mod snapshots;
pub mod spec;
mod supervise;
pub mod transfer;

use std::net::SocketAddr;

use form_runtime::cli::CommonArgs;
use form_runtime::grpc::{GRPC_LISTENER, GrpcServer};
use form_runtime::service::{METRICS_LISTENER, RunContext, Service};
use form_runtime::upstream;
use form_runtime::{ConfigError, RuntimeError};

pub use config::{Args, Config};

use std::sync::Arc;
use std::time::Duration;

use form_proto::vmm::v1::vmm_service_server::VmmServiceServer;

use crate::error::VmmError;
use crate::hypervisor::Hypervisor;
use crate::process::ProcessBackend;
use crate::qemu::{Guest, QemuBackend, Room};
use crate::service::VmmApi;
use crate::snapshots::SnapshotStore;

/// The form-vmm-service service.
#[derive(Debug)]
pub struct VmmNode {
    config: Config,
}

impl VmmNode {
    /// The service with this configuration.
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

impl Service for VmmNode {
    const NAME: &'static str = "form-vmm-service";
    type Args = Args;
    type Config = Config;

    fn configure(args: Args) -> Result<(Self, CommonArgs), ConfigError> {
        let (config, common) = args.into_config()?;
        Ok((Self::new(config), common))
    }

    fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        vec![
            (GRPC_LISTENER, self.config.listen),
            (METRICS_LISTENER, self.config.metrics_listen),
        ]
    }

    async fn run(self, ctx: RunContext) -> Result<(), RuntimeError> {
        let c = &self.config;
        let service_error = |e: VmmError| RuntimeError::Service(e.to_string());
        let instances = c.data_dir.join("instances");
        let ready = Duration::from_millis(c.ready_timeout_ms);
        match (c.backend.as_str(), &c.guest_dir) {
            ("qemu", Some(guest)) => {
                let guest = Guest::in_dir(guest).map_err(service_error)?;
                let room = Room {
                    max_vcpus: c.qemu_max_vcpus,
                    max_memory_mib: c.qemu_max_memory_mib,
                };
                let hv = QemuBackend::new(instances, c.instance_host, c.accel, guest, room, ready)
                    .map_err(service_error)?
                    .with_memory(c.qemu_memory);
                serve(c, Arc::new(hv), ctx).await
            }
            _ => {
                let user = c
                    .workload_user()
                    .map_err(|e| RuntimeError::Service(format!("--workload-user: {e}")))?;
                let user = match user {
                    Some((uid, gid)) => {
                        std::fs::create_dir_all(&instances).map_err(|e| {
                            RuntimeError::Service(format!("creating {}: {e}", instances.display()))
                        })?;
                        match process::unreachable_for(&instances, uid, gid) {
                            None => Some((uid, gid)),
                            // The default gives way (a data directory under /root, as
                            // `formctl up` run by root has), saying so; an explicit
                            // user does not.
                            Some(dir) if c.workload_user.trim().is_empty() => {
                                tracing::warn!(dir = %dir.display(), uid, "workloads run as this node's user: uid {uid} cannot enter the data directory; give a --data-dir it can reach to run them unprivileged");
                                None
                            }
                            Some(dir) => {
                                return Err(RuntimeError::Service(format!(
                                    "--workload-user {uid}:{gid}: {} cannot be entered by that user; give a --data-dir it can reach",
                                    dir.display()
                                )));
                            }
                        }
                    }
                    None => None,
                };
                let hv = ProcessBackend::new(
                    instances,
                    c.instance_host,
                    &c.node_id,
                    &c.cgroup_root,
                    ready,
                    user,
                    // This binary even if its file is replaced (an upgrade in place):
                    // a spare speaks the same launch as this node.
                    Some(std::path::PathBuf::from("/proc/self/exe")).filter(|exe| exe.exists()),
                )
                .map_err(service_error)?;
                hv.fill_spare();
                serve(c, Arc::new(hv), ctx).await
            }
        }
    }
}

/// Serves VmmService over `hv` until shutdown, then deletes every instance.
async fn serve<H: Hypervisor>(c: &Config, hv: Arc<H>, ctx: RunContext) -> Result<(), RuntimeError> {
    let snapshots = SnapshotStore::open(c.data_dir.join("snapshots"))
        .map_err(|e| RuntimeError::Service(e.to_string()))?;
    // What pulls left an hour ago or more is not resumed by anyone.
    let collected = snapshots.collect_incoming(Duration::from_secs(3600));
    if collected > 0 {
        tracing::info!(collected, "removed unfinished snapshot pulls");
    }
    let transfer = transfer::Settings::new(
        c.transfer_rate_mib * 1024 * 1024,
        c.snapshot_store_max_mib * 1024 * 1024,
        c.fault_corrupt_chunk,
    );
    // A VM runs what its guest was built with (deploy/guest/build.sh); the command
    // names it and runs nothing on this node.
    let allowed = if c.backend == "qemu" {
        allow::Allowed::Any
    } else {
        let a = allow::Allowed::from_config(&c.allowed_commands)
            .map_err(|e| RuntimeError::Service(format!("--allowed-commands: {e}")))?;
        match &a {
            allow::Allowed::Any => tracing::warn!(
                "--allowed-commands '*': instances may run any program; for development only"
            ),
            allow::Allowed::Only(list) => {
                tracing::info!(allowed = ?list, "instances run only these programs")
            }
        }
        a
    };
    // The highest epoch seen per cluster, and per id found absent, outlive a restart
    // (docs/fencing.md).
    let fences = form_runtime::fence::Fences::in_file(c.data_dir.join("fences"))
        .map_err(RuntimeError::Service)?;
    let api = VmmApi::new(hv.clone(), snapshots, c.node_id.clone(), allowed)
        .with_transfer(transfer)
        .with_fences(fences);
    let upstreams = upstream::from_config(&[("state", &c.state)])?;
    if let Some(state) = upstreams.first() {
        let listening = ctx
            .local_addr(GRPC_LISTENER)
            .ok_or_else(|| RuntimeError::Service("no gRPC listener".into()))?;
        let record = node::Record::new(c, listening).map_err(RuntimeError::Service)?;
        tokio::spawn(heartbeat::run(
            hv.clone(),
            api.contracts(),
            state.channel(),
            record,
            Duration::from_millis(c.heartbeat_interval_ms),
            form_runtime::clock::Skew::default(),
            ctx.shutdown.clone(),
        ));
    }
    // A merge request carries a whole batch of the state contract.
    let limit = contract::MAX_BATCH + 64 * 1024;
    let server = GrpcServer::new().add_service(
        VmmServiceServer::new(api)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    );
    let mut stop = ctx.shutdown.clone();
    let serving = form_runtime::grpc::run(ctx, server, &upstreams);
    // A client that never answers the server's goodbye (an HTTP/2 connection whose
    // peer reads nothing) holds the drain until the service's graceful deadline, and
    // then nothing below would run: the drain gets DRAIN_FOR, then the instances go.
    let served = tokio::select! {
        served = serving => served,
        () = async {
            stop.requested().await;
            tokio::time::sleep(DRAIN_FOR).await;
        } => {
            tracing::warn!(after = ?DRAIN_FOR, "the gRPC server has not drained; deleting the instances anyway");
            Ok(())
        }
    };
    // No instance outlives the service.
    hv.delete_all().await;
    served
}

/// Time the gRPC server has to drain at a stop before the instances are deleted: the
/// rest of the graceful deadline (4 s) is theirs (3 s of grace each, in parallel).
const DRAIN_FOR: Duration = Duration::from_millis(500);
