//! Errors of the shared service runtime.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A configuration value that was not accepted. Its `Display` is one line naming the
/// value and what is accepted; binaries print it and exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this service.
    #[error("config file {path}, line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// A value was out of range or inconsistent with another.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// Flag or config key, e.g. `--listen` / `listen`.
        field: String,
        /// What was wrong and what is accepted.
        message: String,
    },
}

impl ConfigError {
    /// An invalid value of `field`, with a message saying what is accepted.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A failure of the runtime while starting or running a service.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An address could not be bound.
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        /// Which listener (`grpc`, `http`, `metrics`).
        name: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The ready file could not be written.
    #[error("cannot write ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A server failed.
    #[error("{name} server failed: {message}")]
    Serve {
        /// Which server.
        name: &'static str,
        /// Why.
        message: String,
    },
    /// The configuration turned out unusable at run time.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The service's own run loop failed.
    #[error("{0}")]
    Service(String),
}
