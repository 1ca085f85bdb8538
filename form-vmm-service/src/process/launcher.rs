//! A process placed in its cgroup before it is needed, which becomes the next
//! instance's workload (`exec`).
//!
//! Moving a process into a cgroup waits for an RCU grace period when no process was
//! moved in the last few grace periods (the kernel's threadgroup lock): 10-20 ms on
//! these machines, more than the rest of a process clone. So the backend keeps one
//! spare: this binary started with [`LAUNCH_ARG`], moved into a group `spare-N`, waiting
//! on its stdin. A start renames the group to the instance's id (cgroup v1; v2 keeps
//! the spare's name) and sends the spare what to run (a `Launch`); the spare drops to
//! the workload's user, opens the instance's log files (regular files only) and
//! `exec`s the workload, which keeps the spare's pid, process group and group. The
//! group's limits are written then, and another spare is made in the background
//! (`spares.rs`). The workload never runs outside its group, where the direct path
//! lets it run for the time of the move (a child it forks then would escape).
//!
//! The spare reports on its stdout, which the backend reads: `ready` once started (a
//! binary that is not this one never says it, and no spare is used), then nothing if
//! the `exec` succeeded (the pipe closes with it) or why it failed.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The first argument that makes `form-vmm-service` a spare ([`run`]).
pub const LAUNCH_ARG: &str = "__form-launch";
/// Time a spare has from its [`Launch`] to its `exec` (opening the logs, changing
/// user): one that takes longer is killed, and the workload starts another way.
const EXEC_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
/// How the spare's report of a failed `exec` starts.
pub(crate) const EXEC_FAILED: &str = "exec: ";
/// The spare's first line.
const READY: &str = "ready";

/// What a spare is to run.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Launch {
    pub command: String,
    pub args: Vec<String>,
    /// Added to the environment the spare inherited from this node (as the direct path
    /// adds it to this node's own).
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// (uid, gid) to run as; `None`: the spare's own.
    pub user: Option<(u32, u32)>,
}

/// Why a spare did not run a workload.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The exec of the command failed: the caller's error (the reason).
    Command(String),
    /// The spare failed before (it is gone): the workload may start another way.
    Spare(String),
}

/// A started spare in its group.
#[derive(Debug)]
pub(crate) struct Spare {
    pub group: String,
    pub child: Child,
    stdin: ChildStdin,
    report: BufReader<ChildStdout>,
}

impl Spare {
    /// Starts `exe` as a spare and waits for its `ready`. The caller then moves it
    /// into its group, whose directories are `dirs` (its pid is `child.id()`).
    pub(crate) async fn start(
        exe: &std::path::Path,
        group: String,
        dirs: &[PathBuf],
    ) -> Result<Self, String> {
        let mut child = tokio::process::Command::new(exe)
            .arg(LAUNCH_ARG)
            .args(dirs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the spare's pipes are missing".into());
        };
        let mut report = BufReader::new(stdout);
        let mut line = String::new();
        let said = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            report.read_line(&mut line),
        )
        .await;
        if !matches!(said, Ok(Ok(_))) || line.trim() != READY {
            return Err(format!(
                "{} did not start as a spare (it said {:?})",
                exe.display(),
                line.trim()
            ));
        }
        Ok(Self {
            group,
            child,
            stdin,
            report,
        })
    }

    /// Sends `what` and waits for the `exec`: the workload's process on success, else
    /// why the spare could not run it (the spare has then exited).
    pub(crate) async fn launch(self, what: &Launch) -> Result<Child, Failed> {
        let Self {
            child,
            mut stdin,
            mut report,
            ..
        } = self;
        let mut child = child;
        let json = serde_json::to_vec(what).map_err(|e| Failed::Spare(e.to_string()))?;
        let sent = stdin.write_all(&json).await;
        drop(stdin);
        let mut said = String::new();
        let read = tokio::time::timeout(EXEC_WITHIN, report.read_to_string(&mut said))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::other(format!(
                    "no exec within {EXEC_WITHIN:?}"
                )))
            });
        let failed = match (sent, read) {
            (Ok(()), Ok(_)) if said.trim().is_empty() => return Ok(child),
            (Err(e), _) => Failed::Spare(format!("the spare is gone: {e}")),
            (_, Err(e)) => Failed::Spare(format!("reading the spare: {e}")),
            _ => match said.trim().strip_prefix(EXEC_FAILED) {
                Some(why) => Failed::Command(why.to_owned()),
                None => Failed::Spare(said.trim().to_owned()),
            },
        };
        // Out of its group before the group is removed.
        let _ = child.kill().await;
        Err(failed)
    }
}

/// Drops every group but `gid`, then becomes `uid` (as `Command::uid` and `gid` would
/// at the exec).
fn become_user(uid: u32, gid: u32) -> nix::Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    if Uid::effective().is_root() {
        setgroups(&[])?;
    }
    setgid(Gid::from_raw(gid))?;
    setuid(Uid::from_raw(uid))
}

/// Leaves the group whose directories are `dirs` (for their parents) and removes it:
/// what a spare does when its node is gone. A node that lets a spare go kills it and
/// removes its group itself.
fn leave(dirs: &[PathBuf]) {
    for dir in dirs {
        // The node's group, else (v2 keeps processes out of a group with controllers
        // enabled for its children) the one above it.
        for up in dir.ancestors().skip(1).take(2) {
            if std::fs::write(up.join("cgroup.procs"), "0").is_ok() {
                break;
            }
        }
    }
    for dir in dirs {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The spare's side: says `ready`, reads a `Launch` from stdin and `exec`s it. An
/// empty stdin (its node gone) ends it quietly, and it takes its group (the arguments
/// after [`LAUNCH_ARG`]: the group's directories) with it.
pub fn run() -> ExitCode {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    // Closed by the exec: the backend reads the end of the pipe as success.
    let Ok(report) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return ExitCode::from(2);
    };
    let mut report = std::fs::File::from(report);
    if writeln!(report, "{READY}").is_err() {
        return ExitCode::from(2);
    }
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() || input.is_empty() {
        let dirs: Vec<PathBuf> = std::env::args_os().skip(2).map(PathBuf::from).collect();
        leave(&dirs);
        return ExitCode::SUCCESS;
    }
    let what: Launch = match serde_json::from_slice(&input) {
        Ok(w) => w,
        Err(e) => {
            let _ = writeln!(report, "unreadable launch: {e}");
            return ExitCode::from(2);
        }
    };
    // The workload's user owns the instance's directory, and any workload of that user
    // could put a link there: the logs are opened as that user, never as this node's.
    if let Some((uid, gid)) = what.user
        && let Err(e) = become_user(uid, gid)
    {
        let _ = writeln!(report, "cannot run as {uid}:{gid}: {e}");
        return ExitCode::from(2);
    }
    let open =
        |p: &PathBuf| crate::supervise::open_regular(p, std::fs::OpenOptions::new().append(true));
    let (stdout, stderr) = match (open(&what.stdout), open(&what.stderr)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            let _ = writeln!(report, "cannot open the instance's logs: {e}");
            return ExitCode::from(2);
        }
    };
    let mut command = std::process::Command::new(&what.command);
    command
        .args(&what.args)
        .envs(what.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&what.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let e = command.exec();
    let _ = write!(report, "{EXEC_FAILED}{e}");
    ExitCode::from(127)
}
