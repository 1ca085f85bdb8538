//! The qemu backend end to end with real VMs (TCG where KVM cannot run the guest):
//! boot the demo guest, write keys, snapshot, clone 2; each clone serves the keys on
//! its own port with a new identity; the guest serves the state contract, so writes
//! after the snapshot reach a clone and a clone's writes reach the primary. Needs qemu-system-x86, busybox-static and cpio
//! (`.ci/run` installs them); the guest is built by `deploy/guest/build.sh`.

use std::path::Path;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::{PORT0_ARGS, stop_gracefully};
use form_testkit::{TestDir, probe, start};

const BIN: &str = env!("CARGO_BIN_EXE_form-vmm-service");

/// What the node learned of the primary's workload and the state contract.
async fn primary_contract(c: &mut VmmServiceClient<tonic::transport::Channel>) -> String {
    c.get_instance(pb::InstanceRef {
        instance_id: "vm-primary".into(),
    })
    .await
    .expect("get")
    .into_inner()
    .state_contract
}

#[tokio::test]
async fn vm_snapshot_and_clones_carry_memory_state_with_new_identities() {
    snapshot_and_clones("stream").await;
}

/// The same with the guest's memory in a file: snapshots copy it, clones map it
/// copy-on-write from a sealed copy checked as it loads (docs/vmm.md).
#[tokio::test]
async fn vm_snapshot_and_clones_with_memory_files() {
    snapshot_and_clones("file").await;
}

