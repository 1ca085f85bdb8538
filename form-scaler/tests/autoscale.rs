//! The control loop against the real platform: CPU load through the balancer
//! (`/burn`) scales the demo cluster out with clones that carry the template's keys;
//! when the load stops it scales in to `min_instances` while sticky clients send
//! steady traffic, with no failed request. A killed instance is replaced, and its
//! sessions re-pinned with at most one retry.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use form_proto::scaler::v1 as pb;
use form_proto::types::v1::ScalingPolicy;
use form_testkit::assert_eventually;

const LOOP: &[&str] = &[
    "--autoscale",
    "true",
    "--evaluate-interval-ms",
    "200",
    "--replace-after-ms",
    "300",
];

/// Sticky clients: each keeps its cookies and sends `GET /session` until stopped.
/// Counts requests and failures (`retry`: a failure is retried once first).
struct Clients {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn cookies_of(head: &str) -> Vec<String> {
    head.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("set-cookie")
                .then(|| v.trim().split(';').next().unwrap_or("").to_owned())
        })
        .collect()
}

impl Clients {
    fn start(http: std::net::SocketAddr, n: usize, retry: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|_| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut jar: Vec<String> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let mut ok = false;
                        for _ in 0..if retry { 2 } else { 1 } {
                            let cookie = (!jar.is_empty()).then(|| jar.join("; "));
                            if let Ok((200, _, head)) =
                                via_lb(http, "/session", cookie.as_deref()).await
                            {
                                for c in cookies_of(&head) {
                                    let name = c.split('=').next().unwrap_or("").to_owned();
                                    jar.retain(|j| !j.starts_with(&format!("{name}=")));
                                    jar.push(c);
                                }
                                ok = true;
                                break;
                            }
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test]
async fn cpu_load_scales_out_and_idle_scales_in_to_min_without_a_failed_request() {
    let mut stack = Stack::start("auto-burn").await;
    let mut scaler = stack.start_scaler(LOOP).await;
    scaler
        .set_policy(pb::SetPolicyRequest {
            cluster_id: CLUSTER.into(),
            policy: Some(ScalingPolicy {
                min_instances: 1,
                max_instances: 3,
                target_cpu_utilization: 0.3,
                scale_in_stabilization_seconds: 2,
                warmup_seconds: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("policy");

    let burning = Arc::new(AtomicBool::new(true));
    let burners: Vec<_> = (0..3)
        .map(|_| {
            let (burning, http) = (burning.clone(), stack.http);
            tokio::spawn(async move {
                while burning.load(Ordering::Relaxed) {
                    let _ = via_lb(http, "/burn?ms=200", None).await;
                }
            })
        })
        .collect();
    assert_eventually!(
        deadline = Duration::from_secs(40),
        async { stack.members().await.len() == 3 },
        "CPU load scales the cluster out to 3"
    );
    burning.store(false, Ordering::Relaxed);
    for b in burners {
        let _ = b.await;
    }
    for m in stack.cluster().await.members.values() {
        assert_eventually!(
            async { key_on(&m.addresses[0], "alpha").await.as_deref() == Some("value-alpha") },
            "{} carries the template's key",
            m.instance_id
        );
    }

    let clients = Clients::start(stack.http, 6, false);
    assert_eventually!(
        deadline = Duration::from_secs(60),
        async { stack.members().await == vec![TEMPLATE.to_owned()] },
        "idle, the cluster scales in to min_instances"
    );
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, failed) = clients.stop().await;
    assert!(sent > 50, "the clients sent {sent} requests");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the scale-in"
    );

    let st = scaler
        .get_status(pb::GetStatusRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .expect("status")
        .into_inner();
    let d = st.last_decision.expect("a decision");
    assert!(!d.reason.is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn a_killed_instance_is_replaced_and_its_sessions_re_pinned_with_one_retry_at_most() {
    let mut stack = Stack::start("auto-kill").await;
    let mut scaler = stack
        .start_scaler(&["--replace-after-ms", "300", "--evaluate-interval-ms", "200"])
        .await;
    let reply = scaler
        .scale(scale(form_proto::types::v1::OperationKind::ScaleOut, 3))
        .await
        .expect("scale out")
        .into_inner();
    let op = wait_op(&mut scaler, &reply.operation_id, Duration::from_secs(60)).await;
    assert_eq!(status(&op), "completed");
    let clients = Clients::start(stack.http, 6, true);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim = op.new_instances[0].clone();
    stack.kill_member(&victim).await;
    assert_eventually!(
        deadline = Duration::from_secs(30),
        async {
            let m = stack.members().await;
            m.len() == 3 && !m.contains(&victim)
        },
        "{victim} is replaced: {:?}",
        stack.members().await
    );
    assert_eventually!(stack.agree(), "members, instances and backends agree");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed) = clients.stop().await;
    assert!(sent > 50, "the clients sent {sent} requests");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed even after one retry"
    );
    let history = stack.cluster().await;
    assert!(history.members.len() == 3);
    stack.stop().await;
}

/// The template's uptime as its last heartbeat reported it.
async fn template_uptime(stack: &mut Stack) -> f64 {
    stack.cluster().await.members[TEMPLATE]
        .usage
        .map_or(0.0, |u| u.uptime_seconds)
}

/// Burns CPU on the template through the balancer until `until` says stop (within a
/// minute).
async fn burn_until(stack: &mut Stack, until: impl AsyncFn(&mut Stack) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = via_lb(stack.http, "/burn?ms=300", None).await;
        if until(stack).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the condition did not come within a minute"
        );
    }
}

#[tokio::test]
async fn a_booting_template_is_not_load_until_its_warmup_has_passed() {
    const WARMUP: u32 = 8;
    let mut stack = Stack::start("auto-warmup").await;
    let mut scaler = stack
        .start_scaler(&[LOOP, &["--metric-window-ms", "1000"]].concat())
        .await;
    scaler
        .set_policy(pb::SetPolicyRequest {
            cluster_id: CLUSTER.into(),
            policy: Some(ScalingPolicy {
                min_instances: 1,
                max_instances: 2,
                target_cpu_utilization: 0.3,
                warmup_seconds: WARMUP,
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    assert_eventually!(
        async { template_uptime(&mut stack).await > 0.0 },
        "the heartbeats carry the template's uptime"
    );
    let start = template_uptime(&mut stack).await;
    assert!(
        start < 5.0,
        "the template is young enough to test ({start} s)"
    );
    // Busy while warming up (as a VM is while it boots): not load.
    burn_until(&mut stack, async |s| template_uptime(s).await >= 6.0).await;
    let ops = stack.operations().await;
    assert!(
        ops.is_empty(),
        "a warming template scaled the cluster: {ops:?}"
    );
    assert_eq!(stack.members().await.len(), 1);
    // Once warm, the same load is load.
    burn_until(&mut stack, async |s| s.members().await.len() == 2).await;
    assert!(
        template_uptime(&mut stack).await >= f64::from(WARMUP),
        "the scale-out came after the warm-up"
    );
    stack.stop().await;
}

#[tokio::test]
async fn skipped_heartbeats_are_counted_on_the_member_and_reset_when_they_come_back() {
    let mut stack = Stack::start("auto-skipped").await;
    let _scaler = stack
        .start_scaler(&[
            "--evaluate-interval-ms",
            "100",
            "--replace-after-ms",
            "600000",
        ])
        .await;
    let skipped = async |s: &mut Stack| s.cluster().await.members[TEMPLATE].heartbeats_skipped;
    assert_eventually!(
        async { stack.cluster().await.members[TEMPLATE].last_heartbeat_ms > 0 },
        "the template heartbeats"
    );
    assert_eq!(skipped(&mut stack).await, 0);
    // The node stops (frozen): its heartbeats stop.
    stack
        .vmm
        .signal(nix::sys::signal::Signal::SIGSTOP)
        .expect("SIGSTOP");
    assert_eventually!(
        deadline = Duration::from_secs(20),
        async { skipped(&mut stack).await >= 3 },
        "the controller counts the skipped heartbeats: {}",
        skipped(&mut stack).await
    );
    stack
        .vmm
        .signal(nix::sys::signal::Signal::SIGCONT)
        .expect("SIGCONT");
    assert_eventually!(
        deadline = Duration::from_secs(20),
        async { skipped(&mut stack).await == 0 },
        "back to 0 once heartbeats come again"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_request_rate_is_a_second_signal_that_scales_out_an_idle_cpu() {
    let mut stack = Stack::start("auto-rate").await;
    let mut scaler = stack
        .start_scaler(&[LOOP, &["--metric-window-ms", "1000"]].concat())
        .await;
    scaler
        .set_policy(pb::SetPolicyRequest {
            cluster_id: CLUSTER.into(),
            policy: Some(ScalingPolicy {
                min_instances: 1,
                max_instances: 2,
                // Light requests: the CPU stays far below this.
                target_cpu_utilization: 0.9,
                target_requests_per_instance: Some(5.0),
                warmup_seconds: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("policy");
    // About 50 requests per second, 10 times the target of one instance.
    let clients = Clients::start(stack.http, 1, false);
    assert_eventually!(
        deadline = Duration::from_secs(40),
        async { stack.members().await.len() == 2 },
        "the request rate scales the cluster out"
    );
    let _ = clients.stop().await;
    let st = scaler
        .get_status(pb::GetStatusRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .expect("status")
        .into_inner();
    let ops = stack.operations().await;
    assert!(
        ops.iter().any(|o| o.reason.contains("requests/s")),
        "the scale-out names the request rate: {:?} (last decision {:?})",
        ops.iter().map(|o| &o.reason).collect::<Vec<_>>(),
        st.last_decision
    );
    // The controller's series per cluster.
    let metrics = stack
        .scaler
        .as_ref()
        .and_then(|s| s.addr("metrics"))
        .expect("metrics address");
    assert_eventually!(
        async {
            let text = form_testkit::probe::http_get(metrics, "/metrics")
                .await
                .map(|r| r.1)
                .unwrap_or_default();
            [
                "form_scaler_instances{cluster=\"demo\"} 2",
                "form_scaler_ready_instances{cluster=\"demo\"}",
                "form_scaler_decision{cluster=\"demo\"}",
                "form_scaler_cooldown_remaining_seconds{cluster=\"demo\",direction=\"in\"}",
                "form_scaler_members{cluster=\"demo\",health=\"healthy\"} 2",
                "form_scaler_operation_duration_seconds_count{kind=\"scale_out\",outcome=\"completed\"} 1",
            ]
            .iter()
            .all(|s| text.contains(s))
        },
        "the controller exports its series per cluster"
    );
    stack.stop().await;
}
