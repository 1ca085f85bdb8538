//! `form.vmm.v1.VmmService` over a [`Hypervisor`] and the snapshot store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_server::VmmService;
use tonic::{Request, Response, Status as GrpcStatus};

use form_runtime::fence::Fence;

use crate::contract::{self, Contracts};
use crate::error::VmmError;
use crate::hypervisor::{Hypervisor, InstanceInfo, InstanceSpec, Status, Window};
use crate::snapshots::{FORMAT_VERSION, Manifest, SnapshotStore, workload_hex};
use crate::spec;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh id with `prefix`, unique on this node.
pub fn new_id(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{ms:x}-{:x}{:04x}",
        std::process::id() & 0xffff,
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

fn now_ms() -> u64 {
    form_runtime::clock::unix_ms()
}

/// The wire form of an instance.
pub fn to_pb(i: &InstanceInfo, node_id: &str, backend: &str) -> pb::Instance {
    pb::Instance {
        instance_id: i.spec.instance_id.clone(),
        cluster_id: i.spec.cluster_id.clone(),
        node_id: node_id.to_owned(),
        status: match i.status {
            Status::Starting => pb::InstanceStatus::Starting,
            Status::Running => pb::InstanceStatus::Running,
            Status::Paused => pb::InstanceStatus::Paused,
            Status::Stopped => pb::InstanceStatus::Stopped,
            Status::Failed => pb::InstanceStatus::Failed,
        } as i32,
        workload: Some(form_proto::redact_env(i.spec.workload.clone())),
        address: i.address.to_string(),
        admin_address: i.admin_address.map(|a| a.to_string()).unwrap_or_default(),
        resources: Some(i.spec.resources),
        created_at_ms: i.created_at_ms,
        restored_from: i.restored_from.clone().unwrap_or_default(),
        generation: i.generation,
        backend: backend.to_owned(),
        failure: i.failure.clone().unwrap_or_default(),
        state_contract: String::new(),
    }
}

fn snapshot_pb(m: &Manifest) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        snapshot_id: m.snapshot_id.clone(),
        source_instance_id: m.source_instance_id.clone(),
        cluster_id: m.cluster_id.clone(),
        backend: m.backend.clone(),
        created_at_ms: m.created_at_ms,
        size_bytes: m.size_bytes(),
        files: m
            .files
            .iter()
            .map(|f| pb::SnapshotFile {
                path: f.path.clone(),
                size_bytes: f.size_bytes,
                sha256: f.sha256.clone(),
            })
            .collect(),
        generation: m.generation,
        state_cursor: m.state_cursor.clone(),
    }
}

/// The VmmService of one node.
#[derive(Debug)]
pub struct VmmApi<H> {
    hv: Arc<H>,
    snapshots: SnapshotStore,
    node_id: String,
    /// One lifecycle operation at a time per instance (a pause during a snapshot would
    /// otherwise be undone by the snapshot's resume).
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Which workloads implement the state contract.
    contracts: Arc<Contracts>,
    /// What this node agrees to run.
    allowed: crate::allow::Allowed,
    /// Limits of snapshot transfers between nodes.
    transfer: Arc<crate::transfer::Settings>,
    /// The highest fence seen per cluster (docs/fencing.md).
    fences: Arc<form_runtime::fence::Fences>,
}

impl<H: Hypervisor> VmmApi<H> {
    /// The service over `hv`.
    pub fn new(
        hv: Arc<H>,
        snapshots: SnapshotStore,
        node_id: String,
        allowed: crate::allow::Allowed,
    ) -> Self {
        Self {
            hv,
            snapshots,
            node_id,
            locks: Default::default(),
            contracts: Default::default(),
            allowed,
            transfer: Default::default(),
            fences: Default::default(),
        }
    }

    /// What the service learned of its instances' state contract (the heartbeats
    /// report it into form-state).
    pub fn contracts(&self) -> Arc<Contracts> {
        self.contracts.clone()
    }

    /// The service with these fences (kept in a file by the node).
    pub fn with_fences(mut self, f: form_runtime::fence::Fences) -> Self {
        self.fences = Arc::new(f);
        self
    }

