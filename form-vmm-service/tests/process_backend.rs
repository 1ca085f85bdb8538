//! The process backend end to end with real processes: the demo app is created,
//! written to, snapshotted and cloned; clones carry the state with a new identity; the
//! primary diverges on its own; corrupt snapshots are refused; a crashing workload is
//! reported failed with its stderr; resize enforces CPU limits where cgroups allow;
//! deleting leaves no process behind.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::{PORT0_ARGS, stop_gracefully};
use form_testkit::{ChildService, TestDir, probe, start, workspace_bin};
use tonic::Code;
use tonic::transport::Channel;

mod common;

async fn vmm(dir: &TestDir) -> (ChildService, VmmServiceClient<Channel>) {
    // The demo app, and a shell for the workload that crashes at start.
    let allowed = format!("{},/bin/sh", workspace_bin("form-demo-app").display());
    common::node(dir, "vmm", &allowed).await
}

fn demo(id: &str) -> pb::CreateInstanceRequest {
    pb::CreateInstanceRequest {
        instance_id: id.into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: workspace_bin("form-demo-app").display().to_string(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: None,
    }
}

fn addr(i: &pb::Instance) -> SocketAddr {
    i.address.parse().expect("instance address")
}

async fn get(i: &pb::Instance, path: &str) -> (u16, String) {
    probe::http_get(addr(i), path).await.expect("GET")
}

/// Processes whose environment names this instance id.
fn processes_of(instance: &str) -> usize {
    probe::pids_with_env("FORM_INSTANCE_ID", instance).len()
}

#[tokio::test]
async fn snapshot_and_clone_carry_state_with_new_identities() {
    let dir = TestDir::new("vmm-clone");
    let (mut svc, mut c) = vmm(&dir).await;
    let mut req = demo("primary");
    req.resources = Some(types::Resources {
        vcpus: 1,
        memory_mib: 256,
    });
    let primary = c.create_instance(req).await.expect("create").into_inner();
    assert_eq!(
        primary.status,
        pb::InstanceStatus::Running as i32,
        "{primary:?}"
    );
    for (k, v) in [("a", "1"), ("b", "2")] {
        let (code, _) =
            probe::http_request(addr(&primary), "PUT", &format!("/kv/{k}"), v.as_bytes())
                .await
                .expect("PUT");
        assert_eq!(code, 204);
    }
    // Paused, it answers nothing; resumed, it answers again with its state intact.
    let paused = c
        .pause(pb::InstanceRef {
            instance_id: "primary".into(),
        })
        .await
        .expect("pause")
        .into_inner();
    assert_eq!(paused.status, pb::InstanceStatus::Paused as i32);
    let stalled = tokio::time::timeout(
        Duration::from_millis(300),
        probe::http_get(addr(&primary), "/kv/a"),
    )
    .await;
    assert!(stalled.is_err(), "a paused instance answered: {stalled:?}");
    let resumed = c
        .resume(pb::InstanceRef {
            instance_id: "primary".into(),
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(resumed.status, pb::InstanceStatus::Running as i32);
    assert_eq!(get(&primary, "/kv/a").await, (200, "1".into()));

    let snap = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "primary".into(),
            resume: None,
        })
        .await
        .expect("snapshot")
        .into_inner();
    assert!(
        snap.files.iter().any(|f| f.path == "state/state.json"),
        "{:?}",
        snap.files
    );

    let mut clones = Vec::new();
    for n in 0..3 {
        let req = pb::CloneRequest {
            snapshot_id: snap.snapshot_id.clone(),
            instance_id: format!("clone-{n}"),
            resources: None,
        };
        let clone = VmmServiceClient::clone(&mut c, req)
            .await
            .expect("clone")
            .into_inner();
        assert_eq!(
            clone.status,
            pb::InstanceStatus::Running as i32,
            "{clone:?}"
        );
        assert_eq!(clone.restored_from, snap.snapshot_id);
        assert_eq!(
            clone.resources.expect("resources").memory_mib,
            256,
            "a clone keeps the source's resources"
        );
        assert_eq!(clone.generation, 1);
        clones.push(clone);
    }
    // The primary goes on and diverges.
    probe::http_request(addr(&primary), "PUT", "/kv/a", b"changed")
        .await
        .expect("PUT");
    assert_eq!(get(&primary, "/kv/a").await.1, "changed");
    for (n, clone) in clones.iter().enumerate() {
        assert_eq!(
            get(clone, "/kv/a").await,
            (200, "1".into()),
            "clone {n} has the snapshot's value"
        );
        assert_eq!(get(clone, "/kv/b").await, (200, "2".into()));
        let who: serde_json::Value =
            serde_json::from_str(&get(clone, "/whoami").await.1).expect("json");
        assert_eq!(who["instance_id"], format!("clone-{n}"));
        assert_eq!(who["restored_from"], snap.snapshot_id.as_str());
        assert_eq!(who["generation"], 1);
    }
    probe::http_request(addr(&clones[0]), "PUT", "/kv/b", b"clone-only")
        .await
        .expect("PUT");
    assert_eq!(
        get(&primary, "/kv/b").await.1,
        "2",
        "a clone's write stays in the clone"
    );
    assert_eq!(get(&clones[1], "/kv/b").await.1, "2");

    let listed = c
        .list_instances(pb::ListInstancesRequest {
            cluster_id: "web".into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.instances.len(), 4);
    for id in ["primary", "clone-0", "clone-1", "clone-2"] {
        assert!(processes_of(id) > 0, "{id} runs");
        c.delete_instance(pb::InstanceRef {
            instance_id: id.into(),
        })
        .await
        .expect("delete");
        assert_eq!(processes_of(id), 0, "{id} left a process");
    }
    let e = c
        .get_instance(pb::InstanceRef {
            instance_id: "primary".into(),
        })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    let instances_dir = dir.path().join("vmm-data/instances");
    assert_eq!(
        std::fs::read_dir(&instances_dir).expect("dir").count(),
        0,
        "no instance files left"
    );

    let freed = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await
        .expect("delete snapshot")
        .into_inner();
    assert_eq!(freed.freed_bytes, snap.size_bytes);
    stop_gracefully(&mut svc).await;
}

#[tokio::test]
async fn corrupt_snapshots_crashing_workloads_and_bad_specs_are_refused() {
    let dir = TestDir::new("vmm-refuse");
    let (mut svc, mut c) = vmm(&dir).await;
    c.create_instance(demo("p")).await.expect("create");
    let snap = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "p".into(),
            resume: None,
        })
        .await
        .expect("snapshot")
        .into_inner();
    let state = dir
        .path()
        .join("vmm-data/snapshots")
        .join(&snap.snapshot_id)
        .join("state/state.json");
    let mut bytes = std::fs::read(&state).expect("read");
    bytes.push(b' ');
    std::fs::write(&state, bytes).expect("corrupt");
    let req = pb::CloneRequest {
        snapshot_id: snap.snapshot_id.clone(),
        instance_id: "x".into(),
        resources: None,
    };
    let e = VmmServiceClient::clone(&mut c, req)
        .await
        .expect_err("corrupt snapshot");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("state/state.json"), "{}", e.message());

    let crash = pb::CreateInstanceRequest {
        instance_id: "crash".into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), "echo cannot open database >&2; exit 3".into()],
            ..Default::default()
        }),
        resources: None,
    };
    let failed = c
        .create_instance(crash)
        .await
        .expect("reported")
        .into_inner();
    assert_eq!(
        failed.status,
        pb::InstanceStatus::Failed as i32,
        "{failed:?}"
    );
    assert!(
        failed.failure.contains("exit status: 3")
            && failed.failure.contains("cannot open database"),
        "{}",
        failed.failure
    );

    let mut no_command = demo("bad");
    no_command.workload = Some(types::Workload::default());
    let e = c.create_instance(no_command).await.expect_err("no command");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("workload.command"), "{}", e.message());
    // A port or an image the backend would ignore is refused, naming why.
    for (w, field, says) in [
        (
            types::Workload {
                port: 9090,
                ..demo("x").workload.expect("w")
            },
            "workload.port",
            "free port",
        ),
        (
            types::Workload {
                image: "debian:12".into(),
                ..demo("x").workload.expect("w")
            },
            "workload.image",
            "boots images",
        ),
    ] {
        let mut req = demo("bad");
        req.workload = Some(w);
        let e = c.create_instance(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(says),
            "{}",
            e.message()
        );
    }
    let mut no_memory = demo("bad");
    no_memory.resources = Some(types::Resources {
        vcpus: 1,
        memory_mib: 0,
    });
    let e = c.create_instance(no_memory).await.expect_err("no memory");
    assert!(
        e.message().contains("resources.memory_mib"),
        "{}",
        e.message()
    );
    let e = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: "..".into(),
        })
        .await
        .expect_err("a parent directory is not a snapshot id");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .pause(pb::InstanceRef {
            instance_id: "ghost".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: "ghost".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);

    stop_gracefully(&mut svc).await;
    assert_eq!(
        processes_of("p"),
        0,
        "the service stopped its instances on SIGTERM"
    );
}

