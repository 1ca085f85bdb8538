//! An MCP client (rmcp's) lists and calls the gateway's tools over both protocol
//! generations: 2025-11-25 (initialize, a session) and 2026-07-28 (stateless), with
//! the same bearer tokens as the REST API.

mod common;

use common::*;
use rmcp::model::{CallToolRequestParams, ClientConfig, ProtocolVersion};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientLifecycleMode, ClientServiceExt};
use serde_json::{Value, json};

async fn connect(
    g: &Gateway,
    token: &str,
    mode: ClientLifecycleMode,
    version: ProtocolVersion,
) -> RunningService<RoleClient, ClientConfig> {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("http://{}/mcp", g.http))
            .auth_header(token),
    );
    ClientConfig::default()
        .with_protocol_version(version)
        .serve_with_lifecycle(transport, mode)
        .await
        .expect("MCP client connects")
}

async fn call(
    c: &RunningService<RoleClient, ClientConfig>,
    tool: &str,
    args: Value,
) -> (bool, Value) {
    let Value::Object(args) = args else {
        panic!("arguments are an object")
    };
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = Some(args);
    let r = c.call_tool(params).await.expect("tools/call answered");
    (
        r.is_error.unwrap_or(false),
        r.structured_content.unwrap_or(Value::Null),
    )
}

