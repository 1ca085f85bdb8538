//! Guest RAM in files (`--qemu-memory file`, docs/vmm.md): where a VM's RAM lives,
//! the files of booted VMs on tmpfs, the sealed memory of snapshots that clones map,
//! and the migration capability that leaves RAM files out of a stream.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::QemuBackend;
use super::qmp::Qmp;
use crate::error::VmmError;
use crate::snapshots::Stamp;

/// Name of the copy of the guest's RAM file in a snapshot.
pub(super) const RAM_FILE: &str = crate::ramfile::NAME;
/// Snapshots whose RAM stays loaded for their next clones (each holds the memory the
/// guest had written).
const SEALED_KEPT: usize = 4;
/// The machine option that puts the guest's RAM in the memory backend `ram0`.
pub(super) const RAM_BACKEND: &str = "memory-backend=ram0";

/// Snapshots' RAM loaded into sealed memfds: the path of each `memory.ram`, when that
/// file last changed ([`changed`]), its memfd; the most recent last.
pub(super) type SealedKept = std::sync::Mutex<Vec<(PathBuf, Stamp, Arc<OwnedFd>)>>;

/// Where a VM's RAM lives.
#[derive(Debug, Clone)]
pub(super) enum Ram {
    /// Anonymous memory (`--qemu-memory stream`, and clones of snapshots made so: their
    /// stream names the block `pc.ram`).
    Anonymous,
    /// A file of its own, shared with QEMU: a snapshot copies it.
    Shared(PathBuf),
    /// A snapshot's RAM, loaded into a sealed memfd ([`crate::ramfile::sealed`]) and
    /// mapped privately: written pages are the clone's own, the others are shared
    /// with the clone's siblings.
    Private(Arc<OwnedFd>),
}

impl Ram {
    /// The QEMU arguments of the memory backend of a VM that boots with `boot_mib`.
    pub(super) fn args(&self, boot_mib: u64) -> Vec<String> {
        let (path, share) = match self {
            Ram::Anonymous => return Vec::new(),
            Ram::Shared(p) => (p.display().to_string(), "on"),
            // QEMU opens the memfd through this process's descriptor table.
            Ram::Private(fd) => (
                format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()),
                "off",
            ),
        };
        vec![
            "-object".into(),
            format!("memory-backend-file,id=ram0,size={boot_mib}M,mem-path={path},share={share}"),
        ]
    }
}

impl QemuBackend {
    /// Snapshot `snapshot`'s RAM file `path` in a sealed memfd, loaded (and checked
    /// against `digest`) at its first clone; kept for the next ones while the file is
    /// there (the most recent [`SEALED_KEPT`]).
    pub(super) async fn sealed_memory(
        &self,
        snapshot: &str,
        path: &Path,
        digest: &str,
    ) -> Result<Arc<OwnedFd>, VmmError> {
        let lock = || {
            self.inner
                .sealed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        {
            // A file changed or gone since its memory was kept is loaded (and checked)
            // again: what it holds now is what a clone is made of.
            let mut kept = lock();
            kept.retain(|(p, stamp, _)| changed(p) == Some(*stamp));
            if let Some(k) = kept.iter().position(|(p, _, _)| p == path) {
                let e = kept.remove(k);
                let fd = e.2.clone();
                kept.push(e);
                return Ok(fd);
            }
        }
        let (p, d) = (path.to_owned(), digest.to_owned());
        let fd = tokio::task::spawn_blocking(move || crate::ramfile::sealed(&p, &d))
            .await
            .map_err(|e| VmmError::Backend(e.to_string()))?
            .map_err(|e| match e.kind() {
                // Missing, or not what the manifest says: the snapshot is damaged.
                std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData => {
                    VmmError::CorruptSnapshot {
                        snapshot: snapshot.to_owned(),
                        file: path.to_owned(),
                        message: e.to_string(),
                    }
                }
                // The host's trouble (memory, a read error): not the snapshot's.
                _ => VmmError::io(format!("loading {}", path.display()))(e),
            })?;
        let fd = Arc::new(fd);
        self.keep_sealed(path.to_owned(), fd.clone());
        Ok(fd)
    }

    /// Keeps `fd`, the sealed memory of the snapshot file `path`, for its clones (the
    /// most recent [`SEALED_KEPT`]).
    pub(super) fn keep_sealed(&self, path: PathBuf, fd: Arc<OwnedFd>) {
        let Some(stamp) = changed(&path) else {
            return;
        };
        let mut kept = self
            .inner
            .sealed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.retain(|(p, st, _)| *p != path && changed(p) == Some(*st));
        kept.push((path, stamp, fd));
        if kept.len() > SEALED_KEPT {
            kept.remove(0);
        }
    }

    /// Lets go of the sealed memory of the snapshot in `dir` (deleted).
    pub(super) fn forget_sealed(&self, dir: &Path) {
        self.inner
            .sealed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(p, _, _)| !p.starts_with(dir));
    }

