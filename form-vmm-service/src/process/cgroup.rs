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

    /// This node's directories: one in v2, one per hierarchy in v1.
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Cgroups::V2(p) => vec![p.clone()],
            Cgroups::V1 { cpu, memory } => {
                let mut v = vec![cpu.clone()];
                v.extend(memory.iter().cloned());
                v
            }
            Cgroups::Unavailable(_) => Vec::new(),
        }
    }

    /// The group's directories: one in v2, one per hierarchy in v1.
    pub(crate) fn dirs(&self, group: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(group)).collect()
    }

    /// Removes the empty groups an earlier run of this node left (one that was killed
    /// leaves its instances' groups and its spare's); a group with a process in it
    /// stays. Returns how many were removed.
    pub(crate) fn sweep(&self) -> usize {
        let mut removed = 0;
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                if e.path().is_dir() && std::fs::remove_dir(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Whether groups can be made here at all.
    pub(crate) fn usable(&self) -> bool {
        !matches!(self, Cgroups::Unavailable(_))
    }

    /// Makes `group` (in every hierarchy) and moves `pid` into it. Moving a process
    /// between groups waits for an RCU grace period when none was moved recently (the
    /// kernel's threadgroup lock): 10-20 ms on these machines, which is why a clone
    /// takes a process placed ahead of time where it can (`launcher.rs`).
    pub(crate) fn place(&self, group: &str, pid: u32) -> Result<(), String> {
        if let Cgroups::Unavailable(why) = self {
            return Err(why.clone());
        }
        for parent in self.parents() {
            let dir = writable_dir(&parent, group)?;
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Writes the limits of `group`, reads them back, and checks that `pid` is in it.
    /// Returns whether CPU and memory limits are enforced, with a message for people.
    pub(crate) fn limit(
        &self,
        group: &str,
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
                let dir = parent.join(group);
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
                let dir = cpu.join(group);
                write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                read_back(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                read_back(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                read_back_member(&dir, pid)?;
                let mem = match memory {
                    Some(m) => {
                        let mdir = m.join(group);
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

    /// Puts `pid` in a new group `group` and applies the limits ([`Self::place`], then
    /// [`Self::limit`]).
    pub(crate) fn apply(
        &self,
        group: &str,
        pid: u32,
        vcpus: u32,
        memory_mib: u64,
    ) -> (bool, String) {
        match self.place(group, pid) {
            Ok(()) => self.limit(group, pid, vcpus, memory_mib),
            Err(e) => (false, format!("limits recorded, not enforced: {e}")),
        }
    }

    /// Renames `from` to `to` in every hierarchy, so that a group made ahead of time
    /// carries the instance's name. Only v1 can rename a group: where it fails, every
    /// hierarchy keeps (or gets back) `from`, and `from` is returned as the name.
    pub(crate) fn rename(&self, from: &str, to: &str) -> String {
        let pairs: Vec<(PathBuf, PathBuf)> =
            self.dirs(from).into_iter().zip(self.dirs(to)).collect();
        for (n, (a, b)) in pairs.iter().enumerate() {
            if std::fs::rename(a, b).is_err() {
                for (a, b) in &pairs[..n] {
                    let _ = std::fs::rename(b, a);
                }
                return from.to_owned();
            }
        }
        to.to_owned()
    }

    /// The processes in `group`: its workload and everything it started, also those
    /// that left its process group or session (`setsid`).
    pub(crate) fn procs(&self, group: &str) -> Vec<i32> {
        let Some(dir) = self.dirs(group).into_iter().next() else {
            return Vec::new();
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes `group` (after its processes exited).
    pub(crate) fn remove(&self, group: &str) {
        for d in self.dirs(group) {
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
