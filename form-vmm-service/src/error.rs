//! Errors of the VMM service, and their mapping to gRPC statuses.

use std::path::PathBuf;

/// What went wrong in form-vmm-service.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A request field was missing or invalid; the message says what is accepted.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// The field, e.g. `workload.command`.
        field: String,
        /// What was wrong and what is accepted.
        message: String,
    },
    /// An instance or snapshot does not exist.
    #[error("{what} '{id}' not found")]
    NotFound {
        /// `instance` or `snapshot`.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The request does not fit the instance's state (e.g. snapshot of a stopped instance).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A snapshot failed verification.
    #[error("snapshot {snapshot} is corrupt: {file}: {message}")]
    CorruptSnapshot {
        /// Snapshot id.
        snapshot: String,
        /// The file that failed.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The backend cannot do this.
    #[error("{0}")]
    Unsupported(String),
    /// The node refuses to do this (a command off its allowlist).
    #[error("{0}")]
    PermissionDenied(String),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The workload or hypervisor misbehaved.
    #[error("{0}")]
    Backend(String),
    /// The workload does not answer now (its admin address is closed, say).
    #[error("{0}")]
    Unavailable(String),
    /// A state contract cursor the workload no longer knows: read from the start.
    #[error("{0}")]
    CursorGone(String),
    /// A copy of changes stopped because a target instance did not merge a batch.
    #[error("{0}")]
    MergeFailed(String),
    /// The node has no room for what was asked (a snapshot pulled from another node).
    #[error("{0}")]
    ResourceExhausted(String),
}

impl VmmError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

impl From<VmmError> for tonic::Status {
    fn from(e: VmmError) -> Self {
        let msg = e.to_string();
        match e {
            VmmError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            VmmError::NotFound { .. } => tonic::Status::not_found(msg),
            VmmError::FailedPrecondition(_) | VmmError::CorruptSnapshot { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            VmmError::Unsupported(_) => tonic::Status::unimplemented(msg),
            VmmError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            VmmError::Io { .. } | VmmError::Backend(_) => tonic::Status::internal(msg),
            VmmError::Unavailable(_) => tonic::Status::unavailable(msg),
            VmmError::CursorGone(_) => tonic::Status::out_of_range(msg),
            VmmError::MergeFailed(_) => tonic::Status::aborted(msg),
            VmmError::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
        }
    }
}
