//! A simulated slow disk under the log writer: each record is durable a drawn
//! latency after it was queued (and after the one before it), in the runtime's
//! (simulated) time. Production disks have none; `form-sim` gives one to each replica.
//!
//! The writer's thread still writes and syncs the real file at once. What this adds is
//! when the replica may count a record as kept: the `durable` watch moves record by
//! record at the instants drawn when each was queued, so a simulation replays the same
//! way whatever batches the thread happened to make, and a simulated machine crash
//! can cut the log back to where the slow disk was (`Durable::end`): the length of
//! each record is known when it is queued.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::writer::Durable;
use super::{Record, frame};

/// A simulated disk's latency per sync, on top of the real one.
#[derive(Clone)]
pub struct SyncLatency {
    /// Draws each record's latency (called in the order records are queued).
    pub draw: Arc<dyn Fn() -> Duration + Send + Sync>,
    /// Broken on purpose, for a simulator's test that its checks can fail: a write is
    /// acknowledged once the writer wrote it, before this disk synced it.
    pub ack_before_sync: bool,
}

impl std::fmt::Debug for SyncLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLatency")
            .field("ack_before_sync", &self.ack_before_sync)
            .finish_non_exhaustive()
    }
}

/// When each queued record is durable, and where the log then ends. Its watch carries
/// no error: whether the writer fails is read from the writer's own
/// (`WalHandle::failing`).
#[derive(Debug)]
pub struct SlowDisk {
    latency: SyncLatency,
    plan: Mutex<Plan>,
    tx: mpsc::UnboundedSender<Kept>,
}

#[derive(Debug)]
struct Plan {
    /// When the last queued record is durable.
    ready: Instant,
    /// The segment written to, and its length after the last queued record.
    end: (u64, u64),
}

/// A record the disk keeps at `ready`.
#[derive(Debug)]
struct Kept {
    lsn: u64,
    ready: Instant,
    end: (u64, u64),
}

impl SlowDisk {
    /// A slow disk over the writer's `written` states, whose log ends at `end`; returns
    /// it and the watch of what it has kept. Must run inside a tokio runtime.
    pub fn start(
        latency: SyncLatency,
        written: watch::Receiver<Durable>,
        end: (u64, u64),
    ) -> (Self, watch::Receiver<Durable>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let first = written.borrow().clone();
        let (dtx, drx) = watch::channel(first);
        tokio::spawn(keep(rx, written, dtx));
        let disk = Self {
            latency,
            plan: Mutex::new(Plan {
                ready: Instant::now(),
                end,
            }),
            tx,
        };
        (disk, drx)
    }

    /// `record`, change `lsn`, was queued: it is durable a drawn latency from now, and
    /// not before the record queued before it.
    pub fn appended(&self, lsn: u64, record: &Record) {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        plan.ready = plan.ready.max(Instant::now() + (self.latency.draw)());
        plan.end.1 += frame::record_len(record);
        let _ = self.tx.send(Kept {
            lsn,
            ready: plan.ready,
            end: plan.end,
        });
    }

    /// A snapshot after change `lsn` was queued: the writer starts a new segment there,
    /// in order with the records (the snapshot itself is written beside the log).
    pub fn rotated(&self, lsn: u64) {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        plan.end = (plan.end.0 + 1, 0);
        let _ = self.tx.send(Kept {
            lsn,
            ready: plan.ready,
            end: plan.end,
        });
    }
}

/// Publishes each record as kept at its instant, once the writer has written it too;
/// ends when the disk is dropped and every record queued before is kept, or when the
/// writer stopped.
async fn keep(
    mut rx: mpsc::UnboundedReceiver<Kept>,
    mut written: watch::Receiver<Durable>,
    durable: watch::Sender<Durable>,
) {
    while let Some(k) = rx.recv().await {
        tokio::time::sleep_until(k.ready).await;
        if written.borrow().lsn < k.lsn {
            // The writer is a thread: simulated time waits for it.
            let _hold = form_runtime::clock::hold();
            if written.wait_for(|d| d.lsn >= k.lsn).await.is_err() {
                return;
            }
        }
        durable.send_modify(|d| {
            d.lsn = d.lsn.max(k.lsn);
            d.end = k.end;
        });
    }
}
