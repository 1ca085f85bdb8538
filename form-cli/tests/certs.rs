//! `formctl certs domain`: a public certificate pair for the HTTPS listeners, read
//! back by the loader the balancer and the gateway use.

use form_runtime::tls::public::PublicCerts;
use form_testkit::TestDir;

const FORMCTL: &str = env!("CARGO_BIN_EXE_formctl");

fn formctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(FORMCTL)
        .args(args)
        .output()
        .expect("run formctl")
}

#[test]
fn domain_writes_a_pair_the_https_listeners_serve() {
    let dir = TestDir::new("formctl-certs-domain");
    let ca = dir.path().join("ca");
    let out = dir.path().join("public");
    let (ca_s, out_s) = (ca.to_str().expect("utf-8"), out.to_str().expect("utf-8"));
    assert!(formctl(&["certs", "ca", "--dir", ca_s]).status.success());
    let made = formctl(&[
        "certs",
        "domain",
        "--ca",
        ca_s,
        "--out",
        out_s,
        "demo.localhost",
        "*.apps.localhost",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert!(out.join("demo.localhost.crt").is_file());
    assert!(out.join("demo.localhost.key").is_file());
    let certs = PublicCerts::load(&out).expect("the pair reads");
    assert_eq!(certs.names(), ["*.apps.localhost", "demo.localhost"]);
    assert!(certs.serves("x.apps.localhost"));
    assert!(!certs.serves("other.localhost"));

    let bad = formctl(&[
        "certs",
        "domain",
        "--ca",
        ca_s,
        "--out",
        out_s,
        "--stem",
        "../x",
        "a.localhost",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--stem '../x' cannot name a file"), "{err}");
    for name in ["not a name!", "a.*.localhost"] {
        let bad = formctl(&["certs", "domain", "--ca", ca_s, "--out", out_s, name]);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(
            !bad.status.success() && err.contains(&format!("'{name}' is not a DNS name")),
            "{err}"
        );
    }
}
