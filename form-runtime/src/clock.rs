//! The services' clock: wall-clock milliseconds for the times they record, and
//! monotonic instants for their deadlines, both readable on simulated time.
//!
//! In production [`unix_ms`] is the system clock and [`Instant`] is tokio's (the
//! system's monotonic clock). A simulator that runs the services on tokio's paused
//! time calls [`simulate`] once: from then on [`unix_ms`] follows tokio's clock too
//! (the system time when the process started, plus the time tokio's clock has moved
//! since), so a record's timestamp, a heartbeat's age and a deadline all move with
//! the simulated time and none with the time the host takes to compute.
//!
//! Paused time jumps to the next timer whenever the runtime has nothing to run. A
//! service that waits on a thread of its own (form-state's log writer) holds the clock
//! meanwhile with [`hold`], as tokio's `spawn_blocking` does for its tasks.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

static SIMULATED: AtomicBool = AtomicBool::new(false);

/// The system time in ms and tokio's instant, read together once.
static BASE: OnceLock<(u64, std::time::Instant)> = OnceLock::new();

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn base() -> (u64, std::time::Instant) {
    *BASE.get_or_init(|| (system_ms(), std::time::Instant::now()))
}

/// Milliseconds since the Unix epoch: the system clock, or the simulated one after
/// [`simulate`].
pub fn unix_ms() -> u64 {
    if !SIMULATED.load(Ordering::Relaxed) {
        return system_ms();
    }
    let (ms, at) = base();
    // tokio's clock (paused or not) never runs behind the instant of the base: a
    // paused clock starts from the real instant at which it was paused.
    let moved = Instant::now().into_std().saturating_duration_since(at);
    ms + moved.as_millis() as u64
}

/// A machine's own reading of the wall clock: [`unix_ms`] moved by a fixed offset in
/// ms. Production services read the system clock as it is (offset zero); a simulator
/// gives each simulated machine an offset of its own, as machines whose clocks NTP
/// keeps close are still apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skew(pub i64);

impl Skew {
    /// Milliseconds since the Unix epoch on this machine's clock.
    pub fn unix_ms(self) -> u64 {
        unix_ms().saturating_add_signed(self.0)
    }
}

/// Makes [`unix_ms`] follow tokio's clock for the rest of the process (see the
/// module documentation): the system time at the first call, plus what tokio's clock
/// has moved past the instant of that call (a runtime paused just before it stands
/// still until its clock passes that instant).
pub fn simulate() {
    base();
    SIMULATED.store(true, Ordering::Relaxed);
}

/// Whether [`simulate`] was called.
pub fn simulated() -> bool {
    SIMULATED.load(Ordering::Relaxed)
}

/// While alive (after [`simulate`], inside a runtime), paused time does not jump: the
/// runtime waits for what is happening outside it, as real time would.
#[derive(Debug)]
pub struct Hold {
    _release: Option<std::sync::mpsc::Sender<()>>,
}

/// See [`Hold`]; nothing outside a simulation.
pub fn hold() -> Hold {
    if !simulated() || tokio::runtime::Handle::try_current().is_err() {
        return Hold { _release: None };
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // A blocking task keeps tokio from advancing paused time until it returns, which
    // it does when the sender is dropped.
    drop(tokio::task::spawn_blocking(move || {
        let _ = rx.recv();
    }));
    Hold { _release: Some(tx) }
}

/// `f` on tokio's blocking pool, or, in a simulation, at once on the caller's thread:
/// a blocking thread finishes at a moment of the host's time, which would make the
/// order of a simulation's events differ from one run of a seed to the next.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if simulated() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn simulated_wall_time_moves_with_paused_time_and_holds_wait_for_threads() {
        simulate();
        let t0 = unix_ms();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let t1 = unix_ms();
        assert!(
            // The paused clock may have started a little before `simulate` took
            // its base: until then, simulated wall time stands still.
            (3_590_000..3_601_000).contains(&(t1 - t0)),
            "an hour of paused time is an hour of records: {}",
            t1 - t0
        );

        // A thread that takes 50 ms of real time while a timer 10 s away is pending:
        // held, the runtime waits for the thread and the timer has not fired.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = tx.send(());
        });
        let before = Instant::now();
        {
            let _hold = hold();
            let timer = tokio::time::sleep(Duration::from_secs(10));
            tokio::select! {
                _ = rx => {}
                _ = timer => panic!("paused time jumped while held"),
            }
        }
        assert!(before.elapsed() < Duration::from_secs(1));
    }
}
