//! Reading the data directory back at start-up.

use std::path::{Path, PathBuf};

use super::Record;
use super::frame::{self, Read};
use crate::error::StateError;

/// What the data directory held.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The newest snapshot's payload (an encoded state), if any.
    pub snapshot: Option<Vec<u8>>,
    /// The segment the snapshot was taken at (0 without one).
    pub snapshot_segment: u64,
    /// Records after the snapshot, in order.
    pub records: Vec<Record>,
    /// The segment to append to.
    pub segment: u64,
    /// A torn tail that was cut off: file, offset and why.
    pub torn: Option<(PathBuf, usize, String)>,
}

fn numbered(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<(u64, PathBuf)>, StateError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StateError::io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StateError::io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the newest snapshot and the log after it; cuts a torn tail off the last
/// segment; fails on anything else that is not valid, naming file and offset.
pub fn recover(dir: &Path) -> Result<Recovered, StateError> {
    let wal_dir = dir.join("wal");
    std::fs::create_dir_all(&wal_dir).map_err(StateError::io(&wal_dir))?;
    let mut out = Recovered::default();
    if let Some((n, path)) = numbered(dir, "snapshot-", ".bin")?.pop() {
        let bytes = std::fs::read(&path).map_err(StateError::io(&path))?;
        let (segment, payload) =
            frame::decode_snapshot(&bytes).map_err(|message| StateError::Storage {
                path: path.clone(),
                message,
            })?;
        if segment != n {
            return Err(StateError::Storage {
                path,
                message: format!("names segment {segment} inside, {n} in its file name"),
            });
        }
        out.snapshot = Some(payload.to_vec());
        out.snapshot_segment = n;
    }
    let segments = numbered(&wal_dir, "", ".log")?;
    let last = segments.last().map(|(n, _)| *n);
    for (n, path) in &segments {
        if *n <= out.snapshot_segment {
            // Left by a compaction that stopped before deleting it: the snapshot has it.
            std::fs::remove_file(path).map_err(StateError::io(path))?;
            continue;
        }
        let bytes = std::fs::read(path).map_err(StateError::io(path))?;
        let mut at = 0;
        loop {
            match frame::read_record(&bytes, at) {
                Read::Record(r, next) => {
                    out.records.push(r);
                    at = next;
                }
                Read::End => break,
                Read::Torn(why) if Some(*n) == last => {
                    tracing::warn!(file = %path.display(), offset = at, reason = %why, "dropping a torn last record");
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(StateError::io(path))?;
                    f.set_len(at as u64).map_err(StateError::io(path))?;
                    f.sync_all().map_err(StateError::io(path))?;
                    out.torn = Some((path.clone(), at, why));
                    break;
                }
                Read::Torn(why) | Read::Corrupt(why) => {
                    return Err(StateError::Storage {
                        path: path.clone(),
                        message: format!(
                            "offset {at}: {why}; refusing to start (the data after it would be lost)"
                        ),
                    });
                }
            }
        }
        out.segment = *n;
    }
    if out.segment == 0 {
        out.segment = out.snapshot_segment + 1;
    }
    Ok(out)
}

/// Removes snapshots older than `keep` and segments up to `keep`.
pub fn remove_compacted(dir: &Path, keep: u64) -> Result<(), StateError> {
    for (n, path) in numbered(dir, "snapshot-", ".bin")? {
        if n < keep {
            std::fs::remove_file(&path).map_err(StateError::io(&path))?;
        }
    }
    for (n, path) in numbered(&dir.join("wal"), "", ".log")? {
        if n <= keep {
            std::fs::remove_file(&path).map_err(StateError::io(&path))?;
        }
    }
    Ok(())
}