async fn exercise(g: &Gateway, mode: ClientLifecycleMode, version: ProtocolVersion, cluster: &str) {
    let c = connect(g, ADMIN, mode, version.clone()).await;
    let tools = c.list_tools(None).await.expect("tools/list");
    let mut names: Vec<String> = tools.tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cordon_node",
            "create_cluster",
            "delete_cluster",
            "drain_instance",
            "get_cluster",
            "get_cluster_status",
            "get_operation",
            "list_clusters",
            "list_nodes",
            "scale_cluster",
            "set_drain",
            "set_scaling_policy",
            "set_state_sync",
            "uncordon_node",
            "undrain_instance",
        ]
    );
    // The nodes, and a cordon set and lifted.
    // (The vmm node records itself with its first heartbeat.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (err, nodes) = call(&c, "list_nodes", json!({})).await;
        assert!(!err, "{nodes}");
        if nodes["nodes"][0]["node_id"] == "node-1" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{nodes}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (err, n) = call(&c, "cordon_node", json!({"node_id": "node-1"})).await;
    assert!(!err && n["cordoned"] == true, "{n}");
    let (err, n) = call(
        &c,
        "uncordon_node",
        serde_json::json!({"node_id": "node-1"}),
    )
    .await;
    assert!(!err && n["cordoned"] == false, "{n}");
    // Every tool says whether it reads only, may destroy, and may be repeated.
    for t in &tools.tools {
        let a = t.annotations.as_ref().expect("annotations");
        let (ro, destructive, idempotent) = (
            a.read_only_hint.expect("readOnlyHint"),
            a.destructive_hint.expect("destructiveHint"),
            a.idempotent_hint.expect("idempotentHint"),
        );
        assert_eq!(
            ro,
            t.name.starts_with("get_") || t.name.starts_with("list_"),
            "{}",
            t.name
        );
        assert_eq!(
            destructive,
            ["delete_cluster", "scale_cluster"].contains(&t.name.as_ref()),
            "{}",
            t.name
        );
        assert_eq!(
            idempotent,
            !["create_cluster", "scale_cluster"].contains(&t.name.as_ref()),
            "{}",
            t.name
        );
    }
    let scale = tools
        .tools
        .iter()
        .find(|t| t.name == "scale_cluster")
        .expect("scale_cluster");
    assert!(
        scale
            .input_schema
            .get("properties")
            .is_some_and(|p| p.get("target_count").is_some())
    );

    let (err, created) = call(&c, "create_cluster", demo_cluster(cluster)).await;
    assert!(!err, "{created}");
    assert_eq!(created["cluster_id"], cluster);
    let (err, list) = call(&c, "list_clusters", json!({})).await;
    assert!(!err);
    assert!(
        list["clusters"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["cluster_id"] == cluster))
    );
    let (err, accepted) = call(
        &c,
        "scale_cluster",
        json!({"cluster_id": cluster, "operation": "scale_out", "target_count": 2, "immediate": true}),
    )
    .await;
    assert!(!err, "{accepted}");
    let id = accepted["operation_id"].as_str().expect("id").to_owned();
    let op = g.wait_op(&id).await;
    assert_eq!(op["status"], "completed", "{op}");
    let (err, op) = call(&c, "get_operation", json!({"operation_id": id})).await;
    assert!(!err);
    assert_eq!(op["status"], "completed");
    let (err, st) = call(&c, "get_cluster_status", json!({"cluster_id": cluster})).await;
    assert!(!err);
    assert_eq!(st["instances"], 2);
    let (err, p) = call(
        &c,
        "set_scaling_policy",
        json!({"cluster_id": cluster, "policy": {"min_instances": 1, "max_instances": 3, "target_cpu_utilization": 0.5}}),
    )
    .await;
    assert!(!err, "{p}");
    assert_eq!(st["state_sync"], "on_scale", "{st}");
    let (err, sync) = call(
        &c,
        "set_state_sync",
        json!({"cluster_id": cluster, "state_sync": {"mode": "none"}}),
    )
    .await;
    assert!(!err, "{sync}");
    assert_eq!(sync["mode"], "none");
    let (err, e) = call(
        &c,
        "set_state_sync",
        json!({"cluster_id": cluster, "state_sync": {"mode": "continuous", "batch_bytes": 1}}),
    )
    .await;
    assert!(err);
    assert!(
        e["message"].as_str().unwrap_or("").contains("batch_bytes"),
        "{e}"
    );
    // Errors of the API come back as tool errors naming what was wrong.
    let (err, e) = call(
        &c,
        "scale_cluster",
        json!({"cluster_id": cluster, "operation": "scale_out", "target_count": 50}),
    )
    .await;
    assert!(err);
    assert_eq!(e["status"], 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("target_count 50"),
        "{e}"
    );
    let (err, e) = call(&c, "get_cluster_status", json!({"cluster_id": "missing"})).await;
    assert!(err);
    assert_eq!(e["status"], 404);
    let bad = c
        .call_tool({
            let mut p = CallToolRequestParams::new("scale_cluster");
            p.arguments = json!({"cluster_id": cluster}).as_object().cloned();
            p
        })
        .await;
    assert!(bad.is_err(), "arguments without an operation are refused");
    let (err, one) = call(&c, "get_cluster", json!({"cluster_id": cluster})).await;
    assert!(!err, "{one}");
    assert_eq!(one["cluster_id"], cluster);
    assert_eq!(one["drain"]["wait_for_connections"], true, "{one}");
    let (err, d) = call(
        &c,
        "set_drain",
        json!({"cluster_id": cluster, "drain": {"grace_period_seconds": 7}}),
    )
    .await;
    assert!(!err, "{d}");
    assert_eq!(d["grace_period_seconds"], 7);
    let (err, gone) = call(&c, "delete_cluster", json!({"cluster_id": cluster})).await;
    assert!(!err, "{gone}");
    let (err, e) = call(&c, "get_cluster", json!({"cluster_id": cluster})).await;
    assert!(err);
    assert_eq!(e["status"], 404, "{e}");
    c.cancel().await.expect("close");

    // A read token lists but cannot scale.
    let r = connect(g, READER, mode_again(version.clone()), version).await;
    let (err, _) = call(&r, "list_clusters", json!({})).await;
    assert!(!err);
    let (err, e) = call(
        &r,
        "scale_cluster",
        json!({"cluster_id": cluster, "operation": "scale_in", "target_count": 1}),
    )
    .await;
    assert!(err);
    assert_eq!(e["status"], 403, "{e}");
    r.cancel().await.expect("close");
}

