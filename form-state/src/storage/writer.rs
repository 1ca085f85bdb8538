//! The log writer: one thread that appends records, fsyncs once per batch (group
//! commit) and reports the highest durable `lsn`; at a snapshot's place among the
//! records it starts a new segment and hands the state to the snapshot thread
//! (`snapshotter`), so no write waits for a snapshot to be written.
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
use super::snapshotter::Snapshotter;
use super::{Record, frame, segment_path, sync_dir};
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
    /// The segment of the last snapshot made durable since start (0: none yet).
    snapshotted: watch::Receiver<u64>,
}

impl Command {
    /// The change it was queued after.
    fn lsn(&self) -> u64 {
        match self {
            Command::Append(l, _) | Command::Snapshot(l, _) => *l,
        }
    }
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

    /// A receiver of what the writer thread wrote (closed once the thread ended, and
    /// with it the snapshot thread).
    pub fn written(&self) -> watch::Receiver<Durable> {
        self.written.clone()
    }

    /// A receiver of the segment of the last snapshot made durable (0: none yet since
    /// start); when it moves, what the snapshot compacts is removed.
    pub fn snapshotted(&self) -> watch::Receiver<u64> {
        self.snapshotted.clone()
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
    let (stx, snapshotted) = watch::channel(0);
    let snapshots = Snapshotter::start(dir.clone(), stx)?;
    std::thread::Builder::new()
        .name("form-state-wal".into())
        .spawn(move || {
            // Dropped in reverse order, on a panic too: the snapshot thread has ended
            // (and nothing more touches the files) before the written watch closes.
            let written = dtx;
            let snapshots = snapshots;
            run(dir, segment, file, &rx, &written, &snapshots);
        })
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
        snapshotted,
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
    rx: &mpsc::Receiver<Command>,
    durable: &watch::Sender<Durable>,
    snapshots: &Snapshotter,
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
            let mut log = Log {
                dir: &dir,
                segment: &mut segment,
                file: &mut file,
                good_len: &mut good_len,
                buf: &mut buf,
                snapshots,
            };
            let result = log.write_batch(&batch[done..], &mut done, &mut lsn);
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
                    // What the batch synced before it failed (the records before a
                    // snapshot's place whose next segment would not open) is durable:
                    // their writes are acknowledged, not told to retry.
                    let synced = batch[..done].iter().map(Command::lsn).max();
                    durable.send_modify(|d| {
                        d.error = Some(e.to_string());
                        if let Some(l) = synced.filter(|l| *l > d.lsn) {
                            d.lsn = l;
                            d.end = (segment, good_len);
                        }
                    });
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// The segment being written, as a batch sees it.
struct Log<'a> {
    dir: &'a Path,
    segment: &'a mut u64,
    file: &'a mut std::fs::File,
    /// The segment's length after the last successful flush.
    good_len: &'a mut u64,
    buf: &'a mut Vec<u8>,
    snapshots: &'a Snapshotter,
}

impl Log<'_> {
    /// Writes `batch` (records, snapshots' places) and fsyncs; `lsn` ends at its last
    /// change and `done` grows by the commands made durable before a failure.
    fn write_batch(
        &mut self,
        batch: &[Command],
        done: &mut usize,
        lsn: &mut u64,
    ) -> Result<(), StateError> {
        let mut pending = 0;
        for cmd in batch {
            pending += 1;
            match cmd {
                Command::Append(l, record) => {
                    frame::encode_record(record, self.buf);
                    *lsn = *l;
                }
                Command::Snapshot(l, state) => {
                    self.flush()?;
                    // The records before the snapshot are on disk now.
                    *done += pending - 1;
                    pending = 1;
                    let next = *self.segment + 1;
                    *self.file = open_segment(&segment_path(self.dir, next))?;
                    *self.good_len = self.file.metadata().map_or(0, |m| m.len());
                    let ended = std::mem::replace(self.segment, next);
                    self.snapshots.submit(ended, state.clone());
                    *lsn = (*lsn).max(*l);
                    *done += pending;
                    pending = 0;
                }
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), StateError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = segment_path(self.dir, *self.segment);
        self.file
            .write_all(self.buf)
            .map_err(StateError::io(&path))?;
        let started = Instant::now();
        self.file.sync_data().map_err(StateError::io(&path))?;
        metrics::histogram!("form_state_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("form_state_wal_bytes_total").increment(self.buf.len() as u64);
        // Appended after the last good end (a failed write was cut back to it).
        *self.good_len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::recover;
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

    fn delta(n: u8) -> Record {
        Record::Delta(vec![n; 10])
    }

    /// Drops the writer and returns once its thread (and the snapshot thread) ended.
    async fn stop(wal: WalHandle) {
        let mut written = wal.written();
        drop(wal);
        while written.changed().await.is_ok() {}
    }

    /// Returns once the snapshot of `segment` is durable (within 10 s).
    async fn snapshot_written(wal: &WalHandle, segment: u64) {
        tokio::time::timeout(
            Duration::from_secs(10),
            wal.snapshotted().wait_for(|s| *s == segment),
        )
        .await
        .unwrap_or_else(|_| panic!("snapshot {segment} not written within 10 s"))
        .expect("the snapshot thread runs");
    }

    #[tokio::test]
    async fn writes_go_on_while_a_snapshot_is_held_and_the_next_snapshot_compacts() {
        let dir = form_testkit::TestDir::new("snapshot-beside");
        std::fs::create_dir_all(dir.path().join("wal")).expect("wal dir");
        // The first snapshot's temporary file is a FIFO: the snapshot thread blocks
        // opening it until a reader comes, then fails to sync it (a FIFO cannot be).
        let fifo = super::super::snapshot_path(dir.path(), 1).with_extension("tmp");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success(), "mkfifo {}", fifo.display());
        let wal = spawn(dir.path().to_owned(), 1, 0, None).expect("writer");
        for l in 1..=3 {
            wal.append(l, delta(l as u8)).expect("append");
        }
        wal.snapshot(3, State::default()).expect("snapshot");
        for l in 4..=5 {
            wal.append(l, delta(l as u8)).expect("append");
        }
        tokio::time::timeout(Duration::from_secs(10), wal.wait_durable(5))
            .await
            .expect("writes are durable while the snapshot is held")
            .expect("durable");
        assert!(
            segment_path(dir.path(), 1).exists(),
            "nothing compacted yet"
        );
        assert_eq!(*wal.snapshotted().borrow(), 0, "no snapshot written yet");
        // Let the held snapshot go on (and fail), and queue the next.
        let read = tokio::task::spawn_blocking(move || std::fs::read(&fifo));
        wal.snapshot(5, State::default()).expect("snapshot");
        wal.append(6, delta(6)).expect("append");
        wal.wait_durable(6).await.expect("durable");
        let sent = read.await.expect("reader").expect("read the FIFO");
        assert!(
            !sent.is_empty(),
            "the held snapshot was written into the FIFO"
        );
        snapshot_written(&wal, 2).await;
        stop(wal).await;
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .chain(std::fs::read_dir(dir.path().join("wal")).expect("wal"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["000003.log", "snapshot-000002.bin", "wal"]);
        let r = recover::recover(dir.path()).expect("recovers");
        assert_eq!(
            r.snapshot,
            Some(crate::codec::encode_state(&State::default()))
        );
        assert_eq!((r.snapshot_segment, r.segment), (2, 3));
        assert_eq!(r.records, [delta(6)]);
    }

    #[tokio::test]
    async fn a_new_segment_that_cannot_be_opened_is_tried_again_and_snapshotted_once() {
        let dir = form_testkit::TestDir::new("snapshot-reopen");
        std::fs::create_dir_all(dir.path().join("wal")).expect("wal dir");
        // Segment 2 cannot be opened while a directory stands in its place.
        let blocker = segment_path(dir.path(), 2);
        std::fs::create_dir(&blocker).expect("blocking dir");
        let wal = spawn(dir.path().to_owned(), 1, 0, None).expect("writer");
        wal.append(1, delta(1)).expect("append");
        wal.snapshot(1, State::default()).expect("snapshot");
        wal.append(2, delta(2)).expect("append");
        let mut written = wal.written();
        let failing = tokio::time::timeout(
            Duration::from_secs(10),
            written.wait_for(|d| d.error.is_some()),
        )
        .await
        .expect("the failure is published within 10 s")
        .expect("writer runs")
        .clone();
        assert!(
            failing
                .error
                .as_deref()
                .is_some_and(|e| e.contains("000002.log")),
            "{failing:?}"
        );
        assert_eq!(
            failing.lsn, 1,
            "the record synced before the failure is durable"
        );
        wal.wait_durable(1)
            .await
            .expect("acknowledged while the log fails after it");
        assert!(wal.wait_durable(2).await.is_err(), "the next is not");
        std::fs::remove_dir(&blocker).expect("unblock");
        tokio::time::timeout(
            Duration::from_secs(10),
            written.wait_for(|d| d.lsn >= 2 && d.error.is_none()),
        )
        .await
        .expect("the writer goes on within 10 s")
        .expect("durable once the segment opens");
        snapshot_written(&wal, 1).await;
        stop(wal).await;
        let r = recover::recover(dir.path()).expect("recovers");
        assert_eq!((r.snapshot_segment, r.segment), (1, 2));
        assert_eq!(r.records, [delta(2)], "no record lost or repeated");
    }

    #[tokio::test]
    async fn a_snapshot_that_fails_blocks_no_write_and_removes_nothing() {
        let dir = form_testkit::TestDir::new("snapshot-fails");
        std::fs::create_dir_all(dir.path().join("wal")).expect("wal dir");
        // The snapshot's temporary file cannot be created where a directory stands.
        let tmp = super::super::snapshot_path(dir.path(), 1).with_extension("tmp");
        std::fs::create_dir(&tmp).expect("blocking dir");
        let wal = spawn(dir.path().to_owned(), 1, 0, None).expect("writer");
        wal.append(1, delta(1)).expect("append");
        wal.snapshot(1, State::default()).expect("snapshot");
        wal.append(2, delta(2)).expect("append");
        wal.wait_durable(2)
            .await
            .expect("a write after the failed snapshot is durable");
        assert_eq!(wal.failing(), None, "the log itself does not fail");
        stop(wal).await;
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            2,
            "wal/ and the blocking dir only"
        );
        std::fs::remove_dir(&tmp).expect("unblock");
        let r = recover::recover(dir.path()).expect("recovers");
        assert_eq!(r.snapshot, None);
        assert_eq!(
            r.records,
            [delta(1), delta(2)],
            "every record is still in the log"
        );
        assert_eq!(r.segment, 2);
    }
}
