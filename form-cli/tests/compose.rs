//! The compose stack on this Docker host: the image is built from the project's
//! binaries (deploy/docker/build.sh), `docker-compose up -d` brings up the platform and
//! its demo cluster, the demo answers through the published balancer port, and a scale
//! request through the published API adds an instance carrying the primary's state.
//! Ports and the network are chosen for this run; the stack is removed at the end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use form_testkit::probe;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A compose project of its own, removed (with its volumes) on drop.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker-compose")
            .current_dir(repo())
            .arg("-p")
            .arg(&self.project)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("docker-compose")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = self.ok(&["port", service, &port.to_string()]);
        let hp = out.trim().rsplit(':').next().expect("port").to_owned();
        format!("127.0.0.1:{hp}").parse().expect("addr")
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.cmd(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

fn build_image() {
    let out = Command::new("bash")
        .current_dir(repo())
        .args(["deploy/docker/build.sh", "debug"])
        .output()
        .expect("build.sh");
    assert!(
        out.status.success(),
        "deploy/docker/build.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_compose_stack_serves_the_demo_and_scales_it_with_its_state() {
    build_image();
    // A /24 of its own in Docker's private range, unlikely to meet another network.
    let n = std::process::id() % 250 + 1;
    let c = Compose {
        project: format!("formtest{}", std::process::id()),
        env: vec![
            ("FORM_HTTP_PORT".into(), "127.0.0.1:".into()),
            ("FORM_API_PORT".into(), "127.0.0.1:".into()),
            ("FORM_SUBNET".into(), format!("172.30.{n}.0/24")),
            ("FORM_VMM_IP".into(), format!("172.30.{n}.20")),
        ],
    };
    c.ok(&["up", "-d"]);
    let lb = c.port("form-rplb", 8080);
    let api = c.port("form-mcp", 3010);
    let host = [("Host", "demo.localhost")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok((200, _, _)) = probe::http_call(lb, "GET", "/whoami", &host, b"").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the demo never answered on {lb}: {}",
            c.ok(&["logs", "--tail", "20"])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, _, _) = probe::http_call(lb, "PUT", "/kv/alpha", &host, b"one")
        .await
        .expect("PUT");
    assert!((200..300).contains(&code));

    let logs = c.ok(&["logs", "form-keys"]);
    let token = logs
        .lines()
        .find_map(|l| l.split("API token (admin): ").nth(1))
        .expect("the admin token in form-keys' log")
        .trim()
        .to_owned();
    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = br#"{"operation": "scale_out", "target_count": 2, "immediate": true}"#;
    let (code, _, reply) =
        probe::http_call(api, "POST", "/api/v1/clusters/demo/scale", &headers, body)
            .await
            .expect("scale");
    assert_eq!(code, 202, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).expect("JSON");
    let id = v["operation_id"].as_str().expect("id").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, op) = probe::http_call(
            api,
            "GET",
            &format!("/api/v1/operations/{id}"),
            &headers,
            b"",
        )
        .await
        .expect("operation");
        let op: serde_json::Value = serde_json::from_str(&op).expect("JSON");
        if op["status"] == "completed" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline && op["status"] != "rolled_back",
            "{op}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every instance, the new one too, answers with the primary's key through the
    // balancer (new sessions are spread over both).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (code, _, who) = probe::http_call(lb, "GET", "/whoami", &host, b"")
            .await
            .expect("whoami");
        assert_eq!(code, 200);
        seen.insert(who);
        let (code, _, val) = probe::http_call(lb, "GET", "/kv/alpha", &host, b"")
            .await
            .expect("kv");
        assert_eq!((code, val.as_str()), (200, "one"));
    }
    assert!(seen.len() >= 2, "both instances serve: {seen:?}");
}
