//! The log writer: one thread that appends records, fsyncs once per batch (group
//! commit) and reports the highest durable `lsn`; it also rotates segments and writes
//! snapshots, in order with the records.
//!
//! A batch that cannot be written (a full disk, an I/O error) is not dropped and does
//! not stop the writer: the segment is cut back to its last good length (so no torn
//! frame stays behind), the failure is published (the replica turns NOT_SERVING and
//! acknowledges nothing more), and the same batch is tried again with a growing pause
//! until it is written; then the failure is cleared and durability moves on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::watch;

use super::slow_disk::{SlowDisk, SyncLatency};
use super::{Record, frame, recover, segment_path, snapshot_path, sync_dir};
use crate::codec;
use crate::crdt::State;
use crate::error::StateError;

/// Records written per fsync at most.
const MAX_BATCH: usize = 4096;
/// First pause before a failed batch is tried again; it doubles up to the next.
const RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// What the writer has made durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    /// Every record up to this lsn is on disk.
    pub lsn: u64,
    /// Set while the writer fails (it keeps trying); no write past `lsn` is
    /// acknowledged meanwhile.
    pub error: Option<String>,
    /// Where the durable log ends: the segment written to, and its length. A machine
    /// crash keeps at least this much of it (a simulator cuts the rest).
    pub end: (u64, u64),
}

enum Command {
    Append(u64, Record),
    Snapshot(u64, Box<State>),
}

/// The sending side of the writer.
#[derive(Debug, Clone)]
pub struct WalHandle {
    tx: mpsc::Sender<Command>,
    /// What the writer thread wrote and synced.
    written: watch::Receiver<Durable>,
    /// What the disk has kept: `written`, or, on a simulated slow disk, `written` a
    /// drawn latency later ([`SyncLatency`]).
    durable: watch::Receiver<Durable>,
    /// What writes wait for before they are acknowledged: `durable`, unless broken on
    /// purpose ([`SyncLatency::ack_before_sync`]).
    acked: watch::Receiver<Durable>,
    /// The simulated slow disk, if any.
    slow: Option<std::sync::Arc<SlowDisk>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append(l, _) => write!(f, "Append({l})"),
            Command::Snapshot(l, _) => write!(f, "Snapshot({l})"),
        }
    }
}

impl WalHandle {
    /// Queues `record`, which was applied as change `lsn` (queue in lsn order).
    pub fn append(&self, lsn: u64, record: Record) -> Result<(), StateError> {
        if let Some(slow) = &self.slow {
            slow.appended(lsn, &record);
        }
        self.tx
            .send(Command::Append(lsn, record))
            .map_err(|_| StateError::Unavailable("the log writer stopped".into()))
    }

    /// Queues a snapshot of `state` (the state after change `lsn`) and a new segment.
    pub fn snapshot(&self, lsn: u64, state: State) -> Result<(), StateError> {
        if let Some(slow) = &self.slow {
            slow.rotated(lsn);
        }
        self.tx
            .send(Command::Snapshot(lsn, Box::new(state)))
            .map_err(|_| StateError::Unavailable("the log writer stopped".into()))
    }

    /// Waits until change `lsn` is durable.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StateError> {
        let stopped = |_| StateError::Unavailable("the log writer stopped".into());
        let done = |d: &Durable| d.lsn >= lsn || d.error.is_some();
        let mut written = self.written.clone();
        let now = written.borrow().clone();
        let d = if done(&now) {
            now
        } else {
            // The writer is a thread: simulated time waits for it (form_runtime::clock).
            let _hold = form_runtime::clock::hold();
            written.wait_for(done).await.map_err(stopped)?.clone()
        };
        if let Some(e) = d.error.filter(|_| d.lsn < lsn) {
            return Err(StateError::Unavailable(format!(
                "the write-ahead log cannot write ({e}); this change is not acknowledged: \
                 it may still be kept once the log writes again, so retry it"
            )));
        }
        // A simulated slow disk keeps it later, on simulated time (unheld).
        let mut acked = self.acked.clone();
        acked.wait_for(|d| d.lsn >= lsn).await.map_err(stopped)?;
        Ok(())
    }

    /// Why the writer fails, while it does.
    pub fn failing(&self) -> Option<String> {
        self.written.borrow().error.clone()
    }

    /// A receiver of durability updates.
    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    /// A receiver of what the writer thread wrote (closed once the thread ended).
    pub fn written(&self) -> watch::Receiver<Durable> {
        self.written.clone()
    }
}

/// Starts the writer thread appending to `segment` of `dir`; `first_lsn` is durable.
/// With a `latency` (a simulated slow disk, inside a runtime), a sync is durable only
/// that much later, each after the one before.
pub fn spawn(
    dir: PathBuf,
    segment: u64,
    first_lsn: u64,
    latency: Option<SyncLatency>,
) -> Result<WalHandle, StateError> {
    let path = segment_path(&dir, segment);
    let file = open_segment(&path)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let (tx, rx) = mpsc::channel();
    let (dtx, written) = watch::channel(Durable {
        lsn: first_lsn,
        error: None,
        end: (segment, len),
    });
    std::thread::Builder::new()
        .name("form-state-wal".into())
        .spawn(move || run(dir, segment, file, rx, dtx))
        .map_err(StateError::io("form-state-wal thread"))?;
    let (slow, durable) = match latency.clone() {
        None => (None, written.clone()),
        Some(l) => {
            let (slow, durable) = SlowDisk::start(l, written.clone(), (segment, len));
            (Some(std::sync::Arc::new(slow)), durable)
        }
    };
    let acked = match latency {
        Some(l) if l.ack_before_sync => written.clone(),
        _ => durable.clone(),
    };
    Ok(WalHandle {
        tx,
        written,
        durable,
        acked,
        slow,
    })
}

