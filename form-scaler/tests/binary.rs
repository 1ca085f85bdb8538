//! The form-scaler binary starts on port 0, answers health checks, stops cleanly, and refuses
//! bad flags and config files.

use std::path::Path;

use form_testkit::conformance;

const BIN: &str = env!("CARGO_BIN_EXE_form-scaler");
/// A form-state address (nothing listens there: the controller starts anyway).
const STATE: &[&str] = &["--state", "127.0.0.1:9"];

#[tokio::test]
async fn starts_serves_and_stops_on_sigterm() {
    conformance::grpc_service_lifecycle(Path::new(BIN), "form-scaler", STATE).await;
}

#[tokio::test]
async fn sigint_exits_at_once() {
    conformance::sigint_exits_fast_with(Path::new(BIN), "form-scaler", STATE).await;
}

#[test]
fn bad_flags_and_config_exit_2_naming_the_value() {
    conformance::rejects_bad_configuration(Path::new(BIN));
    conformance::rejects_args(
        Path::new(BIN),
        &["--state", "127.0.0.1:9", "--inject-fault", "clone"],
        &["unknown step 'clone'"],
    );
}

#[test]
fn without_form_state_it_refuses_to_run_and_says_what_is_needed() {
    let out = std::process::Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--state HOST:PORT"), "{stderr}");
}

#[test]
fn a_balancer_timeout_past_the_step_timeouts_exits_2_naming_them() {
    form_testkit::conformance::rejects_args(
        std::path::Path::new(env!("CARGO_BIN_EXE_form-scaler")),
        &["--balancer-timeout-ms", "60000"],
        &["balancer_timeout_ms", "60000", "less than ready_timeout_ms"],
    );
}
