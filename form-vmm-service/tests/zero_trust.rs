//! The gRPC ports refuse whoever the platform did not make: against real processes,
//! every attack of issue 17's first part is tried and refused. No client certificate,
//! one from another CA, an expired one, plaintext: the handshake fails and nothing
//! runs. A valid certificate of the wrong kind: `PERMISSION_DENIED` naming the caller
//! and the method, counted, and the command it asked for never ran. A renewed
//! certificate is taken in without a restart.

use std::path::Path;
use std::time::Duration;

use form_proto::state::v1 as state_pb;
use form_proto::state::v1::gossip_service_client::GossipServiceClient;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_runtime::tls::pki::{self, Ca};
use form_runtime::tls::{Identity, Kind};
use form_testkit::conformance::PORT0_ARGS;
use form_testkit::{TestDir, assert_eventually, pki as test_pki, probe, start};
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_form-vmm-service");

/// The attack of the issue: a command that leaves a file behind if it runs.
fn attack(file: &Path) -> pb::CreateInstanceRequest {
    pb::CreateInstanceRequest {
        instance_id: "attack".into(),
        cluster_id: "web".into(),
        workload: Some(types::Workload {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), format!("id > {}", file.display())],
            ..Default::default()
        }),
        resources: None,
    }
}

async fn connect(e: tonic::transport::Endpoint) -> Result<Channel, tonic::transport::Error> {
    e.connect_timeout(Duration::from_secs(5)).connect().await
}

/// Whether a call over `e` gets through the handshake (a health check answers).
async fn handshake_ok(e: tonic::transport::Endpoint) -> bool {
    let Ok(ch) = connect(e).await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok()
}

#[tokio::test]
async fn a_vmm_node_refuses_every_caller_the_platform_did_not_make() {
    let dir = TestDir::new("zero-trust");
    let data = dir.path().join("vmm-data");
    let args = [PORT0_ARGS, &["--data-dir", data.to_str().expect("utf-8")]].concat();
    let mut svc = start(&dir, "vmm", Path::new(BIN), &args).await;
    let addr = svc.addr("grpc").expect("grpc");
    let proof = dir.path().join("ran");

    // No client certificate.
    assert!(
        !handshake_ok(test_pki::endpoint_without_certificate(addr).expect("endpoint")).await,
        "a client without a certificate got through"
    );
    // A certificate of another CA (trusting the right one itself).
    let other = Ca::generate("another CA").expect("CA");
    let scaler = Identity::new(Kind::Scaler, "intruder").expect("id");
    let foreign = dir.path().join("foreign");
    other
        .issue(&scaler, Duration::from_secs(3600))
        .expect("issue")
        .write(&foreign, &test_pki::ca().cert_pem)
        .expect("write");
    assert!(
        !handshake_ok(test_pki::endpoint_with(addr, &foreign).expect("endpoint")).await,
        "a certificate of another CA got through"
    );
    // An expired certificate of the right CA.
    let expired = dir.path().join("expired");
    test_pki::ca()
        .issue_between(&scaler, Duration::ZERO, Duration::from_secs(3600))
        .expect("issue")
        .write(&expired, &test_pki::ca().cert_pem)
        .expect("write");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        !handshake_ok(test_pki::endpoint_with(addr, &expired).expect("endpoint")).await,
        "an expired certificate got through"
    );
    // Plaintext.
    if let Ok(ch) = probe::plaintext_channel(addr).await {
        let r = VmmServiceClient::new(ch)
            .create_instance(attack(&proof))
            .await;
        assert!(r.is_err(), "plaintext was served: {r:?}");
    }
    // Each of the above also tried the attack: nothing ran.
    for e in [
        test_pki::endpoint_without_certificate(addr).expect("endpoint"),
        test_pki::endpoint_with(addr, &foreign).expect("endpoint"),
        test_pki::endpoint_with(addr, &expired).expect("endpoint"),
    ] {
        if let Ok(ch) = connect(e).await {
            let r = VmmServiceClient::new(ch)
                .create_instance(attack(&proof))
                .await;
            assert!(r.is_err(), "{r:?}");
        }
    }

    // Valid certificates of kinds that may not create instances: refused by name.
    for kind in [
        Kind::Gateway,
        Kind::Operator,
        Kind::Rplb,
        Kind::State,
        Kind::Vmm,
    ] {
        let ch = probe::channel_as(addr, kind).await.expect("connect");
        let s = VmmServiceClient::new(ch)
            .create_instance(attack(&proof))
            .await
            .expect_err("refused");
        assert_eq!(s.code(), Code::PermissionDenied, "{kind}: {s:?}");
        assert!(
            s.message().contains(&format!("{kind}/test-{kind}"))
                && s.message()
                    .contains("form.vmm.v1.VmmService/CreateInstance"),
            "the refusal names the caller and the method: {}",
            s.message()
        );
    }
    // ... and counted.
    let metrics = svc.addr("metrics").expect("metrics");
    let (_, text) = probe::http_get(metrics, "/metrics").await.expect("metrics");
    assert!(
        text.lines()
            .any(|l| l.starts_with("form_authz_denied_total")
                && l.contains("caller=\"gateway\"")
                && l.contains("CreateInstance")),
        "{text}"
    );
    // The controller itself may create instances, but only of programs on the node's
    // allowlist (here the default: the demo app), and never with a loader variable.
    let mut ctl = VmmServiceClient::new(
        probe::channel_as(addr, Kind::Scaler)
            .await
            .expect("connect"),
    );
    let s = ctl
        .create_instance(attack(&proof))
        .await
        .expect_err("not on the allowlist");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("allowlist") && s.message().contains("form-demo-app"),
        "{}",
        s.message()
    );
    let mut preload = attack(&proof);
    if let Some(w) = preload.workload.as_mut() {
        w.command = form_testkit::workspace_bin("form-demo-app")
            .display()
            .to_string();
        w.args.clear();
        w.env.insert("LD_PRELOAD".into(), "/tmp/evil.so".into());
    }
    let s = ctl.create_instance(preload).await.expect_err("LD_PRELOAD");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("LD_PRELOAD"), "{}", s.message());
    // The listing an operator may read is still answered to it; the gateway reads
    // instances from form-state and is refused here.
    let ch = probe::channel_as(addr, Kind::Operator)
        .await
        .expect("connect");
    VmmServiceClient::new(ch)
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .expect("an operator may list");
    let ch = probe::channel_as(addr, Kind::Gateway)
        .await
        .expect("connect");
    let s = VmmServiceClient::new(ch)
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .expect_err("the gateway may not list");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !proof.exists(),
        "the attacker's command ran: {:?}",
        std::fs::read_to_string(&proof)
    );
    form_testkit::conformance::stop_gracefully(&mut svc).await;
}