    /// The RAM file of VM `id` when it has its own.
    pub(super) fn ram_path(&self, id: &str) -> PathBuf {
        self.inner
            .ram_dir
            .join(format!("{id}.{}", crate::ramfile::EXT))
    }
}

/// When the file at `path` last changed, or `None` when it is gone.
fn changed(path: &Path) -> Option<Stamp> {
    Stamp::of(path).ok()
}

/// Where the RAM files of the VMs under `root` live: on tmpfs (`/dev/shm`) where there
/// is one, so that a guest's writes are not written back to a disk, in a directory of
/// this backend's own (nodes on one host keep apart); else beside the VMs.
pub(super) fn ram_dir(root: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return root.join(".ram");
    }
    // The same directory by any path that names it (a relative --data-dir too).
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let key: String = Sha256::digest(root.as_os_str().as_encoded_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    shm.join(format!("form-vmm-{key}"))
}

/// A new RAM file of `mib` MiB at `path` (all holes), readable by the service only: it
/// will hold a guest's whole memory. One left by a crash is replaced.
pub(super) fn new_ram_file(path: &Path, mib: u64) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let what = || format!("creating the RAM file {}", path.display());
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(VmmError::io(what())(e)),
        _ => {}
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    // The directory goes when its last file does (a delete racing this one may remove
    // it between the two steps: then again).
    let create = || {
        private_dir(dir)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    };
    let file = create()
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => create(),
            _ => Err(e),
        })
        .map_err(VmmError::io(what()))?;
    // A guest that writes past what the file system holds is killed (SIGBUS): refused
    // before it starts (tmpfs is often small in containers: /dev/shm is 64 MiB there).
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|v| v.blocks_available() * v.fragment_size())
        .map_err(|e| VmmError::io(what())(e.into()))?;
    if free < mib << 20 {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(VmmError::FailedPrecondition(format!(
            "{} has {} MiB free, and a VM of {mib} MiB may need all of it for its RAM; \
             give it more room (a container's --shm-size) or run the node with \
             --qemu-memory stream",
            dir.display(),
            free >> 20
        )));
    }
    file.set_len(mib << 20).map_err(VmmError::io(what()))
}

/// Makes `dir` (mode 0700) or checks the one there: a directory, not a link, of this
/// user, that nobody else may enter. In a directory all may write to (`/dev/shm`),
/// another user could otherwise have made it first to read or swap the guests' memory.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let m = std::fs::symlink_metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if !m.file_type().is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of this user (uid {me}): a {} of uid {} with mode {:o}; remove it",
                dir.display(),
                if m.file_type().is_symlink() {
                    "link"
                } else if m.file_type().is_dir() {
                    "directory"
                } else {
                    "file"
                },
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Sets `x-ignore-shared`: when on, a migration leaves out RAM in shared files (the
/// source) or in the mapped file (a clone), and carries the device state.
pub(super) async fn ignore_shared(qmp: &mut Qmp, on: bool) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": on }]
        })),
    )
    .await
    .map(|_| ())
}