    /// Checks the fence `req` carries for the cluster of instance `id` (an instance
    /// that does not exist: the call answers that itself).
    async fn fenced<T>(&self, req: &Request<T>, id: &str) -> std::result::Result<(), GrpcStatus> {
        let Some(f) = Fence::of(req)? else {
            return Ok(());
        };
        match self.hv.get(id).await {
            Ok(i) => self.fences.check(&i.spec.cluster_id, Some(&f)),
            Err(VmmError::NotFound { .. }) if spec::id("instance_id", id).is_ok() => {
                self.fences.saw_absent(id, &f)
            }
            Err(_) => Ok(()),
        }
    }

    /// Checks the fence `req` carries for `cluster`.
    fn fenced_cluster<T>(
        &self,
        req: &Request<T>,
        cluster: &str,
    ) -> std::result::Result<(), GrpcStatus> {
        self.fences.check(cluster, Fence::of(req)?.as_ref())
    }

    /// Checks the fence `req` carries for the cluster of snapshot `id`.
    fn fenced_snapshot<T>(
        &self,
        req: &Request<T>,
        id: &str,
    ) -> std::result::Result<(), GrpcStatus> {
        match self.snapshots.manifest(id) {
            Ok(m) => self.fenced_cluster(req, &m.cluster_id),
            Err(VmmError::NotFound { .. }) if spec::id("snapshot_id", id).is_ok() => {
                match Fence::of(req)? {
                    Some(f) => self.fences.saw_absent(id, &f),
                    None => Ok(()),
                }
            }
            Err(_) => Ok(()),
        }
    }

    /// The service with these transfer limits.
    pub fn with_transfer(mut self, t: crate::transfer::Settings) -> Self {
        self.transfer = Arc::new(t);
        self
    }

    /// Waits for instance `id`'s lifecycle lock.
    async fn lifecycle(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn out(&self, i: &InstanceInfo) -> Response<pb::Instance> {
        Response::new(self.instance_pb(i))
    }

    fn instance_pb(&self, i: &InstanceInfo) -> pb::Instance {
        let mut out = to_pb(i, &self.node_id, self.hv.name());
        if let Some(c) = self.contracts.get(&i.spec.instance_id) {
            out.state_contract = c.name();
        }
        out
    }

    /// Learns whether a new instance's workload implements the state contract.
    async fn learn_contract(&self, i: &InstanceInfo) {
        if i.status == Status::Running {
            let c = self
                .contracts
                .probe(&i.spec.instance_id, i.admin_address)
                .await;
            tracing::debug!(instance = %i.spec.instance_id, contract = ?c.map(|c| c.name()), "state contract");
        }
    }

    /// The admin address of a running instance, for the state contract.
    async fn contract_target(
        &self,
        id: &str,
    ) -> std::result::Result<Option<std::net::SocketAddr>, VmmError> {
        spec::id("instance_id", id)?;
        let i = self.hv.get(id).await?;
        if !matches!(i.status, Status::Running | Status::Paused) {
            return Err(VmmError::FailedPrecondition(format!(
                "instance {id} is {:?}; the state of an instance that does not run cannot be read or merged",
                i.status
            )));
        }
        Ok(i.admin_address)
    }
}

type Result<T> = std::result::Result<Response<T>, GrpcStatus>;

fn instance_ref(r: Request<pb::InstanceRef>) -> std::result::Result<String, VmmError> {
    let id = r.into_inner().instance_id;
    spec::id("instance_id", &id)?;
    Ok(id)
}

#[tonic::async_trait]
impl<H: Hypervisor> VmmService for VmmApi<H> {
    async fn create_instance(
        &self,
        req: Request<pb::CreateInstanceRequest>,
    ) -> Result<pb::Instance> {
        self.fenced_cluster(&req, &req.get_ref().cluster_id)?;
        let fence = Fence::of(&req)?;
        let r = req.into_inner();
        let instance_id = if r.instance_id.is_empty() {
            new_id("i")
        } else {
            r.instance_id
        };
        spec::id("instance_id", &instance_id)?;
        // Under the instance's lock: a delete sent meanwhile waits for the instance
        // and deletes it, and one that came first is seen by the check.
        let _guard = self.lifecycle(&instance_id).await;
        self.fences.check_absent(&instance_id, fence.as_ref())?;
        spec::id("cluster_id", &r.cluster_id)?;
        let workload = spec::workload(r.workload.as_ref())?;
        self.allowed.check(&workload)?;
        let s = InstanceSpec {
            instance_id,
            cluster_id: r.cluster_id,
            workload,
            resources: spec::resources("resources", r.resources.as_ref())?,
        };
        let info = self.hv.create(s).await?;
        metrics::counter!("form_vmm_instances_created_total").increment(1);
        self.learn_contract(&info).await;
        Ok(self.out(&info))
    }