#[tokio::test]
async fn resize_enforces_the_cpu_limit_where_cgroups_allow() {
    let dir = TestDir::new("vmm-resize");
    let (mut svc, mut c) = vmm(&dir).await;
    let mut req = demo("busy");
    req.resources = Some(types::Resources {
        vcpus: 2,
        memory_mib: 256,
    });
    let inst = c.create_instance(req).await.expect("create").into_inner();
    let resized = c
        .resize(pb::ResizeRequest {
            instance_id: "busy".into(),
            resources: Some(types::Resources {
                vcpus: 1,
                memory_mib: 192,
            }),
        })
        .await;
    let resized = match resized {
        Ok(r) => r.into_inner(),
        Err(e) => {
            // No writable cgroups on this machine: the refusal says why.
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(
                e.message().contains("cannot be enforced"),
                "{}",
                e.message()
            );
            stop_gracefully(&mut svc).await;
            return;
        }
    };
    assert!(resized.enforced, "{}", resized.message);
    // The instance itself sees the limits in its cgroup.
    let seen = probe::resources_seen(addr(&inst)).await.expect("seen");
    assert_eq!(seen["cpu_limit"], 1.0, "{seen}");
    assert_eq!(seen["memory_limit_mib"], 192, "{seen}");
    // Two threads burn CPU; with a 1-vCPU limit they get about one core together.
    let a = addr(&inst);
    let burners: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { probe::http_get(a, "/burn?ms=2500").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.get_stats(pb::InstanceRef {
        instance_id: "busy".into(),
    })
    .await
    .expect("stats");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = c
        .get_stats(pb::InstanceRef {
            instance_id: "busy".into(),
        })
        .await
        .expect("stats")
        .into_inner();
    for b in burners {
        b.await.expect("join").expect("burn");
    }
    // Utilisation is per vCPU: with 1 vCPU, 1.0 is one whole core.
    assert!(
        stats.cpu_utilization <= 1.15,
        "used {:.2} cores under a 1-vCPU limit",
        stats.cpu_utilization
    );
    assert!(
        stats.cpu_utilization >= 0.3,
        "the burn ran ({:.2})",
        stats.cpu_utilization
    );
    stop_gracefully(&mut svc).await;
}

#[tokio::test]
async fn resize_fails_where_limits_cannot_be_enforced_and_changes_nothing() {
    let dir = TestDir::new("vmm-resize-nocg");
    let data = dir.path().join("vmm-data");
    // A cgroup root with no cgroup file system in it: nothing can be enforced.
    let fake = dir.path().join("no-cgroups");
    std::fs::create_dir_all(&fake).expect("dir");
    let args = [
        PORT0_ARGS,
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--cgroup-root",
            fake.to_str().expect("utf-8"),
        ],
    ]
    .concat();
    let mut svc = start(&dir, "vmm", Path::new(common::BIN), &args).await;
    let mut c = VmmServiceClient::new(
        probe::channel(svc.addr("grpc").expect("grpc"))
            .await
            .expect("connect"),
    );
    let mut req = demo("free");
    req.resources = Some(types::Resources {
        vcpus: 2,
        memory_mib: 256,
    });
    let inst = c.create_instance(req).await.expect("create").into_inner();
    let e = c
        .resize(pb::ResizeRequest {
            instance_id: "free".into(),
            resources: Some(types::Resources {
                vcpus: 1,
                memory_mib: 128,
            }),
        })
        .await
        .expect_err("nothing can enforce the limits");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("cannot be enforced") && e.message().contains("cgroup"),
        "{}",
        e.message()
    );
    let now = c
        .get_instance(pb::InstanceRef {
            instance_id: "free".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        now.resources.expect("resources"),
        types::Resources {
            vcpus: 2,
            memory_mib: 256
        },
        "the record keeps what the instance has"
    );
    let seen = probe::resources_seen(addr(&inst)).await.expect("seen");
    assert_eq!(seen["memory_limit_mib"], serde_json::Value::Null, "{seen}");
    stop_gracefully(&mut svc).await;
}

