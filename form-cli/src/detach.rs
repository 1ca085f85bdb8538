//! `formctl up --detach` and `formctl down`: the stack runs under a `formctl up` in
//! the background (its own process group, so a terminal's Ctrl-C does not reach it),
//! logging to DATA_DIR/formctl.log; its pid is in DATA_DIR/formctl.pid, and `down`
//! sends it SIGTERM, which stops every service cleanly.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;

use crate::{DownArgs, UpArgs};

fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("formctl.pid")
}

/// Whether `pid` is a live `formctl` (not a pid reused by another program after a
/// reboot, nor a zombie).
fn running(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'));
    kill(Pid::from_raw(pid), None).is_ok()
        && !zombie
        && String::from_utf8_lossy(&cmdline).contains("formctl")
}

fn read_pid(data_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file(data_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Starts `formctl up` (the same flags, without --detach) in the background and returns
/// once the stack is up.
pub(crate) fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => crate::up::default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    if let Some(pid) = read_pid(&data_dir).filter(|p| running(*p)) {
        bail!(
            "a stack runs already from {} (pid {pid}); stop it with `formctl down`",
            data_dir.display()
        );
    }
    let ready = data_dir.join("formctl.ready.json");
    drop(std::fs::remove_file(&ready));
    let log_path = data_dir.join("formctl.log");
    // The log holds the API token `up` prints: readable by the user only.
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--host")
        .arg(args.host.to_string())
        .arg("--backend")
        .arg(&args.backend)
        .arg("--ready-file")
        .arg(&ready);
    if args.auto_ports {
        cmd.arg("--auto-ports");
    }
    if args.no_demo {
        cmd.arg("--no-demo");
    }
    if let Some(b) = &args.bin_dir {
        cmd.arg("--bin-dir").arg(b);
    }
    if let Some(g) = &args.guest_dir {
        cmd.arg("--guest-dir").arg(g);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting formctl up in the background")?;
    let pid = child.id() as i32;
    std::fs::write(pid_file(&data_dir), format!("{pid}\n"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        if !matches!(child.try_wait(), Ok(None)) || Instant::now() > deadline {
            // Whatever started stops: `down` would not find it otherwise.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            drop(child.wait());
            drop(std::fs::remove_file(pid_file(&data_dir)));
            bail!("the stack did not come up; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The log holds the summary the foreground `up` prints.
    print!(
        "{}",
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .replace("Press Ctrl-C to stop.\n", "")
    );
    println!("Running in the background (pid {pid}); stop it with `formctl down`.");
    Ok(ExitCode::SUCCESS)
}

/// Stops the background stack of the data directory.
pub(crate) fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => crate::up::default_data_dir()?,
    };
    let Some(pid) = read_pid(&data_dir).filter(|p| running(*p)) else {
        println!("no stack runs from {}", data_dir.display());
        drop(std::fs::remove_file(pid_file(&data_dir)));
        return Ok(ExitCode::SUCCESS);
    };
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("signalling the stack")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(pid) {
        if Instant::now() > deadline {
            bail!("the stack (pid {pid}) did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(std::fs::remove_file(pid_file(&data_dir)));
    println!("stopped the stack of {}", data_dir.display());
    Ok(ExitCode::SUCCESS)
}
