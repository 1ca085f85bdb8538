//! The `qemu` backend: each instance is a QEMU VM (Debian's kernel and an initramfs
//! with busybox and the workload, built by `deploy/guest/build.sh`), driven over QMP.
//!
//! ```text
//! create:   qemu <machine args> -qmp unix:… -serial file:… -netdev user,hostfwd=… ; wait for HTTP
//! snapshot: QMP stop; getfd (a pipe); migrate fd:…, a thread writes memory.bin and
//!           hashes it; wait completed; copy the RAM file to memory.ram; cont
//! clone:    qemu <the snapshot's machine args> … -incoming defer; getfd (memory.bin);
//!           migrate-incoming fd:…; cont; POST /_form/identity (new id, generation, seed)
//! ```
//!
//! With `--qemu-memory file`, a VM's RAM is a file (`memory-backend-file`, machine
//! option `memory-backend=ram0`): its own file on tmpfs, shared with QEMU, for a VM
//! that booted or was restored from a whole stream; a snapshot of it migrates the
//! device state only (`x-ignore-shared`) and copies the file's data (`memory.ram`,
//! holes skipped, [`crate::ramfile`]). A clone of such a snapshot maps it privately
//! from a sealed memfd (copy-on-write, shared with its siblings), so loading it does
//! not grow with its memory. A snapshot of such a clone (its RAM is not a file of its
//! own) is a whole stream. The default, `stream`, keeps anonymous memory and whole
//! streams. docs/vmm.md gives the measures of both.
//!
//! The host port forwards belong to the QEMU that runs, not to the snapshot: every clone
//! gets its own ports. The guest's workload listens on 8080 and its admin endpoint on 8081.
//! Resize in place by hot-plug of vCPUs and DIMMs and the balloon, within the room a VM
//! is started with (`shape.rs`, `resize.rs`).

mod qmp;
mod ram;
mod resize;
mod shape;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use form_proto::types::v1 as types;
use nix::sys::signal::Signal;
use tokio::sync::watch;

use self::qmp::Qmp;
use self::ram::{RAM_BACKEND, RAM_FILE, Ram, ignore_shared, new_ram_file, ram_dir};
use self::shape::Shape;
use crate::error::VmmError;
use crate::hypervisor::{
    Hypervisor, InstanceInfo, InstanceSpec, Resized, Status, Taken, Usage, Window,
};
use crate::snapshots::Manifest;
use crate::supervise::{
    Table, claim_dir, instance_addrs, now_ms, reap, serial, signal_group, tail,
};

/// Guest port of the workload when its `port` is 0.
const GUEST_PORT: u16 = 8080;
/// Guest port of the workload's admin endpoint.
const GUEST_ADMIN_PORT: u16 = 8081;
/// Smallest guest memory that boots the guest.
const MIN_MEMORY_MIB: u64 = 96;
/// Time QEMU gets to quit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Name of the migration stream in a snapshot (the device state only when the snapshot
/// has a RAM file).
const MEMORY_FILE: &str = "memory.bin";
/// Acceleration of the guests.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where it can run a stock guest kernel, else TCG.
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// What `auto` means on this machine: KVM when `/dev/kvm` is usable and not the
    /// paravirtual `kvm_pvm` (which cannot run a stock kernel), else TCG.
    pub fn resolve(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => {
                let pvm = Path::new("/sys/module/kvm_pvm").exists();
                let kvm = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if kvm && !pvm { "kvm" } else { "tcg" }
            }
        }
    }
}

/// How a VM's memory is kept and snapshotted (docs/vmm.md).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Memory {
    /// Anonymous memory; a snapshot is a migration stream of all of it, which a clone
    /// loads before it runs.
    Stream,
    /// A file on tmpfs; a snapshot migrates the device state and copies the file's
    /// data; clones map that copy copy-on-write and share its pages.
    File,
}

