//! The form-mcp binary starts on port 0, answers health checks, stops cleanly, and refuses
//! bad flags and config files.

use std::path::Path;

use form_testkit::conformance;

const BIN: &str = env!("CARGO_BIN_EXE_form-mcp");

#[tokio::test]
async fn starts_serves_and_stops_on_sigterm() {
    conformance::http_service_lifecycle(Path::new(BIN), "form-mcp", &[]).await;
}

#[tokio::test]
async fn sigint_exits_at_once() {
    conformance::sigint_exits_fast(Path::new(BIN), "form-mcp").await;
}

#[test]
fn bad_flags_and_config_exit_2_naming_the_value() {
    conformance::rejects_bad_configuration(Path::new(BIN));
}