fn open_segment(path: &Path) -> Result<std::fs::File, StateError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(StateError::io(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(StateError::io(dir))?;
    }
    Ok(f)
}

fn run(
    dir: PathBuf,
    mut segment: u64,
    mut file: std::fs::File,
    rx: mpsc::Receiver<Command>,
    durable: watch::Sender<Durable>,
) {
    let mut buf = Vec::new();
    // The segment's length after the last successful flush.
    let mut good_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut pause = RETRY_MIN;
        let mut lsn = durable.borrow().lsn;
        // Commands of the batch already on disk (those before a snapshot that was
        // written): a retry starts after them.
        let mut done = 0;
        loop {
            let result = write_batch(
                &dir,
                &mut segment,
                &mut file,
                &mut good_len,
                &mut buf,
                &batch[done..],
                &mut done,
                &mut lsn,
            );
            match result {
                Ok(()) => {
                    durable.send_modify(|d| {
                        if d.error.take().is_some() {
                            tracing::info!("write-ahead log writes again; writes are acknowledged");
                        }
                        d.lsn = d.lsn.max(lsn);
                        d.end = (segment, good_len);
                    });
                    break;
                }
                Err(e) => {
                    buf.clear();
                    // No torn frame stays: the segment goes back to its last good end.
                    let _ = file.set_len(good_len);
                    if durable.borrow().error.is_none() {
                        tracing::error!(error = %e, "write-ahead log failed; nothing more is acknowledged until it writes again (retrying)");
                    }
                    metrics::counter!("form_state_wal_failures_total").increment(1);
                    durable.send_modify(|d| d.error = Some(e.to_string()));
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// Writes `batch` (records, snapshots) and fsyncs; `lsn` ends at its last change and
/// `done` grows by the commands made durable before a failure.
#[allow(clippy::too_many_arguments)]
fn write_batch(
    dir: &Path,
    segment: &mut u64,
    file: &mut std::fs::File,
    good_len: &mut u64,
    buf: &mut Vec<u8>,
    batch: &[Command],
    done: &mut usize,
    lsn: &mut u64,
) -> Result<(), StateError> {
    let mut pending = 0;
    for cmd in batch {
        pending += 1;
        match cmd {
            Command::Append(l, record) => {
                frame::encode_record(record, buf);
                *lsn = *l;
            }
            Command::Snapshot(l, state) => {
                flush(file, buf, &segment_path(dir, *segment))?;
                *good_len = file.metadata().map(|m| m.len()).unwrap_or(*good_len);
                // The records before the snapshot are on disk now.
                *done += pending - 1;
                pending = 1;
                write_snapshot(dir, *segment, state)?;
                *segment += 1;
                *file = open_segment(&segment_path(dir, *segment))?;
                *good_len = 0;
                recover::remove_compacted(dir, *segment - 1)?;
                metrics::counter!("form_state_snapshots_total").increment(1);
                *lsn = (*lsn).max(*l);
                *done += pending;
                pending = 0;
            }
        }
    }
    flush(file, buf, &segment_path(dir, *segment))?;
    *good_len = file.metadata().map(|m| m.len()).unwrap_or(*good_len);
    Ok(())
}

fn flush(file: &mut std::fs::File, buf: &mut Vec<u8>, path: &Path) -> Result<(), StateError> {
    if buf.is_empty() {
        return Ok(());
    }
    file.write_all(buf).map_err(StateError::io(path))?;
    let started = Instant::now();
    file.sync_data().map_err(StateError::io(path))?;
    metrics::histogram!("form_state_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("form_state_wal_bytes_total").increment(buf.len() as u64);
    buf.clear();
    Ok(())
}

fn write_snapshot(dir: &Path, segment: u64, state: &State) -> Result<(), StateError> {
    let path = snapshot_path(dir, segment);
    let tmp = path.with_extension("tmp");
    let bytes = frame::encode_snapshot(segment, &codec::encode_state(state));
    let mut f = std::fs::File::create(&tmp).map_err(StateError::io(&tmp))?;
    f.write_all(&bytes).map_err(StateError::io(&tmp))?;
    f.sync_all().map_err(StateError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(StateError::io(&path))?;
    sync_dir(dir).map_err(StateError::io(dir))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_slow_disk_acknowledges_a_write_after_its_sync_and_says_where_the_log_ends() {
        let dir = form_testkit::TestDir::new("slow-disk");
        std::fs::create_dir_all(dir.path().join("wal")).expect("wal dir");
        let latency = SyncLatency {
            draw: Arc::new(|| Duration::from_millis(50)),
            ack_before_sync: false,
        };
        let wal = spawn(dir.path().to_owned(), 1, 0, Some(latency)).expect("writer");
        let started = std::time::Instant::now();
        wal.append(1, Record::Delta(vec![7; 100])).expect("append");
        wal.wait_durable(1).await.expect("durable");
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "acknowledged after {:?}, before the disk's sync",
            started.elapsed()
        );
        let d = wal.durable().borrow().clone();
        let len = std::fs::metadata(segment_path(dir.path(), 1))
            .expect("segment")
            .len();
        assert!(len > 100, "the record is in the segment");
        assert_eq!((d.lsn, d.end), (1, (1, len)), "{d:?}");
    }
}
