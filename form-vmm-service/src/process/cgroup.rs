//! CPU and memory limits with cgroups: v2 (`cpu.max`, `memory.max`) where the unified
//! hierarchy has those controllers, else v1 (`cpu.cfs_quota_us`,
//! `memory.limit_in_bytes`) where its hierarchies are writable. Where neither works the
//! limit is not enforced, and the caller says so.

use std::path::{Path, PathBuf};

/// Period of the CPU quota, microseconds (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup interface is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cgroups {
    /// The unified hierarchy, under this parent directory.
    V2(PathBuf),
    /// v1 `cpu` and `memory` hierarchies, with our directory name under each.
    V1 {
        cpu: PathBuf,
        memory: Option<PathBuf>,
    },
    /// None: why.
    Unavailable(String),
}

fn writable_dir(parent: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

impl Cgroups {
    /// Finds a usable interface under `root` (normally `/sys/fs/cgroup`) and creates
    /// `form-vmm-<node>` in it.
    pub(crate) fn detect(root: &Path, node: &str) -> Self {
        let name = format!("form-vmm-{node}");
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            let enable = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
            match (enable, writable_dir(root, &name)) {
                (Ok(()), Ok(dir)) => {
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory");
                    return Cgroups::V2(dir);
                }
                (Err(e), _) => {
                    return Cgroups::Unavailable(format!(
                        "cgroup v2 controllers cannot be enabled: {e}"
                    ));
                }
                (_, Err(e)) => return Cgroups::Unavailable(e),
            }
        }
        // A v1 hierarchy is a mount with the controller's files: without them, creating
        // directories would only make stray groups on another filesystem.
        if !root.join("cpu/cpu.cfs_quota_us").exists() {
            return Cgroups::Unavailable(
                "no cgroup v2 cpu controller and no v1 cpu hierarchy".into(),
            );
        }
        match writable_dir(&root.join("cpu"), &name) {
            Ok(cpu) => Cgroups::V1 {
                cpu,
                memory: if root.join("memory/memory.limit_in_bytes").exists() {
                    writable_dir(&root.join("memory"), &name).ok()
                } else {
                    None
                },
            },
            Err(e) => Cgroups::Unavailable(format!(
                "no writable cgroup v2 cpu controller nor v1 cpu hierarchy ({e})"
            )),
        }
    }

    /// Puts `pid` in the instance's group and applies the limits. Returns whether CPU
    /// and memory limits are enforced, with a message for people.
    pub(crate) fn apply(
        &self,
        instance: &str,
        pid: u32,
        vcpus: u32,
        memory_mib: u64,
    ) -> (bool, String) {
        let quota = u64::from(vcpus.max(1)) * CPU_PERIOD_US;
        let bytes = memory_mib * 1024 * 1024;
        let result = match self {
            Cgroups::Unavailable(why) => {
                return (false, format!("limits recorded, not enforced: {why}"));
            }
            Cgroups::V2(parent) => (|| -> Result<String, String> {
                let dir = writable_dir(parent, instance)?;
                write(&dir.join("cgroup.procs"), &pid.to_string())?;
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir.join("memory.max"), &bytes.to_string())?;
                read_back(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                read_back(&dir.join("memory.max"), &bytes.to_string())?;
                read_back_member(&dir, pid)?;
                Ok(format!(
                    "enforced with cgroup v2: cpu.max {quota}/{CPU_PERIOD_US}, memory.max {bytes}"
                ))
            })(),
            Cgroups::V1 { cpu, memory } => (|| -> Result<String, String> {
                let dir = writable_dir(cpu, instance)?;
                write(&dir.join("cgroup.procs"), &pid.to_string())?;
                write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                read_back(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                read_back(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                read_back_member(&dir, pid)?;
                let mem = match memory {
                    Some(m) => {
                        let mdir = writable_dir(m, instance)?;
                        write(&mdir.join("cgroup.procs"), &pid.to_string())?;
                        write(&mdir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                        read_back(&mdir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                        read_back_member(&mdir, pid)?;
                        format!("memory.limit_in_bytes {bytes}")
                    }
                    None => "memory not limited (no writable v1 memory hierarchy)".into(),
                };
                Ok(format!(
                    "enforced with cgroup v1: cpu.cfs_quota_us {quota}/{CPU_PERIOD_US}, {mem}"
                ))
            })(),
        };
        match result {
            Ok(m) => (true, m),
            Err(e) => (false, format!("limits recorded, not enforced: {e}")),
        }
    }

    /// The processes in the instance's group: its workload and everything it started,
    /// also those that left its process group or session (`setsid`).
    pub(crate) fn procs(&self, instance: &str) -> Vec<i32> {
        let dir = match self {
            Cgroups::V2(p) => p.join(instance),
            Cgroups::V1 { cpu, .. } => cpu.join(instance),
            Cgroups::Unavailable(_) => return Vec::new(),
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes the instance's group (after its processes exited).
    pub(crate) fn remove(&self, instance: &str) {
        let dirs: Vec<PathBuf> = match self {
            Cgroups::V2(p) => vec![p.join(instance)],
            Cgroups::V1 { cpu, memory } => {
                let mut v = vec![cpu.join(instance)];
                v.extend(memory.iter().map(|m| m.join(instance)));
                v
            }
            Cgroups::Unavailable(_) => Vec::new(),
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Reads a limit back after writing it: a file system that accepts the write and keeps
/// another value (or none) does not enforce the limit.
fn read_back(path: &Path, want: &str) -> Result<(), String> {
    let got = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read back {}: {e}", path.display()))?;
    if got.trim() != want {
        return Err(format!(
            "{} reads {:?} after writing {want:?}",
            path.display(),
            got.trim()
        ));
    }
    Ok(())
}

/// Checks that `pid` is in the group whose limits were written.
fn read_back_member(dir: &Path, pid: u32) -> Result<(), String> {
    let procs = dir.join("cgroup.procs");
    let list = std::fs::read_to_string(&procs)
        .map_err(|e| format!("cannot read back {}: {e}", procs.display()))?;
    if !list.lines().any(|l| l.trim() == pid.to_string()) {
        return Err(format!("process {pid} is not in {}", procs.display()));
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value} to {}: {e}", path.display()))
}
