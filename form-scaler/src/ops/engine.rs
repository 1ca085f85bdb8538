//! Running an operation: each step is recorded in form-state, then run. A step that
//! fails before the operation commits rolls back: the undo of that step and of every
//! earlier one, in reverse, each recorded as `undo:STEP`. A step that fails after the
//! commit, or an undo that fails, is retried; if it keeps failing the run is suspended
//! (the operation stays in progress) and the next evaluation round resumes it. A run
//! resumed after a restart continues from the recorded step: forward if it had
//! committed, otherwise back. An operation that has not started is checked against the
//! cluster first: planned earlier, it may no longer fit.
//!
//! How it ends (docs/operations.md, "Outcomes"):
//! - `completed`: every step ran;
//! - `rolled_back`: a step failed in a way that may pass (a timeout, a service down),
//!   and everything was undone;
//! - `failed`: the platform refused what was asked (a size a VM has no room for,
//!   limits a node cannot enforce), or the operation passed its deadline
//!   (`--operation-timeout-ms`, from its request); what could be undone was, and what
//!   could not (an undo refused, or still failing at the deadline) is listed in
//!   `left_behind`, so the operation ends and the cluster takes new ones.

use std::time::Duration;

use form_proto::types::v1 as types;
use types::operation_status::State;

use super::{Step, UNDO_PREFIX, create, lifecycle, plan, record, remove, resize, sync};
use crate::faults::{Fault, Faults};
use crate::platform::{OpError, Platform};

/// Attempts of a committed step or of an undo before the operation is given up.
const ATTEMPTS: u32 = 5;

/// Time limits of the steps that wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A new instance must be healthy and served within this.
    pub ready_timeout: Duration,
    /// A victim's drain must end within this.
    pub drain_timeout: Duration,
    /// An unreachable balancer holds up a drain or a wait at most this long.
    pub balancer_timeout: Duration,
    /// Delay between two looks at something awaited.
    pub poll: Duration,
    /// An operation not done this long after its request is rolled back and fails.
    pub operation_timeout: Duration,
    /// A vmm node without a heartbeat this long is lost: placement skips it.
    pub node_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(120),
            balancer_timeout: Duration::from_secs(30),
            poll: Duration::from_millis(20),
            operation_timeout: Duration::from_secs(600),
            node_timeout: Duration::from_secs(15),
        }
    }
}

/// Runs operations against the platform.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The services acted on.
    pub platform: Platform,
    /// Time limits.
    pub limits: Limits,
    /// Injected faults (tests).
    pub faults: Faults,
    /// Clusters whose standby snapshot is being taken (docs/standby.md): an operation
    /// of theirs deletes only its own snapshot, not others of its source it finds.
    pub taking_standby: crate::standby::Taking,
}

/// Why a rollback happens, and whether the operation then fails.
#[derive(Debug, Clone)]
struct Ending {
    why: String,
    /// `failed` rather than `rolled_back`.
    fails: bool,
}

impl Ending {
    /// A failure that may pass: `rolled_back`.
    fn transient(why: String) -> Self {
        Self { why, fails: false }
    }

    /// The platform refused what was asked: `failed`.
    fn refused(why: String) -> Self {
        Self { why, fails: true }
    }

    /// The deadline passed: `failed`.
    fn deadline(why: String) -> Self {
        Self { why, fails: true }
    }
}

/// Where a run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Run steps from this index on.
    Forward(usize),
    /// Undo the step at this index and every earlier one, for this reason.
    Back(usize, String),
    /// Nothing to do: the operation has ended.
    Done,
}

/// Where a run of `op` starts, from its recorded status.
pub fn start_of(op: &types::Operation, steps: &[Step]) -> Start {
    if super::is_terminal(op) {
        return Start::Done;
    }
    let Some(name) = record::current_step(op) else {
        return Start::Forward(0);
    };
    let last = steps.len().saturating_sub(1);
    if let Some(undo) = name.strip_prefix(UNDO_PREFIX) {
        let at = steps.iter().position(|s| s.name() == undo).unwrap_or(last);
        return Start::Back(
            at,
            format!("rollback resumed at {undo} after a controller restart"),
        );
    }
    match steps.iter().position(|s| s.name() == name) {
        Some(i) if steps[i].commits() => Start::Forward(i),
        Some(i) => Start::Back(
            i,
            format!("the controller stopped during step {name}; rolled back on restart"),
        ),
        None => Start::Back(last, format!("unknown recorded step {name}; rolled back")),
    }
}

