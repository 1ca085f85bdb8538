//! The platform's promises under faults, across real container network boundaries, on
//! the compose stack:
//! - a form-state container killed (`docker kill`) while a client writes: after it
//!   comes back, every acknowledged write is there;
//! - a replica disconnected from the network (`docker network disconnect`) while both
//!   sides take writes: reconnected, every replica has the same digest within 5 s;
//! - form-scaler killed during a scale-out: restarted, the operation rolls back and
//!   state, balancer and instances agree;
//! - a scale-in under steady sticky load through the published port: 0 failed requests;
//! - a vmm node killed (`docker kill`) while clients write through the balancer, the
//!   cluster syncing continuously: its instances are replaced on the other node within
//!   the node timeout + 10 s, every write acknowledged more than a sync interval before
//!   the kill is on every instance, and the node, started again, runs none of them;
//! - two controllers acting on one cluster, the owner cut off from the network mid
//!   operation: the other adopts and ends it; back, the first is refused as stale and
//!   the cluster keeps the members the second left.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use form_proto::rplb::v1 as rplb_pb;
use form_proto::rplb::v1::rplb_control_client::RplbControlClient;
use form_proto::state::v1 as state_pb;
use form_proto::state::v1::state_service_client::StateServiceClient;
use form_proto::types::v1 as types;
use form_proto::vmm::v1 as vmm_pb;
use form_proto::vmm::v1::vmm_service_client::VmmServiceClient;
use form_testkit::probe;
use serde_json::json;
use tonic::transport::Channel;

async fn state(addr: SocketAddr) -> StateServiceClient<Channel> {
    StateServiceClient::new(probe::channel(addr).await.expect("state channel"))
}

async fn digest(addr: SocketAddr) -> Option<Vec<u8>> {
    let mut c = StateServiceClient::new(probe::channel(addr).await.ok()?);
    Some(
        c.digest(state_pb::DigestRequest {})
            .await
            .ok()?
            .into_inner()
            .sha256,
    )
}

fn cluster(id: &str) -> state_pb::PutClusterRequest {
    state_pb::PutClusterRequest {
        cluster_id: id.into(),
        ..Default::default()
    }
}