/// A workload that leaves its process group and session (`setsid`) does not outlive
/// its deletion: with cgroups (the node kills what is in the instance's group) and
/// without (it finds the instance's processes by their environment).
#[tokio::test]
async fn a_workload_that_calls_setsid_does_not_survive_its_deletion() {
    for (label, with_cgroups) in [("with", true), ("without", false)] {
        let dir = TestDir::new(&format!("vmm-setsid-{label}"));
        let data = dir.path().join("vmm-data");
        let fake = dir.path().join("no-cgroups");
        std::fs::create_dir_all(&fake).expect("dir");
        let allowed = "/bin/sh".to_owned();
        let mut args: Vec<&str> = [
            PORT0_ARGS,
            &[
                "--data-dir",
                data.to_str().expect("utf-8"),
                "--allowed-commands",
                &allowed,
            ],
        ]
        .concat();
        if !with_cgroups {
            args.extend(["--cgroup-root", fake.to_str().expect("utf-8")]);
        }
        let mut svc = start(&dir, "vmm", Path::new(common::BIN), &args).await;
        let mut c = VmmServiceClient::new(
            probe::channel(svc.addr("grpc").expect("grpc"))
                .await
                .expect("connect"),
        );
        let id = format!("escape-{label}");
        let escape =
            common::shell_then_demo(&id, "setsid sleep 300 < /dev/null > /dev/null 2>&1 &");
        let i = c
            .create_instance(escape)
            .await
            .expect("create")
            .into_inner();
        assert_eq!(i.status, pb::InstanceStatus::Running as i32, "{i:?}");
        assert!(
            processes_of(&id) >= 2,
            "the workload and its escaped sleep run"
        );
        // A node running as root runs its workloads as nobody.
        if nix::unistd::Uid::effective().is_root() {
            for pid in probe::pids_with_env("FORM_INSTANCE_ID", &id) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let uid = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("");
                assert_eq!(uid, "65534", "process {pid} of {id} runs as uid {uid}");
            }
        }
        c.delete_instance(pb::InstanceRef {
            instance_id: id.clone(),
        })
        .await
        .expect("delete");
        assert_eq!(
            processes_of(&id),
            0,
            "{label} cgroups: a process of the instance survived its deletion"
        );
        stop_gracefully(&mut svc).await;
    }
}
