//! The snapshot store: one directory per snapshot, with a manifest that lists every
//! file with its size and SHA-256. A clone verifies the manifest first and refuses a
//! corrupt or truncated snapshot, naming the file.
//!
//! ```text
//! snapshots/<snapshot-id>/
//!   manifest.json     {format_version, snapshot_id, backend, source_instance_id, ...,
//!                      files: [{path, size_bytes, sha256}]}
//!   state/...         what the workload's snapshot hook wrote (process backend)
//!   workdir/...       a copy of the instance's working directory (process backend)
//!   memory.bin        the migration stream (qemu backend)
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use form_proto::types::v1 as types;
use prost::Message;

use crate::error::VmmError;

/// Current manifest format.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the snapshot directory.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// What a snapshot is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format_version: u32,
    /// Snapshot id.
    pub snapshot_id: String,
    /// Backend that made it (`process`, `qemu`).
    pub backend: String,
    /// Instance it was taken from.
    pub source_instance_id: String,
    /// Cluster of that instance.
    pub cluster_id: String,
    /// Generation of the source instance.
    pub generation: u64,
    /// What the source ran (encoded `form.types.v1.Workload`, hex).
    pub workload: String,
    /// vCPUs of the source (clones default to them).
    #[serde(default)]
    pub vcpus: u32,
    /// Memory of the source in MiB (clones default to it).
    #[serde(default)]
    pub memory_mib: u64,
    /// Machine arguments needed to restore it (qemu); empty for processes.
    pub machine_args: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Every file but the manifest.
    pub files: Vec<FileEntry>,
    /// The source's state contract cursor read just before the snapshot; empty when
    /// its workload does not implement the contract.
    #[serde(default)]
    pub state_cursor: String,
}

impl Manifest {
    /// Total size of the files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// The snapshot directory tree.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
    /// Files verified, with their stamp and digest then: a file whose stamp has not
    /// changed since is not hashed again (any write changes its change time).
    verified: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, (Stamp, String)>>>,
}

/// SHA-256 (hex) and size of the file at `path`.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        n += r as u64;
        h.update(&buf[..r]);
    }
    Ok((n, h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

/// Size and digest of the file `rel` of a snapshot, at `path`, as its manifest
/// records it: SHA-256 of the content, or for the guest memory file (`memory.ram`)
/// the block digest of [`crate::ramfile`], which skips holes.
pub fn file_digest(path: &Path, rel: &Path) -> std::io::Result<(u64, String)> {
    if crate::ramfile::is_snapshot_memory(rel) {
        crate::ramfile::digest(path)
    } else {
        sha256_file(path)
    }
}

/// A file's identity and last change, as `stat` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// The stamp of the file at `path`.
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A file changed less than this before it was verified is hashed again next time
/// (the kernel's file times are coarse: a write within the same tick as the check
/// could leave them as they were).
const RACY_NS: i128 = 2_000_000_000;

fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            walk(&entry.path(), base, out)?;
        } else if ty.is_file() {
            out.push(
                entry
                    .path()
                    .strip_prefix(base)
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            );
        }
    }
    Ok(())
}