/// The guest image.
#[derive(Debug, Clone)]
pub struct Guest {
    /// `vmlinux` (PVH) or `vmlinuz`.
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz`.
    pub initrd: PathBuf,
}

/// The room a VM is started with for resizes in place (raised to its size where that
/// is larger).
#[derive(Debug, Clone, Copy)]
pub struct Room {
    /// vCPUs it can be given by hot-plug.
    pub max_vcpus: u32,
    /// Memory it can be given by hot-plug, MiB.
    pub max_memory_mib: u64,
}

impl Guest {
    /// The guest in `dir` (as `deploy/guest/build.sh` writes it).
    pub fn in_dir(dir: &Path) -> Result<Self, VmmError> {
        let kernel = ["vmlinux", "vmlinuz"]
            .iter()
            .map(|k| dir.join(k))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                VmmError::invalid(
                    "guest_dir",
                    format!(
                        "{} holds no vmlinux or vmlinuz; build it with deploy/guest/build.sh",
                        dir.display()
                    ),
                )
            })?;
        let initrd = dir.join("initramfs.cpio.gz");
        if !initrd.is_file() {
            return Err(VmmError::invalid(
                "guest_dir",
                format!(
                    "{} is missing; build it with deploy/guest/build.sh",
                    initrd.display()
                ),
            ));
        }
        Ok(Self { kernel, initrd })
    }
}

#[derive(Debug)]
struct Vm {
    info: InstanceInfo,
    serial: u64,
    pid: u32,
    dir: PathBuf,
    /// Machine arguments other than the shape.
    base_args: Vec<String>,
    shape: Shape,
    /// Its RAM file when it is its own (copied by a snapshot, deleted with the VM).
    ram: Option<PathBuf>,
    /// The sealed memory it maps, held while it runs.
    _mapped: Option<Arc<OwnedFd>>,
    exit: watch::Receiver<Option<String>>,
    started: Instant,
    cpu: [crate::procfs::CpuSampler; 2],
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Where the RAM files of VMs live (tmpfs where there is one).
    ram_dir: PathBuf,
    /// How the VMs it boots keep their memory.
    memory: Memory,
    /// Snapshots' RAM loaded into sealed memfds, by the path of their `memory.ram`
    /// and when that file last changed,
    /// the most recent last (at most [`SEALED_KEPT`]).
    sealed: ram::SealedKept,
    host: IpAddr,
    accel: &'static str,
    guest: Guest,
    room: Room,
    ready_timeout: Duration,
    vms: Table<Vm>,
}

/// Instances as QEMU virtual machines.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    inner: Arc<Inner>,
}

impl QemuBackend {
    /// A backend keeping VM directories under `root`.
    pub fn new(
        root: PathBuf,
        host: IpAddr,
        accel: Accel,
        guest: Guest,
        room: Room,
        ready_timeout: Duration,
    ) -> Result<Self, VmmError> {
        std::fs::create_dir_all(&root)
            .map_err(VmmError::io(format!("creating {}", root.display())))?;
        let ram_dir = ram_dir(&root);
        // A backend starts knowing no VM: RAM files a killed service left are nobody's
        // (a QEMU still running keeps its mapping; the memory goes with it).
        if let Ok(entries) = std::fs::read_dir(&ram_dir) {
            for e in entries.flatten() {
                if crate::ramfile::is_ram(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let accel = accel.resolve();
        tracing::info!(accel, kernel = %guest.kernel.display(), ram = %ram_dir.display(), "qemu backend");
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                ram_dir,
                memory: Memory::Stream,
                sealed: Default::default(),
                host,
                accel,
                guest,
                room,
                ready_timeout,
                vms: Table::new(),
            }),
        })
    }

    /// The same backend, booting VMs with their memory kept as `memory` says (clones
    /// follow their snapshot). Call before any VM runs.
    pub fn with_memory(mut self, memory: Memory) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.memory = memory;
        }
        self
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vm>> {
        self.inner.vms.lock()
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Vm) -> Result<T, VmmError>,
    ) -> Result<T, VmmError> {
        self.inner.vms.with(id, f)
    }

    /// The arguments that define the machine (the same for a snapshot and its clones),
    /// apart from its shape.
    fn machine_args(&self, spec: &InstanceSpec) -> Vec<String> {
        [
            "-M",
            "pc",
            "-accel",
            self.inner.accel,
            "-cpu",
            "max",
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-kernel",
            &self.inner.guest.kernel.display().to_string(),
            "-initrd",
            &self.inner.guest.initrd.display().to_string(),
            // Hot-pluggable memory lies above 4 GiB: the kernel would then take 64 MiB
            // of a small guest for DMA bounce buffers (`swiotlb`); 1 MiB is plenty for
            // virtio. Hot-added memory is onlined by the kernel itself.
            "-append",
            &format!(
                "console=ttyS0 quiet panic=-1 memhp_default_state=online swiotlb=512 form.instance={} form.port={}",
                spec.instance_id,
                guest_port(&spec.workload)
            ),
            "-device",
            "virtio-net-pci,netdev=n0",
            "-device",
            "virtio-balloon-pci,id=balloon0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Starts QEMU for `spec` with `machine_args`; with `incoming`, it waits for a
    /// migration stream instead of booting.
    async fn launch(
        &self,
        spec: InstanceSpec,
        (base_args, shape): (Vec<String>, Shape),
        ram: Ram,
        incoming: Option<(&Path, String)>,
        generation: u64,
    ) -> Result<InstanceInfo, VmmError> {
        let id = spec.instance_id.clone();
        let dir = self.inner.root.join(&id);
        claim_dir(&dir, &id)?;
        let host = self.inner.host;
        let (address, admin) = instance_addrs(host, self.vms().values().map(|v| &v.info))?;
        let qmp_path = dir.join("qmp.sock");
        let mut args = base_args.clone();
        args.extend(shape.args());
        args.extend(ram.args(shape.boot_mib));
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-serial".into(),
            format!("file:{}", dir.join("console.log").display()),
            "-netdev".into(),
            format!(
                "user,id=n0,hostfwd=tcp:{host}:{}-:{},hostfwd=tcp:{host}:{}-:{GUEST_ADMIN_PORT}",
                address.port(),
                guest_port(&spec.workload),
                admin.port()
            ),
        ]);
        if incoming.is_some() {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        let stderr = std::fs::File::create(dir.join("qemu.log"))
            .map_err(VmmError::io("creating qemu.log"))?;
        // Its RAM file last, just before QEMU: nothing fails between them but the start.
        let own_ram = match &ram {
            Ram::Shared(p) => {
                if let Err(e) = new_ram_file(p, shape.boot_mib) {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                Some(p.clone())
            }
            _ => None,
        };
        let spawned = tokio::process::Command::new("qemu-system-x86_64")
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                if let Some(p) = &own_ram {
                    let _ = std::fs::remove_file(p);
                }
                return Err(VmmError::Backend(format!(
                    "cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}"
                )));
            }
        };
        let pid = child.id().unwrap_or(0);
        let serial = serial();
        let (tx, rx) = watch::channel(None);
        let info = InstanceInfo {
            spec,
            status: Status::Starting,
            address,
            admin_address: Some(admin),
            created_at_ms: now_ms(),
            restored_from: incoming.as_ref().map(|(_, s)| s.clone()),
            generation,
            failure: None,
        };
        self.vms().insert(
            id.clone(),
            Vm {
                info,
                serial,
                pid,
                dir: dir.clone(),
                base_args,
                shape,
                ram: own_ram,
                _mapped: match &ram {
                    Ram::Private(fd) => Some(fd.clone()),
                    _ => None,
                },
                exit: rx.clone(),
                started: Instant::now(),
                cpu: [crate::procfs::CpuSampler::new(); 2],
            },
        );
        let inner = self.inner.clone();
        let reaped = id.clone();
        reap(child, tx, move |what| {
            // A failure already recorded (launch error) keeps its reason.
            if let Some(vm) = inner.vms.lock().get_mut(&reaped)
                && vm.serial == serial
                && !matches!(vm.info.status, Status::Stopped | Status::Failed)
            {
                vm.info.status = Status::Failed;
                vm.info.failure = Some(format!(
                    "qemu {what}; qemu log: {}; console: {}",
                    tail(&vm.dir.join("qemu.log")),
                    tail(&vm.dir.join("console.log"))
                ));
            }
        });
        let deadline = Instant::now() + self.inner.ready_timeout;
        let result = async {
            let mut qmp = Qmp::connect(&qmp_path, deadline).await?;
            if let Some((memory, snapshot_id)) = &incoming {
                // The image goes in by file descriptor: no shell, no quoting.
                let image = std::fs::File::open(memory)
                    .map_err(VmmError::io(format!("opening {}", memory.display())))?;
                qmp.send_fd("form-restore", std::os::fd::AsRawFd::as_raw_fd(&image))
                    .await?;
                drop(image);
                if matches!(ram, Ram::Private(_)) {
                    // The stream holds the device state only; the RAM is the file.
                    ignore_shared(&mut qmp, true).await?;
                }
                qmp.execute(
                    "migrate-incoming",
                    Some(serde_json::json!({ "uri": "fd:form-restore" })),
                )
                .await?;
                wait_incoming(&mut qmp, deadline).await?;
                qmp.execute("cont", None).await?;
                // The restored guest still runs as its source: give it its identity.
                let body = serde_json::json!({
                    "instance_id": id,
                    "restored_from": snapshot_id,
                    "seed": seed()?,
                })
                .to_string();
                loop {
                    match crate::http::request(
                        admin,
                        "POST",
                        "/_form/identity",
                        body.as_bytes(),
                        Duration::from_secs(2),
                    )
                    .await
                    {
                        Ok((200, _)) => break,
                        _ if Instant::now() > deadline => {
                            return Err(VmmError::Backend(format!(
                                "the clone {id} did not take its identity in time"
                            )));
                        }
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }
            self.wait_serving(&id, rx, deadline).await
        }
        .await;
        match result {
            Ok(info) => Ok(info),
            Err(e) => {
                self.with(&id, |vm| {
                    if vm.info.status == Status::Starting {
                        vm.info.status = Status::Failed;
                        vm.info.failure = Some(format!(
                            "{e}; console: {}",
                            tail(&vm.dir.join("console.log"))
                        ));
                    }
                    Ok(())
                })?;
                signal_group(pid, Signal::SIGKILL);
                self.get(&id).await
            }
        }
    }

    async fn wait_serving(
        &self,
        id: &str,
        exit: watch::Receiver<Option<String>>,
        deadline: Instant,
    ) -> Result<InstanceInfo, VmmError> {
        let (address, health) = self.with(id, |vm| {
            let h = vm.info.spec.workload.health_path.clone();
            Ok((
                vm.info.address,
                if h.is_empty() {
                    "/healthz".to_owned()
                } else {
                    h
                },
            ))
        })?;
        loop {
            if exit.borrow().is_some() {
                tokio::task::yield_now().await;
                return self.get(id).await;
            }
            if matches!(
                crate::http::request(address, "GET", &health, b"", Duration::from_millis(500))
                    .await,
                Ok((200, _))
            ) {
                return self.with(id, |vm| {
                    vm.info.status = Status::Running;
                    Ok(vm.info.clone())
                });
            }
            if Instant::now() > deadline {
                return Err(VmmError::Backend(format!(
                    "not serving on {address} within the ready timeout"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn qmp(&self, id: &str) -> Result<Qmp, VmmError> {
        let path = self.with(id, |vm| Ok(vm.dir.join("qmp.sock")))?;
        Qmp::connect(&path, Instant::now() + Duration::from_secs(5)).await
    }
}

/// The port the workload listens on inside the guest: its `port`, or 8080.
fn guest_port(w: &types::Workload) -> u16 {
    u16::try_from(w.port)
        .ok()
        .filter(|p| *p != 0)
        .unwrap_or(GUEST_PORT)
}

/// 32 fresh random bytes from the host, hex, for a clone's entropy pool.
fn seed() -> Result<String, VmmError> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(VmmError::io("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

async fn wait_incoming(qmp: &mut Qmp, deadline: Instant) -> Result<(), VmmError> {
    loop {
        let s = qmp.execute("query-status", None).await?;
        match s["status"].as_str() {
            Some("inmigrate") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            Some("paused") | Some("postmigrate") | Some("running") | Some("prelaunch") => {
                return Ok(());
            }
            other => {
                return Err(VmmError::Backend(format!(
                    "incoming migration ended in state {other:?}"
                )));
            }
        }
    }
}

impl Hypervisor for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn snapshot_deleted(&self, dir: &Path) {
        self.forget_sealed(dir);
    }

    async fn create(&self, mut spec: InstanceSpec) -> Result<InstanceInfo, VmmError> {
        if guest_port(&spec.workload) == GUEST_ADMIN_PORT {
            return Err(VmmError::invalid(
                "workload.port",
                format!("{GUEST_ADMIN_PORT} is the guest's admin port; choose another"),
            ));
        }
        let mut args = self.machine_args(&spec);
        let room = self.inner.room;
        spec.resources.memory_mib = spec.resources.memory_mib.max(MIN_MEMORY_MIB);
        let shape = Shape::new(
            spec.resources.vcpus,
            spec.resources.memory_mib,
            room.max_vcpus,
            room.max_memory_mib,
        );
        spec.resources.vcpus = shape.vcpus;
        let ram = match self.inner.memory {
            Memory::Stream => Ram::Anonymous,
            Memory::File => {
                // Recorded in its snapshots' machine arguments: their clones' RAM is
                // the same memory backend.
                args.extend(["-machine".into(), RAM_BACKEND.into()]);
                Ram::Shared(self.ram_path(&spec.instance_id))
            }
        };
        self.launch(spec, (args, shape), ram, None, 0).await
    }

    async fn get(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.with(id, |vm| Ok(vm.info.clone()))
    }

    async fn list(&self) -> Vec<InstanceInfo> {
        self.vms().values().map(|vm| vm.info.clone()).collect()
    }

    async fn pause(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.qmp(id).await?.execute("stop", None).await?;
        self.with(id, |vm| {
            vm.info.status = Status::Paused;
            Ok(vm.info.clone())
        })
    }

    async fn resume(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.qmp(id).await?.execute("cont", None).await?;
        self.with(id, |vm| {
            vm.info.status = Status::Running;
            Ok(vm.info.clone())
        })
    }

    async fn snapshot(&self, id: &str, dir: &Path) -> Result<Taken, VmmError> {
        let (machine_args, ram) = self.with(id, |vm| {
            if vm.info.status != Status::Running {
                return Err(VmmError::FailedPrecondition(format!(
                    "instance {id} is {:?}; only a running instance can be snapshotted",
                    vm.info.status
                )));
            }
            let mut args = vm.base_args.clone();
            args.extend(vm.shape.args());
            Ok((args, vm.ram.clone()))
        })?;
        let mut qmp = self.qmp(id).await?;
        let memory = dir.join(MEMORY_FILE);
        // QEMU writes the stream into a pipe; a thread writes it to the file and hashes it
        // as it comes, so the snapshot is sealed without reading it again.
        let (read_end, write_end) =
            nix::unistd::pipe().map_err(|e| VmmError::io("creating a pipe")(e.into()))?;
        let target = memory.clone();
        let sink = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            use sha2::{Digest, Sha256};
            use std::io::{Read, Write};
            let mut input = std::fs::File::from(read_end);
            let mut out = std::io::BufWriter::with_capacity(1 << 20, {
                use std::os::unix::fs::OpenOptionsExt;
                // The guest's whole memory: readable by the service only.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)?
            });
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            out.flush()?;
            Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
        });
        qmp.execute("stop", None).await?;
        let started = Instant::now();
        let result = async {
            // The 7.2 default of 128 MiB/s would make a snapshot take a second.
            qmp.execute(
                "migrate-set-parameters",
                Some(serde_json::json!({ "max-bandwidth": 64u64 << 30 })),
            )
            .await?;
            // With a RAM file of its own, the stream carries the device state only. Set
            // either way: a clone still has it on from its own restore, and the stream's
            // format follows it (the restoring side must agree).
            ignore_shared(&mut qmp, ram.is_some()).await?;
            qmp.send_fd("form-snapshot", std::os::fd::AsRawFd::as_raw_fd(&write_end))
                .await?;
            drop(write_end);
            qmp.execute(
                "migrate",
                Some(serde_json::json!({ "uri": "fd:form-snapshot" })),
            )
            .await?;
            qmp.wait_migration().await?;
            let Some(from) = ram.clone() else {
                return Ok(None);
            };
            // Still stopped: the copy is the memory the device state goes with.
            let to = dir.join(RAM_FILE);
            let device_state = started.elapsed();
            let path = to.clone();
            let (memfd, _, digest) =
                tokio::task::spawn_blocking(move || crate::ramfile::sealed_copy(&from, &to))
                    .await
                    .map_err(|e| VmmError::Backend(e.to_string()))?
                    .map_err(VmmError::io(format!("copying the RAM of {id}")))?;
            // Its clones map this copy, made and checked in the same pass.
            self.keep_sealed(path, Arc::new(memfd));
            tracing::debug!(instance = %id, ?device_state, copied = ?started.elapsed(), "snapshot: device state and RAM");
            Ok(Some(digest))
        }
        .await;
        if result.is_err() {
            // Stop a migration that failed or hangs before the VM runs on.
            let _ = qmp.execute("migrate_cancel", None).await;
        }
        qmp.execute("cont", None).await?;
        let ram_digest = result?;
        // QEMU closes its copy of the pipe when the migration ends: the sink sees EOF.
        let digest = tokio::time::timeout(Duration::from_secs(30), sink)
            .await
            .map_err(|_| VmmError::Backend("the memory stream did not end".into()))?
            .map_err(|e| VmmError::Backend(e.to_string()))?
            .map_err(VmmError::io(format!("writing {}", memory.display())))?;
        let mut digests = vec![(MEMORY_FILE.to_owned(), digest)];
        digests.extend(ram_digest.map(|d| (RAM_FILE.to_owned(), d)));
        Ok(Taken {
            machine_args,
            digests,
        })
    }

    async fn clone_instance(
        &self,
        manifest: &Manifest,
        dir: &Path,
        spec: InstanceSpec,
    ) -> Result<InstanceInfo, VmmError> {
        if manifest.machine_args.is_empty() {
            return Err(VmmError::FailedPrecondition(format!(
                "snapshot {} was not made by the qemu backend",
                manifest.snapshot_id
            )));
        }
        // A clone starts as the snapshot's machine (memory snapshots cannot change its
        // devices), then is resized in place to what was asked.
        let (base, shape) = Shape::split(&manifest.machine_args).ok_or_else(|| {
            VmmError::FailedPrecondition(format!(
                "snapshot {} was made by a qemu backend without hot-plug room; take a new snapshot",
                manifest.snapshot_id
            ))
        })?;
        // The same floor as a new VM's.
        let want = types::Resources {
            vcpus: spec.resources.vcpus.max(1),
            memory_mib: spec.resources.memory_mib.max(MIN_MEMORY_MIB),
        };
        let spec = InstanceSpec {
            workload: crate::snapshots::manifest_workload(manifest)?,
            cluster_id: manifest.cluster_id.clone(),
            resources: types::Resources {
                vcpus: shape.vcpus,
                memory_mib: manifest.memory_mib.max(MIN_MEMORY_MIB),
            },
            ..spec
        };
        let id = spec.instance_id.clone();
        let memory = dir.join(MEMORY_FILE);
        let ram = if let Some(f) = manifest.files.iter().find(|f| f.path == RAM_FILE) {
            Ram::Private(
                self.sealed_memory(&manifest.snapshot_id, &dir.join(RAM_FILE), &f.sha256)
                    .await?,
            )
        } else if base.iter().any(|a| a == RAM_BACKEND) {
            // A whole stream (a snapshot of a clone): restored into a file of its own,
            // so that its own snapshots are quick.
            Ram::Shared(self.ram_path(&id))
        } else {
            Ram::Anonymous
        };
        let info = self
            .launch(
                spec,
                (base, shape),
                ram,
                Some((&memory, manifest.snapshot_id.clone())),
                manifest.generation + 1,
            )
            .await?;
        if info.status != Status::Running {
            return Ok(info);
        }
        let held = resize::actual_mib(&mut self.qmp(&id).await?).await?;
        self.with(&id, |vm| {
            vm.info.spec.resources.memory_mib = held;
            Ok(())
        })?;
        if info.spec.resources.vcpus == want.vcpus && held == want.memory_mib {
            return self.get(&id).await;
        }
        match self.resize(&id, want).await {
            Ok(r) => Ok(r.info),
            Err(e) => {
                // A clone of another size than asked is not the clone that was asked for.
                let _ = self.delete(&id).await;
                Err(e)
            }
        }
    }

    async fn resize(&self, id: &str, want: types::Resources) -> Result<Resized, VmmError> {
        let mut shape = self.with(id, |vm| {
            if vm.info.status != Status::Running {
                return Err(VmmError::FailedPrecondition(format!(
                    "instance {id} is {:?}; only a running VM can be resized",
                    vm.info.status
                )));
            }
            Ok(vm.shape.clone())
        })?;
        resize::check(&shape, want, self.inner.accel)?;
        let mut qmp = self.qmp(id).await?;
        let changed = async {
            resize::vcpus(&mut qmp, &mut shape, want.vcpus).await?;
            resize::memory(&mut qmp, &mut shape, want.memory_mib).await
        }
        .await;
        // What the VM has now, whether or not every change went through: the record
        // follows the machine, not the request.
        let held = resize::actual_mib(&mut qmp).await.unwrap_or(0);
        let info = self.with(id, |vm| {
            vm.shape = shape.clone();
            vm.info.spec.resources = types::Resources {
                vcpus: shape.vcpus,
                memory_mib: held,
            };
            Ok(vm.info.clone())
        })?;
        changed?;
        Ok(Resized {
            info,
            enforced: true,
            message: resize::describe(&shape, held),
        })
    }

    async fn delete(&self, id: &str) -> Result<bool, VmmError> {
        let found = self.vms().get_mut(id).map(|vm| {
            vm.info.status = Status::Stopped;
            (vm.pid, vm.exit.clone(), vm.dir.clone(), vm.ram.clone())
        });
        let Some((pid, mut exit, dir, ram)) = found else {
            return Ok(false);
        };
        if let Ok(mut qmp) = self.qmp(id).await {
            let _ = qmp.execute("quit", None).await;
        }
        if tokio::time::timeout(STOP_GRACE, exit.wait_for(Option::is_some))
            .await
            .is_err()
        {
            signal_group(pid, Signal::SIGKILL);
            let _ = tokio::time::timeout(STOP_GRACE, exit.wait_for(Option::is_some)).await;
        }
        self.vms().remove(id);
        let removed = std::fs::remove_dir_all(&dir)
            .map_err(VmmError::io(format!("removing {}", dir.display())));
        if let Some(ram) = ram {
            match std::fs::remove_file(&ram) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(VmmError::io(format!("removing {}", ram.display()))(e));
                }
                // The last one takes the directory with it (on tmpfs, nothing else
                // would).
                _ => drop(std::fs::remove_dir(&self.inner.ram_dir)),
            }
        }
        removed?;
        Ok(true)
    }

    async fn stats(&self, id: &str, window: Window) -> Result<Usage, VmmError> {
        self.with(id, |vm| {
            // QEMU's CPU time stands for the guest's (its vCPU threads are QEMU's own).
            Ok(Usage {
                cpu_utilization: vm.cpu[window as usize]
                    .sample(vm.pid, vm.info.spec.resources.vcpus),
                memory_bytes: crate::procfs::rss_bytes(vm.pid).unwrap_or(0),
                uptime_seconds: vm.started.elapsed().as_secs_f64(),
            })
        })
    }
}
