//! Errors of the state store, and their mapping to gRPC statuses.

use std::path::PathBuf;

/// What went wrong in form-state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A request field was missing or invalid; the message says what is accepted.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// The field, e.g. `cluster_id`.
        field: String,
        /// What was wrong and what is accepted.
        message: String,
    },
    /// A cluster, member or operation does not exist.
    #[error("{what} '{id}' not found")]
    NotFound {
        /// `cluster`, `member`, `operation` or `node`.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The write conflicts with the current state (e.g. a status moving backwards).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A delta or full state failed verification.
    #[error("rejected {reason} delta from {origin}: {message}")]
    Rejected {
        /// Metric label: `bad_signature`, `unknown_key`, `malformed`, `wrong_origin`.
        reason: &'static str,
        /// Claimed origin.
        origin: String,
        /// Details.
        message: String,
    },
    /// A persisted file is corrupt or unreadable.
    #[error("{path}: {message}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the offset where it applies.
        message: String,
    },
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store is shutting down or its writer failed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StateError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

impl From<StateError> for tonic::Status {
    fn from(e: StateError) -> Self {
        let msg = e.to_string();
        match e {
            StateError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            StateError::NotFound { .. } => tonic::Status::not_found(msg),
            StateError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            StateError::Rejected { .. } => tonic::Status::permission_denied(msg),
            StateError::Storage { .. } | StateError::Io { .. } => tonic::Status::internal(msg),
            StateError::Unavailable(_) => tonic::Status::unavailable(msg),
        }
    }
}
