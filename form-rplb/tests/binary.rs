//! The form-rplb binary starts on port 0, answers health checks, stops cleanly, and refuses
//! bad flags and config files.

use std::path::Path;

use form_testkit::conformance;

const BIN: &str = env!("CARGO_BIN_EXE_form-rplb");
/// The data plane on a free port too.
const HTTP0: &[&str] = &["--listen-http", "127.0.0.1:0"];

#[tokio::test]
async fn starts_serves_and_stops_on_sigterm() {
    conformance::grpc_service_lifecycle(Path::new(BIN), "form-rplb", HTTP0).await;
}

#[tokio::test]
async fn sigint_exits_at_once() {
    conformance::sigint_exits_fast_with(Path::new(BIN), "form-rplb", HTTP0).await;
}

#[tokio::test]
async fn an_address_in_use_exits_75_naming_it() {
    conformance::refuses_address_in_use(Path::new(BIN), "form-rplb", "--listen-http", &[]).await;
}

#[test]
fn bad_flags_and_config_exit_2_naming_the_value() {
    conformance::rejects_bad_configuration(Path::new(BIN));
}

#[test]
fn an_ejection_limit_over_100_percent_exits_2_naming_the_key() {
    let dir = form_testkit::TestDir::new("rplb-config");
    let file = dir.path().join("rplb.toml");
    std::fs::write(&file, "max_ejection_percent = 101\n").expect("write config");
    let file = file.to_str().expect("utf-8 path");
    conformance::rejects_args(
        Path::new(BIN),
        &["--config", file],
        &[
            "max_ejection_percent",
            "101",
            "expected 0 (no passive ejection) to 100",
        ],
    );
}
