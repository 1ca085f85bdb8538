//! The form-vmm-service binary starts on port 0, answers health checks, stops cleanly, and refuses
//! bad flags and config files.

use std::path::Path;

use form_testkit::conformance;

const BIN: &str = env!("CARGO_BIN_EXE_form-vmm-service");

#[tokio::test]
async fn starts_serves_and_stops_on_sigterm() {
    conformance::grpc_service_lifecycle(Path::new(BIN), "form-vmm-service", &[]).await;
}

#[tokio::test]
async fn sigint_exits_at_once() {
    conformance::sigint_exits_fast(Path::new(BIN), "form-vmm-service").await;
}

#[test]
fn bad_flags_and_config_exit_2_naming_the_value() {
    conformance::rejects_bad_configuration(Path::new(BIN));
}

#[test]
fn node_record_settings_that_cannot_serve_exit_2_naming_them() {
    let bin = Path::new(BIN);
    conformance::rejects_args(
        bin,
        &["--labels", "Zone=eu"],
        &["--labels", "Zone=eu", "a-z 0-9"],
    );
    conformance::rejects_args(
        bin,
        &["--labels", "zone=eu,zone=us"],
        &["--labels", "'zone' is given twice"],
    );
    conformance::rejects_args(
        bin,
        &["--instance-slots", "0"],
        &["--instance-slots", "at least 1"],
    );
    conformance::rejects_args(bin, &["--node-id", "node 1"], &["--node-id", "node 1"]);
}