/// Copies the tree `from` into `to` (files and directories; other kinds are skipped).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let target = to.join(entry.file_name());
        if ty.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if ty.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl SnapshotStore {
    /// The store under `root` (created if missing).
    pub fn open(root: PathBuf) -> Result<Self, VmmError> {
        std::fs::create_dir_all(&root)
            .map_err(VmmError::io(format!("creating {}", root.display())))?;
        Ok(Self {
            root,
            verified: Default::default(),
        })
    }

    /// Directory of snapshot `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// A new, empty directory for snapshot `id`.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, VmmError> {
        let d = self.dir(id);
        std::fs::create_dir_all(&d).map_err(VmmError::io(format!("creating {}", d.display())))?;
        Ok(d)
    }

    /// Hashes every file in the snapshot directory (but those in `known`, whose SHA-256
    /// the backend computed as it wrote them) and writes the manifest (fsynced).
    pub fn seal(
        &self,
        mut manifest: Manifest,
        known: &[(String, String)],
    ) -> Result<Manifest, VmmError> {
        let dir = self.dir(&manifest.snapshot_id);
        let mut files = Vec::new();
        walk(&dir, &dir, &mut files).map_err(VmmError::io(format!("listing {}", dir.display())))?;
        files.sort();
        manifest.files = files
            .into_iter()
            .filter(|p| p != Path::new(MANIFEST))
            .map(|p| {
                let full = dir.join(&p);
                let name = p.to_string_lossy().into_owned();
                let (size_bytes, sha256) = match known.iter().find(|(k, _)| *k == name) {
                    Some((_, sha)) => (
                        std::fs::metadata(&full)
                            .map_err(VmmError::io(format!("reading {}", p.display())))?
                            .len(),
                        sha.clone(),
                    ),
                    None => file_digest(&full, &p)
                        .map_err(VmmError::io(format!("hashing {}", p.display())))?,
                };
                Ok(FileEntry {
                    path: p.to_string_lossy().into_owned(),
                    size_bytes,
                    sha256,
                })
            })
            .collect::<Result<_, VmmError>>()?;
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| VmmError::Backend(e.to_string()))?;
        let path = dir.join(MANIFEST);
        let tmp = dir.join("manifest.json.tmp");
        std::fs::write(&tmp, json).map_err(VmmError::io(format!("writing {}", tmp.display())))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(VmmError::io(format!("syncing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(VmmError::io(format!("writing {}", path.display())))?;
        Ok(manifest)
    }

    /// Reads a snapshot's manifest, without checking the files.
    pub fn manifest(&self, id: &str) -> Result<Manifest, VmmError> {
        let path = self.dir(id).join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmmError::NotFound {
                    what: "snapshot",
                    id: id.to_owned(),
                });
            }
            Err(e) => return Err(VmmError::io(format!("reading {}", path.display()))(e)),
        };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| VmmError::CorruptSnapshot {
                snapshot: id.to_owned(),
                file: path.clone(),
                message: e.to_string(),
            })?;
        if m.format_version != FORMAT_VERSION {
            return Err(VmmError::CorruptSnapshot {
                snapshot: id.to_owned(),
                file: path,
                message: format!(
                    "format version {}; this build reads version {FORMAT_VERSION}",
                    m.format_version
                ),
            });
        }
        Ok(m)
    }

    /// Reads the manifest and checks every file's size and SHA-256, but the guest
    /// memory file (`memory.ram`): the qemu backend checks it as it loads it
    /// ([`crate::ramfile::sealed`]), once per snapshot.
    pub fn verify(&self, id: &str) -> Result<Manifest, VmmError> {
        let m = self.manifest(id)?;
        let dir = self.dir(id);
        for f in &m.files {
            let path = dir.join(&f.path);
            if crate::ramfile::is_snapshot_memory(Path::new(&f.path)) {
                continue;
            }
            let corrupt = |message: String| VmmError::CorruptSnapshot {
                snapshot: id.to_owned(),
                file: path.clone(),
                message,
            };
            let (size, sha) = self
                .digest(&path, Path::new(&f.path))
                .map_err(|e| corrupt(e.to_string()))?;
            if size != f.size_bytes {
                return Err(corrupt(format!(
                    "{size} bytes, the manifest says {} (truncated?)",
                    f.size_bytes
                )));
            }
            if sha != f.sha256 {
                return Err(corrupt("SHA-256 does not match the manifest".into()));
            }
        }
        Ok(m)
    }

    /// The digest of `path`, hashed again unless it was verified since its last change
    /// (by more than [`RACY_NS`]).
    fn digest(&self, path: &Path, rel: &Path) -> std::io::Result<(u64, String)> {
        let before = Stamp::of(path)?;
        let known = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(path)
            .filter(|(stamp, _)| *stamp == before)
            .map(|(_, d)| d.clone());
        if let Some(d) = known {
            return Ok((before.size, d));
        }
        let (size, d) = file_digest(path, rel)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_nanos() as i128)
            .unwrap_or(0);
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if Stamp::of(path)? == before && before.ctime_ns.max(before.mtime_ns) + RACY_NS < now {
            verified.insert(path.to_owned(), (before, d.clone()));
        } else {
            verified.remove(path);
        }
        Ok((size, d))
    }

    /// Every snapshot, newest first (directories without a valid manifest are skipped).
    pub fn list(&self) -> Result<Vec<Manifest>, VmmError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .map_err(VmmError::io(format!("listing {}", self.root.display())))?
        {
            let entry = entry.map_err(VmmError::io("listing snapshots"))?;
            if let Some(id) = entry.file_name().to_str()
                && let Ok(m) = self.manifest(id)
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| {
            (b.created_at_ms, &b.snapshot_id).cmp(&(a.created_at_ms, &a.snapshot_id))
        });
        Ok(out)
    }

    /// Deletes snapshot `id`, and what an unfinished pull of it left; returns the
    /// bytes freed. Not found when neither exists.
    pub fn delete(&self, id: &str) -> Result<u64, VmmError> {
        let partial = self.incoming(id);
        let partial_bytes = tree_bytes(&partial);
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .map_err(VmmError::io(format!("removing {}", partial.display())))?;
        }
        let m = match self.manifest(id) {
            Ok(m) => m,
            Err(VmmError::NotFound { .. }) if partial_bytes.is_some() => {
                return Ok(partial_bytes.unwrap_or(0));
            }
            Err(e) => return Err(e),
        };
        let dir = self.dir(id);
        std::fs::remove_dir_all(&dir)
            .map_err(VmmError::io(format!("removing {}", dir.display())))?;
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|p, _| !p.starts_with(&dir));
        Ok(m.size_bytes() + partial_bytes.unwrap_or(0))
    }

    /// Where a pull of snapshot `id` from another node keeps what it has received so
    /// far (`.incoming/<id>`: not an id, so never listed as a snapshot).
    pub fn incoming(&self, id: &str) -> PathBuf {
        self.root.join(INCOMING).join(id)
    }

    /// Makes the finished pull of `id` a snapshot of the store (one rename).
    pub fn install(&self, id: &str) -> Result<(), VmmError> {
        let (from, to) = (self.incoming(id), self.dir(id));
        std::fs::rename(&from, &to).map_err(VmmError::io(format!(
            "moving {} to {}",
            from.display(),
            to.display()
        )))
    }

    /// Bytes the store holds: its snapshots and unfinished pulls.
    pub fn usage_bytes(&self) -> u64 {
        tree_bytes(&self.root).unwrap_or(0)
    }

    /// Bytes free on the file system of the store, for an unprivileged writer.
    pub fn free_bytes(&self) -> Result<u64, VmmError> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(|e| {
            VmmError::io(format!("reading the free space of {}", self.root.display()))(e.into())
        })?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// Removes what pulls left more than `age` ago (a pull that no caller resumed).
    pub fn collect_incoming(&self, age: std::time::Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(self.root.join(INCOMING)) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|d| d >= age);
            if old && std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Directory of unfinished pulls, under the store's root.
