//! Draining under load: for 10 s clients send a steady stream of requests (new
//! sessions, sessions pinned by cookie, over HTTP/1 and HTTP/2) while one of 3 backends
//! is drained. No request fails; no new unpinned request reaches the drained backend
//! after the drain started; its pinned sessions are served there until the grace period
//! ends and re-pinned afterwards; HTTP/1 clients get `Connection: close` and HTTP/2
//! clients a GOAWAY; `DrainBackend` streams progress and ends with the result.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Http, Lb, backends, cookie};
use form_proto::rplb::v1 as pb;
use form_testkit::conformance::stop_gracefully;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const LOAD: Duration = Duration::from_secs(10);
const DRAIN_AT: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(5);
/// Margin around the drain's edges for requests whose timing straddles them.
const EDGE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
struct Record {
    sent: Instant,
    /// When the whole response was read.
    received: Instant,
    /// Backend named by the cookie sent, if any.
    pinned_to: Option<String>,
    answered_by: String,
    new_cookie: bool,
    conn_close: bool,
}

#[derive(Default)]
struct Tally {
    failures: AtomicU64,
    goaways: AtomicU64,
    /// Requests the client never sent because the connection was closing (HTTP/2:
    /// opened after the GOAWAY arrived), sent again on a new connection as every
    /// client does (hyper's pooled client, browsers).
    unsent: AtomicU64,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(
        hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        Arc<AtomicBool>,
    ),
}

async fn connect(addr: std::net::SocketAddr, h2: bool, tally: &Arc<Tally>) -> Sender {
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    if h2 {
        let (send, driver) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        let ended = Arc::new(AtomicBool::new(false));
        let (flag, tally) = (ended.clone(), tally.clone());
        tokio::spawn(async move {
            // The connection ends cleanly only when the balancer sent a GOAWAY.
            if driver.await.is_ok() {
                tally.goaways.fetch_add(1, Ordering::Relaxed);
            }
            flag.store(true, Ordering::Relaxed);
        });
        Sender::H2(send, ended)
    } else {
        let (send, driver) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(driver);
        Sender::H1(send)
    }
}

fn cookie_of(resp: &http::HeaderMap) -> Option<String> {
    resp.get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            v.split(';')
                .next()?
                .strip_prefix("FORM=")
                .map(str::to_owned)
        })
}

