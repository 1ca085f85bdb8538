//! A process workload starts inside its cgroup: the node keeps a spare process placed in
//! a group ahead of time, which becomes the next workload (`process/launcher.rs`).
//! Checked from inside the workload (the first thing it runs reads its own cgroup), on
//! a command that cannot run (refused, nothing left behind), and at the node's stop (no
//! spare and no group outlives it, and the groups of a node killed are removed at its
//! next start).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use form_proto::vmm::v1 as pb;
use form_testkit::conformance::stop_gracefully;
use form_testkit::{TestDir, probe};
use tonic::Code;

mod common;

/// The workload: its shell's first child reads the shell's cgroups into a file in the
/// working directory, then the demo app replaces the shell.
fn reader(id: &str) -> pb::CreateInstanceRequest {
    common::shell_then_demo(id, "cat /proc/$$/cgroup > first-cgroup")
}

/// The group of the cpu controller in a `/proc/PID/cgroup` listing (v1 `N:cpu:/path`
/// or `N:cpu,cpuacct:/path`, else the v2 line `0::/path`).
fn cpu_group(listing: &str) -> Option<String> {
    let line = listing
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "cpu"))
        })
        .or_else(|| listing.lines().find(|l| l.starts_with("0::")))?;
    line.splitn(3, ':').nth(2).map(str::to_owned)
}