async fn snapshot_and_clones(memory: &str) {
    let guest = tokio::task::spawn_blocking(form_testkit::guest::build)
        .await
        .expect("guest");
    let dir = TestDir::new(&format!("vmm-qemu-{memory}"));
    let data = dir.path().join("data");
    let args = [
        PORT0_ARGS,
        &[
            "--backend",
            "qemu",
            "--guest-dir",
            guest.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--ready-timeout-ms",
            "60000",
            "--qemu-max-vcpus",
            "2",
            "--qemu-max-memory-mib",
            "512",
            "--qemu-memory",
            memory,
        ],
    ]
    .concat();
    let mut svc = start(&dir, "vmm", Path::new(BIN), &args).await;
    let grpc = svc.addr("grpc").expect("grpc");
    let mut c = VmmServiceClient::new(
        probe::channel_with_timeout(grpc, std::time::Duration::from_secs(120))
            .await
            .expect("connect"),
    );
    let req = pb::CreateInstanceRequest {
        instance_id: "vm-primary".into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: "form-demo-app".into(),
            health_path: "/healthz".into(),
            // Inside the guest the workload listens on this port (the host forwards
            // the instance's own port to it).
            port: 9090,
            ..Default::default()
        }),
        resources: Some(types::Resources {
            vcpus: 1,
            memory_mib: 128,
        }),
    };
    let primary = c.create_instance(req).await.expect("create").into_inner();
    assert_eq!(
        primary.status,
        pb::InstanceStatus::Running as i32,
        "{}",
        primary.failure
    );
    assert_eq!(primary.backend, "qemu");
    let paddr: std::net::SocketAddr = primary.address.parse().expect("addr");
    for (k, v) in [("x", "10"), ("y", "20")] {
        let (code, _) = probe::http_request(paddr, "PUT", &format!("/kv/{k}"), v.as_bytes())
            .await
            .expect("PUT");
        assert_eq!(code, 204);
    }
    let snap = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "vm-primary".into(),
            resume: None,
        })
        .await
        .expect("snapshot")
        .into_inner();
    assert!(
        snap.files
            .iter()
            .any(|f| f.path == "memory.bin" && f.size_bytes > 0),
        "{:?}",
        snap.files
    );
    probe::http_request(paddr, "PUT", "/kv/x", b"after")
        .await
        .expect("PUT");

    let mut ports = Vec::new();
    for n in 0..2 {
        let req = pb::CloneRequest {
            snapshot_id: snap.snapshot_id.clone(),
            instance_id: format!("vm-clone-{n}"),
            resources: None,
        };
        let clone = VmmServiceClient::clone(&mut c, req)
            .await
            .expect("clone")
            .into_inner();
        assert_eq!(
            clone.status,
            pb::InstanceStatus::Running as i32,
            "{}",
            clone.failure
        );
        let a: std::net::SocketAddr = clone.address.parse().expect("addr");
        assert_eq!(
            probe::http_get(a, "/kv/x").await.expect("GET"),
            (200, "10".into()),
            "clone {n} has the memory of the snapshot"
        );
        assert_eq!(
            probe::http_get(a, "/kv/y").await.expect("GET"),
            (200, "20".into())
        );
        let who: serde_json::Value =
            serde_json::from_str(&probe::http_get(a, "/whoami").await.expect("GET").1)
                .expect("json");
        assert_eq!(who["instance_id"], format!("vm-clone-{n}"));
        assert_eq!(who["restored_from"], snap.snapshot_id.as_str());
        assert_eq!(who["generation"], 1);
        assert_eq!(
            clone.resources.expect("resources").memory_mib,
            128,
            "the snapshot's machine"
        );
        ports.push(a.port());
    }
    assert_ne!(ports[0], ports[1], "each clone has its own port");
    assert_eq!(
        probe::http_get(paddr, "/kv/x").await.expect("GET").1,
        "after",
        "the primary runs on"
    );

    // The guest serves the state contract: the write made on the primary after the
    // snapshot reaches a clone from the snapshot's cursor, and a clone's own write is
    // handed to the primary.
    assert_eq!(primary_contract(&mut c).await, "supported");
    assert!(!snap.state_cursor.is_empty(), "{snap:?}");
    let since = c
        .read_changes(pb::ReadChangesRequest {
            instance_id: "vm-primary".into(),
            since: snap.state_cursor.clone(),
            max_bytes: 0,
            own: false,
            prefixes: Vec::new(),
        })
        .await
        .expect("read the primary's changes since the snapshot")
        .into_inner();
    assert_eq!(
        since.changes,
        1,
        "{}",
        String::from_utf8_lossy(&since.batch)
    );
    c.merge_changes(pb::MergeChangesRequest {
        instance_id: "vm-clone-0".into(),
        batch: since.batch,
    })
    .await
    .expect("merge into a clone");
    let clone0: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().expect("addr");
    assert_eq!(
        probe::http_get(clone0, "/kv/x").await.expect("GET"),
        (200, "after".into()),
        "the primary's write after the snapshot reached the clone"
    );
    let clone1: std::net::SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().expect("addr");
    assert_eq!(
        probe::http_request(clone1, "PUT", "/kv/cart", b"on a clone")
            .await
            .expect("PUT")
            .0,
        204
    );
    let all = c
        .read_changes(pb::ReadChangesRequest {
            instance_id: "vm-clone-1".into(),
            since: String::new(),
            max_bytes: 0,
            own: false,
            prefixes: Vec::new(),
        })
        .await
        .expect("read a clone's changes")
        .into_inner();
    c.merge_changes(pb::MergeChangesRequest {
        instance_id: "vm-primary".into(),
        batch: all.batch,
    })
    .await
    .expect("hand off to the primary");
    assert_eq!(
        probe::http_get(paddr, "/kv/cart").await.expect("GET"),
        (200, "on a clone".into())
    );
    assert_eq!(
        probe::http_get(paddr, "/kv/x").await.expect("GET").1,
        "after",
        "the clone's older x did not undo the primary's newer write"
    );

    resize_in_place_as_the_guest_sees_it(&mut c, clone0).await;

    // A clone of the resized VM's snapshot is started with its devices: it has the two
    // vCPUs too; a clone asked for another size is resized to it.
    let snap2 = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "vm-clone-0".into(),
            resume: None,
        })
        .await
        .expect("snapshot of the resized VM")
        .into_inner();
    let grown = VmmServiceClient::clone(
        &mut c,
        pb::CloneRequest {
            snapshot_id: snap2.snapshot_id.clone(),
            instance_id: "vm-clone-2".into(),
            resources: None,
        },
    )
    .await
    .expect("clone of the resized VM")
    .into_inner();
    let seen = probe::wait_resources(
        grown.address.parse().expect("addr"),
        std::time::Duration::from_secs(20),
        |r| r["cpus_online"] == 2,
    )
    .await;
    assert_eq!(seen["cpus_online"], 2, "{seen}");
    let asked = VmmServiceClient::clone(
        &mut c,
        pb::CloneRequest {
            snapshot_id: snap.snapshot_id.clone(),
            instance_id: "vm-clone-3".into(),
            resources: Some(types::Resources {
                vcpus: 2,
                memory_mib: 256,
            }),
        },
    )
    .await
    .expect("clone of another size")
    .into_inner();
    assert_eq!(
        asked.resources.expect("resources"),
        types::Resources {
            vcpus: 2,
            memory_mib: 256
        }
    );
    let seen = probe::wait_resources(
        asked.address.parse().expect("addr"),
        std::time::Duration::from_secs(20),
        |r| r["cpus_online"] == 2 && r["memory_total_mib"].as_u64() > Some(180),
    )
    .await;
    assert_eq!(seen["cpus_online"], 2, "{seen}");
    assert!(seen["memory_total_mib"].as_u64() > Some(180), "{seen}");

    if memory == "file" {
        damaged_memory_files_are_refused(&mut c, &data).await;
    }

    for id in [
        "vm-primary",
        "vm-clone-0",
        "vm-clone-1",
        "vm-clone-2",
        "vm-clone-3",
    ] {
        c.delete_instance(pb::InstanceRef {
            instance_id: id.into(),
        })
        .await
        .expect("delete");
    }
    assert_eq!(
        std::fs::read_dir(data.join("instances"))
            .expect("dir")
            .count(),
        0,
        "no VM files left"
    );
    stop_gracefully(&mut svc).await;
}

