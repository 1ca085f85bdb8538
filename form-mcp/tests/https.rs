//! The gateway over HTTPS (`--https-certs`), against the real binary with a form-state
//! replica: the API answers over TLS with its tokens, plain HTTP gets no answer, and
//! a directory that cannot serve stops it at start naming what is wrong.

use std::path::Path;
use std::time::Duration;

use form_runtime::tls::pki::Ca;
use form_testkit::conformance::{self, PORT0_ARGS, stop_gracefully};
use form_testkit::probe::HttpsClient;
use form_testkit::replicas::{ReplicaOptions, Replicas};
use form_testkit::{TestDir, start, workspace_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_form-mcp");
const ADMIN: &str = "admin-token-for-https-tests-01";

#[tokio::test]
async fn serves_the_api_over_https_only() {
    let replicas = Replicas::start(
        &workspace_bin("form-state"),
        "mcp-https-state",
        ReplicaOptions::new(1),
    )
    .await;
    let dir = TestDir::new("mcp-https");
    let ca = Ca::generate("gateway https test").expect("CA");
    let certs = dir.path().join("certs");
    ca.issue_domains(
        &["api.localhost".into(), "localhost".into()],
        Duration::from_secs(3600),
    )
    .and_then(|i| i.write_pair(&certs, "api.localhost"))
    .expect("certificate");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{ADMIN} admin tests\n")).expect("tokens");
    let state = replicas.addrs[0].to_string();
    let args: Vec<&str> = PORT0_ARGS
        .iter()
        .copied()
        .chain([
            "--state",
            &state,
            "--tokens-file",
            tokens.to_str().expect("utf-8"),
            "--https-certs",
            certs.to_str().expect("utf-8"),
        ])
        .collect();
    let mut mcp = start(&dir, "mcp", Path::new(BIN), &args).await;
    let addr = mcp.addr("http").expect("listener");
    let client = HttpsClient {
        ca_pem: ca.cert_pem.clone(),
        sni: "api.localhost".into(),
    };

    let (code, _, body) = client
        .call(addr, "GET", "/healthz", &[], b"")
        .await
        .expect("healthz over TLS");
    assert_eq!(code, 200, "{body}");
    let bearer = format!("Bearer {ADMIN}");
    let (code, _, body) = client
        .call(
            addr,
            "GET",
            "/api/v1/clusters",
            &[("Authorization", &bearer)],
            b"",
        )
        .await
        .expect("clusters over TLS");
    assert_eq!(code, 200, "{body}");
    let (code, _, _) = client
        .call(addr, "GET", "/api/v1/clusters", &[], b"")
        .await
        .expect("no token");
    assert_eq!(code, 401);

    // The same port in plain HTTP: no HTTP answer, so no token ever crosses in clear.
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut raw)).await;
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // A client that does not trust the CA refuses the server.
    let other = Ca::generate("another CA").expect("CA");
    let stranger = HttpsClient {
        ca_pem: other.cert_pem.clone(),
        sni: "api.localhost".into(),
    };
    assert!(stranger.connect(addr, &[]).await.is_err());

    // formctl speaks HTTPS to it, trusting the authority in FORM_API_CA.
    let ca_file = dir.path().join("api-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).expect("CA file");
    let url = format!("https://localhost:{}", addr.port());
    let formctl = |args: &[&str], ca: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(workspace_bin("formctl"));
        c.args(args).env_remove("FORM_API_CA");
        if let Some(ca) = ca {
            c.env("FORM_API_CA", ca);
        }
        c.output().expect("run formctl")
    };
    let listed = formctl(
        &["--api", &url, "--token", ADMIN, "cluster", "list", "--json"],
        Some(&ca_file),
    );
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let hostport = format!("localhost:{}", addr.port());
    let probe = formctl(&["probe", "http", &hostport, "--https"], Some(&ca_file));
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // Without the authority (the system's are trusted instead), or with a file that
    // holds none, the server is not trusted, and formctl says what to set.
    for ca in [None, Some(dir.path().join("tokens"))] {
        let untrusted = formctl(
            &["--api", &url, "--token", ADMIN, "cluster", "list"],
            ca.as_deref(),
        );
        let err = String::from_utf8_lossy(&untrusted.stderr);
        assert!(
            !untrusted.status.success() && err.contains("FORM_API_CA"),
            "{err}"
        );
    }
    stop_gracefully(&mut mcp).await;
}

#[test]
fn a_certificate_directory_that_cannot_serve_exits_2_naming_it() {
    let dir = TestDir::new("mcp-https-bad");
    let path = dir.path().to_str().expect("utf-8");
    conformance::rejects_args(
        Path::new(BIN),
        &["--https-certs", path],
        &["https_certs", "holds no certificate"],
    );
    std::fs::write(dir.path().join("api.crt"), "garbage").expect("write");
    std::fs::write(dir.path().join("api.key"), "garbage").expect("write");
    conformance::rejects_args(Path::new(BIN), &["--https-certs", path], &["api.crt"]);
}
