//! `formctl up` starts every service, each answers its health check, and Ctrl-C
//! (SIGINT to formctl) stops them all, leaving no process behind.

use std::time::Duration;

use form_testkit::{LaunchSpec, Signal, TestDir, probe};
use tonic_health::pb::health_check_response::ServingStatus;

const FORMCTL: &str = env!("CARGO_BIN_EXE_formctl");

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