impl Engine {
    /// Runs `op` to a terminal state (or until it cannot be recorded, leaving it to be
    /// resumed) and returns it as last recorded.
    pub async fn run(&self, mut op: types::Operation) -> types::Operation {
        let kind =
            types::OperationKind::try_from(op.kind).unwrap_or(types::OperationKind::Unspecified);
        let steps = plan::steps(kind);
        let mut seq = record::next_seq(&op);
        let outcome = match start_of(&op, steps) {
            Start::Done => return op,
            // A create precedes its cluster: the controller checked it was absent.
            Start::Forward(0) if kind == types::OperationKind::CreateCluster => {
                self.forward(&mut op, steps, 0, &mut seq).await
            }
            Start::Forward(0) if record::current_step(&op).is_none() => {
                match self.platform.cluster(&op.cluster_id).await {
                    Ok(c) => match plan::still_valid(&op, &c) {
                        Ok(()) => self.forward(&mut op, steps, 0, &mut seq).await,
                        Err(why) => Ok(State::RolledBack(types::RolledBack {
                            reason: format!(
                                "not started: the cluster changed since the request ({why})"
                            ),
                        })),
                    },
                    Err(e) => Err(e),
                }
            }
            Start::Forward(i) => self.forward(&mut op, steps, i, &mut seq).await,
            Start::Back(i, why) => {
                let end = if self.deadline_passed(&op) {
                    Ending::deadline(why)
                } else {
                    Ending::transient(why)
                };
                self.back(&mut op, steps, i, end, &mut seq).await
            }
        };
        let end = match outcome {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(operation = %op.operation_id, error = %e, "operation suspended; the next round resumes it");
                metrics::counter!("form_scaler_operations_suspended_total").increment(1);
                return op;
            }
        };
        let name = super::status_name(&types::Operation {
            status: Some(types::OperationStatus {
                state: Some(end.clone()),
            }),
            ..Default::default()
        });
        let recorded = op.clone();
        record::set(&mut op, end);
        match record::put(&self.platform, &op).await {
            Ok(()) => {
                tracing::info!(operation = %op.operation_id, cluster = %op.cluster_id, kind = super::kind_name(op.kind), status = name, "operation ended");
                metrics::counter!("form_scaler_operations_total", "kind" => super::kind_name(op.kind), "status" => name).increment(1);
                crate::series::operation_ended(&op, name);
            }
            Err(e) => {
                tracing::error!(operation = %op.operation_id, error = %e, "the end of the operation cannot be recorded; it will be resumed");
                // As last recorded: unfinished, so the next round resumes it.
                return recorded;
            }
        }
        op
    }

    async fn step_record(
        &self,
        op: &mut types::Operation,
        name: String,
        seq: &mut u32,
    ) -> Result<(), OpError> {
        record::set(
            op,
            State::InProgress(types::InProgress {
                step_index: *seq,
                step: name,
            }),
        );
        *seq += 1;
        record::put(&self.platform, op).await
    }

    /// Time left before `op`'s deadline (zero once it has passed).
    fn remaining(&self, op: &types::Operation) -> Duration {
        let deadline = op
            .created_at_ms
            .saturating_add(self.limits.operation_timeout.as_millis() as u64);
        Duration::from_millis(deadline.saturating_sub(record::now_ms()))
    }

    fn deadline_passed(&self, op: &types::Operation) -> bool {
        self.remaining(op).is_zero()
    }

    /// The terminal state reached going forward from `from`; `Err` when the run is
    /// suspended (a record failed, or a committed step keeps failing before the
    /// deadline).
    async fn forward(
        &self,
        op: &mut types::Operation,
        steps: &[Step],
        from: usize,
        seq: &mut u32,
    ) -> Result<State, OpError> {
        for (i, step) in steps.iter().copied().enumerate().skip(from) {
            if !step.commits() && self.deadline_passed(op) {
                let why = self.deadline_reason(step);
                return self.back(op, steps, i, Ending::deadline(why), seq).await;
            }
            self.step_record(op, step.name().to_owned(), seq).await?;
            let remaining = self.remaining(op);
            let ran = self.attempt(step, op);
            let result = if step.commits() {
                ran.await?
            } else {
                match tokio::time::timeout(remaining, ran).await {
                    Ok(r) => r?,
                    Err(_) => {
                        let why = self.deadline_reason(step);
                        return self.back(op, steps, i, Ending::deadline(why), seq).await;
                    }
                }
            };
            if let Err(e) = result {
                tracing::warn!(operation = %op.operation_id, step = step.name(), error = %e, "step failed");
                if e.message.contains("stale fence") {
                    // Another controller claimed the cluster: it carries the
                    // operation on; this one neither goes on nor rolls back.
                    return Err(e);
                }
                if step.commits() {
                    if self.deadline_passed(op) || e.refused {
                        // It cannot go back after the commit: end, naming what is left.
                        let left = steps[i..]
                            .iter()
                            .map(|s| format!("step {} not done", s.name()));
                        return Ok(State::Failed(types::Failed {
                            error: format!(
                                "step {} failed after the operation committed: {e}",
                                step.name()
                            ),
                            left_behind: left.collect(),
                        }));
                    }
                    return Err(OpError::new(format!(
                        "step {} keeps failing after the operation committed: {e}",
                        step.name()
                    )));
                }
                let why = format!("step {} failed: {e}", step.name());
                let end = if e.refused {
                    Ending::refused(why)
                } else {
                    Ending::transient(why)
                };
                return self.back(op, steps, i, end, seq).await;
            }
        }
        Ok(State::Completed(types::Completed {}))
    }

    fn deadline_reason(&self, step: Step) -> String {
        format!(
            "the operation did not finish within its deadline of {:?} (--operation-timeout-ms); it was at step {}",
            self.limits.operation_timeout,
            step.name()
        )
    }

    /// Runs `step` (after an injected fault, in tests), retrying a committed one.
    /// The outer `Err` is a record that failed (the run is suspended); the inner one,
    /// the step's failure.
    async fn attempt(
        &self,
        step: Step,
        op: &mut types::Operation,
    ) -> Result<Result<(), OpError>, OpError> {
        let fault = self.faults.at(step);
        match &fault {
            Some(Fault::Hang) => {
                tracing::warn!(operation = %op.operation_id, step = step.name(), "injected fault: hanging before the step");
                std::future::pending::<()>().await;
            }
            Some(Fault::Hold(file)) => {
                tracing::warn!(operation = %op.operation_id, step = step.name(), file = %file.display(), "injected fault: holding before the step until the file exists");
                while !file.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            _ => {}
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let mut r = self.run_step(step, op).await;
            if r.is_ok() && fault == Some(Fault::Fail) && attempt == 1 {
                r = Err(OpError::new(format!(
                    "injected fault after step {}",
                    step.name()
                )));
            }
            if r.is_ok() {
                tracing::info!(operation = %op.operation_id, step = step.name(), took_ms = started.elapsed().as_millis() as u64, "step done");
            }
            // What the step learned (a snapshot id, a cursor, new victims) is kept by the
            // next record, which comes before anything else is done: the next step's
            // (or its undo's) start, or the operation's end. Written on its own it would
            // cost a durable write more and keep it no sooner.
            match r {
                Err(e) if step.commits() && !e.refused && attempt < ATTEMPTS => {
                    tracing::warn!(operation = %op.operation_id, step = step.name(), error = %e, "committed step failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                r => return Ok(r),
            }
        }
    }

    /// Undoes `steps[..=from]` in reverse; `Err` when the run is suspended (a record
    /// failed, or an undo keeps failing before the deadline: the rollback resumes
    /// there). An undo refused, or still failing at the deadline, is listed as left
    /// behind and the rollback goes on.
    async fn back(
        &self,
        op: &mut types::Operation,
        steps: &[Step],
        from: usize,
        end: Ending,
        seq: &mut u32,
    ) -> Result<State, OpError> {
        let mut left_behind = Vec::new();
        for step in steps.iter().take(from + 1).rev().copied() {
            if step.commits() {
                continue;
            }
            self.step_record(op, format!("{UNDO_PREFIX}{}", step.name()), seq)
                .await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                // A service that hangs must not hold the rollback for ever: each attempt
                // has a quarter of the operation's time (1 to 30 s).
                let limit = (self.limits.operation_timeout / 4)
                    .clamp(Duration::from_secs(1), Duration::from_secs(30));
                let undone = tokio::time::timeout(limit, self.undo_step(step, op))
                    .await
                    .unwrap_or_else(|_| {
                        Err(OpError::new(format!(
                            "the undo of {} did not answer within {limit:?}",
                            step.name()
                        )))
                    });
                match undone {
                    Ok(()) => break,
                    Err(e) if e.refused || (attempt >= ATTEMPTS && self.deadline_passed(op)) => {
                        tracing::error!(operation = %op.operation_id, step = step.name(), error = %e, "undo given up; left behind");
                        left_behind.push(format!("undo of {}: {e}", step.name()));
                        break;
                    }
                    Err(e) if attempt < ATTEMPTS => {
                        tracing::warn!(operation = %op.operation_id, step = step.name(), error = %e, "undo failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    }
                    Err(e) => {
                        return Err(OpError::new(format!(
                            "undo of {} keeps failing: {e} (rolling back because {})",
                            step.name(),
                            end.why
                        )));
                    }
                }
            }
        }
        if end.fails || !left_behind.is_empty() {
            let undone = if left_behind.is_empty() {
                "everything it changed was undone"
            } else {
                "some of what it changed could not be undone (left_behind)"
            };
            return Ok(State::Failed(types::Failed {
                error: format!("{}; {undone}", end.why),
                left_behind,
            }));
        }
        Ok(State::RolledBack(types::RolledBack { reason: end.why }))
    }

    async fn run_step(&self, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
        match step {
            Step::StoreCluster
            | Step::CreateTemplate
            | Step::AddTemplate
            | Step::DeleteClusterRecord
            | Step::DeleteClusterInstances => lifecycle::forward(self, step, op).await,
            Step::TemplateServing => create::forward(self, Step::WaitServing, op).await,
            Step::ResizeInPlace | Step::StoreResources => resize::forward(self, step, op).await,
            Step::SyncClones | Step::FinalSyncClones | Step::HandoffVictims => {
                sync::forward(self, step, op).await
            }
            Step::DrainVictims
            | Step::RemoveVictimMembers
            | Step::DeleteVictimInstances
            | Step::DeleteSnapshot => remove::forward(self, step, op).await,
            _ => create::forward(self, step, op).await,
        }
    }

    async fn undo_step(&self, step: Step, op: &mut types::Operation) -> Result<(), OpError> {
        if self.faults.at(step) == Some(Fault::SkipUndo) {
            tracing::warn!(operation = %op.operation_id, step = step.name(), "injected fault: the undo of this step does nothing");
            return Ok(());
        }
        match step {
            Step::StoreCluster | Step::CreateTemplate | Step::AddTemplate => {
                lifecycle::undo(self, step, op).await
            }
            Step::TemplateServing => Ok(()),
            Step::ResizeInPlace | Step::StoreResources => resize::undo(self, step, op).await,
            // Changes merged into other instances stay: merging only moves their state
            // forward, and the same changes merged again change nothing.
            Step::SyncClones | Step::FinalSyncClones | Step::HandoffVictims => Ok(()),
            Step::DrainVictims
            | Step::RemoveVictimMembers
            | Step::DeleteVictimInstances
            | Step::DeleteSnapshot => remove::undo(self, step, op).await,
            _ => create::undo(self, step, op).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(step: &str) -> types::Operation {
        types::Operation {
            status: Some(types::OperationStatus {
                state: Some(State::InProgress(types::InProgress {
                    step_index: 3,
                    step: step.into(),
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_restart_rolls_back_before_the_commit_and_goes_forward_after_it() {
        let steps = plan::steps(types::OperationKind::ScaleIn);
        assert_eq!(
            start_of(&types::Operation::default(), steps),
            Start::Forward(0)
        );
        assert!(matches!(
            start_of(&at("drain_victims"), steps),
            Start::Back(0, _)
        ));
        assert!(matches!(
            start_of(&at("handoff_victims"), steps),
            Start::Back(1, _)
        ));
        assert_eq!(
            start_of(&at("remove_victim_members"), steps),
            Start::Forward(2)
        );
        assert!(matches!(
            start_of(&at("undo:drain_victims"), steps),
            Start::Back(0, _)
        ));
        let out = plan::steps(types::OperationKind::ScaleOut);
        assert!(matches!(
            start_of(&at("wait_healthy"), out),
            Start::Back(2, _)
        ));
        assert_eq!(start_of(&at("delete_snapshot"), out), Start::Forward(8));
    }
}
