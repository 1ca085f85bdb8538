//! The spare a process backend keeps for its next workload (`launcher.rs` says why):
//! made in the background, taken by a start, made for a start when none is ready, and
//! taken with its group at the node's stop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use form_proto::types::v1 as types;

use super::ProcessBackend;
use super::launcher::{Failed, Launch, Spare};
use crate::error::VmmError;
use crate::supervise::serial;

/// Failures in a row after which spares are off until the node restarts (a binary
/// that does not start as a spare fails every time; a passing error does not).
const FAILURES_OFF: u32 = 3;
/// How long the node's stop waits for a spare being made.
const CLOSE_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub(super) struct SparePool {
    /// This binary, to start spares with; `None`: workloads start directly.
    exe: Option<PathBuf>,
    /// The spare the next start takes.
    ready: Mutex<Option<Spare>>,
    /// A spare is being made in the background.
    filling: AtomicBool,
    /// Failures in a row to make one.
    failures: AtomicU32,
    /// The node stops: no spare is kept any more.
    closing: AtomicBool,
}

impl SparePool {
    pub(super) fn new(exe: Option<PathBuf>) -> Self {
        Self {
            exe,
            ready: Mutex::new(None),
            filling: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            closing: AtomicBool::new(false),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Spare>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The binary spares are started from, unless spares are off or the node stops.
    fn exe(&self) -> Option<PathBuf> {
        let off = self.failures.load(Ordering::Acquire) >= FAILURES_OFF
            || self.closing.load(Ordering::Acquire);
        self.exe.clone().filter(|_| !off)
    }
}

impl ProcessBackend {
    /// A spare for the next workload: the one made ahead of time if it is alive, else
    /// one made now (an exec of this binary and a move into a group more than a
    /// direct start, but the workload still never runs outside its group). Another is
    /// made in the background once this one is the workload ([`Self::fill_spare`]).
    /// `None`: spares are off, or one cannot be made.
    pub(super) async fn take_spare(&self) -> Option<Spare> {
        let pool = &self.inner.spares;
        let exe = pool.exe()?;
        let taken = pool.slot().take();
        if let Some(mut spare) = taken {
            if matches!(spare.child.try_wait(), Ok(None)) {
                return Some(spare);
            }
            self.discard(spare).await;
        }
        self.make_spare(&exe).await.ok()
    }

    /// Makes a spare in the background, unless one is there or being made.
    pub(crate) fn fill_spare(&self) {
        let pool = &self.inner.spares;
        let Some(exe) = pool.exe() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if pool.slot().is_some() || pool.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        runtime.spawn(async move {
            if let Ok(spare) = this.make_spare(&exe).await {
                // The stop looks at the slot once nothing is being made: checked with
                // the slot held, a spare is either kept there for it or let go here.
                let extra = {
                    let pool = &this.inner.spares;
                    let mut slot = pool.slot();
                    if pool.closing.load(Ordering::Acquire) || slot.is_some() {
                        Some(spare)
                    } else {
                        *slot = Some(spare);
                        None
                    }
                };
                if let Some(spare) = extra {
                    this.discard(spare).await;
                }
            }
            this.inner.spares.filling.store(false, Ordering::Release);
        });
    }

    /// A new spare, placed in its group. Failures are counted ([`FAILURES_OFF`]).
    async fn make_spare(&self, exe: &Path) -> Result<Spare, String> {
        let made = self.try_make_spare(exe).await;
        let pool = &self.inner.spares;
        match &made {
            Ok(_) => pool.failures.store(0, Ordering::Release),
            Err(e) => {
                let n = pool.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if n == FAILURES_OFF {
                    tracing::warn!(error = %e, "cannot make a spare process, {n} times in a row: workloads start directly from now on, and are moved into their cgroup after their start");
                } else if n < FAILURES_OFF {
                    tracing::info!(error = %e, "cannot make a spare process");
                }
            }
        }
        made
    }

    async fn try_make_spare(&self, exe: &Path) -> Result<Spare, String> {
        let group = format!("spare-{}", serial());
        let dirs = self.inner.cgroups.dirs(&group);
        let spare = Spare::start(exe, group.clone(), &dirs).await?;
        let pid = spare.child.id().unwrap_or(0);
        let placed = self
            .with_cgroups(move |c| c.place(&group, pid))
            .await
            .unwrap_or_else(|| Err("placing the spare did not finish".into()));
        match placed {
            Ok(()) => Ok(spare),
            Err(e) => {
                self.discard(spare).await;
                Err(e)
            }
        }
    }

    /// Runs `f` on the cgroups off the async workers: a write to a cgroup can wait
    /// for a grace period that another move holds the kernel's cgroup lock through.
    /// `None`: it did not finish (a panic).
    async fn with_cgroups<T: Send + 'static>(
        &self,
        f: impl FnOnce(&super::cgroup::Cgroups) -> T + Send + 'static,
    ) -> Option<T> {
        let cgroups = self.inner.cgroups.clone();
        form_runtime::clock::blocking(move || f(&cgroups))
            .await
            .ok()
    }

    /// Ends a spare, then removes its group (a group is removed only once empty).
    pub(super) async fn discard(&self, mut spare: Spare) {
        let _ = spare.child.kill().await;
        let group = spare.group;
        self.with_cgroups(move |c| c.remove(&group)).await;
    }

    /// Runs `launch` in `spare`, whose group becomes the instance's, then writes the
    /// group's limits (after the exec: the spare's own memory is not the workload's).
    /// `Err(None)`: the spare failed before the exec, the workload may start directly.
    pub(super) async fn launch_in_spare(
        &self,
        spare: Spare,
        id: &str,
        launch: &Launch,
        res: types::Resources,
    ) -> Result<(tokio::process::Child, String, bool, String), Option<VmmError>> {
        let (from, to) = (spare.group.clone(), id.to_owned());
        let group = self
            .with_cgroups(move |c| c.rename(&from, &to))
            .await
            .unwrap_or_else(|| spare.group.clone());
        match spare.launch(launch).await {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                let g = group.clone();
                let (enforced, limits) = self
                    .with_cgroups(move |c| c.limit(&g, pid, res.vcpus, res.memory_mib))
                    .await
                    .unwrap_or_else(|| (false, "writing the limits did not finish".into()));
                Ok((child, group, enforced, limits))
            }
            Err(failed) => {
                let g = group.clone();
                self.with_cgroups(move |c| c.remove(&g)).await;
                match failed {
                    Failed::Command(why) => Err(Some(super::cannot_start(&launch.command, &why))),
                    Failed::Spare(why) => {
                        tracing::info!(instance = %id, error = %why, "the spare failed; starting the workload directly");
                        Err(None)
                    }
                }
            }
        }
    }

    /// At the node's stop: no spare is made any more, and the one kept goes with its
    /// group (one being made is waited for, up to [`CLOSE_WAIT`]).
    pub(super) async fn close_spares(&self) {
        let pool = &self.inner.spares;
        pool.closing.store(true, Ordering::Release);
        let deadline = Instant::now() + CLOSE_WAIT;
        while pool.filling.load(Ordering::Acquire) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let spare = pool.slot().take();
        if let Some(spare) = spare {
            self.discard(spare).await;
        }
    }
}
