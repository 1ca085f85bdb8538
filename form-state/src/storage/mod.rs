//! Durable storage in `--data-dir`: a write-ahead log of every applied delta, fsynced
//! before a write is acknowledged (group commit), and snapshots that compact it.
//!
//! ```text
//! data-dir/
//!   incarnation           this data dir's incarnation (actor = replica-id@incarnation)
//!   node.key              default --node-key
//!   snapshot-000007.bin   state at the end of wal segment 7
//!   wal/000008.log        records after it, in apply order
//! ```
//!
//! A snapshot is written on its own thread while the log goes on in the next segment;
//! what it compacts is removed only once it is durable (`snapshotter`).
//! Recovery loads the newest snapshot, then replays the segments after it. A torn last
//! record (crash mid-write) is dropped with a warning; a bad record anywhere else, or a
//! corrupt snapshot, stops start-up with an error naming the file and offset.

pub mod frame;
pub mod recover;
pub mod slow_disk;
mod snapshotter;
pub mod writer;

use std::path::{Path, PathBuf};

/// A record of the write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A signed delta (encoded `form.state.v1.SignedDelta`), as applied.
    Delta(Vec<u8>),
    /// A peer's whole state joined into ours (encoded state).
    FullState(Vec<u8>),
}

impl Record {
    fn kind(&self) -> u8 {
        match self {
            Record::Delta(_) => 1,
            Record::FullState(_) => 2,
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            Record::Delta(b) | Record::FullState(b) => b,
        }
    }
}

/// Path of WAL segment `n`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join("wal").join(format!("{n:06}.log"))
}

/// Path of the snapshot taken at the end of segment `n`.
pub fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:06}.bin"))
}

/// Fsyncs a directory, so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