async fn killed_replica_keeps_every_acknowledged_write(c: &Compose) {
    let addr = c.addr("form-state-1", 3004);
    let mut s1 = state(addr).await;
    let mut acked = Vec::new();
    let mut killed_at = None;
    for i in 0.. {
        // After 100 acknowledged writes (a write slower than 300 ms on a busy machine
        // is not acknowledged, and does not count).
        if acked.len() == 100 && killed_at.is_none() {
            docker(&["kill", &c.container("form-state-1")]);
            killed_at = Some(tokio::time::Instant::now());
        }
        // Writes go on for a while after the kill; a write to the dead replica fails
        // (or times out) and is not acknowledged.
        if killed_at.is_some_and(|t| t.elapsed() > Duration::from_millis(1500)) {
            break;
        }
        let id = format!("ack-{i}");
        let put = s1.put_cluster(cluster(&id));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), put).await {
            acked.push(id);
        }
    }
    assert!(acked.len() >= 100, "{} writes acknowledged", acked.len());
    c.ok(&["start", "form-state-1"]);
    let addr = c.addr("form-state-1", 3004);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut s1 = loop {
        if let Ok(ch) = probe::channel(addr).await {
            let mut s = StateServiceClient::new(ch);
            if s.list_clusters(state_pb::ListClustersRequest {})
                .await
                .is_ok()
            {
                break s;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "form-state-1 did not come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for id in &acked {
        let got = s1
            .get_cluster(state_pb::GetClusterRequest {
                cluster_id: id.clone(),
            })
            .await;
        assert!(got.is_ok(), "acknowledged write {id} lost after the kill");
    }
}

async fn partitioned_replica_converges_within_5_s(c: &Compose) {
    let side = format!("{}:3004", c.ip("form-state-3", "side"))
        .parse()
        .expect("addr");
    let s1_addr = c.addr("form-state-1", 3004);
    let s2_addr = c.addr("form-state-2", 3004);
    let net = format!("{}_form", c.project);
    let s3 = c.container("form-state-3");
    docker(&["network", "disconnect", &net, &s3]);
    let (mut a, mut b) = (state(s1_addr).await, state(side).await);
    for i in 0..20 {
        a.put_cluster(cluster(&format!("left-{i}")))
            .await
            .expect("write on the majority side");
        b.put_cluster(cluster(&format!("right-{i}")))
            .await
            .expect("write on the cut-off replica");
    }
    assert_ne!(
        digest(s1_addr).await,
        digest(side).await,
        "the partition holds"
    );
    docker(&["network", "connect", &net, &s3]);
    let healed = tokio::time::Instant::now();
    loop {
        let (d1, d2, d3) = (
            digest(s1_addr).await,
            digest(s2_addr).await,
            digest(side).await,
        );
        if d1.is_some() && d1 == d2 && d2 == d3 {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(5),
            "digests differ 5 s after reconnecting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Members (API), instances (both vmm nodes) and balancer backends of the demo are one
/// set, and no snapshot is left on either node.
async fn demo_agrees(c: &Compose, api_addr: SocketAddr, token: &str) -> bool {
    let (_, cl) = api(api_addr, token, "GET", "/api/v1/clusters/demo", None).await;
    let mut members: Vec<String> = cl["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["instance_id"].as_str().map(str::to_owned))
        .collect();
    members.sort();
    // The instances and snapshots of both vmm nodes.
    let (mut instances, mut snapshots) = (Vec::new(), 0);
    for node in ["form-vmm", "form-vmm-2"] {
        let Ok(ch) = probe::channel(c.addr(node, 3002)).await else {
            return false;
        };
        let mut vmm = VmmServiceClient::new(ch);
        let Ok(list) = vmm
            .list_instances(vmm_pb::ListInstancesRequest::default())
            .await
        else {
            return false;
        };
        instances.extend(
            list.into_inner()
                .instances
                .into_iter()
                .map(|i| i.instance_id),
        );
        snapshots += vmm
            .list_snapshots(vmm_pb::ListSnapshotsRequest::default())
            .await
            .map(|r| r.into_inner().snapshots.len())
            .unwrap_or(1);
    }
    instances.sort();
    let Ok(ch) = probe::channel(c.addr("form-rplb", 3005)).await else {
        return false;
    };
    let stats = RplbControlClient::new(ch)
        .get_stats(rplb_pb::GetStatsRequest {
            domain: "demo.localhost".into(),
        })
        .await
        .map(|r| r.into_inner())
        .unwrap_or_default();
    let mut backends: Vec<String> = stats
        .routes
        .into_iter()
        .flat_map(|r| r.backends)
        .map(|b| b.id)
        .collect();
    backends.sort();
    !members.is_empty() && members == instances && members == backends && snapshots == 0
}

/// Asks the API to scale the demo out to `target`, again while a controller is not
/// ready to take it (a recreated one); the operation's id.
async fn scale_out_to(api_addr: SocketAddr, token: &str, target: usize) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, v) = api(
            api_addr,
            token,
            "POST",
            "/api/v1/clusters/demo/scale",
            Some(json!({"operation": "scale_out", "target_count": target, "immediate": true})),
        )
        .await;
        if code == 202 {
            return v["operation_id"].as_str().expect("id").to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scale-out refused: {code} {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn scaler_killed_mid_scale_out_rolls_back(c: &Compose, api_addr: SocketAddr, token: &str) {
    // The controllers, recreated with a fault that holds scale-outs before wait_serving.
    c.ok_env(
        &["up", "-d", "form-scaler", "form-scaler-2"],
        &[
            ("FORM_SCALER_INJECT_FAULT_1", "wait_serving=hang"),
            ("FORM_SCALER_INJECT_FAULT_2", "wait_serving=hang"),
        ],
    );
    let id = scale_out_to(api_addr, token, 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, op) = api(
            api_addr,
            token,
            "GET",
            &format!("/api/v1/operations/{id}"),
            None,
        )
        .await;
        if op["step"] == "wait_serving" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached wait_serving: {op}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The controller that runs it (the cluster's owner) is killed, then started again
    // without the fault; so is the other.
    let owner = state(c.addr("form-state-1", 3004))
        .await
        .get_operation(state_pb::GetOperationRequest {
            operation_id: id.clone(),
        })
        .await
        .expect("the operation")
        .into_inner()
        .owner;
    let owner = scaler_service(&owner);
    docker(&["kill", &c.container(owner)]);
    c.ok(&["up", "-d", "form-scaler", "form-scaler-2"]);
    let op = wait_op(api_addr, token, &id).await;
    assert_eq!(op["status"], "rolled_back", "{op}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !demo_agrees(c, api_addr, token).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "state, balancer and instances disagree after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scale_in_under_load_fails_no_request(lb: SocketAddr, api_addr: SocketAddr, token: &str) {
    let scale = |to: u32| {
        json!({"operation": if to > 1 { "scale_out" } else { "scale_in" }, "target_count": to,
               "immediate": true, "drain_connections": true})
    };
    let (code, v) = api(
        api_addr,
        token,
        "POST",
        "/api/v1/clusters/demo/scale",
        Some(scale(3)),
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let op = wait_op(api_addr, token, v["operation_id"].as_str().expect("id")).await;
    assert_eq!(op["status"], "completed", "{op}");

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // What the first failures were, for the assertion's message.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut cookie: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    let mut headers: Vec<(&str, &str)> = DEMO_HOST.to_vec();
                    if let Some(c) = &cookie {
                        headers.push(("Cookie", c));
                    }
                    match probe::http_call(lb, "GET", "/session", &headers, b"").await {
                        Ok((200, head, _)) => {
                            if let Some(c) = head.lines().find_map(|l| {
                                l.to_ascii_lowercase()
                                    .starts_with("set-cookie: form_session=")
                                    .then(|| {
                                        l[12..].split(';').next().unwrap_or("").trim().to_owned()
                                    })
                            }) {
                                cookie = Some(c);
                            }
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let what = match other {
                                Ok((code, head, body)) => format!("{code} {head:?} {body:?}"),
                                Err(e) => format!("{e:#}"),
                            };
                            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                            if seen.len() < 5 {
                                seen.push(what);
                            }
                        }
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, v) = api(
        api_addr,
        token,
        "POST",
        "/api/v1/clusters/demo/scale",
        Some(scale(1)),
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let op = wait_op(api_addr, token, v["operation_id"].as_str().expect("id")).await;
    assert_eq!(op["status"], "completed", "{op}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        let _ = t.await;
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(sent > 100, "{sent} requests sent");
    assert_eq!(
        failed,
        0,
        "{failed} of {sent} requests failed during the scale-in: {:?}",
        seen.lock().unwrap_or_else(|p| p.into_inner())
    );
}

/// The compose service of controller `id`.
fn scaler_service(id: &str) -> &'static str {
    match id {
        "scaler-1" => "form-scaler",
        "scaler-2" => "form-scaler-2",
        other => panic!("no controller {other} in the stack"),
    }
}

/// Two controllers both act on the demo: its owner, held before clone_instances, is
/// cut off from the network; the other adopts its operation and ends it; back on the
/// network and released, the first is refused everywhere (its epoch is older) and the
/// cluster keeps exactly the members the second left.
async fn stale_controller_is_fenced(c: &Compose, api_addr: SocketAddr, token: &str) {
    // A hold each controller can be released from: a file the certificate service
    // writes into that controller's (read-only) certificate volume.
    c.ok_env(
        &["up", "-d", "form-scaler", "form-scaler-2"],
        &[
            (
                "FORM_SCALER_INJECT_FAULT_1",
                "clone_instances=hold:/certs/scaler-1/go.crt",
            ),
            (
                "FORM_SCALER_INJECT_FAULT_2",
                "clone_instances=hold:/certs/scaler-2/go.crt",
            ),
        ],
    );
    let target = members(api_addr, token).await.len() + 1;
    let id = scale_out_to(api_addr, token, target).await;
    let mut st = state(c.addr("form-state-1", 3004)).await;
    let op = |st: &mut StateServiceClient<Channel>| {
        let mut st = st.clone();
        let id = id.clone();
        async move {
            st.get_operation(state_pb::GetOperationRequest { operation_id: id })
                .await
                .map(|r| r.into_inner())
                .ok()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let owner = loop {
        if let Some(o) = op(&mut st).await
            && let Some(types::operation_status::State::InProgress(p)) =
                o.status.as_ref().and_then(|s| s.state.clone())
            && p.step == "clone_instances"
        {
            break o.owner;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never held at clone_instances"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (stale, stale_svc) = (owner.clone(), scaler_service(&owner));
    let other = if stale == "scaler-1" {
        "scaler-2"
    } else {
        "scaler-1"
    };
    let net = format!("{}_form", c.project);
    docker(&["network", "disconnect", &net, &c.container(stale_svc)]);
    // The other controller sees the owner silent, adopts the operation and ends it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ended = loop {
        if let Some(o) = op(&mut st).await
            && matches!(
                o.status.as_ref().and_then(|s| s.state.as_ref()),
                Some(
                    types::operation_status::State::RolledBack(_)
                        | types::operation_status::State::Completed(_)
                        | types::operation_status::State::Failed(_)
                )
            )
        {
            break o;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{other} never ended the operation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let cluster = st
        .get_cluster(state_pb::GetClusterRequest {
            cluster_id: "demo".into(),
        })
        .await
        .expect("demo")
        .into_inner();
    assert_eq!(
        cluster.fence.as_ref().map(|f| f.owner.as_str()),
        Some(other),
        "{cluster:?}"
    );
    let mut wanted: Vec<String> = cluster.members.keys().cloned().collect();
    wanted.sort();
    // The stale controller is back, and goes on from where it was held.
    docker(&["network", "connect", &net, &c.container(stale_svc)]);
    let out = format!("/certs/{stale}");
    c.ok(&[
        "exec",
        "-T",
        "form-certs",
        "formctl",
        "certs",
        "domain",
        "go",
        "--ca",
        "/certs/ca",
        "--out",
        &out,
    ]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !c.ok(&["logs", stale_svc]).contains("stale fence") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stale} was never refused as stale"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let again = op(&mut st).await.expect("the operation");
    assert_eq!(again.status, ended.status, "the operation's end changed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut now: Vec<String> = members(api_addr, token)
            .await
            .into_iter()
            .map(|m| m.0)
            .collect();
        now.sort();
        if now == wanted && demo_agrees(c, api_addr, token).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members {now:?}, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both controllers again, without faults.
    c.ok(&["up", "-d", "form-scaler", "form-scaler-2"]);
}

/// The demo's members, each with its node and address, from the API.
async fn members(api_addr: SocketAddr, token: &str) -> Vec<(String, String, String)> {
    let (_, cl) = api(api_addr, token, "GET", "/api/v1/clusters/demo", None).await;
    cl["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let s = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
            (
                s("instance_id"),
                s("node_id"),
                m["addresses"][0].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Node timeout of the compose controller (form-scaler's default).
const NODE_TIMEOUT: Duration = Duration::from_secs(15);

async fn killed_vmm_node_is_replaced(
    c: &Compose,
    lb: SocketAddr,
    api_addr: SocketAddr,
    token: &str,
) {
    const INTERVAL_MS: u64 = 200;
    let (code, v) = api(
        api_addr,
        token,
        "PUT",
        "/api/v1/clusters/demo/state-sync",
        Some(json!({"mode": "continuous", "interval_ms": INTERVAL_MS})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = api(
        api_addr,
        token,
        "POST",
        "/api/v1/clusters/demo/scale",
        Some(json!({"operation": "scale_out", "target_count": 4, "immediate": true})),
    )
    .await;
    assert_eq!(code, 202, "{v}");
    let op = wait_op(api_addr, token, v["operation_id"].as_str().expect("id")).await;
    assert_eq!(op["status"], "completed", "{op}");
    let on_node2 = members(api_addr, token)
        .await
        .into_iter()
        .filter(|m| m.1 == "node-2")
        .count();
    assert_eq!(on_node2, 2, "{:?}", members(api_addr, token).await);

    // Clients write through the balancer; each acknowledged write is kept with when.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(
        Vec::<(String, tokio::time::Instant)>::new(),
    ));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, acked) = (stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("load-{w}-{n}");
                    let path = format!("/kv/{key}");
                    let put = probe::http_call(lb, "PUT", &path, &DEMO_HOST, key.as_bytes());
                    if let Ok((204, _, _)) = put.await {
                        acked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((key, tokio::time::Instant::now()));
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    docker(&["kill", &c.container("form-vmm-2")]);
    let killed = tokio::time::Instant::now();
    let deadline = killed + Duration::from_secs(120);
    loop {
        let m = members(api_addr, token).await;
        if m.len() == 4 && m.iter().all(|m| m.1 == "node-1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not replaced: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = killed.elapsed();
    assert!(
        took <= NODE_TIMEOUT + Duration::from_secs(10),
        "replaced after {took:?}"
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    // Every write acknowledged more than a sync interval (and a round) before the kill
    // is on every instance that serves now.
    let horizon = killed - Duration::from_millis(INTERVAL_MS + 1000);
    let old: Vec<String> = acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, at)| *at < horizon)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        old.len() > 20,
        "too few writes before the kill: {}",
        old.len()
    );
    for (id, _, address) in members(api_addr, token).await {
        let at: SocketAddr = address.parse().expect("address");
        for k in &old {
            let got = probe::http_get(at, &format!("/kv/{k}")).await;
            assert_eq!(
                got.ok(),
                Some((200, k.clone())),
                "the acknowledged write {k} is missing on {id}"
            );
        }
    }
    // Started again, the node runs none of the replaced instances.
    c.ok(&["start", "form-vmm-2"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let listed = match probe::channel(c.addr("form-vmm-2", 3002)).await {
            Ok(ch) => VmmServiceClient::new(ch)
                .list_instances(vmm_pb::ListInstancesRequest::default())
                .await
                .ok()
                .map(|r| r.into_inner().instances.len()),
            Err(_) => None,
        };
        if listed == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "form-vmm-2: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn the_compose_stack_keeps_its_promises_under_faults() {
    build_image();
    let c = Compose::new("faults", &["form-cli/tests/compose-side.yml"]);
    let lb = c.up_with_demo().await;
    let (api_addr, token) = (c.port("form-mcp", 3010), c.token());
    killed_replica_keeps_every_acknowledged_write(&c).await;
    partitioned_replica_converges_within_5_s(&c).await;
    scale_in_under_load_fails_no_request(lb, api_addr, &token).await;
    scaler_killed_mid_scale_out_rolls_back(&c, api_addr, &token).await;
    killed_vmm_node_is_replaced(&c, lb, api_addr, &token).await;
    stale_controller_is_fenced(&c, api_addr, &token).await;
}
