//! Snapshots from node to node with real processes: a snapshot taken on one vmm node is
//! pulled by another (through a TCP proxy that a test can cut), resumed after a cut and
//! after a pull given up halfway, and cloned there with the source's state; a damaged
//! chunk is refused and fetched again; a node without room refuses the pull and keeps
//! nothing; bad requests are refused with what is accepted.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::net::Proxy;
use form_testkit::{ChildService, Signal, TestDir, probe, start, workspace_bin};
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_form-vmm-service");

/// Size of each value written to the source.
const VALUE_BYTES: usize = 900 * 1024;

/// A vmm node that is stopped with SIGTERM when dropped, so it deletes its instances
/// (a test that fails must not leave workloads behind).
struct Node(ChildService);

impl Node {
    fn addr(&self) -> SocketAddr {
        self.0.addr("grpc").expect("grpc")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.0.signal(Signal::SIGTERM).is_ok() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

async fn node(dir: &TestDir, name: &str, extra: &[&str]) -> (Node, VmmServiceClient<Channel>) {
    let data = dir.path().join(format!("{name}-data"));
    let args = [
        PORT0_ARGS,
        &[
            "--node-id",
            name,
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        extra,
    ]
    .concat();
    let svc = start(dir, name, Path::new(BIN), &args).await;
    let client = VmmServiceClient::new(
        probe::channel(svc.addr("grpc").expect("grpc"))
            .await
            .expect("connect"),
    )
    .max_decoding_message_size(8 * 1024 * 1024);
    (Node(svc), client)
}

fn value(i: usize) -> Vec<u8> {
    vec![b'a' + i as u8; VALUE_BYTES]
}

/// A demo instance on `c` holding `values` large values, and a snapshot of it.
async fn source(c: &mut VmmServiceClient<Channel>, values: usize) -> pb::SnapshotInfo {
    let req = pb::CreateInstanceRequest {
        instance_id: "primary".into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: workspace_bin("form-demo-app").display().to_string(),
            health_path: "/healthz".into(),
            ..Default::default()
        }),
        resources: None,
    };
    let primary = c.create_instance(req).await.expect("create").into_inner();
    let at: SocketAddr = primary.address.parse().expect("address");
    for i in 0..values {
        let (code, body) = probe::http_request(at, "PUT", &format!("/kv/k{i}"), &value(i))
            .await
            .expect("PUT");
        assert_eq!(code, 204, "{body}");
    }
    c.snapshot(pb::SnapshotRequest {
        instance_id: "primary".into(),
        resume: None,
    })
    .await
    .expect("snapshot")
    .into_inner()
}

fn pull_req(snap: &pb::SnapshotInfo, from: SocketAddr) -> pb::PullSnapshotRequest {
    pb::PullSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        from_address: from.to_string(),
        expected_files: snap.files.clone(),
        max_bytes_per_second: 0,
    }
}

/// Clones `snap` on `c` and checks that the clone holds every one of the source's
/// `values`.
async fn clone_holds_the_values(
    c: &mut VmmServiceClient<Channel>,
    snap: &pb::SnapshotInfo,
    values: usize,
) {
    let req = pb::CloneRequest {
        snapshot_id: snap.snapshot_id.clone(),
        instance_id: "copy".into(),
        resources: None,
    };
    let clone = VmmServiceClient::clone(c, req)
        .await
        .expect("clone on the other node")
        .into_inner();
    assert_eq!(clone.restored_from, snap.snapshot_id);
    let at: SocketAddr = clone.address.parse().expect("address");
    for i in 0..values {
        let (code, body) = probe::http_get(at, &format!("/kv/k{i}"))
            .await
            .expect("GET");
        assert_eq!(code, 200);
        assert!(
            body.len() == VALUE_BYTES && body.bytes().all(|b| b == b'a' + i as u8),
            "value k{i} differs on the clone ({} bytes)",
            body.len()
        );
    }
}