/// The cpu hierarchy's mount (v1), else the unified one.
fn cpu_root() -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.join("cpu.cfs_quota_us").exists() {
        v1.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

#[tokio::test]
async fn a_workload_is_in_its_cgroup_from_its_first_instruction() {
    let dir = TestDir::new("vmm-spares");
    let (mut svc, mut c) = common::node(&dir, "vmm", "*").await;
    let work = |id: &str| dir.path().join("vmm-data/instances").join(id).join("work");
    let mut node_group = None;
    // The first may take a spare made at the node's start or one made for it; the
    // second takes the one made in the background after the first.
    // Ids of this run only: a process left by an earlier run may carry a fixed one.
    let tag = std::process::id();
    let (first, second, third) = (
        format!("first-{tag}"),
        format!("second-{tag}"),
        format!("third-{tag}"),
    );
    for id in [first.as_str(), second.as_str()] {
        let i = c
            .create_instance(reader(id))
            .await
            .expect("create")
            .into_inner();
        assert_eq!(i.status, pb::InstanceStatus::Running as i32, "{i:?}");
        let pid = *probe::pids_with_env("FORM_INSTANCE_ID", id)
            .first()
            .expect("the workload runs");
        let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let now = cpu_group(&now).unwrap_or_default();
        if !now.contains("/form-vmm-") {
            // No writable cgroups here (not root): nothing is placed, nothing to check.
            eprintln!("skipped: the workload runs in {now:?}, no cgroup of this node");
            stop_gracefully(&mut svc).await;
            return;
        }
        let first = std::fs::read_to_string(work(id).join("first-cgroup")).expect("read");
        let group = cpu_group(&first).unwrap_or_default();
        assert_eq!(
            group, now,
            "{id}'s shell ran first outside the group it runs in"
        );
        // v1 renames the spare's group to the instance id; v2 cannot rename one.
        let leaf = group.rsplit('/').next().unwrap_or_default().to_owned();
        assert!(
            leaf == *id || leaf.starts_with("spare-"),
            "{id}'s shell ran first in {group}, not in a group of its own"
        );
        let parent = group.rsplit_once('/').map(|(p, _)| p.to_owned());
        assert!(
            node_group.is_none() || node_group == parent,
            "{group} is not under {node_group:?}"
        );
        node_group = parent;
    }
    let node_dir = cpu_root().join(node_group.expect("a group").trim_start_matches('/'));

    // A command that cannot run is the caller's error, and leaves nothing behind.
    let mut ghost = reader("ghost");
    if let Some(w) = ghost.workload.as_mut() {
        w.command = "/no/such/program".into();
        w.args.clear();
    }
    let e = c.create_instance(ghost).await.expect_err("no such program");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("cannot start '/no/such/program'")
            && e.message().contains("No such file"),
        "{}",
        e.message()
    );
    assert!(!dir.path().join("vmm-data/instances/ghost").exists());
    assert!(
        !node_dir.join("ghost").exists(),
        "the group of ghost is left"
    );
    let i = c
        .create_instance(reader(&third))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(i.status, pb::InstanceStatus::Running as i32, "{i:?}");

    // At its stop, the node takes its spare and every group with it.
    stop_gracefully(&mut svc).await;
    let left: Vec<String> = std::fs::read_dir(&node_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "groups left in {}: {left:?}",
        node_dir.display()
    );

    // A node killed leaves its groups: the next start on its data directory removes
    // the empty ones.
    let crashed = node_dir.join("left-by-a-crash");
    std::fs::create_dir(&crashed).expect("a group");
    let (svc, _c) = common::node(&dir, "vmm", "*").await;
    assert!(
        !crashed.exists(),
        "an empty group of an earlier run is kept"
    );

    // The node killed, its spare (made at its start) leaves and removes its group.
    let spares = || -> Vec<PathBuf> {
        std::fs::read_dir(&node_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("spare-"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while spares().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no spare made at the node's start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    svc.signal(nix::sys::signal::Signal::SIGKILL).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spares().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the spare's group outlived its node: {:?}",
            spares()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a spare told to run a shell that writes into `log`, as nobody; what it said.
fn spare_writing_to(log: &Path, cwd: &Path) -> String {
    use std::io::{BufRead, Read, Write};
    let mut spare = std::process::Command::new(common::BIN)
        .arg(form_vmm_service::process::launcher::LAUNCH_ARG)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spare");
    let mut out = std::io::BufReader::new(spare.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready");
    assert_eq!(line.trim(), "ready");
    let launch = serde_json::json!({
        "command": "/bin/sh",
        "args": ["-c", "echo written"],
        "env": [],
        "cwd": cwd,
        "stdout": log,
        "stderr": log,
        "user": [65534, 65534],
    });
    let mut stdin = spare.stdin.take().expect("stdin");
    stdin
        .write_all(launch.to_string().as_bytes())
        .expect("send");
    drop(stdin);
    let mut said = String::new();
    out.read_to_string(&mut said).expect("report");
    let status = spare.wait().expect("exit");
    assert!(!status.success(), "{status}: {said}");
    said
}

/// What a workload can put where an instance's log was is not opened as root: a
/// symbolic link is not followed, and a hard link to a file of root's is opened as
/// the workload's user, who cannot write it. The file is untouched.
#[test]
fn a_spare_opens_the_logs_as_the_workload_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: not root, the spare cannot change its user");
        return;
    }
    let dir = TestDir::new("vmm-spare-link");
    // Enterable by the workload's user, so that what refuses the hard link is the
    // file's owner, not the way to it.
    use std::os::unix::fs::PermissionsExt;
    let mut on_the_way = dir.path().to_path_buf();
    while on_the_way.pop() && on_the_way != Path::new("/") {
        let mode = std::fs::metadata(&on_the_way)
            .expect("stat")
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            eprintln!("skipped: {} is closed to others", on_the_way.display());
            return;
        }
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = dir.path().join("root-only");
    std::fs::write(&secret, "root's\n").expect("write");
    let soft = dir.path().join("soft.log");
    std::os::unix::fs::symlink(&secret, &soft).expect("symlink");
    let said = spare_writing_to(&soft, dir.path());
    assert!(
        said.contains("cannot open the instance's logs") && said.contains("symbolic link"),
        "{said}"
    );
    let hard = dir.path().join("hard.log");
    std::fs::hard_link(&secret, &hard).expect("hard link");
    let said = spare_writing_to(&hard, dir.path());
    assert!(
        said.contains("cannot open the instance's logs") && said.contains("ermission denied"),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(&secret).expect("read"), "root's\n");
}