    async fn get_instance(&self, req: Request<pb::InstanceRef>) -> Result<pb::Instance> {
        let info = self.hv.get(&instance_ref(req)?).await?;
        Ok(self.out(&info))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<pb::ListInstancesReply> {
        let cluster = req.into_inner().cluster_id;
        let mut instances: Vec<pb::Instance> = self
            .hv
            .list()
            .await
            .iter()
            .filter(|i| cluster.is_empty() || i.spec.cluster_id == cluster)
            .map(|i| self.instance_pb(i))
            .collect();
        instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(Response::new(pb::ListInstancesReply { instances }))
    }

    async fn pause(&self, req: Request<pb::InstanceRef>) -> Result<pb::Instance> {
        self.fenced(&req, &req.get_ref().instance_id).await?;
        let id = instance_ref(req)?;
        let _guard = self.lifecycle(&id).await;
        let info = self.hv.pause(&id).await?;
        Ok(self.out(&info))
    }

    async fn resume(&self, req: Request<pb::InstanceRef>) -> Result<pb::Instance> {
        self.fenced(&req, &req.get_ref().instance_id).await?;
        let id = instance_ref(req)?;
        let _guard = self.lifecycle(&id).await;
        let info = self.hv.resume(&id).await?;
        Ok(self.out(&info))
    }

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<pb::SnapshotInfo> {
        self.fenced(&req, &req.get_ref().instance_id).await?;
        let r = req.into_inner();
        spec::id("instance_id", &r.instance_id)?;
        let guard = self.lifecycle(&r.instance_id).await;
        let source = self.hv.get(&r.instance_id).await?;
        let started = std::time::Instant::now();
        let (hv, store) = (self.hv.clone(), self.snapshots.clone());
        let contracts = self.contracts.clone();
        // A task of its own: a client that goes away must not cancel the snapshot half
        // way (with its instance stopped); hashing and copying run off the async workers.
        let task = tokio::spawn(async move {
            let _guard = guard;
            // Read before the snapshot: every change after this cursor may be missing
            // from it, so a sync from here misses nothing (a change both in the
            // snapshot and after the cursor merges twice, which changes nothing).
            let state_cursor = contract::cursor(&contracts, &r.instance_id, source.admin_address)
                .await?
                .unwrap_or_default();
            let snapshot_id = new_id("snap");
            let dir = store.create_dir(&snapshot_id)?;
            let taken = match hv.snapshot(&r.instance_id, &dir).await {
                Ok(t) => t,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            };
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                snapshot_id,
                backend: hv.name().to_owned(),
                source_instance_id: r.instance_id.clone(),
                cluster_id: source.spec.cluster_id.clone(),
                generation: source.generation,
                workload: workload_hex(&source.spec.workload),
                vcpus: source.spec.resources.vcpus,
                memory_mib: source.spec.resources.memory_mib,
                machine_args: taken.machine_args,
                created_at_ms: now_ms(),
                files: Vec::new(),
                state_cursor,
            };
            let digests = taken.digests;
            let sealed = form_runtime::clock::blocking(move || store.seal(manifest, &digests))
                .await
                .map_err(|e| VmmError::Backend(e.to_string()))?;
            let manifest = match sealed {
                Ok(m) => m,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            };
            if r.resume == Some(false) {
                hv.pause(&r.instance_id).await?;
            }
            Ok(manifest)
        });
        let manifest = task.await.map_err(|e| VmmError::Backend(e.to_string()))??;
        metrics::histogram!("form_vmm_snapshot_seconds").record(started.elapsed().as_secs_f64());
        Ok(Response::new(snapshot_pb(&manifest)))
    }

