//! What the instance really has, read from inside it: the CPUs online and the memory
//! the kernel sees (`/sys/devices/system/cpu/online`, `/proc/meminfo`), and the limits
//! of its cgroup where it has them (v2 `cpu.max`, `memory.max`; v1
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `memory.limit_in_bytes`). The effective
//! figures are the smaller of the two, as a runtime sizing its thread pool would see.

use std::path::{Path, PathBuf};

/// The instance's CPUs and memory as seen from inside.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Seen {
    /// CPUs the kernel has online.
    pub cpus_online: u32,
    /// `MemTotal` of `/proc/meminfo`, MiB.
    pub memory_total_mib: u64,
    /// CPU quota of the cgroup in cores (quota / period), when one is set.
    pub cpu_limit: Option<f64>,
    /// Memory limit of the cgroup, MiB, when one is set.
    pub memory_limit_mib: Option<u64>,
    /// `min(cpus_online, cpu_limit)`.
    pub effective_cpus: f64,
    /// `min(memory_total_mib, memory_limit_mib)`.
    pub effective_memory_mib: u64,
}

/// Reads what the instance has now.
pub(crate) fn seen() -> Seen {
    let cpus_online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpu_list(&s))
        .unwrap_or(1);
    let memory_total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_total_kib(&s))
        .unwrap_or(0)
        / 1024;
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = |controller: &str| cgroup_dir(&groups, &mounts, controller);
    let cpu_limit = dir("cpu").and_then(|d| cpu_quota(&d));
    let memory_limit_mib = dir("memory")
        .and_then(|d| memory_limit(&d))
        .map(|b| b >> 20);
    Seen {
        cpus_online,
        memory_total_mib,
        cpu_limit,
        memory_limit_mib,
        effective_cpus: cpu_limit.map_or(f64::from(cpus_online), |l| l.min(f64::from(cpus_online))),
        effective_memory_mib: memory_limit_mib
            .map_or(memory_total_mib, |l| l.min(memory_total_mib)),
    }
}

/// Number of CPUs in a list like `0-3,5`.
fn count_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(n)
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The directory of this process's cgroup for `controller`: from `/proc/self/cgroup`
/// (v1 `N:cpu,cpuacct:/path`, v2 `0::/path`) and the mount of that hierarchy in
/// `/proc/self/mountinfo` (its root may be a sub-path, as in containers).
fn cgroup_dir(groups: &str, mountinfo: &str, controller: &str) -> Option<PathBuf> {
    let v1 = groups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls.split(',').any(|c| c == controller).then_some(path)
    });
    let (path, v2) = match v1 {
        Some(p) => (p, false),
        None => (groups.lines().find_map(|l| l.strip_prefix("0::"))?, true),
    };
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let (fstype, _source, opts) = (r.next()?, r.next()?, r.next().unwrap_or(""));
        let mine = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && opts.split(',').any(|o| o == controller)
        };
        if !mine {
            return None;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        let (root, point) = (*f.get(3)?, *f.get(4)?);
        let rel = path.strip_prefix(root).unwrap_or(path);
        Some(Path::new(point).join(rel.trim_start_matches('/')))
    })
}

fn cpu_quota(dir: &Path) -> Option<f64> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    if let Some(max) = read("cpu.max") {
        let mut it = max.split_whitespace();
        let (quota, period) = (it.next()?, it.next()?);
        return ratio(quota.parse().ok()?, period.parse().ok()?);
    }
    let quota: i64 = read("cpu.cfs_quota_us")?.trim().parse().ok()?;
    let period: u64 = read("cpu.cfs_period_us")?.trim().parse().ok()?;
    ratio(u64::try_from(quota).ok()?, period)
}

fn ratio(quota: u64, period: u64) -> Option<f64> {
    (period > 0).then(|| quota as f64 / period as f64)
}

fn memory_limit(dir: &Path) -> Option<u64> {
    let v = std::fs::read_to_string(dir.join("memory.max"))
        .or_else(|_| std::fs::read_to_string(dir.join("memory.limit_in_bytes")))
        .ok()?;
    // "max" (v2) or a huge page-rounded number (v1) mean no limit.
    v.trim().parse().ok().filter(|b| *b < (1u64 << 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3,5\n"), Some(5));
        assert_eq!(count_cpu_list("0,2-3"), Some(3));
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn cgroup_dirs_of_v1_and_v2() {
        let mounts = "30 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                      31 25 0:28 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      32 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let v1 = "4:cpu:/form-vmm-n/i1\n3:memory:/docker/abc/form-vmm-n/i1\n0::/\n";
        assert_eq!(
            cgroup_dir(v1, mounts, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/form-vmm-n/i1"))
        );
        assert_eq!(
            cgroup_dir(v1, mounts, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/form-vmm-n/i1"))
        );
        assert_eq!(
            cgroup_dir("0::/a/b\n", mounts, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
    }

    #[test]
    fn quota_and_limit_files() {
        let d = std::env::temp_dir().join(format!("demo-res-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("cpu.max"), "150000 100000\n").expect("w");
        std::fs::write(d.join("memory.max"), "max\n").expect("w");
        assert_eq!(cpu_quota(&d), Some(1.5));
        assert_eq!(memory_limit(&d), None);
        std::fs::write(d.join("memory.max"), "268435456\n").expect("w");
        assert_eq!(memory_limit(&d), Some(268_435_456));
        std::fs::write(d.join("cpu.max"), "max 100000\n").expect("w");
        assert_eq!(cpu_quota(&d), None);
        std::fs::remove_dir_all(&d).expect("rm");
    }
}
