//! The `Hypervisor` trait: what every backend does to instances, and the types it
//! speaks. Contract: ids are unique per node; every method but `create`/`clone_instance`
//! on an unknown id fails with `NotFound`; `delete` leaves no process, socket or
//! temporary file behind; a snapshot written by `snapshot` can be cloned any number
//! of times, each clone with its own identity.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use form_proto::types::v1 as types;

use crate::error::VmmError;
use crate::snapshots::Manifest;

/// Lifecycle of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Started, not yet serving.
    Starting,
    /// Serving.
    Running,
    /// Frozen.
    Paused,
    /// Stopped on request.
    Stopped,
    /// Exited on its own or failed to start.
    Failed,
}

/// A validated request for a new instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Unique id.
    pub instance_id: String,
    /// Cluster it belongs to.
    pub cluster_id: String,
    /// What it runs.
    pub workload: types::Workload,
    /// Its resources.
    pub resources: types::Resources,
}

/// What the backend knows of an instance.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// The spec it was made from.
    pub spec: InstanceSpec,
    /// Status.
    pub status: Status,
    /// Where it serves.
    pub address: SocketAddr,
    /// Where its snapshot hook listens.
    pub admin_address: Option<SocketAddr>,
    /// Milliseconds since the Unix epoch when it started.
    pub created_at_ms: u64,
    /// Snapshot it was cloned from.
    pub restored_from: Option<String>,
    /// 0 for a fresh instance, parent + 1 for a clone.
    pub generation: u64,
    /// Why it failed: exit status and the end of its stderr.
    pub failure: Option<String>,
}

/// Who asks for usage: each has its own CPU sampling window, so a `GetStats` call does
/// not shorten the heartbeat's window (or the reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `GetStats` callers.
    Api = 0,
    /// The heartbeat loop.
    Heartbeat = 1,
}

/// Usage of an instance.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU utilisation since the last sample, per vCPU: 1.0 is every vCPU busy; above
    /// 1.0 when the instance uses more cores than its vCPUs (limits not enforced).
    pub cpu_utilization: f64,
    /// Resident memory in bytes.
    pub memory_bytes: u64,
    /// Seconds since start.
    pub uptime_seconds: f64,
}

/// What a snapshot recorded about its source, for the manifest.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    /// Arguments needed to restore the machine (qemu); empty otherwise.
    pub machine_args: Vec<String>,
    /// SHA-256 (hex) of files the backend hashed while writing them, by relative path,
    /// so sealing the snapshot need not read them again.
    pub digests: Vec<(String, String)>,
}

/// The outcome of a resize.
#[derive(Debug, Clone)]
pub struct Resized {
    /// The instance afterwards.
    pub info: InstanceInfo,
    /// Whether the backend enforces the new limits.
    pub enforced: bool,
    /// What was and was not applied.
    pub message: String,
}

/// A backend that runs instances.
pub trait Hypervisor: Send + Sync + 'static {
    /// Backend name (`process`, `qemu`).
    fn name(&self) -> &'static str;
    /// Lets go of what it keeps of the snapshot in `dir`, which is deleted (the qemu
    /// backend's sealed memory of it); nothing by default.
    fn snapshot_deleted(&self, _dir: &std::path::Path) {}
    /// Starts an instance; returns once it serves or has failed.
    fn create(
        &self,
        spec: InstanceSpec,
    ) -> impl Future<Output = Result<InstanceInfo, VmmError>> + Send;
    /// One instance.
    fn get(&self, id: &str) -> impl Future<Output = Result<InstanceInfo, VmmError>> + Send;
    /// Every instance.
    fn list(&self) -> impl Future<Output = Vec<InstanceInfo>> + Send;
    /// Freezes an instance.
    fn pause(&self, id: &str) -> impl Future<Output = Result<InstanceInfo, VmmError>> + Send;
    /// Thaws an instance.
    fn resume(&self, id: &str) -> impl Future<Output = Result<InstanceInfo, VmmError>> + Send;
    /// Writes the instance's state into `dir`; the instance keeps running afterwards.
    fn snapshot(
        &self,
        id: &str,
        dir: &Path,
    ) -> impl Future<Output = Result<Taken, VmmError>> + Send;
    /// Starts a new instance from the snapshot in `dir` with a new identity.
    fn clone_instance(
        &self,
        manifest: &Manifest,
        dir: &Path,
        spec: InstanceSpec,
    ) -> impl Future<Output = Result<InstanceInfo, VmmError>> + Send;
    /// Changes vCPUs and memory.
    fn resize(
        &self,
        id: &str,
        resources: types::Resources,
    ) -> impl Future<Output = Result<Resized, VmmError>> + Send;
    /// Stops an instance and removes everything it left; false if it did not exist.
    fn delete(&self, id: &str) -> impl Future<Output = Result<bool, VmmError>> + Send;
    /// Usage of an instance since the last call of the same `window`.
    fn stats(
        &self,
        id: &str,
        window: Window,
    ) -> impl Future<Output = Result<Usage, VmmError>> + Send;

    /// Deletes every instance (service shutdown).
    fn delete_all(&self) -> impl Future<Output = ()> + Send {
        async {
            for i in self.list().await {
                if let Err(e) = self.delete(&i.spec.instance_id).await {
                    tracing::warn!(instance = %i.spec.instance_id, error = %e, "cannot delete instance at shutdown");
                }
            }
        }
    }
}
