//! Helpers for supervising child processes (workloads, QEMU): free ports, signals to
//! process groups, the end of a log file.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::VmmError;
use crate::hypervisor::InstanceInfo;

/// Bytes of a log quoted when a child fails.
const TAIL_BYTES: usize = 2000;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    form_runtime::clock::unix_ms()
}

/// An instance's service and admin addresses on `host`: two distinct free ports that
/// none of `instances` has (see `form_runtime::ports`).
pub(crate) fn instance_addrs<'a>(
    host: IpAddr,
    instances: impl IntoIterator<Item = &'a InstanceInfo>,
) -> Result<(SocketAddr, SocketAddr), VmmError> {
    let mut avoid: Vec<u16> = instances
        .into_iter()
        .flat_map(|i| [Some(i.address), i.admin_address])
        .flatten()
        .map(|a| a.port())
        .collect();
    let mut choose = || {
        let port = form_runtime::ports::choose(host, &avoid)
            .map_err(VmmError::io(format!("choosing a free port on {host}")))?;
        avoid.push(port);
        Ok::<_, VmmError>(SocketAddr::new(host, port))
    };
    Ok((choose()?, choose()?))
}

/// The end of a log file (only its last bytes are read).
/// The log is the workload's (in a directory its user owns): a link or a FIFO put in
/// its place is not read.
pub(crate) fn tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = open_regular(path, std::fs::OpenOptions::new().read(true)) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES as u64)));
    let mut bytes = Vec::with_capacity(TAIL_BYTES);
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// Opens `path` with `options` only if it is a regular file: a link is not followed,
/// and a FIFO does not block the open (it is refused).
pub(crate) fn open_regular(
    path: &Path,
    options: &mut std::fs::OpenOptions,
) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::unix::fs::OpenOptionsExt;
    let f = options
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let flags = OFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFL)?);
    fcntl(&f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(f)
}

/// Sends `signal` to the process group of `pid` (ignoring a group already gone).
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(p), signal);
    }
}

/// A number no other instance of this process had: a reaper compares it, so it never
/// marks a later instance that reused the id.
pub(crate) fn serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Claims `dir` for a new instance: fails if it exists (an id in use, or left behind).
pub(crate) fn claim_dir(dir: &Path, id: &str) -> Result<(), VmmError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(VmmError::io(format!("creating {}", parent.display())))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(
            VmmError::FailedPrecondition(format!("instance {id} already exists")),
        ),
        Err(e) => Err(VmmError::io(format!("creating {}", dir.display()))(e)),
    }
}

/// A backend's instances by id, behind one lock that is never held across an await.
#[derive(Debug)]
pub(crate) struct Table<T> {
    map: Mutex<BTreeMap<String, T>>,
}

impl<T> Table<T> {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(BTreeMap::new()),
        }
    }

    /// The table, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<String, T>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on instance `id`, or fails with `NotFound`.
    pub(crate) fn with<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut T) -> Result<R, VmmError>,
    ) -> Result<R, VmmError> {
        let mut map = self.lock();
        let entry = map.get_mut(id).ok_or_else(|| VmmError::NotFound {
            what: "instance",
            id: id.to_owned(),
        })?;
        f(entry)
    }
}

/// Waits in a task for `child` to exit: `on_exit` records the exit status, then `exit`
/// publishes it. Register the instance before calling, so a child that exits at once is
/// still recorded.
pub(crate) fn reap(
    mut child: tokio::process::Child,
    exit: watch::Sender<Option<String>>,
    on_exit: impl FnOnce(&str) + Send + 'static,
) {
    tokio::spawn(async move {
        let what = match child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("lost: {e}"),
        };
        on_exit(&what);
        let _ = exit.send(Some(what));
    });
}

#[cfg(test)]
mod tests {
    use super::{open_regular, tail};

    /// A workload may put a link or a FIFO where its log was: neither is opened (the
    /// FIFO without blocking, though no one writes to it), and the tail of it is empty.
    #[test]
    fn only_a_regular_file_is_opened_as_a_log() {
        let dir = std::env::temp_dir().join(format!("form-open-regular-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (file, link, fifo) = (dir.join("file"), dir.join("link"), dir.join("fifo"));
        std::fs::write(&file, "the end\n").expect("write");
        std::os::unix::fs::symlink(&file, &link).expect("link");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        let read = || {
            let mut o = std::fs::OpenOptions::new();
            o.read(true);
            o
        };
        assert!(open_regular(&file, &mut read()).is_ok());
        assert!(
            open_regular(&link, &mut read()).is_err(),
            "a link is followed"
        );
        let e = open_regular(&fifo, &mut read()).expect_err("a FIFO is opened");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert_eq!(tail(&file), "the end");
        assert_eq!(tail(&link), "");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
