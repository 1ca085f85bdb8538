//! Checks every service binary must pass: it starts on port 0 and says where it
//! listens, answers health and reflection (or `/healthz`), exposes `/metrics`, stops
//! with exit 0 within 5 s of SIGTERM, exits at once on SIGINT, and refuses bad flags
//! and bad config files with one line and exit code 2 before binding anything, and
//! exits with code 75 when a listen address is already in use.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

use crate::{Signal, TestDir, probe, start};

/// The deadline for a graceful stop that the platform promises.
pub const SIGTERM_DEADLINE: Duration = Duration::from_secs(5);

/// The port 0 arguments every service takes.
pub const PORT0_ARGS: &[&str] = &["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];

/// Starts a gRPC service binary, checks health, reflection (v1 and v1alpha) and
/// metrics, then SIGTERM and exit 0 within 5 s.
pub async fn grpc_service_lifecycle(bin: &Path, name: &str, extra_args: &[&str]) {
    let dir = TestDir::new(name);
    let args: Vec<&str> = PORT0_ARGS.iter().chain(extra_args).copied().collect();
    let mut svc = start(&dir, name, bin, &args).await;
    let grpc = svc.addr("grpc").expect("ready file names the grpc address");
    assert_ne!(grpc.port(), 0, "the ready file has the port actually bound");

    assert_eq!(
        probe::health(grpc, "").await.expect("health check"),
        ServingStatus::Serving
    );
    for list in [
        probe::reflection_services_v1(grpc)
            .await
            .expect("reflection v1"),
        probe::reflection_services_v1alpha(grpc)
            .await
            .expect("reflection v1alpha"),
    ] {
        for want in [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                list.iter().any(|s| s == want),
                "{name}: {want} not in {list:?}"
            );
        }
    }
    check_metrics(&svc).await;
    stop_gracefully(&mut svc).await;
}

/// Starts an HTTP service binary, checks `/healthz` and `/metrics` on its `http`
/// listener and the metrics listener, then SIGTERM and exit 0 within 5 s.
pub async fn http_service_lifecycle(bin: &Path, name: &str, extra_args: &[&str]) {
    let dir = TestDir::new(name);
    let args: Vec<&str> = PORT0_ARGS.iter().chain(extra_args).copied().collect();
    let mut svc = start(&dir, name, bin, &args).await;
    let http = svc.addr("http").expect("ready file names the http address");
    let (status, body) = probe::http_get(http, "/healthz")
        .await
        .expect("GET /healthz");
    assert_eq!(status, 200, "{name} /healthz: {body}");
    check_metrics(&svc).await;
    stop_gracefully(&mut svc).await;
}

async fn check_metrics(svc: &crate::ChildService) {
    let metrics = svc
        .addr("metrics")
        .expect("ready file names the metrics address");
    let (status, body) = probe::http_get(metrics, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(
        status,
        200,
        "{}: /metrics answered {status}: {body}",
        svc.name()
    );
    let (status, _) = probe::http_get(metrics, "/nothing-here")
        .await
        .expect("GET unknown");
    assert_eq!(status, 404);
}

/// SIGTERM, then exit code 0 within [`SIGTERM_DEADLINE`].
pub async fn stop_gracefully(svc: &mut crate::ChildService) {
    let status = svc
        .stop(Signal::SIGTERM, SIGTERM_DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", svc.log_tail()));
    assert_eq!(
        status.code(),
        Some(0),
        "{} after SIGTERM: {status}; log:\n{}",
        svc.name(),
        svc.log_tail()
    );
}

/// SIGINT exits at once with code 130.
pub async fn sigint_exits_fast(bin: &Path, name: &str) {
    sigint_exits_fast_with(bin, name, &[]).await;
}

/// [`sigint_exits_fast`] with more flags (e.g. more listeners on port 0).
pub async fn sigint_exits_fast_with(bin: &Path, name: &str, extra_args: &[&str]) {
    let dir = TestDir::new(name);
    let args: Vec<&str> = PORT0_ARGS.iter().chain(extra_args).copied().collect();
    let mut svc = start(&dir, name, bin, &args).await;
    let status = svc
        .stop(Signal::SIGINT, Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(130),
        "{name} after SIGINT: {status}; log:\n{}",
        svc.log_tail()
    );
}

/// Starts `bin` with the listener of `flag` on an address another socket holds, every
/// other listener on port 0, then `extra_args`: it must exit before it is ready with
/// [`form_runtime::service::EXIT_ADDR_IN_USE`], naming the address and the listener.
pub async fn refuses_address_in_use(bin: &Path, name: &str, flag: &str, extra_args: &[&str]) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let taken = held.local_addr().expect("held address").to_string();
    let mut args: Vec<&str> = PORT0_ARGS
        .chunks(2)
        .flat_map(|kv| [kv[0], if kv[0] == flag { &taken } else { kv[1] }])
        .collect();
    if !PORT0_ARGS.contains(&flag) {
        args.extend([flag, &taken]);
    }
    args.extend(extra_args);
    let dir = TestDir::new(name);
    let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let tls = crate::pki::service_args(bin, name, &owned);
    let spec = crate::LaunchSpec::new(name, bin, dir.path()).args(owned.into_iter().chain(tls));
    match crate::ChildService::start(spec).await {
        Ok(_) => panic!("{name} started with {flag} {taken}, an address in use"),
        Err(e) => {
            assert!(e.is_addr_in_use(), "{name}: {e}");
            let message = e.to_string();
            assert!(
                message.contains(&format!("cannot listen on {taken}")),
                "{message}"
            );
        }
    }
    drop(held);
}

/// Runs `bin` with `args` and expects exit code 2 and one line on stderr containing
/// every string of `expect_in_message`, without starting.
pub fn rejects_args(bin: &Path, args: &[&str], expect_in_message: &[&str]) {
    let out = Command::new(bin).args(args).output().expect("run binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: {}\nstderr: {stderr}",
        out.status
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    for want in expect_in_message {
        assert!(stderr.contains(want), "{args:?}: '{want}' not in: {stderr}");
    }
}

/// Bad flag values, unknown flags and bad config files are refused with exit code 2.
pub fn rejects_bad_configuration(bin: &Path) {
    rejects_args(
        bin,
        &["--listen", "not-an-address"],
        &["--listen", "not-an-address", "IP:PORT"],
    );
    rejects_args(
        bin,
        &["--metrics-listen", "127.0.0.1:99999"],
        &["--metrics-listen", "127.0.0.1:99999"],
    );
    rejects_args(bin, &["--no-such-flag"], &["--no-such-flag"]);
    rejects_args(
        bin,
        &["--listen", "127.0.0.1:7", "--metrics-listen", "127.0.0.1:7"],
        &["--metrics-listen", "127.0.0.1:7"],
    );
    rejects_args(
        bin,
        &["--log-format", "xml"],
        &["--log-format", "xml", "text", "json"],
    );
    rejects_args(bin, &["--log", "form=[[["], &["--log"]);

    let dir = TestDir::new("bad-config");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nno_such_key = 1\n").expect("write config");
    let file = file.to_str().expect("utf-8 path");
    rejects_args(bin, &["--config", file], &[file, "line 2", "no_such_key"]);
    rejects_args(
        bin,
        &["--config", "/nonexistent/form.toml"],
        &["/nonexistent/form.toml"],
    );
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--metrics-listen",
        "--config",
        "--ready-file",
        "--log",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help does not explain {flag}");
    }
}
