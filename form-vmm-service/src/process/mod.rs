//! The `process` backend: an instance is a child process of the workload's command,
//! in its own process group and working directory, with its own port (`PORT`), admin
//! address for the snapshot hook (`FORM_ADMIN_ADDR`) and id (`FORM_INSTANCE_ID`).
//!
//! Snapshot: ask the workload to write its state through the hook (a workload without
//! one gets only its working directory carried), then stop the process group
//! (SIGSTOP) while its working directory is copied, then continue it (SIGCONT).
//! Clone: a new process of the same command with a copy of the working directory and
//! `FORM_RESTORE_DIR` pointing at a copy of the hook's state.

mod cgroup;
pub mod launcher;
mod spares;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use form_proto::types::v1 as types;
use nix::sys::signal::Signal;
use tokio::sync::watch;

use self::cgroup::Cgroups;
use self::launcher::Launch;
use self::spares::SparePool;
use crate::error::VmmError;
use crate::hypervisor::{
    Hypervisor, InstanceInfo, InstanceSpec, Resized, Status, Taken, Usage, Window,
};
use crate::procfs;
use crate::snapshots::{Manifest, copy_tree, manifest_workload};
use crate::supervise::{
    Table, claim_dir, instance_addrs, now_ms, reap, serial, signal_group, tail,
};

/// Time a workload gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Time the snapshot hook may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// A new instance is asked whether it serves after 1 ms, then after twice as long each
/// time, up to every 10 ms: a process commonly listens within 2-3 ms of its start, and a
/// flat 10 ms pause made nearly every clone wait for a second look (about 8 ms of a
/// 15 ms clone). A refused connect costs a few microseconds.
const READY_POLL_FIRST: Duration = Duration::from_millis(1);
const READY_POLL_MAX: Duration = Duration::from_millis(10);

#[derive(Debug)]
struct Proc {
    info: InstanceInfo,
    serial: u64,
    pid: u32,
    /// The instance's cgroup: its id, or the spare's group where it cannot be renamed.
    group: String,
    dir: PathBuf,
    exit: watch::Receiver<Option<String>>,
    cpu: [procfs::CpuSampler; 2],
    started: Instant,
}

#[derive(Debug)]
struct Inner {
    /// This node's tag (node id and data directory): with an instance id, it names
    /// the instance's processes in their environment (`FORM_INSTANCE_KEY`).
    tag: String,
    /// The (uid, gid) workloads run as; `None`: this node's own.
    user: Option<(u32, u32)>,
    root: PathBuf,
    host: IpAddr,
    cgroups: Cgroups,
    /// Processes placed in a group ahead of time, which become workloads.
    spares: SparePool,
    /// Held from choosing an instance's addresses until it is in `procs`: two starts
    /// at once would otherwise choose the same free port, and the node's stop would
    /// miss one recorded after it listed them.
    starting: tokio::sync::Mutex<()>,
    /// The node stops: no instance starts any more.
    stopping: std::sync::atomic::AtomicBool,
    ready_timeout: Duration,
    procs: Table<Proc>,
}

/// The first directory on the way to `path` (itself included) that `uid`:`gid` may
/// not enter, if any.
pub(crate) fn unreachable_for(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let path = std::fs::canonicalize(path).ok()?;
    let mut dirs: Vec<&Path> = path.ancestors().collect();
    dirs.reverse();
    dirs.into_iter().find_map(|d| {
        let m = std::fs::metadata(d).ok()?;
        let mode = m.mode();
        let enter = if m.uid() == uid {
            mode & 0o100
        } else if m.gid() == gid {
            mode & 0o010
        } else {
            mode & 0o001
        };
        (enter == 0).then(|| d.to_owned())
    })
}

/// Gives `path` and everything under it to `uid`:`gid` (links themselves, not their
/// targets).
fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A command that cannot be run: the caller's error.
fn cannot_start(command: &str, why: &str) -> VmmError {
    VmmError::invalid(
        "workload.command",
        format!("cannot start '{command}': {why}"),
    )
}

