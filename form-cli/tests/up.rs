//! `formctl up` starts every service, each answers its health check, and Ctrl-C
//! (SIGINT to formctl) stops them all, leaving no process behind.

use std::time::Duration;

use form_proto::state::v1 as pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_testkit::{LaunchSpec, Signal, TestDir, assert_eventually, probe};
use tonic_health::pb::health_check_response::ServingStatus;

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
    for (name, addr) in &grpc {
        let status = probe::health(*addr, "")
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(status, ServingStatus::Serving, "{name}");
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
    let mut c = StateServiceClient::new(probe::channel(s1).await.expect("connect"));
    c.put_cluster(pb::PutClusterRequest {
        cluster_id: "demo".into(),
        ..Default::default()
    })
    .await
    .expect("write");
    let digest = |i: usize| {
        let addr = addresses[&format!("form-state-{i}/grpc")].to_string();
        async move {
            let out = formctl(&["state", "digest", "--addr", &addr]);
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
    ]);
    let v: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(v["clusters"][0]["cluster_id"], "demo");
    assert_eq!(v["clusters"][0]["domain"], "demo.fog");

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
}
