//! The compose stack on this Docker host: the image is built from the project's
//! binaries (deploy/docker/build.sh), `docker-compose up -d` brings up the platform and
//! its demo cluster, the demo answers through the published balancer port, and a scale
//! request through the published API adds an instance carrying the primary's state.
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
        Some(json!({"operation": "scale_out", "target_count": 2, "immediate": true})),
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let op = wait_op(api_addr, &token, v["operation_id"].as_str().expect("id")).await;
    assert_eq!(op["status"], "completed", "{op}");
    // Every instance, the new one too, answers with the primary's key through the
    // balancer (new sessions are spread over both).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
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
    assert!(seen.len() >= 2, "both instances serve: {seen:?}");
}