/// The primary's snapshot holds its RAM as a file (memory.ram, holes kept); a clone
/// checks it as it loads it: one damaged or missing is refused, naming it.
async fn damaged_memory_files_are_refused(
    c: &mut VmmServiceClient<tonic::transport::Channel>,
    data: &Path,
) {
    let snap3 = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "vm-primary".into(),
            resume: None,
        })
        .await
        .expect("another snapshot")
        .into_inner();
    let ram = data
        .join("snapshots")
        .join(&snap3.snapshot_id)
        .join("memory.ram");
    {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let meta = std::fs::metadata(&ram).expect("memory.ram is in the snapshot");
        assert!(
            meta.blocks() * 512 < meta.len(),
            "memory.ram keeps the guest's untouched memory as holes: {} of {} bytes",
            meta.blocks() * 512,
            meta.len()
        );
        // The node keeps the snapshot's memory it made for its clones, and loads the
        // file again once it has changed: the damage must come at a later tick of
        // the file system's clock than the snapshot's write.
        let written = meta.modified().expect("mtime");
        while std::time::SystemTime::now() < written + std::time::Duration::from_millis(20) {
            tokio::task::yield_now().await;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ram)
            .expect("open");
        // The kernel's first pages are written memory.
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 1 << 20).expect("read");
        f.write_all_at(&[b[0] ^ 0xff], 1 << 20).expect("damage");
    }
    let mut refused = async |id: &str| {
        VmmServiceClient::clone(
            c,
            pb::CloneRequest {
                snapshot_id: snap3.snapshot_id.clone(),
                instance_id: id.into(),
                resources: None,
            },
        )
        .await
        .expect_err("a damaged snapshot is refused")
        .message()
        .to_owned()
    };
    let e = refused("vm-clone-damaged").await;
    assert!(
        e.contains("memory.ram") && e.contains("digest"),
        "the refusal names the file and what is wrong: {e}"
    );
    std::fs::remove_file(&ram).expect("remove");
    let e = refused("vm-clone-missing").await;
    assert!(e.contains("memory.ram"), "{e}");
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: snap3.snapshot_id.clone(),
    })
    .await
    .expect("delete the damaged snapshot");
}

/// Resizes a running VM up and down in place and reads the result from inside the
/// guest (its CPUs online, its `MemTotal`); a size past the VM's room is refused,
/// naming the limit, and changes nothing.
async fn resize_in_place_as_the_guest_sees_it(
    c: &mut VmmServiceClient<tonic::transport::Channel>,
    addr: std::net::SocketAddr,
) {
    let secs = std::time::Duration::from_secs;
    let before = probe::resources_seen(addr).await.expect("seen");
    assert_eq!(before["cpus_online"], 1, "{before}");
    let mem0 = before["memory_total_mib"].as_u64().expect("memory");
    let mut resize = async |vcpus, memory_mib| {
        c.resize(pb::ResizeRequest {
            instance_id: "vm-clone-0".into(),
            resources: Some(types::Resources { vcpus, memory_mib }),
        })
        .await
    };

    let up = resize(2, 384).await.expect("grow").into_inner();
    assert!(up.enforced, "{}", up.message);
    assert_eq!(
        up.instance.expect("instance").resources.expect("resources"),
        types::Resources {
            vcpus: 2,
            memory_mib: 384
        }
    );
    let seen = probe::wait_resources(addr, secs(20), |r| {
        r["cpus_online"] == 2 && r["memory_total_mib"].as_u64() >= Some(mem0 + 200)
    })
    .await;
    assert_eq!(
        seen["cpus_online"], 2,
        "the guest sees the hot-plugged vCPU: {seen}"
    );
    assert!(
        seen["memory_total_mib"].as_u64() >= Some(mem0 + 200),
        "the guest sees the hot-plugged memory ({mem0} MiB before): {seen}"
    );

    let e = resize(3, 384).await.expect_err("past maxcpus");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("maxcpus"), "{}", e.message());
    let e = resize(2, 1024).await.expect_err("past maxmem");
    assert!(e.message().contains("maxmem"), "{}", e.message());

    // Memory goes back through the balloon. vCPUs go only under KVM: under TCG the
    // refusal says why, and the VM keeps what it has.
    let kvm = qemu_accel_is_kvm();
    let down = resize(if kvm { 1 } else { 2 }, 160)
        .await
        .expect("shrink")
        .into_inner();
    assert!(down.enforced, "{}", down.message);
    let cpus = if kvm { 1 } else { 2 };
    let seen = probe::wait_resources(addr, secs(20), |r| {
        r["cpus_online"] == cpus && r["memory_total_mib"].as_u64() < Some(mem0 + 40)
    })
    .await;
    assert_eq!(seen["cpus_online"], cpus, "{seen}");
    assert!(
        seen["memory_total_mib"].as_u64() < Some(mem0 + 40),
        "the balloon took the memory back ({mem0} MiB at 128): {seen}"
    );
    if kvm {
        resize(2, 192).await.expect("two vCPUs again");
    } else {
        let e = resize(1, 160).await.expect_err("vCPU unplug under TCG");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("TCG"), "{}", e.message());
        let seen = probe::resources_seen(addr).await.expect("seen");
        assert_eq!(seen["cpus_online"], 2, "nothing was unplugged: {seen}");
    }
}

/// Whether the backend runs guests under KVM here (`--accel auto`).
fn qemu_accel_is_kvm() -> bool {
    form_vmm_service::qemu::Accel::Auto.resolve() == "kvm"
}