    async fn clone(&self, req: Request<pb::CloneRequest>) -> Result<pb::Instance> {
        self.fenced_snapshot(&req, &req.get_ref().snapshot_id)?;
        let fence = Fence::of(&req)?;
        let r = req.into_inner();
        spec::id("snapshot_id", &r.snapshot_id)?;
        let instance_id = if r.instance_id.is_empty() {
            new_id("i")
        } else {
            r.instance_id
        };
        spec::id("instance_id", &instance_id)?;
        // Held by the task until the clone exists: a delete of the new id sent while the
        // clone runs (a caller that gave up and rolls back) waits, then deletes it,
        // instead of finding nothing and leaving the clone behind.
        let guard = self.lifecycle(&instance_id).await;
        self.fences.check_absent(&instance_id, fence.as_ref())?;
        let started = std::time::Instant::now();
        let (hv, store) = (self.hv.clone(), self.snapshots.clone());
        let requested = r.resources;
        let task = tokio::spawn(async move {
            let _guard = guard;
            let id = r.snapshot_id.clone();
            let verify_store = store.clone();
            let manifest = form_runtime::clock::blocking(move || verify_store.verify(&id))
                .await
                .map_err(|e| VmmError::Backend(e.to_string()))??;
            // Unset resources keep the source's.
            let source = types::Resources {
                vcpus: manifest.vcpus.max(1),
                memory_mib: manifest.memory_mib.max(16),
            };
            let resources =
                spec::resources("resources", Some(requested.as_ref().unwrap_or(&source)))?;
            let s = InstanceSpec {
                instance_id,
                cluster_id: manifest.cluster_id.clone(),
                workload: Default::default(),
                resources,
            };
            hv.clone_instance(&manifest, &store.dir(&r.snapshot_id), s)
                .await
        });
        let info = task.await.map_err(|e| VmmError::Backend(e.to_string()))??;
        metrics::histogram!("form_vmm_clone_seconds").record(started.elapsed().as_secs_f64());
        self.learn_contract(&info).await;
        Ok(self.out(&info))
    }

    async fn resize(&self, req: Request<pb::ResizeRequest>) -> Result<pb::ResizeReply> {
        self.fenced(&req, &req.get_ref().instance_id).await?;
        let r = req.into_inner();
        spec::id("instance_id", &r.instance_id)?;
        let res = r
            .resources
            .as_ref()
            .ok_or_else(|| VmmError::invalid("resources", "is missing"))?;
        let res = spec::resources("resources", Some(res))?;
        let _guard = self.lifecycle(&r.instance_id).await;
        let out = self.hv.resize(&r.instance_id, res).await?;
        Ok(Response::new(pb::ResizeReply {
            instance: Some(self.instance_pb(&out.info)),
            enforced: out.enforced,
            message: out.message,
        }))
    }

    async fn delete_instance(
        &self,
        req: Request<pb::InstanceRef>,
    ) -> Result<pb::DeleteInstanceReply> {
        self.fenced(&req, &req.get_ref().instance_id).await?;
        let id = instance_ref(req)?;
        let guard = self.lifecycle(&id).await;
        let deleted = self.hv.delete(&id).await?;
        drop(guard);
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        self.contracts.forget(&id);
        if !deleted {
            return Err(VmmError::NotFound {
                what: "instance",
                id,
            }
            .into());
        }
        Ok(Response::new(pb::DeleteInstanceReply { deleted: true }))
    }