/// Bytes the pulling node has written of `file` of snapshot `id` so far, read from its
/// disk.
fn pulled(dir: &TestDir, node: &str, id: &str, file: &str) -> u64 {
    let path = dir
        .path()
        .join(format!("{node}-data/snapshots/.incoming/{id}/{file}"));
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Waits until node-b has written more than `bytes` of the snapshot's state.
async fn until_pulled(dir: &TestDir, id: &str, bytes: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pulled(dir, "node-b", id, "state/state.json") <= bytes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} bytes arrived",
            pulled(dir, "node-b", id, "state/state.json")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_pull_broken_halfway_resumes_and_the_clone_has_the_state() {
    let dir = TestDir::new("transfer-resume");
    let (_a, mut a) = node(&dir, "node-a", &[]).await;
    // 4 MiB/s: the pull of ~14 MiB takes long enough to be cut halfway, with more
    // left than the flow-control windows and socket buffers hold.
    let (_b, mut b) = node(&dir, "node-b", &["--transfer-rate-mib", "4"]).await;
    let values = 16;
    let snap = source(&mut a, values).await;
    assert!(snap.size_bytes >= (values * VALUE_BYTES) as u64, "{snap:?}");
    let proxy = Proxy::start(_a.addr()).await;

    // A pull given up by its caller halfway keeps what arrived ...
    let first = {
        let mut b = b.clone();
        let req = pull_req(&snap, proxy.addr());
        tokio::spawn(async move { b.pull_snapshot(req).await })
    };
    until_pulled(&dir, &snap.snapshot_id, 1024 * 1024).await;
    first.abort();
    let _ = first.await;
    let listed = b
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.snapshots.is_empty(),
        "a half-pulled snapshot is listed: {listed:?}"
    );

    // ... and the next pull starts from there; its link is cut halfway and it goes on.
    // What the given-up pull kept, once it has stopped writing.
    let mut kept = pulled(&dir, "node-b", &snap.snapshot_id, "state/state.json");
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = pulled(&dir, "node-b", &snap.snapshot_id, "state/state.json");
        if now == kept {
            break;
        }
        kept = now;
    }
    let second = {
        let mut b = b.clone();
        let req = pull_req(&snap, proxy.addr());
        tokio::spawn(async move { b.pull_snapshot(req).await })
    };
    until_pulled(&dir, &snap.snapshot_id, kept + 1024 * 1024).await;
    proxy.cut();
    proxy.heal();
    let reply = second
        .await
        .expect("task")
        .expect("the pull completes after the cut")
        .into_inner();
    assert!(reply.bytes_resumed > 0, "nothing was resumed: {reply:?}");
    assert!(reply.reconnects >= 1, "the cut was not seen: {reply:?}");
    assert_eq!(
        reply.bytes_resumed + reply.bytes_received,
        snap.size_bytes,
        "{reply:?}"
    );
    assert_eq!(reply.snapshot.as_ref().map(|s| &s.files), Some(&snap.files));
    clone_holds_the_values(&mut b, &snap, values).await;

    // A snapshot already here is answered at once.
    let again = b
        .pull_snapshot(pull_req(&snap, proxy.addr()))
        .await
        .expect("pull again")
        .into_inner();
    assert!(
        again.already_present && again.bytes_received == 0,
        "{again:?}"
    );
    drop((a, b, proxy));
    drop((_a, _b));
}

#[tokio::test]
async fn a_damaged_chunk_is_refused_and_fetched_again() {
    let dir = TestDir::new("transfer-damage");
    // The source serves its second chunk with a byte changed after hashing it.
    let (a_svc, mut a) = node(&dir, "node-a", &["--fault-corrupt-chunk", "2"]).await;
    let (_b, mut b) = node(&dir, "node-b", &[]).await;
    let snap = source(&mut a, 4).await;
    let reply = b
        .pull_snapshot(pull_req(&snap, a_svc.addr()))
        .await
        .expect("pull")
        .into_inner();
    assert_eq!(reply.chunks_refused, 1, "{reply:?}");
    clone_holds_the_values(&mut b, &snap, 4).await;
    drop((a, b));
    drop((a_svc, _b));
}

#[tokio::test]
async fn a_node_without_room_or_a_bad_request_gets_nothing() {
    let dir = TestDir::new("transfer-refused");
    let (a_svc, mut a) = node(&dir, "node-a", &[]).await;
    let (_c, mut c) = node(&dir, "node-c", &["--snapshot-store-max-mib", "2"]).await;
    let snap = source(&mut a, 4).await;
    let from = a_svc.addr();

    let e = c
        .pull_snapshot(pull_req(&snap, from))
        .await
        .expect_err("no room");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--snapshot-store-max-mib"),
        "{}",
        e.message()
    );
    let listed = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.snapshots.is_empty(), "{listed:?}");

    // Only vmm nodes read snapshot files (the test's client is a controller) ...
    let read = |path: &str| pb::ReadSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        path: path.into(),
        offset: 0,
        chunk_bytes: 0,
    };
    let e = a
        .read_snapshot(read("manifest.json"))
        .await
        .expect_err("a controller read snapshot files");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // ... and a node reads nothing but the manifest and the files it lists.
    let mut peer = VmmServiceClient::new(
        probe::channel_as(from, form_runtime::tls::Kind::Vmm)
            .await
            .expect("connect as a node"),
    );
    let e = peer
        .read_snapshot(read("../../../etc/passwd"))
        .await
        .expect_err("a path outside the snapshot was served");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("manifest.json"), "{}", e.message());

    // The manifest must list the files the snapshot was reported with.
    let mut forged = pull_req(&snap, from);
    forged.expected_files[0].sha256 = "00".repeat(32);
    let e = c.pull_snapshot(forged).await.expect_err("other hashes");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("differ"), "{}", e.message());

    for (req, field) in [
        (
            pb::PullSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                from_address: "not an address".into(),
                ..Default::default()
            },
            "from_address",
        ),
        (
            pb::PullSnapshotRequest {
                snapshot_id: "../x".into(),
                from_address: from.to_string(),
                ..Default::default()
            },
            "snapshot_id",
        ),
    ] {
        let e = c.pull_snapshot(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
    let e = c
        .pull_snapshot(pb::PullSnapshotRequest {
            snapshot_id: "snap-nowhere".into(),
            from_address: from.to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown snapshot");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cannot give"), "{}", e.message());
    drop((a, c, peer));
    drop((a_svc, _c));
}
