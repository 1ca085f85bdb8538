//! Snapshots written beside the log, on a thread of their own.
//!
//! The log writer cuts its segment at a snapshot's place in the log and goes on
//! appending to the next one at once; this thread encodes the state, writes it to
//! `snapshot-N.bin` (through a temporary file, synced, renamed, its directory synced)
//! and only then removes what it compacts: older snapshots and segments up to `N`.
//! Until then recovery still has the previous snapshot and every segment after it,
//! so a crash at any point of a snapshot loses nothing; and writes never wait for a
//! snapshot (encoding the whole state takes milliseconds at fleet size).
//!
//! A snapshot that fails is logged and counted and nothing is removed: the log still
//! holds every record, and the next snapshot tries again. A snapshot queued while an
//! older one waits replaces it (the newer covers more of the log). A file that a
//! durable snapshot compacts but that cannot be removed is left for the next one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::watch;

use super::{frame, recover, snapshot_path, sync_dir};
use crate::codec;
use crate::crdt::State;
use crate::error::StateError;

/// A snapshot to write: the state at the end of `segment`.
struct Job {
    segment: u64,
    state: Box<State>,
}

/// The sending side of the snapshot thread. Dropping it lets the thread write what
/// was queued and waits for it to end.
pub(super) struct Snapshotter {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Snapshotter {
    /// Starts the thread for `dir`; `done` is set to the segment of each snapshot once
    /// it is durable and what it compacts was removed (or tried).
    pub(super) fn start(dir: PathBuf, done: watch::Sender<u64>) -> Result<Self, StateError> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("form-state-snapshot".into())
            .spawn(move || run(&dir, &rx, &done))
            .map_err(StateError::io("form-state-snapshot thread"))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a snapshot of `state`, the state at the end of `segment`.
    pub(super) fn submit(&self, segment: u64, state: Box<State>) {
        let sent = self.tx.as_ref().map(|tx| tx.send(Job { segment, state }));
        if !matches!(sent, Some(Ok(()))) {
            metrics::counter!("form_state_snapshot_failures_total").increment(1);
            tracing::error!(
                segment,
                "the snapshot thread has stopped; the log keeps every record but is no longer compacted"
            );
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the snapshot thread panicked");
        }
    }
}

fn run(dir: &Path, rx: &mpsc::Receiver<Job>, done: &watch::Sender<u64>) {
    while let Ok(mut job) = rx.recv() {
        while let Ok(newer) = rx.try_recv() {
            job = newer;
        }
        let started = Instant::now();
        if let Err(e) = write_snapshot(dir, job.segment, &job.state) {
            metrics::counter!("form_state_snapshot_failures_total").increment(1);
            tracing::error!(error = %e, segment = job.segment, "snapshot failed; the log keeps every record and the next snapshot tries again");
            continue;
        }
        metrics::counter!("form_state_snapshots_total").increment(1);
        metrics::histogram!("form_state_snapshot_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = recover::remove_compacted(dir, job.segment) {
            metrics::counter!("form_state_compaction_failures_total").increment(1);
            tracing::error!(error = %e, segment = job.segment, "snapshot written, but a file it compacts could not be removed; the next snapshot tries again");
        }
        done.send_replace(job.segment);
    }
}

fn write_snapshot(dir: &Path, segment: u64, state: &State) -> Result<(), StateError> {
    let path = snapshot_path(dir, segment);
    let tmp = path.with_extension("tmp");
    let bytes = frame::encode_snapshot(segment, &codec::encode_state(state));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(StateError::io(&tmp))?;
        f.write_all(&bytes).map_err(StateError::io(&tmp))?;
        f.sync_all().map_err(StateError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(StateError::io(&path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir).map_err(StateError::io(dir))
}