/// The variable naming an instance's processes (node tag and instance id), so that
/// what it left behind is found and killed on delete.
const INSTANCE_KEY: &str = "FORM_INSTANCE_KEY";

/// Instances as local processes.
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    inner: Arc<Inner>,
}

impl ProcessBackend {
    /// A backend keeping instance directories under `root`, binding instances to `host`.
    pub fn new(
        root: PathBuf,
        host: IpAddr,
        node_id: &str,
        cgroup_root: &std::path::Path,
        ready_timeout: Duration,
        user: Option<(u32, u32)>,
        launcher: Option<PathBuf>,
    ) -> Result<Self, VmmError> {
        std::fs::create_dir_all(&root)
            .map_err(VmmError::io(format!("creating {}", root.display())))?;
        // Named for this node and its data directory: two nodes on one host (or two
        // tests) with the same node id and instance ids must not share cgroups, where
        // one's limits would overwrite the other's.
        let root_abs = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
        let tag: String = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            root_abs.as_os_str().as_encoded_bytes(),
        ))
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
        let tag = format!("{node_id}-{tag}");
        let cgroups = Cgroups::detect(cgroup_root, &tag);
        match &cgroups {
            Cgroups::Unavailable(why) => {
                tracing::warn!(reason = %why, "resource limits will be recorded, not enforced")
            }
            other => tracing::info!(cgroups = ?other, "resource limits are enforced with cgroups"),
        }
        let swept = cgroups.sweep();
        if swept > 0 {
            tracing::info!(
                groups = swept,
                "removed the empty cgroups an earlier run left"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                tag,
                user,
                root,
                host,
                spares: SparePool::new(launcher.filter(|_| cgroups.usable())),
                starting: tokio::sync::Mutex::new(()),
                stopping: std::sync::atomic::AtomicBool::new(false),
                cgroups,
                ready_timeout,
                procs: Table::new(),
            }),
        })
    }

    /// The value of [`INSTANCE_KEY`] in the environment of `id`'s processes.
    fn instance_key(&self, id: &str) -> String {
        format!("{}/{id}", self.inner.tag)
    }

    /// Kills what is left of instance `id` once its process group is gone: processes
    /// that left the group or the session (`setsid`) but not its cgroup `group`, or (where no
    /// cgroup is writable) that still carry its key in their environment.
    async fn kill_survivors(&self, id: &str, group: &str) {
        let key = self.instance_key(id);
        for _ in 0..20 {
            let mut left = self.inner.cgroups.procs(group);
            left.extend(form_runtime::procenv::pids_with_env(INSTANCE_KEY, &key));
            left.retain(|p| *p > 1 && *p != std::process::id() as i32);
            if left.is_empty() {
                return;
            }
            tracing::info!(instance = %id, pids = ?left, "killing what is left of the instance");
            for pid in left {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(instance = %id, "processes of the instance are still there after SIGKILL");
    }

    /// Starts the workload itself, then moves it into its group.
    fn launch_directly(
        &self,
        id: &str,
        w: &types::Workload,
        vars: Vec<(String, String)>,
        work: &Path,
        (stdout, stderr): (std::fs::File, std::fs::File),
        res: types::Resources,
    ) -> Result<(tokio::process::Child, String, bool, String), VmmError> {
        let mut command = tokio::process::Command::new(&w.command);
        if let Some((uid, gid)) = self.inner.user {
            // Unprivileged: it cannot read this node's keys or touch other instances.
            command.uid(uid).gid(gid);
        }
        let child = command
            .args(&w.args)
            .current_dir(work)
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| cannot_start(&w.command, &e.to_string()))?;
        let pid = child.id().unwrap_or(0);
        let (enforced, limits) = self.inner.cgroups.apply(id, pid, res.vcpus, res.memory_mib);
        Ok((child, id.to_owned(), enforced, limits))
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Proc>> {
        self.inner.procs.lock()
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Proc) -> Result<T, VmmError>,
    ) -> Result<T, VmmError> {
        self.inner.procs.with(id, f)
    }

    /// Starts the workload of `spec` in a fresh directory; `prepare` fills the
    /// directory first and returns extra environment variables. In a task of its own:
    /// a caller that goes away (a client that hangs up) does not stop a start half way,
    /// between its spare's exec and the instance's record.
    async fn start(
        &self,
        spec: InstanceSpec,
        restored_from: Option<String>,
        generation: u64,
        prepare: impl FnOnce(&Path) -> Result<Vec<(String, String)>, VmmError> + Send + 'static,
    ) -> Result<InstanceInfo, VmmError> {
        let this = self.clone();
        tokio::spawn(async move {
            this.start_here(spec, restored_from, generation, prepare)
                .await
        })
        .await
        .map_err(|e| VmmError::Backend(format!("starting the instance: {e}")))?
    }

    async fn start_here(
        &self,
        spec: InstanceSpec,
        restored_from: Option<String>,
        generation: u64,
        prepare: impl FnOnce(&Path) -> Result<Vec<(String, String)>, VmmError>,
    ) -> Result<InstanceInfo, VmmError> {
        let id = spec.instance_id.clone();
        let dir = self.inner.root.join(&id);
        claim_dir(&dir, &id)?;
        let work = dir.join("work");
        std::fs::create_dir_all(&work)
            .map_err(VmmError::io(format!("creating {}", work.display())))?;
        let env = match prepare(&dir) {
            Ok(env) => env,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let stdout = std::fs::File::create(dir.join("stdout.log"))
            .map_err(VmmError::io("creating stdout.log"))?;
        let stderr = std::fs::File::create(dir.join("stderr.log"))
            .map_err(VmmError::io("creating stderr.log"))?;
        if let Some((uid, gid)) = self.inner.user
            && let Err(e) = chown_tree(&dir, uid, gid)
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(VmmError::io(format!(
                "giving {} to uid {uid}",
                dir.display()
            ))(e));
        }
        let spare = self.take_spare().await;
        let starting = self.inner.starting.lock().await;
        let host = self.inner.host;
        let addrs = if self
            .inner
            .stopping
            .load(std::sync::atomic::Ordering::Acquire)
        {
            Err(VmmError::FailedPrecondition(
                "this node is stopping; it starts no instance".into(),
            ))
        } else {
            instance_addrs(host, self.procs().values().map(|p| &p.info))
        };
        let (address, admin) = match addrs {
            Ok(a) => a,
            Err(e) => {
                drop(starting);
                if let Some(spare) = spare {
                    self.discard(spare).await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let w = &spec.workload;
        let mut vars: Vec<(String, String)> =
            w.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.extend([
            ("PORT".to_owned(), address.port().to_string()),
            ("FORM_BIND_HOST".to_owned(), host.to_string()),
            ("FORM_INSTANCE_ID".to_owned(), id.clone()),
            (INSTANCE_KEY.to_owned(), self.instance_key(&id)),
            ("FORM_ADMIN_ADDR".to_owned(), admin.to_string()),
        ]);
        vars.extend(env);
        let res = spec.resources;
        let launched = match spare {
            Some(spare) => {
                let launch = Launch {
                    command: w.command.clone(),
                    args: w.args.clone(),
                    env: vars.clone(),
                    cwd: work.clone(),
                    stdout: dir.join("stdout.log"),
                    stderr: dir.join("stderr.log"),
                    user: self.inner.user,
                };
                self.launch_in_spare(spare, &id, &launch, res).await
            }
            None => Err(None),
        };
        // A spare that failed before its exec leaves the start to the direct path.
        let started = match launched {
            Ok(s) => Ok(s),
            Err(Some(e)) => Err(e),
            Err(None) => self.launch_directly(&id, w, vars, &work, (stdout, stderr), res),
        };
        let (child, group, enforced, limits) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let serial = serial();
        tracing::info!(instance = %id, pid, enforced, limits = %limits, "started");
        let (tx, rx) = watch::channel(None);
        let info = InstanceInfo {
            spec,
            status: Status::Starting,
            address,
            admin_address: Some(admin),
            created_at_ms: now_ms(),
            restored_from,
            generation,
            failure: None,
        };
        self.procs().insert(
            id.clone(),
            Proc {
                info,
                serial,
                pid,
                group,
                dir: dir.clone(),
                exit: rx.clone(),
                cpu: [procfs::CpuSampler::new(); 2],
                started: Instant::now(),
            },
        );
        drop(starting);
        // The next spare is made once this one's group is the instance's: its move
        // would hold the kernel's cgroup lock through a grace period.
        self.fill_spare();
        let inner = self.inner.clone();
        let stderr_path = dir.join("stderr.log");
        let reaped_id = id.clone();
        reap(child, tx, move |what| {
            // A failure already recorded (ready timeout) keeps its reason.
            if let Some(p) = inner.procs.lock().get_mut(&reaped_id)
                && p.serial == serial
                && !matches!(p.info.status, Status::Stopped | Status::Failed)
            {
                p.info.status = Status::Failed;
                p.info.failure = Some(format!("{what}; stderr ends with: {}", tail(&stderr_path)));
                tracing::warn!(instance = %reaped_id, status = %what, "workload exited");
            }
        });
        self.wait_ready(&id, rx).await
    }

    async fn wait_ready(
        &self,
        id: &str,
        mut exit: watch::Receiver<Option<String>>,
    ) -> Result<InstanceInfo, VmmError> {
        let deadline = Instant::now() + self.inner.ready_timeout;
        let (address, health) = self.with(id, |p| {
            Ok((p.info.address, p.info.spec.workload.health_path.clone()))
        })?;
        let mut pause = READY_POLL_FIRST;
        loop {
            if exit.borrow_and_update().is_some() {
                // Let the reaper record the failure, then report it.
                tokio::task::yield_now().await;
                return self.get(id).await;
            }
            let ready = if health.is_empty() {
                tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(address),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            } else {
                matches!(
                    crate::http::request(address, "GET", &health, b"", Duration::from_millis(500))
                        .await,
                    Ok((200, _))
                )
            };
            if ready {
                return self.with(id, |p| {
                    if p.info.status == Status::Starting {
                        p.info.status = Status::Running;
                    }
                    Ok(p.info.clone())
                });
            }
            if Instant::now() > deadline {
                let pid = self.with(id, |p| {
                    p.info.status = Status::Failed;
                    p.info.failure = Some(format!(
                        "not serving on {address} within {:?}; stderr ends with: {}",
                        self.inner.ready_timeout,
                        tail(&p.dir.join("stderr.log"))
                    ));
                    Ok(p.pid)
                })?;
                signal_group(pid, Signal::SIGKILL);
                return self.get(id).await;
            }
            tokio::select! {
                _ = exit.changed() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(READY_POLL_MAX);
        }
    }

    fn set_status(
        &self,
        id: &str,
        from: &[Status],
        to: Status,
        signal: Signal,
    ) -> Result<InstanceInfo, VmmError> {
        self.with(id, |p| {
            if !from.contains(&p.info.status) {
                return Err(VmmError::FailedPrecondition(format!(
                    "instance {id} is {:?}; expected {from:?}",
                    p.info.status
                )));
            }
            signal_group(p.pid, signal);
            p.info.status = to;
            Ok(p.info.clone())
        })
    }
}

impl Hypervisor for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceInfo, VmmError> {
        if spec.workload.port != 0 {
            // Processes of one node share its addresses: each gets a free port of its own.
            return Err(VmmError::invalid(
                "workload.port",
                format!(
                    "is {}; the process backend gives each instance a free port of its own in \
                     PORT, so set 0 (the qemu backend honours a port: inside each VM)",
                    spec.workload.port
                ),
            ));
        }
        self.start(spec, None, 0, |_| Ok(Vec::new())).await
    }

    async fn get(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.with(id, |p| Ok(p.info.clone()))
    }

    async fn list(&self) -> Vec<InstanceInfo> {
        self.procs().values().map(|p| p.info.clone()).collect()
    }

    async fn pause(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.set_status(
            id,
            &[Status::Running, Status::Paused],
            Status::Paused,
            Signal::SIGSTOP,
        )
    }

    async fn resume(&self, id: &str) -> Result<InstanceInfo, VmmError> {
        self.set_status(
            id,
            &[Status::Paused, Status::Running],
            Status::Running,
            Signal::SIGCONT,
        )
    }

    async fn snapshot(&self, id: &str, dir: &Path) -> Result<Taken, VmmError> {
        let (pid, admin, work) = self.with(id, |p| {
            if p.info.status != Status::Running {
                return Err(VmmError::FailedPrecondition(format!(
                    "instance {id} is {:?}; only a running instance can be snapshotted",
                    p.info.status
                )));
            }
            Ok((p.pid, p.info.admin_address, p.dir.join("work")))
        })?;
        if let Some(admin) = admin {
            // The workload (unprivileged) writes its state into a directory of its
            // own, which goes back to this node once written: no workload can change
            // a snapshot afterwards.
            let state = dir.join("state");
            std::fs::create_dir_all(&state)
                .map_err(VmmError::io(format!("creating {}", state.display())))?;
            if let Some((uid, gid)) = self.inner.user {
                chown_tree(&state, uid, gid).map_err(VmmError::io(format!(
                    "giving {} to uid {uid}",
                    state.display()
                )))?;
            }
            let body = serde_json::json!({ "dir": state }).to_string();
            match crate::http::request(
                admin,
                "POST",
                "/_form/snapshot",
                body.as_bytes(),
                HOOK_TIMEOUT,
            )
            .await
            {
                Ok((200..=299, _)) => {}
                Ok((code, text)) => {
                    return Err(VmmError::Backend(format!(
                        "the snapshot hook of {id} answered {code}: {}",
                        text.trim()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(instance = %id, "no snapshot hook; carrying the working directory only");
                }
                Err(e) => {
                    return Err(VmmError::Backend(format!(
                        "the snapshot hook of {id} failed: {e}"
                    )));
                }
            }
        }
        if self.inner.user.is_some() {
            let (uid, gid) = (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            );
            chown_tree(&dir.join("state"), uid, gid)
                .map_err(VmmError::io("taking the snapshot's state back"))?;
        }
        signal_group(pid, Signal::SIGSTOP);
        let copied = copy_tree(&work, &dir.join("workdir"));
        signal_group(pid, Signal::SIGCONT);
        copied.map_err(VmmError::io(format!(
            "copying the working directory of {id}"
        )))?;
        Ok(Taken::default())
    }

    async fn clone_instance(
        &self,
        manifest: &Manifest,
        dir: &Path,
        spec: InstanceSpec,
    ) -> Result<InstanceInfo, VmmError> {
        let spec = InstanceSpec {
            workload: manifest_workload(manifest)?,
            cluster_id: manifest.cluster_id.clone(),
            ..spec
        };
        let (workdir, state) = (dir.join("workdir"), dir.join("state"));
        let snapshot_id = manifest.snapshot_id.clone();
        self.start(
            spec,
            Some(snapshot_id.clone()),
            manifest.generation + 1,
            move |inst| {
                if workdir.exists() {
                    copy_tree(&workdir, &inst.join("work"))
                        .map_err(VmmError::io("copying the snapshot's working directory"))?;
                }
                let restore = inst.join("restore");
                std::fs::create_dir_all(&restore)
                    .map_err(VmmError::io("creating the restore directory"))?;
                if state.exists() {
                    copy_tree(&state, &restore)
                        .map_err(VmmError::io("copying the snapshot's state"))?;
                }
                Ok(vec![
                    ("FORM_RESTORE_DIR".to_owned(), restore.display().to_string()),
                    ("FORM_RESTORED_FROM".to_owned(), snapshot_id),
                ])
            },
        )
        .await
    }

    async fn resize(&self, id: &str, resources: types::Resources) -> Result<Resized, VmmError> {
        let (pid, group) = self.with(id, |p| {
            if matches!(p.info.status, Status::Failed | Status::Stopped) {
                return Err(VmmError::FailedPrecondition(format!(
                    "instance {id} is {:?}",
                    p.info.status
                )));
            }
            Ok((p.pid, p.group.clone()))
        })?;
        let (vcpus, memory) = (resources.vcpus, resources.memory_mib);
        // Its group exists unless its start could not place it: then it is placed now.
        let (mut enforced, mut message) = self.inner.cgroups.limit(&group, pid, vcpus, memory);
        if !enforced {
            (enforced, message) = self.inner.cgroups.apply(&group, pid, vcpus, memory);
        }
        if !enforced {
            // Recording a size the instance does not have would be a lie: refuse.
            return Err(VmmError::FailedPrecondition(format!(
                "cannot resize instance {id}: the new limits cannot be enforced on this node ({message})"
            )));
        }
        let info = self.with(id, |p| {
            p.info.spec.resources = resources;
            Ok(p.info.clone())
        })?;
        Ok(Resized {
            info,
            enforced,
            message,
        })
    }

    async fn delete(&self, id: &str) -> Result<bool, VmmError> {
        let found = self.procs().get_mut(id).map(|p| {
            p.info.status = Status::Stopped;
            (p.pid, p.exit.clone(), p.dir.clone(), p.group.clone())
        });
        let Some((pid, mut exit, dir, group)) = found else {
            return Ok(false);
        };
        // Signals only while the workload runs: once it is reaped, its pid may be reused.
        if exit.borrow().is_none() {
            signal_group(pid, Signal::SIGCONT);
            signal_group(pid, Signal::SIGTERM);
            if tokio::time::timeout(STOP_GRACE, exit.wait_for(Option::is_some))
                .await
                .is_err()
            {
                signal_group(pid, Signal::SIGKILL);
                let _ = tokio::time::timeout(STOP_GRACE, exit.wait_for(Option::is_some)).await;
            }
        }
        self.kill_survivors(id, &group).await;
        self.inner.cgroups.remove(&group);
        self.procs().remove(id);
        std::fs::remove_dir_all(&dir)
            .map_err(VmmError::io(format!("removing {}", dir.display())))?;
        Ok(true)
    }

    /// Stops every instance, all at once (the workloads get their grace in parallel).
    async fn delete_all(&self) {
        // A start still running (its caller gone) is recorded before the list is
        // taken, or sees the stop and records nothing.
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        drop(self.inner.starting.lock().await);
        let ids: Vec<String> = self.procs().keys().cloned().collect();
        let mut set = tokio::task::JoinSet::new();
        // Beside the instances, not after them: a stop that outlasts the service's
        // graceful deadline would drop the spare instead, leaving its group behind.
        let this = self.clone();
        set.spawn(async move { this.close_spares().await });
        for id in ids {
            let this = self.clone();
            set.spawn(async move {
                if let Err(e) = this.delete(&id).await {
                    tracing::warn!(instance = %id, error = %e, "cannot delete instance at shutdown");
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    async fn stats(&self, id: &str, window: Window) -> Result<Usage, VmmError> {
        self.with(id, |p| {
            Ok(Usage {
                cpu_utilization: p.cpu[window as usize].sample(p.pid, p.info.spec.resources.vcpus),
                memory_bytes: procfs::rss_bytes(p.pid).unwrap_or(0),
                uptime_seconds: p.started.elapsed().as_secs_f64(),
            })
        })
    }
}

#[cfg(test)]
mod reach_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::unreachable_for;

    #[test]
    fn a_closed_directory_on_the_way_is_named() {
        let base = std::env::temp_dir().join(format!("form-reach-{}", std::process::id()));
        let inner = base.join("closed/instances");
        std::fs::create_dir_all(&inner).expect("dirs");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let closed = base.join("closed");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        // Another user (not the owner, not its group) cannot enter it.
        assert_eq!(unreachable_for(&inner, 65534, 65534), Some(closed.clone()));
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        assert_eq!(unreachable_for(&inner, 65534, 65534), None);
        let _ = std::fs::remove_dir_all(&base);
    }
}
