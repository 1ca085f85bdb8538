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
    // A snapshot that a crash interrupted before its rename is not one.
    for (_, path) in numbered(dir, "snapshot-", ".tmp")? {
        std::fs::remove_file(&path).map_err(StateError::io(&path))?;
    }
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
                Read::Torn(why)
                    if Some(*n) == last && frame::valid_record_after(&bytes, at).is_none() =>
                {
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

/// Removes snapshots older than `keep` (and temporary ones up to it) and segments up
/// to `keep`, file by file: one that cannot be removed does not keep the others; the
/// first failure is returned.
pub fn remove_compacted(dir: &Path, keep: u64) -> Result<(), StateError> {
    let old = numbered(dir, "snapshot-", ".bin")?
        .into_iter()
        .filter(|(n, _)| *n < keep)
        .chain(
            numbered(dir, "snapshot-", ".tmp")?
                .into_iter()
                .filter(|(n, _)| *n <= keep),
        )
        .chain(
            numbered(&dir.join("wal"), "", ".log")?
                .into_iter()
                .filter(|(n, _)| *n <= keep),
        );
    let mut first = None;
    for (_, path) in old {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a compacted file");
            first.get_or_insert(StateError::io(&path)(e));
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{frame, segment_path, snapshot_path};

    fn dir(label: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("form-recover-{label}-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&d));
        std::fs::create_dir_all(d.join("wal")).expect("mkdir");
        d
    }

    #[test]
    fn a_corrupt_snapshot_stops_recovery_naming_the_file() {
        let d = dir("snap");
        let mut snap = frame::encode_snapshot(3, b"state");
        let n = snap.len() - 1;
        snap[n] ^= 0xff;
        std::fs::write(snapshot_path(&d, 3), snap).expect("write");
        let e = recover(&d).expect_err("corrupt").to_string();
        assert!(
            e.contains("snapshot-000003.bin") && e.contains("checksum"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn a_torn_record_in_an_earlier_segment_is_corruption() {
        let d = dir("mid");
        let mut buf = Vec::new();
        frame::encode_record(&Record::Delta(b"abc".to_vec()), &mut buf);
        std::fs::write(segment_path(&d, 1), &buf[..buf.len() - 1]).expect("write");
        std::fs::write(segment_path(&d, 2), &buf).expect("write");
        let e = recover(&d).expect_err("corrupt").to_string();
        assert!(e.contains("000001.log") && e.contains("offset 0"), "{e}");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn a_damaged_length_before_valid_records_is_corruption_not_a_torn_tail() {
        let d = dir("length");
        let mut buf = Vec::new();
        frame::encode_record(&Record::Delta(b"one".to_vec()), &mut buf);
        frame::encode_record(&Record::Delta(b"two".to_vec()), &mut buf);
        buf[6] = 0xff;
        std::fs::write(segment_path(&d, 1), &buf).expect("write");
        let e = recover(&d).expect_err("corrupt").to_string();
        assert!(e.contains("000001.log") && e.contains("offset 0"), "{e}");
        assert_eq!(
            std::fs::read(segment_path(&d, 1)).expect("read"),
            buf,
            "nothing was cut off"
        );
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn a_snapshot_a_crash_interrupted_is_removed_and_the_log_replayed() {
        let d = dir("tmp");
        let mut buf = Vec::new();
        frame::encode_record(&Record::Delta(b"a".to_vec()), &mut buf);
        std::fs::write(segment_path(&d, 1), &buf).expect("write");
        let tmp = snapshot_path(&d, 1).with_extension("tmp");
        std::fs::write(&tmp, &frame::encode_snapshot(1, b"s")[..5]).expect("write");
        let r = recover(&d).expect("recovers");
        assert_eq!(r.snapshot, None);
        assert_eq!(r.records, [Record::Delta(b"a".to_vec())]);
        assert!(!tmp.exists(), "the unfinished snapshot is removed");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn segments_after_the_snapshot_are_replayed_in_order() {
        let d = dir("order");
        std::fs::write(snapshot_path(&d, 1), frame::encode_snapshot(1, b"s")).expect("write");
        for (n, payload) in [(1u64, "old"), (2, "a"), (3, "b")] {
            let mut buf = Vec::new();
            frame::encode_record(&Record::Delta(payload.as_bytes().to_vec()), &mut buf);
            std::fs::write(segment_path(&d, n), buf).expect("write");
        }
        let r = recover(&d).expect("recovers");
        assert_eq!(r.snapshot.as_deref(), Some(&b"s"[..]));
        assert_eq!(
            r.records,
            [Record::Delta(b"a".to_vec()), Record::Delta(b"b".to_vec())]
        );
        assert_eq!(r.segment, 3);
        assert!(
            !segment_path(&d, 1).exists(),
            "a segment the snapshot covers is removed"
        );
        std::fs::remove_dir_all(&d).expect("cleanup");
    }
}
