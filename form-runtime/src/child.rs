//! Starting service binaries as child processes and waiting for their ready file;
//! stopping them with a signal and a deadline. Used by `formctl up` and the test kit.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::ready::{self, ReadyInfo};
use crate::service::EXIT_ADDR_IN_USE;

/// How often the ready file is looked for while a child starts.
const READY_POLL: Duration = Duration::from_millis(20);
/// Bytes of a child's log quoted in an error.
const LOG_TAIL_BYTES: usize = 2000;

/// Why a child could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The binary could not be started.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The child exited before it was ready.
    #[error("{name} exited with {status} before it was ready; its log ends with:\n{log_tail}")]
    ExitedEarly {
        /// Service name.
        name: String,
        /// Its exit status.
        status: ExitStatus,
        /// End of its log.
        log_tail: String,
    },
    /// The child did not write its ready file in time.
    #[error("{name} was not ready within {timeout:?}; its log ends with:\n{log_tail}")]
    NotReady {
        /// Service name.
        name: String,
        /// The deadline.
        timeout: Duration,
        /// End of its log.
        log_tail: String,
    },
    /// The child did not exit in time after a signal (it was killed).
    #[error("{name} did not exit within {timeout:?} after {signal}; killed")]
    StopTimeout {
        /// Service name.
        name: String,
        /// The signal sent.
        signal: Signal,
        /// The deadline.
        timeout: Duration,
    },
    /// Waiting, reading or signalling failed.
    #[error("{name}: {source}")]
    Io {
        /// Service name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

impl ChildError {
    /// True if the child exited before it was ready because a listen address was
    /// already in use ([`EXIT_ADDR_IN_USE`]).
    pub fn is_addr_in_use(&self) -> bool {
        matches!(self, Self::ExitedEarly { status, .. }
            if status.code() == Some(i32::from(EXIT_ADDR_IN_USE)))
    }
}

/// Calls `start` with the attempt number (from 1) until it succeeds, fails with an
/// error `retry` refuses, or `attempts` calls were made; returns the last result.
/// For a supervisor that chose its children's ports: when one was taken before the
/// child bound it ([`ChildError::is_addr_in_use`]), it stops what it started, chooses
/// new ports and starts again.
pub async fn retry_while<T, E>(
    attempts: usize,
    retry: impl Fn(&E) -> bool,
    mut start: impl AsyncFnMut(usize) -> Result<T, E>,
) -> Result<T, E> {
    let mut attempt = 1;
    loop {
        match start(attempt).await {
            Err(e) if attempt < attempts && retry(&e) => attempt += 1,
            done => return done,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Name for messages and log files, e.g. `form-state-1`.
    pub name: String,
    /// Path of the binary.
    pub bin: PathBuf,
    /// Arguments; `--ready-file` is added.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Directory for the ready file and the log (`<name>.log`, stdout and stderr); the
    /// child's working directory.
    pub run_dir: PathBuf,
    /// How long the child may take to become ready.
    pub ready_timeout: Duration,
}

impl LaunchSpec {
    /// A spec with no arguments, a 30 s ready timeout.
    pub fn new(
        name: impl Into<String>,
        bin: impl Into<PathBuf>,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            bin: bin.into(),
            args: Vec::new(),
            env: Vec::new(),
            run_dir: run_dir.into(),
            ready_timeout: Duration::from_secs(30),
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running service binary that has written its ready file. Killed on drop if it is
/// still running.
#[derive(Debug)]
pub struct ChildService {
    name: String,
    child: Child,
    info: ReadyInfo,
    log: PathBuf,
}

impl ChildService {
    /// Starts the binary and waits for its ready file.
    pub async fn start(spec: LaunchSpec) -> Result<Self, ChildError> {
        let name = spec.name.clone();
        let io = |source| ChildError::Io {
            name: name.clone(),
            source,
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(io)?;
        let run_dir = std::fs::canonicalize(&spec.run_dir).map_err(io)?;
        let spec = LaunchSpec { run_dir, ..spec };
        let ready_file = spec.run_dir.join(format!("{}.ready.json", spec.name));
        let log = spec.run_dir.join(format!("{}.log", spec.name));
        drop(std::fs::remove_file(&ready_file));
        let out = std::fs::File::create(&log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut child = Command::new(&spec.bin)
            .args(&spec.args)
            .arg("--ready-file")
            .arg(&ready_file)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            // Its own process group: a Ctrl-C in the supervisor's terminal reaches only
            // the supervisor, which then stops its children in order.
            .process_group(0)
            // Relative paths the child uses by default land in its run directory.
            .current_dir(&spec.run_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ChildError::Spawn {
                bin: spec.bin.clone(),
                source,
            })?;
        let started = Instant::now();
        loop {
            if let Some(info) = ready::read(&ready_file).map_err(io)? {
                return Ok(Self {
                    name: spec.name,
                    child,
                    info,
                    log,
                });
            }
            if let Some(status) = child.try_wait().map_err(io)? {
                return Err(ChildError::ExitedEarly {
                    name: spec.name,
                    status,
                    log_tail: log_tail(&log),
                });
            }
            if started.elapsed() > spec.ready_timeout {
                drop(child.start_kill());
                return Err(ChildError::NotReady {
                    name: spec.name,
                    timeout: spec.ready_timeout,
                    log_tail: log_tail(&log),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The name given at launch.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the child wrote in its ready file.
    pub fn info(&self) -> &ReadyInfo {
        &self.info
    }

    /// The address bound for listener `name` (`grpc`, `http`, `metrics`).
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.info.address(name)
    }

    /// The child's log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The end of the child's log, for messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) -> Result<(), ChildError> {
        let pid = self.child.id().ok_or_else(|| ChildError::Io {
            name: self.name.clone(),
            source: std::io::Error::other("already exited"),
        })?;
        let pid = i32::try_from(pid).map_err(|e| ChildError::Io {
            name: self.name.clone(),
            source: std::io::Error::other(e),
        })?;
        kill(Pid::from_raw(pid), signal).map_err(|e| ChildError::Io {
            name: self.name.clone(),
            source: e.into(),
        })
    }

    /// The exit status if the child has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ChildError> {
        self.child.try_wait().map_err(|source| ChildError::Io {
            name: self.name.clone(),
            source,
        })
    }

    /// Waits up to `timeout` for the child to exit.
    pub async fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, ChildError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(r) => r.map(Some).map_err(|source| ChildError::Io {
                name: self.name.clone(),
                source,
            }),
            Err(_) => Ok(None),
        }
    }

    /// Sends `signal` and waits up to `timeout` for the exit; kills the child and fails
    /// when it takes longer.
    pub async fn stop(
        &mut self,
        signal: Signal,
        timeout: Duration,
    ) -> Result<ExitStatus, ChildError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(signal)?;
        match self.wait_timeout(timeout).await? {
            Some(status) => Ok(status),
            None => {
                drop(self.child.start_kill());
                drop(self.child.wait().await);
                Err(ChildError::StopTimeout {
                    name: self.name.clone(),
                    signal,
                    timeout,
                })
            }
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// What a child that exited early with `code` gives.
    fn exited(code: i32) -> ChildError {
        ChildError::ExitedEarly {
            name: "svc".into(),
            status: ExitStatus::from_raw(code << 8),
            log_tail: String::new(),
        }
    }

    #[test]
    fn only_exit_75_means_an_address_in_use() {
        assert!(exited(i32::from(EXIT_ADDR_IN_USE)).is_addr_in_use());
        assert!(!exited(1).is_addr_in_use());
        assert!(!exited(2).is_addr_in_use());
    }

    #[tokio::test]
    async fn retries_an_address_in_use_until_it_starts_or_attempts_run_out() {
        let mut calls = Vec::new();
        let started = retry_while(5, ChildError::is_addr_in_use, async |attempt| {
            calls.push(attempt);
            if attempt < 3 {
                Err(exited(i32::from(EXIT_ADDR_IN_USE)))
            } else {
                Ok(attempt)
            }
        })
        .await;
        assert_eq!(started.ok(), Some(3));
        assert_eq!(calls, [1, 2, 3]);

        let mut calls = 0;
        let failed: Result<(), _> = retry_while(2, ChildError::is_addr_in_use, async |_| {
            calls += 1;
            Err(exited(i32::from(EXIT_ADDR_IN_USE)))
        })
        .await;
        assert!(failed.is_err_and(|e| e.is_addr_in_use()));
        assert_eq!(calls, 2, "no more than the attempts given");
    }

    #[tokio::test]
    async fn another_failure_is_not_retried() {
        let mut calls = 0;
        let failed: Result<(), _> = retry_while(5, ChildError::is_addr_in_use, async |_| {
            calls += 1;
            Err(exited(1))
        })
        .await;
        assert!(failed.is_err_and(|e| !e.is_addr_in_use()));
        assert_eq!(calls, 1);
    }
}