fn mode_again(version: ProtocolVersion) -> ClientLifecycleMode {
    if version == ProtocolVersion::V_2025_11_25 {
        ClientLifecycleMode::Initialize
    } else {
        ClientLifecycleMode::Discover {
            preferred_versions: vec![version],
        }
    }
}

#[tokio::test]
async fn tools_over_the_session_protocol_of_2025_11_25() {
    let mut g = Gateway::start("mcp-2025", &[]).await;
    exercise(
        &g,
        ClientLifecycleMode::Initialize,
        ProtocolVersion::V_2025_11_25,
        "legacy",
    )
    .await;
    g.stop().await;
}

#[tokio::test]
async fn tools_over_the_stateless_protocol_of_2026_07_28() {
    let mut g = Gateway::start("mcp-2026", &[]).await;
    let v = ProtocolVersion::V_2026_07_28;
    exercise(&g, mode_again(v.clone()), v, "stateless").await;
    g.stop().await;
}

#[tokio::test]
async fn the_endpoint_wants_a_token_and_an_allowed_host() {
    let mut g = Gateway::start("mcp-auth", &[]).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    .to_string();
    let accept = ("Accept", "application/json, text/event-stream");
    let (code, body) = g
        .call_with("POST", "/mcp", None, &[accept], Some(&init))
        .await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = g
        .call_with(
            "POST",
            "/mcp",
            Some("not-a-token-not-a-token"),
            &[accept],
            Some(&init),
        )
        .await;
    assert_eq!(code, 401);
    let (code, _) = g
        .call_with("POST", "/mcp", Some(ADMIN), &[accept], Some(&init))
        .await;
    assert_eq!(code, 200);
    let (code, body) = g
        .call_with(
            "POST",
            "/mcp",
            Some(ADMIN),
            &[accept, ("Host", "evil.example")],
            Some(&init),
        )
        .await;
    assert_eq!(code, 403, "a host that is not allowed is refused: {body}");
    // A page of another site (DNS rebinding) is refused by its Origin, with a token.
    let (code, body) = g
        .call_with(
            "POST",
            "/mcp",
            Some(ADMIN),
            &[accept, ("Origin", "http://evil.example")],
            Some(&init),
        )
        .await;
    assert_eq!(
        code, 403,
        "an origin that is not allowed is refused: {body}"
    );
    g.stop().await;
}

#[tokio::test]
async fn malformed_messages_get_json_rpc_errors_and_a_session_delete_answers_200() {
    let mut g = Gateway::start("mcp-errors", &[]).await;
    let auth = format!("Bearer {ADMIN}");
    let post = async |body: &str| {
        let h = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ];
        let (code, _, text) =
            form_testkit::probe::http_call(g.http, "POST", "/mcp", &h, body.as_bytes())
                .await
                .expect("POST /mcp");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (code, v["error"]["code"].as_i64())
    };
    assert_eq!(post("{nope").await, (400, Some(-32700)));
    assert_eq!(post("[]").await, (400, Some(-32600)));
    assert_eq!(
        post(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#).await,
        (400, Some(-32602))
    );

    // A 2025-11-25 session ends with 200.
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let h = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    let (code, head, _) =
        form_testkit::probe::http_call(g.http, "POST", "/mcp", &h, init.as_bytes())
            .await
            .expect("initialize");
    assert_eq!(code, 200, "{head}");
    let session = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("mcp-session-id")
                .then(|| v.trim().to_owned())
        })
        .expect("a session id");
    let h = [
        ("Authorization", auth.as_str()),
        ("Mcp-Session-Id", session.as_str()),
    ];
    let (code, _, body) = form_testkit::probe::http_call(g.http, "DELETE", "/mcp", &h, b"")
        .await
        .expect("DELETE");
    assert_eq!(code, 200, "{body}");
    g.stop().await;
}