    async fn get_stats(&self, req: Request<pb::InstanceRef>) -> Result<pb::InstanceStats> {
        let id = instance_ref(req)?;
        let info = self.hv.get(&id).await?;
        let u = self.hv.stats(&id, Window::Api).await?;
        Ok(Response::new(pb::InstanceStats {
            instance_id: id,
            status: to_pb(&info, &self.node_id, self.hv.name()).status,
            cpu_utilization: u.cpu_utilization,
            memory_bytes: u.memory_bytes,
            uptime_seconds: u.uptime_seconds,
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<pb::ListSnapshotsReply> {
        let source = req.into_inner().source_instance_id;
        let snapshots = self
            .snapshots
            .list()?
            .iter()
            .filter(|m| source.is_empty() || m.source_instance_id == source)
            .map(snapshot_pb)
            .collect();
        Ok(Response::new(pb::ListSnapshotsReply { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<pb::DeleteSnapshotReply> {
        // After a pull of it that runs (so a pull a stale run started is deleted once
        // it lands, and one that comes later finds the absence recorded).
        let _pull = self
            .lifecycle(&format!("pull/{}", req.get_ref().snapshot_id))
            .await;
        self.fenced_snapshot(&req, &req.get_ref().snapshot_id)?;
        let id = req.into_inner().snapshot_id;
        spec::id("snapshot_id", &id)?;
        let freed_bytes = self.snapshots.delete(&id);
        self.hv.snapshot_deleted(&self.snapshots.dir(&id));
        drop(_pull);
        // The lock of a snapshot that is gone is dropped, as an instance's is.
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&format!("pull/{id}"));
        let freed_bytes = freed_bytes?;
        Ok(Response::new(pb::DeleteSnapshotReply {
            deleted: true,
            freed_bytes,
        }))
    }

    async fn read_changes(&self, req: Request<pb::ReadChangesRequest>) -> Result<pb::ChangeBatch> {
        let r = req.into_inner();
        let admin = self.contract_target(&r.instance_id).await?;
        let batch = contract::read(
            &self.contracts,
            &r.instance_id,
            admin,
            &r.since,
            r.max_bytes,
            r.own,
            &r.prefixes,
        )
        .await?;
        metrics::counter!("form_vmm_state_changes_read_total").increment(batch.changes);
        Ok(Response::new(batch))
    }

    async fn copy_changes(
        &self,
        req: Request<pb::CopyChangesRequest>,
    ) -> Result<pb::CopyChangesReply> {
        for id in &req.get_ref().to_instance_ids {
            self.fenced(&req, id).await?;
        }
        let r = req.into_inner();
        let from = (
            r.from_instance_id.clone(),
            self.contract_target(&r.from_instance_id).await?,
        );
        let mut to = Vec::new();
        for id in &r.to_instance_ids {
            let admin = self
                .contract_target(id)
                .await
                .map_err(|e| VmmError::MergeFailed(format!("merging into {id}: {e}")))?;
            to.push((id.clone(), admin));
        }
        let reply = contract::copy(
            self.contracts.clone(),
            from,
            to,
            r.since,
            r.max_bytes,
            r.own,
            r.prefixes,
        )
        .await?;
        metrics::counter!("form_vmm_state_changes_read_total").increment(reply.changes);
        Ok(Response::new(reply))
    }

    type ReadSnapshotStream = crate::transfer::ChunkStream;

    async fn read_snapshot(
        &self,
        req: Request<pb::ReadSnapshotRequest>,
    ) -> Result<Self::ReadSnapshotStream> {
        let stream =
            crate::transfer::serve(&self.snapshots, self.transfer.clone(), req.into_inner())?;
        Ok(Response::new(stream))
    }

    async fn pull_snapshot(
        &self,
        req: Request<pb::PullSnapshotRequest>,
    ) -> Result<pb::PullSnapshotReply> {
        let fence = Fence::of(&req)?;
        let r = req.into_inner();
        spec::id("snapshot_id", &r.snapshot_id)?;
        // One pull of a snapshot at a time (two clones on this node need it once);
        // "pull/" is not an id, so no instance shares the lock. A delete of the
        // snapshot takes it too.
        let _one = self.lifecycle(&format!("pull/{}", r.snapshot_id)).await;
        self.fences.check_absent(&r.snapshot_id, fence.as_ref())?;
        let started = std::time::Instant::now();
        let (m, mut reply) = crate::transfer::pull(&self.snapshots, &self.transfer, r).await?;
        if !reply.already_present {
            metrics::histogram!("form_vmm_pull_seconds").record(started.elapsed().as_secs_f64());
            metrics::counter!("form_vmm_pull_bytes_total").increment(reply.bytes_received);
        }
        reply.snapshot = Some(snapshot_pb(&m));
        Ok(Response::new(reply))
    }

    async fn merge_changes(
        &self,
        req: Request<pb::MergeChangesRequest>,
    ) -> Result<pb::MergeChangesReply> {
        self.fenced(&req, &req.get_ref().instance_id).await?;
        let r = req.into_inner();
        let admin = self.contract_target(&r.instance_id).await?;
        let reply = contract::merge(&self.contracts, &r.instance_id, admin, &r.batch).await?;
        metrics::counter!("form_vmm_state_changes_merged_total").increment(reply.applied);
        Ok(Response::new(reply))
    }
}
