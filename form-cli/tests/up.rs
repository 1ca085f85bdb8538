//! `formctl up` starts every service, each answers its health check, and Ctrl-C
//! (SIGINT to formctl) stops them all, leaving no process behind.

use std::time::Duration;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_testkit::{LaunchSpec, Signal, TestDir, assert_eventually, probe};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const FORMCTL: &str = env!("CARGO_BIN_EXE_formctl");

fn formctl(args: &[&str]) -> String {
    let out = std::process::Command::new(FORMCTL)
        .args(args)
        .output()
        .expect("run formctl");
    assert!(
        out.status.success(),
        "formctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn up_starts_the_stack_and_ctrl_c_stops_it() {
    let dir = TestDir::new("formctl-up");
    let data = dir.path().join("data");
    let spec = LaunchSpec::new("formctl", FORMCTL, dir.path()).args([
        "up".as_ref(),
        "--auto-ports".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    let mut up = form_testkit::ChildService::start(spec)
        .await
        .unwrap_or_else(|e| panic!("formctl up: {e}"));
    let addresses = up.info().addresses.clone();
    let grpc: Vec<_> = addresses
        .iter()
        .filter(|(k, _)| k.ends_with("/grpc"))
        .map(|(k, a)| (k.clone(), *a))
        .collect();
    assert_eq!(
        grpc.len(),
        6,
        "3 replicas, vmm, rplb, scaler: {addresses:?}"
    );
    // Every service speaks mutual TLS with the stack's own CA: a certificate issued by
    // it (here for a controller, with `formctl certs issue`) is accepted, one of
    // another CA (the tests') is not.
    let tls = data.join("tls");
    let writer = dir.path().join("scaler-tls");
    formctl(&[
        "certs",
        "issue",
        "--ca",
        &tls.join("ca").display().to_string(),
        "--kind",
        "scaler",
        "--id",
        "up-test",
        "--out",
        &writer.display().to_string(),
    ]);
    for (name, addr) in &grpc {
        let ch = probe::channel_with(*addr, &writer)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name}");
        assert!(
            probe::health(*addr, "").await.is_err(),
            "{name} accepts a certificate of another CA"
        );
    }
    let api = addresses["form-mcp/http"];
    assert_eq!(
        probe::http_get(api, "/healthz")
            .await
            .expect("GET /healthz")
            .0,
        200
    );

    // The replicas authorize each other: a write on one reaches the others, and
    // `formctl state` shows it.
    let s1 = addresses["form-state-1/grpc"];
    let mut c = StateServiceClient::new(probe::channel_with(s1, &writer).await.expect("connect"));
    c.put_cluster(pb::PutClusterRequest {
        cluster_id: "probe".into(),
        ..Default::default()
    })
    .await
    .expect("write");
    let operator = tls.join("formctl").display().to_string();
    let digest = |i: usize| {
        let operator = operator.clone();
        let addr = addresses[&format!("form-state-{i}/grpc")].to_string();
        async move {
            let out = formctl(&["state", "digest", "--addr", &addr, "--tls-dir", &operator]);
            out.lines()
                .find(|l| l.starts_with("digest"))
                .map(str::to_owned)
                .unwrap_or_default()
        }
    };
    assert_eventually!(
        async {
            let d1 = digest(1).await;
            !d1.is_empty() && digest(2).await == d1 && digest(3).await == d1
        },
        "replicas converge"
    );
    let dump = formctl(&[
        "state",
        "dump",
        "--json",
        "--addr",
        &addresses["form-state-3/grpc"].to_string(),
        "--tls-dir",
        &operator,
    ]);
    let v: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    let probe_cluster = v["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["cluster_id"] == "probe"))
        .expect("the write is on replica 3");
    assert_eq!(probe_cluster["domain"], "probe.fog");

    // The demo cluster answers through the balancer; scaled to 3 through formctl, every
    // instance serves the primary's keys.
    let balancer = addresses["form-rplb/http"];
    let (code, _, who) = probe::http_call(
        balancer,
        "GET",
        "/whoami",
        &[("Host", "demo.localhost")],
        b"",
    )
    .await
    .expect("demo through the balancer");
    assert_eq!(code, 200, "{who}");
    let (code, _, _) = probe::http_call(
        balancer,
        "PUT",
        "/kv/alpha",
        &[("Host", "demo.localhost")],
        b"one",
    )
    .await
    .expect("PUT a key");
    assert!((200..300).contains(&code));
    let api = format!("http://{}", addresses["form-mcp/http"]);
    let ctl = |args: &[&str]| {
        std::process::Command::new(FORMCTL)
            .args(args)
            .env("FORM_API", &api)
            .env("FORM_DATA_DIR", &data)
            .env_remove("FORM_TOKEN")
            .output()
            .expect("run formctl")
    };
    let out = ctl(&["scale", "demo", "--to", "3"]);
    assert!(
        out.status.success(),
        "scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["status", "demo", "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(st["instances"], 3, "{st}");
    let members: Vec<std::net::SocketAddr> = st["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            m["addresses"][0]
                .as_str()
                .expect("address")
                .parse()
                .expect("addr")
        })
        .collect();
    assert_eq!(members.len(), 3);
    for m in &members {
        assert_eq!(
            probe::http_get(*m, "/kv/alpha").await.expect("GET key"),
            (200, "one".to_owned()),
            "{m} carries the primary's key"
        );
    }

    let out = ctl(&["status", "demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state sync: on_scale"), "{text}");
    let out = ctl(&["state-sync", "demo", "--mode", "on_scale"]);
    assert!(
        out.status.success(),
        "state-sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Output into a closed pipe (`formctl status | head`) ends quietly.
    let mut piped = std::process::Command::new(FORMCTL)
        .args(["status", "demo"])
        .env("FORM_API", &api)
        .env("FORM_DATA_DIR", &data)
        .env_remove("FORM_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run formctl");
    drop(piped.stdout.take());
    let out = piped.wait_with_output().expect("formctl ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "{:?}: {err}",
        out.status
    );
    // Without --api, formctl finds the stack of its data directory (here on ports
    // chosen at run time).
    let found = std::process::Command::new(FORMCTL)
        .args(["status", "demo", "--json"])
        .env("FORM_DATA_DIR", &data)
        .env_remove("FORM_API")
        .env_remove("FORM_TOKEN")
        .output()
        .expect("run formctl");
    assert!(
        found.status.success(),
        "formctl without --api: {}",
        String::from_utf8_lossy(&found.stderr)
    );

    // One instance out of rotation and back, then removed by name.
    let clone = st["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["template"] == false))
        .and_then(|m| m["instance_id"].as_str())
        .expect("a clone")
        .to_owned();
    for args in [
        vec!["drain", "demo", clone.as_str()],
        vec!["undrain", "demo", clone.as_str()],
        vec!["drain-settings", "demo", "--grace-seconds", "5"],
        vec![
            "scale",
            "demo",
            "--remove",
            clone.as_str(),
            "--grace-seconds",
            "1",
            "--immediate",
        ],
    ] {
        let out = ctl(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ctl(&["status", "demo", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(st["instances"], 2, "{st}");
    assert!(
        !st.to_string().contains(&clone),
        "{clone} was removed: {st}"
    );

    // Clear errors, non-zero exits.
    for (args, says) in [
        (
            vec!["--api", "http://127.0.0.1:9", "status", "demo"],
            "cannot reach the API",
        ),
        (
            vec!["--token", "wrong-token-wrong-token", "status", "demo"],
            "401",
        ),
        (vec!["status", "nope"], "404"),
        (vec!["scale", "demo", "--to", "99"], "target_count 99"),
        (vec!["state-sync", "demo", "--mode", "often"], "on_scale"),
        (vec!["state-sync", "nope", "--mode", "none"], "404"),
        (
            vec!["scale", "demo", "--remove", "ghost", "--immediate"],
            "not a member",
        ),
        (vec!["scale", "demo", "--to", "1"], "pass --immediate"),
    ] {
        let out = ctl(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: '{says}' not in {err}");
    }

    // `formctl demo`: sticky clients through the balancer while the cluster scales in
    // to 1, out to 2 and in again; no request fails, every instance has the keys, no
    // write is lost and every session counter counts on.
    let out = ctl(&[
        "demo",
        "--balancer",
        &format!("http://{balancer}"),
        "--to",
        "2",
        "--clients",
        "4",
        "--keys",
        "5",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("requests failed:               0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("state on every instance:       2 of 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("writes lost:                   0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("session counters kept:         4 of 4"),
        "{stdout}"
    );

    let status = up
        .stop(Signal::SIGINT, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", up.log_tail()));
    assert_eq!(
        status.code(),
        Some(0),
        "formctl after Ctrl-C; log:\n{}",
        up.log_tail()
    );
    for (name, addr) in addresses {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{name} still listens on {addr} after formctl stopped"
        );
    }
    for m in members {
        assert!(
            tokio::net::TcpStream::connect(m).await.is_err(),
            "a demo instance still listens on {m} after formctl stopped"
        );
    }
}

#[tokio::test]
async fn up_detach_runs_in_the_background_and_down_stops_it() {
    let dir = TestDir::new("formctl-detach");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let out = formctl(&[
        "up",
        "--detach",
        "--auto-ports",
        "--no-demo",
        "--data-dir",
        data_s,
    ]);
    assert!(out.contains("formctl down"), "{out}");
    let ready: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("formctl.ready.json")).expect("ready file"),
    )
    .expect("JSON");
    let api: std::net::SocketAddr = ready["addresses"]["form-mcp/http"]
        .as_str()
        .expect("api")
        .parse()
        .expect("addr");
    assert_eq!(
        probe::http_get(api, "/healthz").await.expect("healthz").0,
        200
    );
    let again = std::process::Command::new(FORMCTL)
        .args(["up", "--detach", "--auto-ports", "--data-dir", data_s])
        .output()
        .expect("run");
    assert!(
        !again.status.success(),
        "a second stack on the same data is refused"
    );
    let out = formctl(&["down", "--data-dir", data_s]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        tokio::net::TcpStream::connect(api).await.is_err(),
        "the API still listens after formctl down"
    );
}