const INCOMING: &str = ".incoming";

/// Bytes of the files under `dir`; `None` when it does not exist.
fn tree_bytes(dir: &Path) -> Option<u64> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files).ok()?;
    Some(
        files
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum(),
    )
}

/// Workload of a manifest (hex of the encoded message).
pub fn manifest_workload(m: &Manifest) -> Result<types::Workload, VmmError> {
    let bytes: Option<Vec<u8>> = (0..m.workload.len())
        .step_by(2)
        .map(|i| {
            m.workload
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    bytes
        .and_then(|b| types::Workload::decode(b.as_slice()).ok())
        .ok_or_else(|| {
            VmmError::Backend(format!(
                "snapshot {} has no readable workload",
                m.snapshot_id
            ))
        })
}

/// Hex of an encoded workload, for manifests.
pub fn workload_hex(w: &types::Workload) -> String {
    w.encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            snapshot_id: id.into(),
            backend: "process".into(),
            source_instance_id: "i1".into(),
            cluster_id: "web".into(),
            generation: 0,
            workload: String::new(),
            vcpus: 1,
            memory_mib: 128,
            machine_args: Vec::new(),
            created_at_ms: 1,
            files: Vec::new(),
            state_cursor: String::new(),
        }
    }

    #[test]
    fn sealed_snapshots_verify_and_damage_is_named() {
        let root = std::env::temp_dir().join(format!("form-snapshots-{}", std::process::id()));
        let store = SnapshotStore::open(root.clone()).expect("open");
        let dir = store.create_dir("s1").expect("dir");
        std::fs::create_dir_all(dir.join("state")).expect("mkdir");
        std::fs::write(dir.join("state/state.json"), b"{\"kv\":{}}").expect("write");
        std::fs::write(dir.join("workdir.bin"), vec![7u8; 1000]).expect("write");
        let m = store.seal(manifest("s1"), &[]).expect("seal");
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.size_bytes(), 1000 + 9);
        assert_eq!(store.verify("s1").expect("verifies"), m);

        std::fs::write(dir.join("workdir.bin"), vec![7u8; 999]).expect("truncate");
        let e = store.verify("s1").expect_err("truncated").to_string();
        assert!(e.contains("workdir.bin") && e.contains("truncated"), "{e}");
        std::fs::write(dir.join("workdir.bin"), vec![8u8; 1000]).expect("corrupt");
        let e = store.verify("s1").expect_err("corrupt").to_string();
        assert!(e.contains("workdir.bin") && e.contains("SHA-256"), "{e}");
        assert!(matches!(
            store.verify("nope"),
            Err(VmmError::NotFound { .. })
        ));
        assert_eq!(store.delete("s1").expect("delete"), 1009);
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_verified_file_is_not_hashed_again_until_it_changes() {
        let root = std::env::temp_dir().join(format!("form-verified-{}", std::process::id()));
        let store = SnapshotStore::open(root.clone()).expect("open");
        let dir = store.create_dir("s1").expect("dir");
        let file = dir.join("memory.bin");
        std::fs::write(&file, vec![1u8; 5000]).expect("write");
        store.seal(manifest("s1"), &[]).expect("seal");
        let cached = || {
            store
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(&file)
        };
        // Changed just now: hashed, not remembered (a write in the same clock tick
        // would not change its times).
        store.verify("s1").expect("verifies");
        assert!(
            !cached(),
            "a file changed within {RACY_NS} ns is not remembered"
        );
        let changed = Stamp::of(&file).expect("stat").ctime_ns;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            store.verify("s1").expect("verifies");
            if cached() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never remembered");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(Stamp::of(&file).expect("stat").ctime_ns == changed);
        // Any write changes its change time: hashed again, and refused.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &[2], 4999).expect("write");
        let e = store.verify("s1").expect_err("corrupt").to_string();
        assert!(e.contains("memory.bin") && e.contains("SHA-256"), "{e}");
        assert!(!cached());
        store.delete("s1").expect("delete");
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
