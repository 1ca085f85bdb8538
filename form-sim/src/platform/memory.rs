//! The simulated fleet's backend: instances without a workload. An instance is a
//! record that is running the moment it is made (and whose size is what its record
//! says: a resize changes the record); a snapshot writes the source's
//! record into the snapshot directory (hashed and sealed by the node's real snapshot
//! store, as every backend's files are); a clone reads it back from the sealed
//! snapshot. Everything around it (the node's gRPC service, fences, the snapshot
//! store, the controller, form-state) is the real thing, so what a scale-out costs on
//! this backend is what the platform adds to a backend's own work.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;

use form_proto::types::v1 as types;
use form_vmm_service::error::VmmError;
use form_vmm_service::hypervisor::{
    Hypervisor, InstanceInfo, InstanceSpec, Resized, Status, Taken, Usage, Window,
};
use form_vmm_service::node::Record;
use form_vmm_service::snapshots::Manifest;

/// The record of a node over this backend, `id` at `address`: room for 256 vCPUs,
/// 512 GiB and 500 instances, backend `simulated`.
pub fn record(id: String, address: String) -> Record {
    Record::of(
        id,
        address,
        form_proto::state::v1::NodeCapacity {
            vcpus: 256,
            memory_mib: 512 * 1024,
            instance_slots: 500,
        },
        Default::default(),
        "simulated".into(),
    )
}

/// A node's instances, in memory.
#[derive(Debug, Default)]
pub struct Memory {
    instances: Mutex<BTreeMap<String, InstanceInfo>>,
}

/// Where every simulated instance "serves" (nothing listens: the fleet's clusters
/// have no health path, and no balancer routes to them).
const NOWHERE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InstanceInfo>> {
        self.instances
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut InstanceInfo) -> Result<T, VmmError>,
    ) -> Result<T, VmmError> {
        match self.lock().get_mut(id) {
            Some(i) => f(i),
            None => Err(VmmError::NotFound {
                what: "instance",
                id: id.to_owned(),
            }),
        }
    }

    fn start(
        &self,
        spec: InstanceSpec,
        restored_from: Option<String>,
        generation: u64,
    ) -> Result<InstanceInfo, VmmError> {
        let mut all = self.lock();
        if all.contains_key(&spec.instance_id) {
            return Err(VmmError::FailedPrecondition(format!(
                "instance {} already exists",
                spec.instance_id
            )));
        }
        let info = InstanceInfo {
            status: Status::Running,
            address: NOWHERE,
            admin_address: None,
            created_at_ms: form_scaler::ops::record::now_ms(),
            restored_from,
            generation,
            failure: None,
            spec,
        };
        all.insert(info.spec.instance_id.clone(), info.clone());
        Ok(info)
    }
}

impl Hypervisor for Memory {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceInfo, VmmError> {
        self.start(spec, None, 0)
    }

    async fn get(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.with(id, |i| Ok(i.clone()))
    }

    async fn list(&self) -> Vec<InstanceInfo> {
        self.lock().values().cloned().collect()
    }

    async fn pause(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.with(id, |i| {
            i.status = Status::Paused;
            Ok(i.clone())
        })
    }

    async fn resume(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.with(id, |i| {
            i.status = Status::Running;
            Ok(i.clone())
        })
    }

    async fn snapshot(&self, id: &str, dir: &Path) -> Result<Taken, VmmError> {
        let record = self.with(id, |i| {
            if i.status != Status::Running {
                return Err(VmmError::FailedPrecondition(format!(
                    "instance {id} is {:?}; only a running instance can be snapshotted",
                    i.status
                )));
            }
            Ok(format!(
                "{} generation {}\n",
                i.spec.instance_id, i.generation
            ))
        })?;
        let path = dir.join("instance");
        std::fs::write(&path, record)
            .map_err(VmmError::io(format!("writing {}", path.display())))?;
        Ok(Taken::default())
    }

    async fn clone_instance(
        &self,
        manifest: &Manifest,
        dir: &Path,
        spec: InstanceSpec,
    ) -> Result<InstanceInfo, VmmError> {
        let path = dir.join("instance");
        std::fs::read(&path).map_err(VmmError::io(format!("reading {}", path.display())))?;
        let spec = InstanceSpec {
            cluster_id: manifest.cluster_id.clone(),
            ..spec
        };
        self.start(
            spec,
            Some(manifest.snapshot_id.clone()),
            manifest.generation + 1,
        )
    }

    async fn resize(&self, id: &str, resources: types::Resources) -> Result<Resized, VmmError> {
        self.with(id, |i| {
            i.spec.resources = resources;
            Ok(Resized {
                info: i.clone(),
                // A simulated instance is its record: what it has is what the record
                // says, so the new size is all there is to apply.
                enforced: true,
                message: "the simulated instance's record has the new resources".into(),
            })
        })
    }

    async fn delete(&self, id: &str) -> Result<bool, VmmError> {
        Ok(self.lock().remove(id).is_some())
    }

    async fn stats(&self, id: &str, _: Window) -> Result<Usage, VmmError> {
        self.with(id, |_| Ok(Usage::default()))
    }
}
