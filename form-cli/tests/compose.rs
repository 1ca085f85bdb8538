//! The compose stack on this Docker host: the image is built from the project's
//! binaries (deploy/docker/build.sh), `docker-compose up -d` brings up the platform and
//! its demo cluster, the demo answers through the published balancer port, and a scale
//! request through the published API adds instances on both vmm nodes, each carrying
//! the primary's state.
//! Ports and the network are chosen for this run; the stack is removed at the end.

mod common;

use common::*;
use form_testkit::probe;
use serde_json::json;

#[tokio::test]
async fn the_compose_stack_serves_the_demo_and_scales_it_with_its_state() {
    build_image();
    let c = Compose::new("smoke", &[]);
    let lb = c.up_with_demo().await;
    let (code, _, _) = probe::http_call(lb, "PUT", "/kv/alpha", &DEMO_HOST, b"one")
        .await
        .expect("PUT");
    assert!((200..300).contains(&code));

    let (api_addr, token) = (c.port("form-mcp", 3010), c.token());
    let (code, v) = api(
        api_addr,
        &token,
        "POST",
        "/api/v1/clusters/demo/scale",
        Some(json!({"operation": "scale_out", "target_count": 4, "immediate": true})),
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let op = wait_op(api_addr, &token, v["operation_id"].as_str().expect("id")).await;
    assert_eq!(op["status"], "completed", "{op}");
    // Two instances on each node: the clones on node-2 were made from a snapshot
    // copied there from node-1.
    let (code, cluster) = api(api_addr, &token, "GET", "/api/v1/clusters/demo", None).await;
    assert_eq!(code, 200, "{cluster}");
    let mut per_node = std::collections::BTreeMap::new();
    for m in cluster["members"].as_array().expect("members") {
        *per_node
            .entry(m["node_id"].as_str().expect("node_id").to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_node.into_iter().collect::<Vec<_>>(),
        [("node-1".to_owned(), 2), ("node-2".to_owned(), 2)],
        "{cluster}"
    );
    assert!(
        op["notes"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains("to node node-2")))),
        "{op}"
    );
    // Right after the scale-out (the idle cluster is scaled in again once its
    // stabilization window has passed, which a slow machine reached before the checks
    // below ended): the demo's workloads run as nobody, not as the node's root
    // (`docker top`: every process of the container, with its uid as the host's
    // kernel sees it).
    for node in ["form-vmm", "form-vmm-2"] {
        let top = docker(&["top", &c.container(node), "-eo", "pid,uid,comm"]);
        let workloads: Vec<&str> = top
            .lines()
            .filter(|l| l.contains("form-demo-app"))
            .collect();
        assert_eq!(workloads.len(), 2, "{node} runs its two workloads: {top}");
        for w in workloads {
            assert_eq!(w.split_whitespace().nth(1), Some("65534"), "{top}");
        }
    }
    // Every instance, the new ones too, answers with the primary's key through the
    // balancer (new sessions are spread over them).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (code, _, who) = probe::http_call(lb, "GET", "/whoami", &DEMO_HOST, b"")
            .await
            .expect("whoami");
        assert_eq!(code, 200);
        seen.insert(who);
        let (code, _, val) = probe::http_call(lb, "GET", "/kv/alpha", &DEMO_HOST, b"")
            .await
            .expect("kv");
        assert_eq!((code, val.as_str()), (200, "one"));
    }
    assert!(seen.len() >= 4, "every instance serves: {seen:?}");
    // The second balancer serves the same cluster, the clone included.
    let lb2 = c.port("form-rplb-2", 8080);
    let mut seen2 = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (code, _, who) = probe::http_call(lb2, "GET", "/whoami", &DEMO_HOST, b"")
            .await
            .expect("whoami via the second balancer");
        assert_eq!(code, 200);
        seen2.insert(who);
        let (code, _, val) = probe::http_call(lb2, "GET", "/kv/alpha", &DEMO_HOST, b"")
            .await
            .expect("kv via the second balancer");
        assert_eq!((code, val.as_str()), (200, "one"));
    }
    assert!(
        seen2.len() >= 4,
        "every instance serves through form-rplb-2: {seen2:?}"
    );
    // The balancers share one cookie key: a session pinned by one stays on its
    // instance through the other, with no new cookie.
    for _ in 0..10 {
        let (code, head, who) = probe::http_call(lb, "GET", "/whoami", &DEMO_HOST, b"")
            .await
            .expect("whoami");
        assert_eq!(code, 200);
        let session =
            probe::set_cookie(&head, "FORM_SESSION").expect("a new session gets a cookie");
        let (code, head2, who2) = probe::http_call(
            lb2,
            "GET",
            "/whoami",
            &[DEMO_HOST[0], ("Cookie", session.as_str())],
            b"",
        )
        .await
        .expect("whoami via the second balancer");
        assert_eq!(code, 200);
        assert_eq!(
            who2, who,
            "form-rplb-2 honors form-rplb's session {session}"
        );
        assert_eq!(probe::set_cookie(&head2, "FORM_SESSION"), None, "{head2}");
    }

    // What each container's process is, from the kernel: no root and no capability
    // (form-vmm: root, with the six it needs to run workloads as nobody), no privilege
    // gain, a read-only root file system.
    const VMM_CAPS: u64 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7);
    for service in [
        "form-state-1",
        "form-state-2",
        "form-state-3",
        "form-rplb",
        "form-rplb-2",
        "form-scaler",
        "form-scaler-2",
        "form-mcp",
        "form-certs",
        "form-vmm",
        "form-vmm-2",
    ] {
        let container = c.container(service);
        let (uids, caps, no_new_privs) = process_status(&container);
        if service.starts_with("form-vmm") {
            assert_eq!(caps, VMM_CAPS, "{service}: CapEff {caps:x}");
        } else {
            assert!(
                uids.iter().all(|u| *u == SERVICE_UID),
                "{service}: uids {uids:?}"
            );
            assert_eq!(caps, 0, "{service}: CapEff {caps:x}");
        }
        assert!(no_new_privs, "{service} may gain privileges");
        let ro = docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.ReadonlyRootfs}}",
            &container,
        ]);
        assert_eq!(ro.trim(), "true", "{service}: writable root file system");
    }
    // Each container holds its own secrets only: another service's TLS key is not
    // there, and the API tokens are only where the API runs.
    let exec_ok = |service: &str, args: &[&str]| {
        std::process::Command::new("docker")
            .args(["exec", &c.container(service), "formctl"])
            .args(args)
            .output()
            .expect("docker exec")
            .status
            .success()
    };
    assert!(exec_ok(
        "form-state-1",
        &["certs", "verify", "--tls-dir", "/certs/state-1"]
    ));
    for (service, other) in [
        ("form-state-1", "rplb-1"),
        ("form-rplb", "state-1"),
        ("form-vmm", "mcp-1"),
        ("form-vmm-2", "vmm-1"),
    ] {
        let dir = format!("/certs/{other}");
        assert!(
            !exec_ok(service, &["certs", "verify", "--tls-dir", &dir]),
            "{service} can read {dir}"
        );
    }
    assert!(exec_ok("form-mcp", &["tokens", "--tokens-dir", "/tokens"]));
    for service in [
        "form-state-1",
        "form-rplb",
        "form-scaler",
        "form-vmm",
        "form-vmm-2",
    ] {
        for dir in ["/tokens", "/keys"] {
            assert!(
                !exec_ok(service, &["tokens", "--tokens-dir", dir]),
                "{service} can read the API tokens in {dir}"
            );
        }
    }
}
