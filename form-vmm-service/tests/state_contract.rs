//! The workload state contract through the node (`ReadChanges`, `MergeChanges`), with
//! real form-demo-app processes: concurrent writes of one key end with one value
//! everywhere, a delete stays deleted, a snapshot records the source's cursor, bad
//! batches are refused whole, and a workload without the contract is told apart from
//! one whose admin address stopped answering.

use std::net::SocketAddr;

use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::conformance::stop_gracefully;
use form_testkit::{ChildService, TestDir, probe, workspace_bin};
use tonic::Code;
use tonic::transport::Channel;

mod common;

type Client = VmmServiceClient<Channel>;

async fn vmm(dir: &TestDir) -> (ChildService, Client) {
    // Scripts written by the tests run too (the allowlist is not what is tested here).
    let (svc, client) = common::node(dir, "vmm", "*").await;
    (svc, client.max_decoding_message_size(32 << 20))
}

async fn instance(c: &mut Client, id: &str, command: &str) -> pb::Instance {
    let i = c
        .create_instance(pb::CreateInstanceRequest {
            instance_id: id.into(),
            cluster_id: "web".into(),
            workload: Some(types::Workload {
                command: command.into(),
                health_path: "/healthz".into(),
                ..Default::default()
            }),
            resources: None,
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(i.status, pb::InstanceStatus::Running as i32, "{i:?}");
    i
}

fn demo_app() -> String {
    workspace_bin("form-demo-app").display().to_string()
}

fn addr(i: &pb::Instance) -> SocketAddr {
    i.address.parse().expect("address")
}

async fn call(i: &pb::Instance, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    probe::http_request(addr(i), method, path, body)
        .await
        .expect("request")
}

/// `ReadChanges` of `id` after `since` (with `prefixes`, only those keys).
async fn read(
    c: &mut Client,
    id: &str,
    since: &str,
    prefixes: &[&str],
) -> Result<pb::ChangeBatch, tonic::Status> {
    c.read_changes(pb::ReadChangesRequest {
        instance_id: id.into(),
        since: since.into(),
        max_bytes: 0,
        own: false,
        prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Everything `from` has, merged into `to`; returns the batch.
async fn exchange(c: &mut Client, from: &str, to: &str) -> pb::ChangeBatch {
    let b = c
        .read_changes(pb::ReadChangesRequest {
            instance_id: from.into(),
            since: String::new(),
            max_bytes: 0,
            own: false,
            prefixes: Vec::new(),
        })
        .await
        .expect("read")
        .into_inner();
    c.merge_changes(pb::MergeChangesRequest {
        instance_id: to.into(),
        batch: b.batch.clone(),
    })
    .await
    .expect("merge");
    b
}

#[tokio::test]
async fn instances_converge_by_merging_and_a_delete_is_never_undone() {
    let dir = TestDir::new("vmm-contract");
    let (mut svc, mut c) = vmm(&dir).await;
    let a = instance(&mut c, "a", &demo_app()).await;
    let b = instance(&mut c, "b", &demo_app()).await;
    assert_eq!(a.state_contract, "supported", "{a:?}");

    // Concurrent writes of one key, a key deleted on one side after both had it.
    assert_eq!(call(&a, "PUT", "/kv/shared", b"from a").await.0, 204);
    assert_eq!(call(&b, "PUT", "/kv/shared", b"from b").await.0, 204);
    assert_eq!(call(&a, "PUT", "/kv/gone", b"old").await.0, 204);
    exchange(&mut c, "a", "b").await;
    assert_eq!(call(&b, "DELETE", "/kv/gone", b"").await.0, 204);
    let old = exchange(&mut c, "a", "b").await; // a's old write of "gone" again
    exchange(&mut c, "b", "a").await;
    exchange(&mut c, "a", "b").await;
    let (va, vb) = (
        call(&a, "GET", "/kv/shared", b"").await,
        call(&b, "GET", "/kv/shared", b"").await,
    );
    assert_eq!(va, vb, "one value everywhere");
    assert_eq!(va.0, 200);
    for i in [&a, &b] {
        assert_eq!(
            call(i, "GET", "/kv/gone", b"").await.0,
            404,
            "{}",
            i.instance_id
        );
    }
    // A replay of an old batch changes nothing.
    let r = c
        .merge_changes(pb::MergeChangesRequest {
            instance_id: "b".into(),
            batch: old.batch,
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(r.applied, 0, "{r:?}");
    assert!(r.duplicates + r.stale >= 2, "{r:?}");
    assert_eq!(call(&b, "GET", "/kv/gone", b"").await.0, 404);

    // A snapshot records the cursor read before it: a write after it is exactly what
    // a read from that cursor returns.
    let snap = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "a".into(),
            resume: Some(true),
        })
        .await
        .expect("snapshot")
        .into_inner();
    assert!(!snap.state_cursor.is_empty(), "{snap:?}");
    assert_eq!(call(&a, "PUT", "/kv/after", b"1").await.0, 204);
    let after = read(&mut c, "a", &snap.state_cursor, &[])
        .await
        .expect("read since the snapshot");
    assert_eq!(
        after.changes,
        1,
        "{}",
        String::from_utf8_lossy(&after.batch)
    );
    assert!(!after.more);
    // A read of some keys only: the others are left out.
    assert_eq!(call(&a, "PUT", "/kv/cart-1", b"c").await.0, 204);
    let some = read(&mut c, "a", &snap.state_cursor, &["cart-"])
        .await
        .expect("read some keys");
    let text = String::from_utf8_lossy(&some.batch);
    assert_eq!(some.changes, 1, "{text}");
    assert!(
        text.contains("cart-1") && !text.contains("\"after\""),
        "{text}"
    );
    let e = read(&mut c, "a", "", &["a,b"]).await.expect_err("a comma");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A cursor of another instance is refused, not read from the start silently.
    let e = read(&mut c, "b", &snap.state_cursor, &[])
        .await
        .expect_err("foreign cursor");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    stop_gracefully(&mut svc).await;
}

#[tokio::test]
async fn bad_batches_are_refused_and_change_nothing() {
    let dir = TestDir::new("vmm-contract-bad");
    let (mut svc, mut c) = vmm(&dir).await;
    let a = instance(&mut c, "a", &demo_app()).await;
    assert_eq!(call(&a, "PUT", "/kv/k", b"v").await.0, 204);
    let before = exchange(&mut c, "a", "a").await.batch;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let future = format!(
        r#"{{"format":"form.changes/v1","origin":"x","changes":[{{"type":"kv","key":"k","value":"evil","ts":[{},0],"dot":["x",1]}}]}}"#,
        now_ms + 86_400_000
    );
    let half_good = format!(
        r#"{{"format":"form.changes/v1","origin":"x","changes":[{{"type":"kv","key":"new","value":"n","ts":[{now_ms},0],"dot":["x",1]}},{{"type":"kv","key":"","value":"n","ts":[1,0],"dot":["x",2]}}]}}"#
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed", b"{not json".to_vec(), "not JSON"),
        (
            "unknown version",
            br#"{"format":"form.changes/v9","origin":"x","changes":[]}"#.to_vec(),
            "form.changes/v9",
        ),
        (
            "missing changes",
            br#"{"format":"form.changes/v1","origin":"x"}"#.to_vec(),
            "malformed",
        ),
        ("a time far ahead", future.into_bytes(), "ahead"),
        (
            "one bad change among good ones",
            half_good.into_bytes(),
            "changes[1].key",
        ),
        ("oversized", vec![b' '; 17 * 1024 * 1024], "bytes"),
    ];
    for (what, batch, says) in cases {
        let e = c
            .merge_changes(pb::MergeChangesRequest {
                instance_id: "a".into(),
                batch,
            })
            .await
            .expect_err(what);
        assert!(
            matches!(
                e.code(),
                Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
            ),
            "{what}: {e:?}"
        );
        assert!(e.message().contains(says), "{what}: {}", e.message());
    }
    // Nothing changed: the same state, and no key from the half-good batch.
    assert_eq!(call(&a, "GET", "/kv/k", b"").await, (200, "v".into()));
    assert_eq!(call(&a, "GET", "/kv/new", b"").await.0, 404);
    let after = exchange(&mut c, "a", "a").await.batch;
    assert_eq!(
        String::from_utf8_lossy(&after),
        String::from_utf8_lossy(&before)
    );
    // Local writes that the other instances would refuse in a batch are refused (or
    // ignored) where they are made: a value that grows past 1 MiB as UTF-8, an empty or
    // oversized session id. Every batch of this instance still merges elsewhere.
    let (code, text) = call(&a, "PUT", "/kv/wide", &vec![0xFF; 600 * 1024]).await;
    assert_eq!(code, 413, "{text}");
    for bad in [String::new(), "s".repeat(300)] {
        let (code, _, _) = probe::http_call(
            addr(&a),
            "GET",
            "/session",
            &[("Cookie", format!("demo_session={bad}").as_str())],
            b"",
        )
        .await
        .expect("session");
        assert_eq!(code, 200);
    }
    let b = instance(&mut c, "b", &demo_app()).await;
    exchange(&mut c, "a", "b").await;
    assert_eq!(call(&b, "GET", "/kv/k", b"").await, (200, "v".into()));

    // max_bytes out of range names the range.
    let e = c
        .read_changes(pb::ReadChangesRequest {
            instance_id: "a".into(),
            since: String::new(),
            max_bytes: 10,
            own: false,
            prefixes: Vec::new(),
        })
        .await
        .expect_err("tiny batch");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("4096 to 4194304"), "{}", e.message());
    stop_gracefully(&mut svc).await;
}

#[tokio::test]
async fn a_workload_without_the_contract_is_told_apart_from_a_closed_admin_address() {
    let dir = TestDir::new("vmm-contract-none");
    let (mut svc, mut c) = vmm(&dir).await;
    // A workload that serves HTTP and never opens its admin address.
    let script = dir.path().join("plain.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nexec env -u FORM_ADMIN_ADDR \"$0.bin\"\n",
    )
    .expect("script");
    std::os::unix::fs::symlink(
        workspace_bin("form-demo-app"),
        dir.path().join("plain.sh.bin"),
    )
    .expect("link");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let plain = instance(&mut c, "plain", script.to_str().expect("utf-8")).await;
    assert!(plain.state_contract.starts_with("unsupported"), "{plain:?}");
    let e = read(&mut c, "plain", "", &[])
        .await
        .expect_err("no contract");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // A snapshot of it records no cursor.
    let snap = c
        .snapshot(pb::SnapshotRequest {
            instance_id: "plain".into(),
            resume: Some(true),
        })
        .await
        .expect("snapshot")
        .into_inner();
    assert_eq!(snap.state_cursor, "");

    // A workload that had the contract and closed its admin address is unavailable.
    let a = instance(&mut c, "a", &demo_app()).await;
    let admin: SocketAddr = a.admin_address.parse().expect("admin");
    assert_eq!(
        probe::http_request(admin, "POST", "/_form/close", b"")
            .await
            .expect("close")
            .0,
        200
    );
    form_testkit::assert_eventually!(
        deadline = std::time::Duration::from_secs(10),
        async { tokio::net::TcpStream::connect(admin).await.is_err() },
        "the admin address closed"
    );
    let e = read(&mut c, "a", "", &[]).await.expect_err("closed");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    stop_gracefully(&mut svc).await;
}
