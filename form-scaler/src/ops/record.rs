//! Writing an operation's progress to form-state. A step is recorded before it runs;
//! its sequence number (`InProgress.step_index`) only grows, through undo steps and
//! restarts too, as form-state's monotone merge requires.

use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::types::v1 as types;
use types::operation_status::State;

use crate::platform::{OpError, Platform};

/// How long a write is retried before the run gives up (and leaves the operation to
/// be resumed).
const PUT_PATIENCE: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    form_runtime::clock::unix_ms()
}

/// The recorded step's name, if the operation is in progress.
pub fn current_step(op: &types::Operation) -> Option<&str> {
    match op.status.as_ref().and_then(|s| s.state.as_ref()) {
        Some(State::InProgress(p)) => Some(p.step.as_str()),
        _ => None,
    }
}

/// The next free sequence number.
pub fn next_seq(op: &types::Operation) -> u32 {
    match op.status.as_ref().and_then(|s| s.state.as_ref()) {
        Some(State::InProgress(p)) => p.step_index + 1,
        _ => 0,
    }
}

/// Sets `op`'s status (and its times).
pub fn set(op: &mut types::Operation, state: State) {
    let now = now_ms();
    if matches!(
        state,
        State::Completed(_) | State::Failed(_) | State::RolledBack(_)
    ) {
        op.completed_at_ms = now;
    }
    op.updated_at_ms = now;
    if let State::InProgress(p) = &state {
        op.steps_recorded = op.steps_recorded.max(p.step_index + 1);
    }
    op.status = Some(types::OperationStatus { state: Some(state) });
    op.affected_instances = super::plan::affected(op);
}

/// Writes `op` to form-state, retrying for a while when the state is unreachable.
pub async fn put(platform: &Platform, op: &types::Operation) -> Result<(), OpError> {
    let deadline = tokio::time::Instant::now() + PUT_PATIENCE;
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = state_pb::PutOperationRequest {
            operation: Some(op.clone()),
        };
        match platform.state.clone().put_operation(req).await {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                ) && tokio::time::Instant::now() + backoff < deadline =>
            {
                tracing::warn!(operation = %op.operation_id, error = %e.message(), "recording the operation failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(OpError::rpc(
                    format!("recording operation {}", op.operation_id),
                    &e,
                ));
            }
        }
    }
}
