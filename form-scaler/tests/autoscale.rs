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
