//! What a benchmarked process costs while it serves: CPU time from `/proc`, and, on
//! request, its system calls counted by `perf stat` (Debian's linux-perf) through the
//! kernel's syscall tracepoints.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Clock ticks per second of `/proc/*/stat` (USER_HZ).
pub(crate) const TICKS_PER_SECOND: f64 = 100.0;

/// `pids` and their child processes (nginx's workers).
pub(crate) fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut out = pids.to_vec();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((_, ppid)) = stat(pid)
            && pids.contains(&ppid)
            && !out.contains(&pid)
        {
            out.push(pid);
        }
    }
    out
}

/// CPU time of a process in clock ticks: in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ticks {
    /// In user space.
    pub(crate) user: u64,
    /// In the kernel.
    pub(crate) system: u64,
}

impl Ticks {
    /// Both.
    pub(crate) fn total(self) -> u64 {
        self.user + self.system
    }

    /// The time spent since `before`.
    pub(crate) fn since(self, before: Ticks) -> Ticks {
        Ticks {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }
}

/// The CPU time and the parent of `pid`.
fn stat(pid: u32) -> Option<(Ticks, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    Some((
        Ticks {
            user: f.get(11)?.parse().ok()?,
            system: f.get(12)?.parse().ok()?,
        },
        f.get(1)?.parse().ok()?,
    ))
}

/// CPU time of `pids` and their child processes.
pub(crate) fn cpu_ticks(pids: &[u32]) -> Ticks {
    with_children(pids)
        .iter()
        .filter_map(|&p| stat(p))
        .fold(Ticks::default(), |a, (t, _)| Ticks {
            user: a.user + t.user,
            system: a.system + t.system,
        })
}

/// The scheduler events counted beside the calls.
pub(crate) const EVENTS: [&str; 2] = ["context-switches", "cpu-migrations"];

/// A running `perf stat` counting the system calls of some processes, by call.
pub(crate) struct SyscallCount {
    perf: Child,
    out: PathBuf,
}

impl SyscallCount {
    /// Starts counting the calls of `pids` and their children, all threads.
    pub(crate) async fn start(pids: &[u32], dir: &Path, name: &str) -> anyhow::Result<Self> {
        let list: Vec<String> = with_children(pids).iter().map(u32::to_string).collect();
        let out = dir.join(format!("perf-{name}.csv"));
        let perf = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "syscalls:sys_enter_*",
                "-e",
                "context-switches,cpu-migrations",
                "-o",
            ])
            .arg(&out)
            .args(["-p", &list.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("running perf (apt-get install linux-perf)")?;
        // perf attaches to every thread before it counts; give it that moment.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        Ok(Self { perf, out })
    }

    /// Stops counting: each call's count, the most frequent first, then the context
    /// switches and migrations between CPUs (names without a `syscalls:` prefix).
    pub(crate) async fn finish(mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let pid = self.perf.id().context("perf already ended")?;
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()?;
        let status = self.perf.wait().await?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let mut counts: Vec<(String, u64)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split(',');
                let n = f.next()?.parse::<u64>().ok()?;
                let event = f.nth(1)?;
                let event = event.strip_prefix("syscalls:sys_enter_").unwrap_or(event);
                (n > 0).then(|| (event.to_owned(), n))
            })
            .collect();
        if counts.is_empty() {
            bail!("perf stat ({status}) counted no system calls:\n{text}");
        }
        counts.sort_by_key(|(name, n)| (EVENTS.contains(&name.as_str()), std::cmp::Reverse(*n)));
        Ok(counts)
    }
}

/// TCP segments sent by the whole machine so far (`OutSegs` of `/proc/net/snmp`): on
/// loopback every segment of wrk, the proxy and the backends.
pub(crate) fn tcp_segments_sent() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
