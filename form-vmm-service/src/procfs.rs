//! CPU time and resident memory of a process, and fields of other `/proc` texts.

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub(crate) fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// User plus system CPU time of `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the fields start at 3 (state); utime is 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU utilisation of a process between two samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSampler {
    at: std::time::Instant,
    ticks: u64,
}

impl CpuSampler {
    /// A sampler whose first window starts now (at zero CPU time: the process start).
    pub(crate) fn new() -> Self {
        Self {
            at: std::time::Instant::now(),
            ticks: 0,
        }
    }

    /// CPU time of `pid` since the last sample, per wall second and per vCPU: 1.0 is
    /// `vcpus` whole cores; above 1.0 when the process uses more cores than its vCPUs
    /// (limits not enforced).
    pub(crate) fn sample(&mut self, pid: u32, vcpus: u32) -> f64 {
        let now = std::time::Instant::now();
        let ticks = cpu_ticks(pid).unwrap_or(self.ticks);
        let wall = now.duration_since(self.at).as_secs_f64();
        let used = ticks.saturating_sub(self.ticks) as f64 / ticks_per_second();
        *self = Self { at: now, ticks };
        if wall > 0.0 {
            used / wall / f64::from(vcpus.max(1))
        } else {
            0.0
        }
    }
}

/// Resident memory of `pid` in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(kib(&status, "VmRSS")? * 1024)
}

/// The value in KiB of `field` in a /proc text of `Field:   123 kB` lines
/// (`status`, `meminfo`, `smaps_rollup`).
pub fn kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_ticks(pid).is_some());
        assert!(rss_bytes(pid).is_some_and(|b| b > 0));
        assert!(ticks_per_second() > 0.0);
    }

    #[test]
    fn kib_fields_are_matched_whole() {
        let rollup = "Rss:  2048 kB\nPss_Anon:  7 kB\nPss:  1536 kB\n";
        assert_eq!(kib(rollup, "Pss"), Some(1536));
        assert_eq!(kib(rollup, "Pss_Anon"), Some(7));
        assert_eq!(kib(rollup, "Swap"), None);
        assert_eq!(kib("MemTotal:  oops kB", "MemTotal"), None);
    }
}
