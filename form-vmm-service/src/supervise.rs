//! Helpers for supervising child processes (workloads, QEMU): free ports, signals to
//! process groups, the end of a log file.

use std::net::IpAddr;
use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::VmmError;

/// Bytes of a log quoted when a child fails.
const TAIL_BYTES: usize = 2000;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A port on `host` that was free a moment ago.
pub(crate) fn free_port(host: IpAddr) -> Result<u16, VmmError> {
    let l = std::net::TcpListener::bind((host, 0))
        .map_err(VmmError::io(format!("finding a free port on {host}")))?;
    Ok(l.local_addr()
        .map_err(VmmError::io("finding a free port"))?
        .port())
}

/// The end of a log file.
pub(crate) fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

/// Sends `signal` to the process group of `pid` (ignoring a group already gone).
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(p), signal);
    }
}
