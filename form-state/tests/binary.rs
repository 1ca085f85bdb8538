//! The form-state binary starts on port 0, answers health checks, stops cleanly, and refuses
//! bad flags and config files.

use std::path::Path;

use form_testkit::conformance;

const BIN: &str = env!("CARGO_BIN_EXE_form-state");

#[tokio::test]
async fn starts_serves_and_stops_on_sigterm() {
    conformance::grpc_service_lifecycle(Path::new(BIN), "form-state", &[]).await;
}

#[tokio::test]
async fn sigint_exits_at_once() {
    conformance::sigint_exits_fast(Path::new(BIN), "form-state").await;
}

#[tokio::test]
async fn an_address_in_use_exits_75_naming_it() {
    conformance::refuses_address_in_use(Path::new(BIN), "form-state", "--listen", &[]).await;
}

#[test]
fn bad_flags_and_config_exit_2_naming_the_value() {
    conformance::rejects_bad_configuration(Path::new(BIN));
}

#[test]
fn bad_replication_settings_exit_2_naming_the_flag() {
    let bin = Path::new(BIN);
    conformance::rejects_args(
        bin,
        &["--batch-size", "0"],
        &["--batch-size", "0", "1-100000"],
    );
    conformance::rejects_args(
        bin,
        &[
            "--replication",
            "prioritized",
            "--high-priority-fields",
            "members,bogus",
        ],
        &["--high-priority-fields", "bogus", "members, health"],
    );
    conformance::rejects_args(
        bin,
        &["--replication", "gossipy"],
        &["--replication", "gossipy", "delta"],
    );
    conformance::rejects_args(bin, &["--replica-id", "a@b"], &["--replica-id", "'@'"]);
}