/// Sends requests until `until`; keeps the cookie it gets when `sticky`.
async fn worker(
    addr: std::net::SocketAddr,
    h2: bool,
    mut cookie: Option<String>,
    sticky: bool,
    until: Instant,
    tally: Arc<Tally>,
) -> Vec<Record> {
    let mut out = Vec::new();
    let mut sender: Option<Sender> = None;
    while Instant::now() < until {
        let usable = match &sender {
            Some(Sender::H1(s)) => !s.is_closed(),
            Some(Sender::H2(s, ended)) => !s.is_closed() && !ended.load(Ordering::Relaxed),
            None => false,
        };
        if !usable {
            sender = Some(connect(addr, h2, &tally).await);
        }
        let mut req = Request::builder().uri("/whoami").header("host", "demo.fog");
        if h2 {
            req = Request::builder().uri(format!("http://demo.fog:{}/whoami", addr.port()));
        }
        if let Some(c) = &cookie {
            req = req.header("cookie", format!("FORM={c}"));
        }
        let req = req.body(Empty::<Bytes>::new()).expect("request");
        let sent = Instant::now();
        let resp = match sender.as_mut().expect("connected") {
            Sender::H1(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            Sender::H2(s, _) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) if e.is_canceled() => {
                eprintln!("unsent (h2 {h2}): {e}");
                tally.unsent.fetch_add(1, Ordering::Relaxed);
                sender = None;
                continue;
            }
            Err(e) => {
                eprintln!("request failed (h2 {h2}, cookie {cookie:?}): {e}");
                tally.failures.fetch_add(1, Ordering::Relaxed);
                sender = None;
                continue;
            }
        };
        let status = resp.status();
        let conn_close = resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let fresh = cookie_of(resp.headers());
        let body = match resp.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => {
                eprintln!("body failed: {e}");
                tally.failures.fetch_add(1, Ordering::Relaxed);
                sender = None;
                continue;
            }
        };
        if status != 200 {
            eprintln!("status {status}: {body}");
            tally.failures.fetch_add(1, Ordering::Relaxed);
        }
        out.push(Record {
            sent,
            received: Instant::now(),
            pinned_to: cookie
                .as_ref()
                .and_then(|c| c.split('~').next().map(str::to_owned)),
            answered_by: body,
            new_cookie: fresh.is_some(),
            conn_close,
        });
        if sticky && fresh.is_some() {
            cookie = fresh;
        }
        if conn_close {
            sender = None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// Starts sessions until `want` of them are pinned to `backend`.
async fn sessions_on(http: &Http, backend: &str, want: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..500 {
        let r = http.get("demo.fog", "/whoami", &[]).await.expect("request");
        if r.body == backend {
            got.push(r.set_cookie("FORM").expect("cookie"));
            if got.len() == want {
                return got;
            }
        }
    }
    panic!("no {want} sessions on {backend}");
}

#[tokio::test]
async fn draining_under_load_fails_nothing_and_keeps_pinned_sessions_until_the_grace_ends() {
    let mut lb = Lb::start("drain", &[]).await;
    let bs = backends(3).await;
    lb.route("demo.fog", cookie(), None, &[&bs[0], &bs[1], &bs[2]])
        .await;
    let http = Http::new(lb.http);
    let on_b0 = sessions_on(&http, "b0", 4).await;
    let on_b1 = sessions_on(&http, "b1", 1).await;

    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let until = t0 + LOAD;
    let mut workers = tokio::task::JoinSet::new();
    // Pinned to b0: three over HTTP/1, one over HTTP/2; one pinned to b1; two that
    // start a new session with every request, one per protocol.
    for (i, c) in on_b0.iter().enumerate() {
        workers.spawn(worker(
            lb.http,
            i == 3,
            Some(c.clone()),
            true,
            until,
            tally.clone(),
        ));
    }
    workers.spawn(worker(
        lb.http,
        false,
        Some(on_b1[0].clone()),
        true,
        until,
        tally.clone(),
    ));
    workers.spawn(worker(lb.http, false, None, false, until, tally.clone()));
    workers.spawn(worker(lb.http, true, None, false, until, tally.clone()));

    tokio::time::sleep(DRAIN_AT).await;
    let drain_requested = Instant::now();
    let mut progress = lb
        .control
        .drain_backend(pb::DrainBackendRequest {
            domain: "demo.fog".into(),
            backend_id: "b0".into(),
            drain: Some(pb::ConnectionDrainConfig {
                grace_period_seconds: GRACE.as_secs() as u32,
                wait_for_connections: false,
                notify_clients: true,
            }),
        })
        .await
        .expect("drain starts")
        .into_inner();
    let drain_started = Instant::now();
    // The drain started between these two instants, so its grace period ended
    // between these two.
    let (grace_over_earliest, grace_over) = (drain_requested + GRACE, drain_started + GRACE);
    let mut messages = Vec::new();
    while let Some(m) = progress.message().await.expect("progress") {
        messages.push(m);
    }
    let records: Vec<Record> = workers.join_all().await.into_iter().flatten().collect();

    assert_eq!(tally.failures.load(Ordering::Relaxed), 0, "failed requests");
    assert!(
        records.len() > 1000,
        "steady load: {} requests",
        records.len()
    );
    // No new unpinned request reached b0 once the drain started.
    let unpinned_to_b0 = records
        .iter()
        .filter(|r| {
            r.sent >= drain_started
                && r.answered_by == "b0"
                && (r.pinned_to.is_none() || r.new_cookie)
        })
        .count();
    assert_eq!(unpinned_to_b0, 0, "new requests to the draining backend");
    // b0's sessions: served by b0 during the grace period, re-pinned after it.
    let pinned_b0 = |from: Instant, to: Instant| {
        records
            .iter()
            .filter(move |r| r.sent >= from && r.sent < to && r.pinned_to.as_deref() == Some("b0"))
    };
    let during: Vec<_> = pinned_b0(drain_started, grace_over_earliest - EDGE).collect();
    assert!(
        during.len() > 100,
        "pinned requests during the grace: {}",
        during.len()
    );
    assert!(
        during
            .iter()
            .all(|r| r.answered_by == "b0" && !r.new_cookie),
        "pinned sessions kept until the grace ends"
    );
    let after: Vec<_> = pinned_b0(grace_over + EDGE, until).collect();
    assert!(
        after.iter().all(|r| r.answered_by != "b0" && r.new_cookie),
        "re-pinned after the grace"
    );
    // The b0 sessions moved elsewhere and stayed there.
    let late = records
        .iter()
        .filter(|r| r.sent >= grace_over + EDGE)
        .count();
    assert!(
        late > 100
            && records
                .iter()
                .filter(|r| r.sent >= grace_over + EDGE)
                .all(|r| r.answered_by != "b0")
    );
    // Clients were told to reconnect.
    assert!(
        records
            .iter()
            .any(|r| r.sent >= drain_started && r.answered_by == "b0" && r.conn_close),
        "HTTP/1 clients of the draining backend got Connection: close"
    );
    assert!(
        tally.goaways.load(Ordering::Relaxed) > 0,
        "HTTP/2 clients got a GOAWAY"
    );
    assert!(
        records
            .iter()
            .filter(|r| r.received < drain_requested)
            .all(|r| !r.conn_close)
    );
    // Progress, then the result.
    let last = messages.last().expect("progress messages");
    assert!(
        [pb::DrainResult::Completed, pb::DrainResult::TimedOut].contains(&last.result()),
        "{last:?}"
    );
    assert!(messages.len() >= 5, "{} progress messages", messages.len());
    assert!(
        messages.iter().any(|m| m.pinned_sessions >= 4),
        "{messages:?}"
    );
    assert!(messages[0].seconds_left > messages[messages.len() - 2].seconds_left);
    let states = lb.states("demo.fog").await;
    assert!(
        states.contains(&("b0".into(), pb::BackendState::Drained)),
        "{states:?}"
    );
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn wait_for_connections_completes_as_soon_as_requests_finish() {
    let mut lb = Lb::start("drain-wait", &[]).await;
    let bs = backends(2).await;
    lb.route("demo.fog", common::none(), None, &[&bs[0], &bs[1]])
        .await;
    let http = Http::new(lb.http);
    // One slow request on b0 (the only backend at first).
    lb.set_backends("demo.fog", &[&bs[0]]).await;
    let slow = {
        let http = http.clone();
        tokio::spawn(async move { http.get("demo.fog", "/slow/1000", &[]).await })
    };
    form_testkit::assert_eventually!(async { bs[0].hits() == 1 }, "slow request in flight");
    lb.set_backends("demo.fog", &[&bs[0], &bs[1]]).await;
    let t = Instant::now();
    let mut progress = lb
        .control
        .drain_backend(pb::DrainBackendRequest {
            domain: "demo.fog".into(),
            backend_id: "b0".into(),
            drain: Some(pb::ConnectionDrainConfig {
                grace_period_seconds: 60,
                wait_for_connections: true,
                notify_clients: false,
            }),
        })
        .await
        .expect("drain")
        .into_inner();
    let mut last = None;
    while let Some(m) = progress.message().await.expect("progress") {
        last = Some(m);
    }
    let last = last.expect("a result");
    assert_eq!(last.result(), pb::DrainResult::Completed);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "completed long before the 60 s grace"
    );
    let r = slow.await.expect("join").expect("slow request");
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "b0"));
    for _ in 0..10 {
        assert_eq!(
            http.get("demo.fog", "/whoami", &[])
                .await
                .expect("request")
                .body,
            "b1"
        );
    }
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn backends_removed_with_drain_leave_when_their_drain_ends() {
    let mut lb = Lb::start("drain-remove", &[]).await;
    let bs = backends(2).await;
    lb.route("demo.fog", common::none(), None, &[&bs[0], &bs[1]])
        .await;
    lb.set_backends_draining("demo.fog", &[&bs[1]]).await;
    // Idle, with the default wait_for_connections: the drain ends at once and b0 goes.
    form_testkit::assert_eventually!(
        async { lb.states("demo.fog").await == vec![("b1".to_owned(), pb::BackendState::Active)] },
        "b0 left after its drain"
    );
    stop_gracefully(&mut lb.svc).await;
}

async fn drain_now(lb: &mut Lb, id: &str) -> pb::DrainResult {
    let mut progress = lb
        .control
        .drain_backend(pb::DrainBackendRequest {
            domain: "demo.fog".into(),
            backend_id: id.into(),
            drain: None,
        })
        .await
        .expect("drain")
        .into_inner();
    let mut last = None;
    while let Some(m) = progress.message().await.expect("progress") {
        last = Some(m.result());
    }
    last.expect("a result")
}

#[tokio::test]
async fn a_drained_backend_listed_again_is_active_and_one_removed_with_drain_leaves() {
    let mut lb = Lb::start("drain-again", &[]).await;
    let bs = backends(2).await;
    lb.route("demo.fog", common::none(), None, &[&bs[0], &bs[1]])
        .await;
    assert_eq!(drain_now(&mut lb, "b0").await, pb::DrainResult::Completed);
    assert!(
        lb.states("demo.fog")
            .await
            .contains(&("b0".into(), pb::BackendState::Drained))
    );
    // Listed again: active, and serving.
    lb.set_backends("demo.fog", &[&bs[0], &bs[1]]).await;
    assert!(
        lb.states("demo.fog")
            .await
            .contains(&("b0".into(), pb::BackendState::Active))
    );
    let http = Http::new(lb.http);
    form_testkit::assert_eventually!(
        async {
            http.get("demo.fog", "/whoami", &[])
                .await
                .is_ok_and(|r| r.body == "b0")
        },
        "b0 serves again"
    );
    // Drained, then removed with drain_removed: it leaves at once.
    assert_eq!(drain_now(&mut lb, "b0").await, pb::DrainResult::Completed);
    lb.set_backends_draining("demo.fog", &[&bs[1]]).await;
    form_testkit::assert_eventually!(
        async { lb.states("demo.fog").await == vec![("b1".to_owned(), pb::BackendState::Active)] },
        "the drained backend left"
    );
    stop_gracefully(&mut lb.svc).await;
}