#[tokio::test]
async fn gossip_is_for_replicas_and_a_client_gets_only_the_kind_it_dialled() {
    let dir = TestDir::new("zero-trust-kinds");
    let data = dir.path().join("vmm-data");
    let args = [PORT0_ARGS, &["--data-dir", data.to_str().expect("utf-8")]].concat();
    let mut svc = start(&dir, "vmm", Path::new(BIN), &args).await;
    let addr = svc.addr("grpc").expect("grpc");
    // A controller that dials form-state but reaches a vmm node does not talk to it:
    // the server's certificate names another kind.
    let tls =
        form_runtime::tls::Tls::load(&test_pki::tls_dir(Kind::Scaler, "test-scaler")).expect("tls");
    let hp: form_runtime::addr::HostPort = addr.to_string().parse().expect("host:port");
    let as_state = form_runtime::tls::client::endpoint_in(
        &form_runtime::tls::Mode::Mutual(tls.clone()),
        &hp,
        Kind::State,
    )
    .expect("endpoint");
    assert!(
        !handshake_ok(as_state).await,
        "a vmm node passed for form-state"
    );
    let as_vmm = form_runtime::tls::client::endpoint_in(
        &form_runtime::tls::Mode::Mutual(tls),
        &hp,
        Kind::Vmm,
    )
    .expect("endpoint");
    assert!(handshake_ok(as_vmm).await, "the vmm node it dialled");
    // Gossip to a node that does not serve it is refused by the table first.
    let ch = probe::channel_as(addr, Kind::Operator)
        .await
        .expect("connect");
    let s = GossipServiceClient::new(ch)
        .push_deltas(state_pb::DeltaBatch::default())
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    form_testkit::conformance::stop_gracefully(&mut svc).await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = TestDir::new("zero-trust-renew");
    let tls_dir = dir.path().join("tls");
    let me = Identity::new(Kind::Vmm, "renewed").expect("id");
    let ca = test_pki::ca();
    ca.issue_into(&tls_dir, &me, Duration::from_secs(3600))
        .expect("issue");
    let data = dir.path().join("vmm-data");
    let tls_arg = tls_dir.display().to_string();
    let args = [
        PORT0_ARGS,
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--tls-dir",
            &tls_arg,
        ],
    ]
    .concat();
    let mut svc = start(&dir, "vmm", Path::new(BIN), &args).await;
    let addr = svc.addr("grpc").expect("grpc");
    let first = std::fs::read(tls_dir.join(pki::CERT_FILE)).expect("cert");
    let served = || async move { test_pki::served_certificate(addr).await.ok() };
    assert_eq!(served().await.as_deref(), Some(pem_der(&first).as_slice()));
    ca.issue_into(&tls_dir, &me, Duration::from_secs(7200))
        .expect("renew");
    let second = pem_der(&std::fs::read(tls_dir.join(pki::CERT_FILE)).expect("cert"));
    assert_ne!(second, pem_der(&first));
    assert_eventually!(
        async { served().await.as_deref() == Some(second.as_slice()) },
        "the renewed certificate is served by the running process"
    );
    // A renewal that names someone else is refused; the one in force stays.
    let other = Identity::new(Kind::Vmm, "someone-else").expect("id");
    ca.issue_into(&tls_dir, &other, Duration::from_secs(7200))
        .expect("issue");
    tokio::time::sleep(form_runtime::tls::RELOAD_CHECK * 2).await;
    assert_eq!(served().await.as_deref(), Some(second.as_slice()));
    assert!(
        svc.log_tail().contains("names someone else"),
        "{}",
        svc.log_tail()
    );
    form_testkit::conformance::stop_gracefully(&mut svc).await;
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem)
        .expect("PEM")
        .as_ref()
        .to_vec()
}
