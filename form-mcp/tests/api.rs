//! Contract tests of the REST API against the real platform: every endpoint, the
//! errors it names (401, 403, invalid JSON, unknown fields, a target outside the
//! policy, an unknown cluster, a conflicting operation, a body too large), the
//! Idempotency-Key, and the OpenAPI document.

mod common;

use common::*;
use form_testkit::probe;
use serde_json::{Value, json};

#[tokio::test]
async fn tokens_are_required_and_read_tokens_cannot_write() {
    let mut g = Gateway::start("api-auth", &[]).await;
    let (code, body) = g.call("GET", "/api/v1/clusters", None, None).await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (code, _) = g
        .call(
            "GET",
            "/api/v1/clusters",
            Some("wrong-token-wrong-token"),
            None,
        )
        .await;
    assert_eq!(code, 401);
    let (code, body) = g.call("GET", "/api/v1/clusters", Some(READER), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["clusters"], json!([]));
    let (code, body) = g
        .call(
            "POST",
            "/api/v1/clusters",
            Some(READER),
            Some(&demo_cluster("ro")),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    // Unauthenticated requests learn nothing about what exists.
    let (code, _) = g.call("GET", "/api/v1/clusters/nope", None, None).await;
    assert_eq!(code, 401);
    // Health and the document are open.
    let (code, _) = g.call("GET", "/healthz", None, None).await;
    assert_eq!(code, 200);
    let (code, doc) = g.call("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    // Metrics are not on the API port (only on the metrics listener), not even to a
    // token holder.
    let (code, _, _) = probe::http_call(g.http, "GET", "/metrics", &[], b"")
        .await
        .expect("GET /metrics");
    assert_eq!(code, 401);
    let auth = format!("Bearer {READER}");
    let (code, _, _) =
        probe::http_call(g.http, "GET", "/metrics", &[("Authorization", &auth)], b"")
            .await
            .expect("GET /metrics");
    assert_eq!(code, 404);
    g.stop().await;
}

#[tokio::test]
async fn a_cluster_is_created_scaled_with_an_idempotency_key_inspected_and_deleted() {
    let mut g = Gateway::start("api-life", &[]).await;
    let (code, c) = g
        .call(
            "POST",
            "/api/v1/clusters",
            Some(ADMIN),
            Some(&demo_cluster("web")),
        )
        .await;
    assert_eq!(code, 201, "{c}");
    assert_eq!(c["cluster_id"], "web");
    assert_eq!(c["members"].as_array().map(Vec::len), Some(1));
    assert_eq!(c["members"][0]["status"], "active");
    assert!(
        c["template_instance_id"]
            .as_str()
            .is_some_and(|t| t.starts_with("web-")),
        "{c}"
    );
    let (code, body) = g
        .call(
            "POST",
            "/api/v1/clusters",
            Some(ADMIN),
            Some(&demo_cluster("web")),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "already_exists");

    let (code, list) = g.call("GET", "/api/v1/clusters", Some(READER), None).await;
    assert_eq!(code, 200);
    assert_eq!(list["clusters"][0]["cluster_id"], "web");
    let (code, one) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(one["domain"], "web.test");

    let scale = json!({"operation": "scale_out", "target_count": 3, "immediate": true});
    let key = [("Idempotency-Key", "retry-me-1")];
    let (code, accepted) = g
        .call_with(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            &key,
            Some(&scale.to_string()),
        )
        .await;
    assert_eq!(code, 202, "{accepted}");
    let id = accepted["operation_id"].as_str().expect("id").to_owned();
    assert!(
        accepted["operation"]["owner"]
            .as_str()
            .is_some_and(|o| !o.is_empty()),
        "the controller that runs it: {accepted}"
    );
    let (code, again) = g
        .call_with(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            &key,
            Some(&scale.to_string()),
        )
        .await;
    assert_eq!(code, 202, "{again}");
    assert_eq!(
        again["operation_id"],
        id.as_str(),
        "a retry returns the same operation"
    );
    let other = json!({"operation": "scale_out", "target_count": 4, "immediate": true});
    let (code, e) = g
        .call_with(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            &key,
            Some(&other.to_string()),
        )
        .await;
    assert_eq!(code, 409, "the key names another request: {e}");
    assert_eq!(e["error"]["code"], "already_exists");
    // The whole request counts: the same count without immediate is another request.
    let flags = json!({"operation": "scale_out", "target_count": 3, "drain_connections": false, "immediate": true});
    let (code, e) = g
        .call_with(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            &key,
            Some(&flags.to_string()),
        )
        .await;
    assert_eq!(code, 409, "a flag differs: {e}");
    assert!(e.to_string().contains("another request"), "{e}");
    let op = g.wait_op(&id).await;
    assert_eq!(op["status"], "completed", "{op}");
    assert_eq!(op["type"], "scale_out");
    assert!(
        op["completed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let (code, st) = g
        .call("GET", "/api/v1/clusters/web/status", Some(READER), None)
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["cluster_id"], "web");
    assert_eq!(st["instances"], 3);
    assert_eq!(st["scaling_status"], "stable");
    assert_eq!(st["health_status"], "healthy");
    assert_eq!(st["last_operation"]["type"], "scale_out");
    assert_eq!(st["last_operation"]["status"], "completed");
    assert_eq!(st["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(st["state_sync"], "on_scale", "{st}");
    assert_eq!(
        op["state_transfer"]["contract"], "supported",
        "the demo app implements the state contract: {op}"
    );
    // Each member shows it too, as its node reported it into form-state.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, st) = g
            .call("GET", "/api/v1/clusters/web/status", Some(READER), None)
            .await;
        assert_eq!(code, 200, "{st}");
        let members = st["members"].as_array().cloned().unwrap_or_default();
        if members.len() == 3 && members.iter().all(|m| m["state_contract"] == "supported") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members' state_contract: {st}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // state_sync: read with the cluster, set with a check of every field.
    assert_eq!(one["state_sync"]["mode"], "on_scale", "{one}");
    for (bad, says) in [
        (
            json!({"mode": "continuous", "interval_ms": 10}),
            "interval_ms",
        ),
        (json!({"mode": "sometimes"}), "mode"),
        (json!({"mode": "none", "extra": 1}), "extra"),
    ] {
        let (code, e) = g
            .call(
                "PUT",
                "/api/v1/clusters/web/state-sync",
                Some(ADMIN),
                Some(&bad),
            )
            .await;
        assert_eq!(code, 400, "{bad}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{bad}: {e}"
        );
    }
    let (code, e) = g
        .call(
            "PUT",
            "/api/v1/clusters/nope/state-sync",
            Some(ADMIN),
            Some(&json!({"mode": "none"})),
        )
        .await;
    assert_eq!(code, 404, "{e}");
    let (code, e) = g
        .call(
            "PUT",
            "/api/v1/clusters/web/state-sync",
            Some(READER),
            Some(&json!({"mode": "none"})),
        )
        .await;
    assert_eq!(code, 403, "{e}");
    let (code, set) = g
        .call(
            "PUT",
            "/api/v1/clusters/web/state-sync",
            Some(ADMIN),
            Some(&json!({"mode": "continuous", "interval_ms": 500, "refuse_unsynced_scale_in": true})),
        )
        .await;
    assert_eq!(code, 200, "{set}");
    assert_eq!(set["mode"], "continuous");
    assert_eq!(set["interval_ms"], 500);
    let (_, one) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    assert_eq!(one["state_sync"]["refuse_unsynced_scale_in"], true, "{one}");

    let (code, p) = g
        .call(
            "PUT",
            "/api/v1/clusters/web/policy",
            Some(ADMIN),
            Some(&json!({"min_instances": 2, "max_instances": 5, "target_cpu_utilization": 0.7})),
        )
        .await;
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["max_instances"], 5);
    // Fields left out keep the values in force, not zero.
    assert_eq!(
        p["scale_in_cooldown_seconds"], st["policy"]["scale_in_cooldown_seconds"],
        "{p} {st}"
    );
    let (code, p2) = g
        .call(
            "PUT",
            "/api/v1/clusters/web/policy",
            Some(ADMIN),
            Some(&json!({"warmup_seconds": 12})),
        )
        .await;
    assert_eq!(code, 200, "{p2}");
    assert_eq!(p2["warmup_seconds"], 12);
    assert_eq!(p2["standby_snapshot_seconds"], 0, "none kept by default");
    assert_eq!(
        (p2["min_instances"].clone(), p2["max_instances"].clone()),
        (json!(2), json!(5))
    );
    assert_eq!(p2["target_cpu_utilization"], 0.7);

    let victim = st["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["template"] == false))
        .and_then(|m| m["instance_id"].as_str())
        .expect("a clone")
        .to_owned();
    let (code, d) = g
        .call(
            "POST",
            &format!("/api/v1/clusters/web/instances/{victim}/drain"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(code, 202, "{d}");
    let (_, one) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    let drained = one["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["instance_id"] == victim.as_str()))
        .expect("member");
    assert_eq!(drained["status"], "draining");
    drain_undrain_and_remove_by_name(&g, &victim).await;

    let (code, del) = g
        .call("DELETE", "/api/v1/clusters/web", Some(ADMIN), None)
        .await;
    assert_eq!(code, 200, "{del}");
    assert_eq!(del["instances_deleted"].as_array().map(Vec::len), Some(2));
    let (code, body) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    g.stop().await;
}

/// The status of `instance` in cluster `web`.
async fn member_status(g: &Gateway, instance: &str) -> Value {
    let (_, one) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    one["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["instance_id"] == instance))
        .map_or(Value::Null, |m| m["status"].clone())
}

/// `victim` is draining: undrain it, set the cluster's drain settings, drain it again
/// and remove it by name; the last serving member cannot be drained.
async fn drain_undrain_and_remove_by_name(g: &Gateway, victim: &str) {
    let instance = |verb: &str| format!("/api/v1/clusters/web/instances/{victim}/{verb}");
    let (code, u) = g
        .call("POST", &instance("undrain"), Some(ADMIN), None)
        .await;
    assert_eq!(code, 200, "{u}");
    assert_eq!(member_status(g, victim).await, "active");

    let (code, d) = g
        .call(
            "PUT",
            "/api/v1/clusters/web/drain",
            Some(ADMIN),
            Some(&json!({"grace_period_seconds": 5, "wait_for_connections": false})),
        )
        .await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(d["wait_for_connections"], false);
    let (_, one) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    assert_eq!(one["drain"]["grace_period_seconds"], 5, "{one}");
    let (code, e) = g
        .call(
            "PUT",
            "/api/v1/clusters/web/drain",
            Some(ADMIN),
            Some(&json!({"grace_period_seconds": 4000})),
        )
        .await;
    assert_eq!(code, 400, "{e}");
    assert!(e.to_string().contains("grace_period_seconds"), "{e}");

    let (code, _) = g.call("POST", &instance("drain"), Some(ADMIN), None).await;
    assert_eq!(code, 202);
    let (code, accepted) = g
        .call(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            Some(&json!({
                "operation": "scale_in",
                "immediate": true,
                "instance_ids_to_remove": [victim],
                "drain": {"grace_period_seconds": 1}
            })),
        )
        .await;
    assert_eq!(code, 202, "{accepted}");
    let op = g
        .wait_op(accepted["operation_id"].as_str().expect("id"))
        .await;
    assert_eq!(op["status"], "completed", "{op}");
    assert_eq!(member_status(g, victim).await, Value::Null, "removed");

    // Template and one clone left: the clone may drain, then the template may not.
    let (_, one) = g
        .call("GET", "/api/v1/clusters/web", Some(READER), None)
        .await;
    let members = one["members"].as_array().cloned().unwrap_or_default();
    let id_of = |template: bool| {
        members
            .iter()
            .find(|m| m["template"] == template)
            .and_then(|m| m["instance_id"].as_str())
            .expect("member")
            .to_owned()
    };
    let (clone, template) = (id_of(false), id_of(true));
    let path = |id: &str| format!("/api/v1/clusters/web/instances/{id}/drain");
    let (code, _) = g.call("POST", &path(&clone), Some(ADMIN), None).await;
    assert_eq!(code, 202);
    let (code, e) = g.call("POST", &path(&template), Some(ADMIN), None).await;
    assert_eq!(code, 409, "{e}");
    assert!(e.to_string().contains("no serving instance"), "{e}");
    assert_eq!(member_status(g, &template).await, "active");
}

/// What fuzzing from the OpenAPI document found: every error is the documented JSON,
/// a wrong-typed field is named, a body that is not JSON by its type gets 415.
async fn fuzzed_requests_get_the_documented_json(g: &Gateway) {
    let auth = format!("Bearer {ADMIN}");
    let raw = |method: &'static str,
               path: &'static str,
               headers: Vec<(&'static str, String)>,
               body: &'static str| {
        let auth = auth.clone();
        async move {
            let mut h: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
            h.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
            let (code, head, text) = probe::http_call(g.http, method, path, &h, body.as_bytes())
                .await
                .expect("request");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {head}{text}"));
            (code, v)
        }
    };
    let json_type = || vec![("Content-Type", "application/json".to_owned())];
    let (code, e) = raw("PATCH", "/api/v1/clusters/web", vec![], "").await;
    assert_eq!(code, 405, "{e}");
    assert_eq!(e["error"]["code"], "method_not_allowed", "{e}");
    let (code, e) = raw("GET", "/api/v1/clusters/%FF%FE", vec![], "").await;
    assert_eq!(code, 400, "{e}");
    let (code, e) = raw(
        "POST",
        "/api/v1/clusters/web/scale",
        vec![("Content-Type", "text/plain".to_owned())],
        r#"{"operation": "scale_out"}"#,
    )
    .await;
    assert_eq!(code, 415, "{e}");
    assert!(e.to_string().contains("application/json"), "{e}");
    let (code, e) = raw(
        "POST",
        "/api/v1/clusters/web/scale",
        json_type(),
        r#"{"operation": "scale_out", "target_count": "three"}"#,
    )
    .await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_argument", "{e}");
    assert!(
        e.to_string().contains("target_count"),
        "the field is named: {e}"
    );
    let (code, e) = raw(
        "POST",
        "/api/v1/clusters/web/scale",
        json_type(),
        r#"{"operation": "scale_out", "target_count": 2.0}"#,
    )
    .await;
    assert_eq!(code, 400, "{e}");
    assert!(
        e.to_string().contains("target_count") && e.to_string().contains("u32"),
        "{e}"
    );
    // What hyper answers before any route runs is JSON too.
    let long = format!("/api/v1/clusters/{}", "a".repeat(100_000));
    let big = "b".repeat(300_000);
    let auth_h = ("Authorization", auth.as_str());
    for (path, headers, status, code) in [
        (long.as_str(), vec![auth_h], 414, "uri_too_long"),
        (
            "/api/v1/clusters",
            vec![auth_h, ("X-One", big.as_str()), ("X-Two", big.as_str())],
            431,
            "headers_too_large",
        ),
        (
            "/api/v1/clusters\tnot http",
            vec![auth_h],
            400,
            "invalid_request",
        ),
    ] {
        let (got, head, text) = probe::http_call(g.http, "GET", path, &headers, b"")
            .await
            .expect("request");
        let e: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{code}: not JSON: {head}{text}"));
        assert_eq!(got, status, "{e}");
        assert_eq!(e["error"]["code"], code, "{e}");
    }
    // The gateway still answers after those (each closed only its own connection).
    let (code, _) = raw("GET", "/api/v1/clusters", vec![], "").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn bad_requests_get_an_error_naming_what_was_wrong() {
    let mut g = Gateway::start("api-errors", &["--inject-fault", "wait_serving=hang"]).await;
    let (code, c) = g
        .call(
            "POST",
            "/api/v1/clusters",
            Some(ADMIN),
            Some(&demo_cluster("web")),
        )
        .await;
    assert_eq!(code, 201, "{c}");
    // A cluster created without a policy, or with part of one, shows the policy the
    // controller applies: the defaults filled in.
    let mut bare = demo_cluster("bare");
    bare["policy"] = json!({"max_instances": 3});
    let (code, made) = g
        .call("POST", "/api/v1/clusters", Some(ADMIN), Some(&bare))
        .await;
    assert_eq!(code, 201, "{made}");
    let (_, st) = g
        .call("GET", "/api/v1/clusters/bare/status", Some(ADMIN), None)
        .await;
    assert_eq!(made["policy"], st["policy"], "GET and status agree");
    assert_eq!(made["policy"]["max_instances"], 3);
    assert_eq!(made["policy"]["scale_in_cooldown_seconds"], 60, "{made}");
    // A node selector no node meets: refused before anything is made, naming the lack.
    let mut pinned = demo_cluster("pinned");
    pinned["node_selector"] = json!({"zone": "nowhere"});
    let (code, body) = g
        .call("POST", "/api/v1/clusters", Some(ADMIN), Some(&pinned))
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("resource_exhausted")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("lacks label zone=nowhere")),
        "{body}"
    );
    let (code, _) = g
        .call("GET", "/api/v1/clusters/pinned", Some(ADMIN), None)
        .await;
    assert_eq!(code, 404, "nothing made");
    let (code, _) = g
        .call("DELETE", "/api/v1/clusters/bare", Some(ADMIN), None)
        .await;
    assert_eq!(code, 200);

    // A client that goes away in the middle of a create (once the cluster is stored,
    // before its template serves): the create still runs to its end, not half way.
    let body = demo_cluster("left").to_string();
    let request = format!(
        "POST /api/v1/clusters HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        g.http,
        body.len()
    );
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(g.http)
            .await
            .expect("connect");
        s.write_all(request.as_bytes()).await.expect("send");
        form_testkit::assert_eventually!(
            deadline = std::time::Duration::from_secs(60),
            async {
                g.call("GET", "/api/v1/clusters/left", Some(ADMIN), None)
                    .await
                    .0
                    == 200
            },
            "the create has begun"
        );
    }
    form_testkit::assert_eventually!(
        deadline = std::time::Duration::from_secs(60),
        async {
            let (code, c) = g
                .call("GET", "/api/v1/clusters/left", Some(ADMIN), None)
                .await;
            code == 200
                && c["members"]
                    .as_array()
                    .is_some_and(|m| m.len() == 1 && m[0]["status"] == "active")
                && c["template_instance_id"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
        },
        "the create of a client that left completes: {:?}",
        g.call("GET", "/api/v1/clusters/left", Some(ADMIN), None)
            .await
    );
    form_testkit::assert_eventually!(
        deadline = std::time::Duration::from_secs(60),
        async {
            let (_, st) = g
                .call("GET", "/api/v1/clusters/left/status", Some(ADMIN), None)
                .await;
            st["scaling_status"] == "stable"
        },
        "the create's operation ends: {:?}",
        g.call("GET", "/api/v1/clusters/left/status", Some(ADMIN), None)
            .await
    );
    let (code, e) = g
        .call("DELETE", "/api/v1/clusters/left", Some(ADMIN), None)
        .await;
    assert_eq!(code, 200, "{e}");
    let cases: Vec<(&str, &str, String, u16, &str, &str)> = vec![
        (
            "POST",
            "/api/v1/clusters",
            "{not json".into(),
            400,
            "invalid_json",
            "expected JSON",
        ),
        (
            "POST",
            "/api/v1/clusters",
            "".into(),
            400,
            "invalid_json",
            "empty",
        ),
        (
            "POST",
            "/api/v1/clusters",
            json!({"cluster_id": "x", "workload": {"command": "y"}, "colour": 1}).to_string(),
            400,
            "invalid_argument",
            "unknown field `colour`",
        ),
        (
            "POST",
            "/api/v1/clusters",
            json!({"cluster_id": "bad id", "workload": {"command": "y"}}).to_string(),
            400,
            "invalid_argument",
            "cluster_id",
        ),
        (
            "POST",
            "/api/v1/clusters",
            json!({"cluster_id": "x", "workload": {"command": "y"},
                   "affinity": {"method": "cookie", "name": "bad name", "ttl_seconds": 60}})
            .to_string(),
            400,
            "invalid_argument",
            "affinity.cookie.name",
        ),
        (
            "POST",
            "/api/v1/clusters",
            json!({"cluster_id": "x", "workload": {"command": "y"},
                   "affinity": {"method": "consistent_hashing", "parameter": "a b"}})
            .to_string(),
            400,
            "invalid_argument",
            "affinity.consistent_hashing.parameter",
        ),
        (
            "POST",
            "/api/v1/clusters",
            json!({"cluster_id": "big", "workload": {"command": "y"},
                   "policy": {"max_instances": 500}})
            .to_string(),
            400,
            "invalid_argument",
            "max_instances",
        ),
        (
            "POST",
            "/api/v1/clusters",
            json!({"cluster_id": "slow", "workload": {"command": "y"},
                   "policy": {"scale_in_cooldown_seconds": 999_999}})
            .to_string(),
            400,
            "invalid_argument",
            "scale_in_cooldown_seconds",
        ),
        (
            "POST",
            "/api/v1/clusters/web/scale",
            json!({"operation": "scale_out", "target_count": 9}).to_string(),
            400,
            "invalid_argument",
            "target_count 9",
        ),
        (
            "POST",
            "/api/v1/clusters/web/scale",
            json!({"operation": "explode"}).to_string(),
            400,
            "invalid_argument",
            "unknown variant `explode`",
        ),
        (
            "POST",
            "/api/v1/clusters/nope/scale",
            json!({"operation": "scale_out", "target_count": 2}).to_string(),
            404,
            "not_found",
            "nope",
        ),
        (
            "PUT",
            "/api/v1/clusters/web/policy",
            json!({"min_instances": 3, "max_instances": 2, "target_cpu_utilization": 0.5})
                .to_string(),
            400,
            "invalid_argument",
            "min_instances",
        ),
        (
            "PUT",
            "/api/v1/clusters/web/policy",
            json!({"standby_snapshot_seconds": 5}).to_string(),
            400,
            "invalid_argument",
            "standby_snapshot_seconds",
        ),
        (
            "GET",
            "/api/v1/operations/none-such",
            String::new(),
            404,
            "not_found",
            "none-such",
        ),
        (
            "GET",
            "/api/v1/nothing",
            String::new(),
            404,
            "not_found",
            "openapi.json",
        ),
        (
            "POST",
            "/api/v1/clusters",
            "x".repeat(70_000),
            413,
            "payload_too_large",
            "larger than",
        ),
    ];
    for (method, path, body, want, code_name, says) in cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let (code, e) = g.call_with(method, path, Some(ADMIN), &[], body).await;
        assert_eq!(code, want, "{method} {path}: {e}");
        assert_eq!(e["error"]["code"], code_name, "{method} {path}: {e}");
        let msg = e["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(says), "{method} {path}: '{says}' not in {msg}");
    }
    fuzzed_requests_get_the_documented_json(&g).await;

    // An operation that does not end (a fault holds it): a second one conflicts.
    let scale = json!({"operation": "scale_out", "target_count": 2}).to_string();
    let (code, first) = g
        .call_with(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            &[],
            Some(&scale),
        )
        .await;
    assert_eq!(code, 202, "{first}");
    let id = first["operation_id"].as_str().expect("id").to_owned();
    // Valid whether or not the first one has added its member yet (max_instances 4).
    let second = json!({"operation": "scale_out", "target_count": 4}).to_string();
    let (code, e) = g
        .call_with(
            "POST",
            "/api/v1/clusters/web/scale",
            Some(ADMIN),
            &[],
            Some(&second),
        )
        .await;
    assert_eq!(code, 409, "{e}");
    assert_eq!(e["error"]["code"], "conflict");
    assert!(
        e["error"]["message"].as_str().unwrap_or("").contains(&id),
        "{e}"
    );
    let (code, e) = g
        .call("DELETE", "/api/v1/clusters/web", Some(ADMIN), None)
        .await;
    assert_eq!(
        code, 409,
        "a cluster with a running operation is not deleted: {e}"
    );
    g.stop().await;
}

#[tokio::test]
async fn every_route_of_the_openapi_document_is_served() {
    let mut g = Gateway::start("api-doc", &[]).await;
    let (_, doc) = g.call("GET", "/api/v1/openapi.json", None, None).await;
    let paths = doc["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 13);
    for (path, ops) in paths {
        for method in ops.as_object().expect("ops").keys() {
            let concrete = path.replace("{id}", "x").replace("{instance}", "y");
            let (code, body) = g.call(&method.to_uppercase(), &concrete, None, None).await;
            assert_eq!(code, 401, "{method} {path} asks for a token: {body}");
            // With a token, the route's own handler answers (the catch-all says "no
            // such API route"; a method the route lacks gets 405).
            let (code, body) = g
                .call(&method.to_uppercase(), &concrete, Some(READER), None)
                .await;
            assert_ne!(code, 405, "{method} {path}: {body}");
            assert!(
                !body.to_string().contains("no such API route"),
                "{method} {path} is not served: {body}"
            );
        }
    }
    g.stop().await;
}

/// Environment values carry secrets: the workload gets them, no read shows them (REST,
/// or a vmm node's instance listing to an operator).
#[tokio::test]
async fn environment_values_reach_the_workload_and_no_read_shows_them() {
    let g = Gateway::start("api-secrets", &[]).await;
    let secret = "s3cret-value-17";
    let mut spec = demo_cluster("vault");
    spec["workload"]["env"] = json!({ "DB_PASSWORD": secret });
    let (code, made) = g
        .call("POST", "/api/v1/clusters", Some(ADMIN), Some(&spec))
        .await;
    assert_eq!(code, 201, "{made}");
    assert_eq!(
        made["workload"]["env"]["DB_PASSWORD"], "<redacted>",
        "{made}"
    );
    for path in [
        "/api/v1/clusters",
        "/api/v1/clusters/vault",
        "/api/v1/clusters/vault/status",
    ] {
        for token in [ADMIN, READER] {
            let (code, body) = g.call("GET", path, Some(token), None).await;
            assert_eq!(code, 200, "{path}: {body}");
            assert!(
                !body.to_string().contains(secret),
                "{path} shows it: {body}"
            );
        }
    }
    assert!(
        !probe::pids_with_env("DB_PASSWORD", secret).is_empty(),
        "the workload got its environment"
    );
    let vmm = g
        .services
        .iter()
        .find(|s| s.info().service == "form-vmm-service")
        .and_then(|s| s.addr("grpc"))
        .expect("vmm");
    let listed = form_proto::vmm::v1::vmm_service_client::VmmServiceClient::new(
        probe::channel_as(vmm, form_runtime::tls::Kind::Operator)
            .await
            .expect("connect"),
    )
    .list_instances(form_proto::vmm::v1::ListInstancesRequest::default())
    .await
    .expect("list")
    .into_inner();
    assert!(!listed.instances.is_empty());
    assert!(!format!("{listed:?}").contains(secret), "{listed:?}");
}

#[tokio::test]
async fn nodes_are_listed_and_cordoned_and_formctl_shows_them() {
    let mut g = Gateway::start("api-nodes", &[]).await;
    // The vmm node records itself within a heartbeat or two.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let nodes = loop {
        let (code, v) = g.call("GET", "/api/v1/nodes", Some(READER), None).await;
        assert_eq!(code, 200, "{v}");
        if v["nodes"].as_array().is_some_and(|n| !n.is_empty()) {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "no node: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let n = &nodes["nodes"][0];
    assert_eq!(n["node_id"], "node-1");
    assert_eq!(n["backend"], "process");
    assert!(n["capacity"]["instance_slots"].as_u64() > Some(0), "{n}");
    assert_eq!(n["cordoned"], false);

    // A read token cannot cordon; an admin can, and an unknown node is 404.
    let (code, _) = g
        .call("POST", "/api/v1/nodes/node-1/cordon", Some(READER), None)
        .await;
    assert_eq!(code, 403);
    let (code, v) = g
        .call("POST", "/api/v1/nodes/node-1/cordon", Some(ADMIN), None)
        .await;
    assert_eq!((code, v["cordoned"].as_bool()), (200, Some(true)), "{v}");
    let (code, v) = g
        .call("POST", "/api/v1/nodes/ghost/cordon", Some(ADMIN), None)
        .await;
    assert_eq!(code, 404, "{v}");
    assert!(v.to_string().contains("ghost"), "{v}");

    // formctl shows it, cordoned, and lifts the cordon.
    let api = format!("http://{}", g.http);
    let formctl = |args: &[&str]| {
        std::process::Command::new(form_testkit::workspace_bin("formctl"))
            .args(["--api", &api, "--token", ADMIN])
            .args(args)
            .output()
            .expect("formctl")
    };
    let out = formctl(&["nodes", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("node-1"))
        .unwrap_or_else(|| panic!("no node-1 in {table}"));
    assert!(
        row.contains("process") && row.contains("cordoned"),
        "{table}"
    );
    let out = formctl(&["nodes", "uncordon", "node-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, v) = g.call("GET", "/api/v1/nodes", Some(READER), None).await;
    assert_eq!(v["nodes"][0]["cordoned"], false, "{v}");
    g.stop().await;
}
