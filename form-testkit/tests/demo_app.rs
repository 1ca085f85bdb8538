//! form-demo-app, the workload of the demo, tests and benchmarks: its state lives in
//! memory, the snapshot hook writes it out, a restore reads it back as the next
//! generation, and a VM clone takes a new identity through the admin endpoint.

use std::process::{Child, Command, Stdio};

use form_testkit::net::free_addrs;
use form_testkit::{TestDir, assert_eventually, probe};

const BIN: &str = env!("CARGO_BIN_EXE_form-demo-app");

struct App {
    child: Child,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn launch(id: &str, restore: Option<&std::path::Path>) -> App {
    let addrs = free_addrs(2);
    let mut cmd = Command::new(BIN);
    cmd.env("PORT", addrs[0].to_string())
        .env("FORM_ADMIN_ADDR", addrs[1].to_string())
        .env("FORM_INSTANCE_ID", id)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(dir) = restore {
        cmd.env("FORM_RESTORE_DIR", dir)
            .env("FORM_RESTORED_FROM", "snap-1");
    }
    let app = App {
        child: cmd.spawn().expect("spawn"),
        addr: addrs[0],
        admin: addrs[1],
    };
    assert_eventually!(
        async { matches!(probe::http_get(app.addr, "/healthz").await, Ok((200, _))) },
        "{id} serves"
    );
    app
}

#[tokio::test]
async fn state_snapshot_restore_and_identity() {
    let dir = TestDir::new("demo-app");
    let a = launch("a", None).await;
    assert_eq!(
        probe::http_request(a.addr, "PUT", "/kv/k", b"v1")
            .await
            .expect("PUT")
            .0,
        204
    );
    assert_eq!(
        probe::http_get(a.addr, "/kv/k").await.expect("GET"),
        (200, "v1".into())
    );
    assert_eq!(
        probe::http_get(a.addr, "/kv/missing").await.expect("GET").0,
        404
    );
    let (_, first) = probe::http_get(a.addr, "/session").await.expect("session");
    let first: serde_json::Value = serde_json::from_str(&first).expect("json");
    assert_eq!(first["count"], 1);
    let (code, body) = probe::http_get(a.addr, "/burn?ms=20").await.expect("burn");
    assert!(code == 200 && body.starts_with("burned"), "{body}");

    let snap = dir.path().join("snap");
    let body = serde_json::json!({ "dir": snap }).to_string();
    let (code, _) = probe::http_request(a.admin, "POST", "/_form/snapshot", body.as_bytes())
        .await
        .expect("hook");
    assert_eq!(code, 200);
    assert!(snap.join("state.json").exists());
    let (code, msg) = probe::http_request(a.admin, "POST", "/_form/snapshot", b"not json")
        .await
        .expect("hook");
    assert!(code == 400 && msg.contains("dir"), "{code} {msg}");

    let b = launch("b", Some(&snap)).await;
    assert_eq!(
        probe::http_get(b.addr, "/kv/k").await.expect("GET"),
        (200, "v1".into())
    );
    let who: serde_json::Value =
        serde_json::from_str(&probe::http_get(b.addr, "/whoami").await.expect("GET").1)
            .expect("json");
    assert_eq!(
        (
            who["instance_id"].as_str(),
            who["generation"].as_u64(),
            who["restored_from"].as_str()
        ),
        (Some("b"), Some(1), Some("snap-1"))
    );
    probe::http_request(b.addr, "PUT", "/kv/k", b"v2")
        .await
        .expect("PUT");
    assert_eq!(
        probe::http_get(a.addr, "/kv/k").await.expect("GET").1,
        "v1",
        "the restored copy is independent"
    );

    let id = serde_json::json!({ "instance_id": "c", "restored_from": "snap-9" }).to_string();
    assert_eq!(
        probe::http_request(b.admin, "POST", "/_form/identity", id.as_bytes())
            .await
            .expect("identity")
            .0,
        200
    );
    let who: serde_json::Value =
        serde_json::from_str(&probe::http_get(b.addr, "/whoami").await.expect("GET").1)
            .expect("json");
    assert_eq!(
        (who["instance_id"].as_str(), who["generation"].as_u64()),
        (Some("c"), Some(2))
    );
    // A write's answer names the instance that took it, under its new identity.
    let (code, head, _) = probe::http_call(b.addr, "PUT", "/kv/k", &[], b"v3")
        .await
        .expect("PUT");
    assert_eq!(code, 204, "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("x-instance: c")),
        "{head}"
    );
}

#[test]
fn refuses_to_start_without_a_port() {
    let out = Command::new(BIN).env_remove("PORT").output().expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
