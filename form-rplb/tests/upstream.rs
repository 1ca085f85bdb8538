//! The balancer starts and reports SERVING while form-state is down, and connects to
//! it once it comes up (probing with backoff).

use std::path::Path;

use form_testkit::conformance::{PORT0_ARGS, stop_gracefully};
use form_testkit::{TestDir, assert_eventually, probe, start};
use tonic_health::pb::health_check_response::ServingStatus;

const BIN: &str = env!("CARGO_BIN_EXE_form-rplb");

async fn upstream_up(metrics: std::net::SocketAddr, value: &str) -> bool {
    let want = format!("form_upstream_up{{upstream=\"state\"}} {value}");
    match probe::http_get(metrics, "/metrics").await {
        Ok((200, body)) => body.lines().any(|l| l.trim() == want),
        _ => false,
    }
}

#[tokio::test]
async fn serves_while_state_is_down_and_connects_when_it_comes() {
    let dir = TestDir::new("upstream");
    let state_bin = form_testkit::workspace_bin("form-state");
    // Learn a free address for form-state by starting it once, then stop it.
    let mut peer = start(&dir, "state", &state_bin, PORT0_ARGS).await;
    let peer_addr = peer.addr("grpc").expect("state grpc address").to_string();
    stop_gracefully(&mut peer).await;

    let args = [
        PORT0_ARGS,
        &[
            "--listen-http",
            "127.0.0.1:0",
            "--state",
            peer_addr.as_str(),
        ],
    ]
    .concat();
    let mut replica = start(&dir, "rplb", Path::new(BIN), &args).await;
    let grpc = replica.addr("grpc").expect("grpc address");
    let metrics = replica.addr("metrics").expect("metrics address");
    assert_eq!(
        probe::health(grpc, "").await.expect("health"),
        ServingStatus::Serving
    );
    assert_eventually!(upstream_up(metrics, "0"), "peer reported down");

    let peer_args = [
        "--listen",
        peer_addr.as_str(),
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut peer = start(&dir, "state-again", &state_bin, &peer_args).await;
    assert_eventually!(upstream_up(metrics, "1"), "peer {peer_addr} reported up");

    stop_gracefully(&mut peer).await;
    assert_eventually!(
        upstream_up(metrics, "0"),
        "peer reported down after it stopped"
    );
    stop_gracefully(&mut replica).await;
}
