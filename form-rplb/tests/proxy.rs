//! The data plane with real sockets: routing by host, plain errors, forwarded headers,
//! streamed bodies, HTTP/2, limits, retries, health, statistics, route changes and
//! SIGTERM with requests in flight.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Http, Lb, backends, none};
use form_proto::rplb::v1 as pb;
use form_testkit::assert_eventually;
use form_testkit::backend::HttpBackend;
use form_testkit::conformance::stop_gracefully;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn routes_by_host_and_answers_404_and_503_plainly() {
    let mut lb = Lb::start("route", &[]).await;
    let http = Http::new(lb.http);
    let r = http
        .get("unknown.fog", "/whoami", &[])
        .await
        .expect("request");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("'unknown.fog'"), "{}", r.body);

    lb.route("empty.fog", none(), None, &[]).await;
    let r = http
        .get("empty.fog", "/whoami", &[])
        .await
        .expect("request");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");

    let bs = backends(2).await;
    lb.route("demo.fog", none(), None, &[&bs[0], &bs[1]]).await;
    for host in ["demo.fog", "DEMO.fog:8080", "demo.fog."] {
        let r = http.get(host, "/whoami", &[]).await.expect("request");
        assert_eq!(r.status, 200, "{host}: {}", r.body);
        assert!(r.body == "b0" || r.body == "b1", "{}", r.body);
    }
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn forwards_headers_and_streams_bodies_in_both_directions() {
    let mut lb = Lb::start("forward", &[]).await;
    let b = HttpBackend::start("b0").await;
    lb.route("demo.fog", none(), None, &[&b]).await;
    let http = Http::new(lb.http);
    let r = http
        .get(
            "demo.fog",
            "/headers",
            &[
                ("connection", "x-hop"),
                ("x-hop", "secret"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-kept", "yes"),
            ],
        )
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    let seen = r.body;
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(
        seen.contains("forwarded: for=127.0.0.1;proto=http;host=\"demo.fog\"\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("host: demo.fog\n"), "{seen}");
    assert!(seen.contains("x-kept: yes\n"), "{seen}");
    assert!(
        !seen.contains("x-hop") && !seen.contains("6.6.6.6"),
        "{seen}"
    );

    let big = Bytes::from(vec![7u8; 8 << 20]);
    let r = http
        .send("POST", "demo.fog", "/echo", &[], big)
        .await
        .expect("post");
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "8388608"));
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let mut lb = Lb::start("h2", &[]).await;
    let b = HttpBackend::start("b0").await;
    lb.route("demo.fog", none(), None, &[&b]).await;
    for _ in 0..3 {
        let uri: http::Uri = format!("http://demo.fog:{}/whoami", lb.http.port())
            .parse()
            .expect("uri");
        // Connect to the balancer's address while the :authority names the route.
        let req = http::Request::builder()
            .uri(uri)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let conn = tokio::net::TcpStream::connect(lb.http)
            .await
            .expect("connect");
        let (mut send, driver) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(conn),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(driver);
        let resp = send.send_request(req).await.expect("h2 response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"b0");
    }
    stop_gracefully(&mut lb.svc).await;
}

async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_400_and_431_and_others_are_still_served() {
    let mut lb = Lb::start("limits", &[]).await;
    let b = HttpBackend::start("b0").await;
    lb.route("demo.fog", none(), None, &[&b]).await;
    let malformed = raw(lb.http, b"GARBAGE \x01\x02\r\n\r\n").await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let huge = format!(
        "GET /whoami HTTP/1.1\r\nhost: demo.fog\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let r = raw(lb.http, huge.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = raw(
        lb.http,
        format!("GET /whoami HTTP/1.1\r\nhost: demo.fog\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let no_host = raw(lb.http, b"GET /whoami HTTP/1.0\r\n\r\n").await;
    assert!(
        no_host.starts_with("HTTP/1.0 400") || no_host.starts_with("HTTP/1.1 400"),
        "{no_host}"
    );
    assert!(no_host.contains("Host"), "{no_host}");
    let ok = Http::new(lb.http)
        .get("demo.fog", "/whoami", &[])
        .await
        .expect("request");
    assert_eq!((ok.status.as_u16(), ok.body.as_str()), (200, "b0"));
    stop_gracefully(&mut lb.svc).await;
}

fn checks(interval_ms: u32, fall: u32) -> pb::HealthCheckConfig {
    pb::HealthCheckConfig {
        path: "/healthz".into(),
        interval_ms,
        timeout_ms: 500,
        rise: 2,
        fall,
    }
}

#[tokio::test]
async fn a_connect_failure_is_retried_elsewhere_and_the_client_sees_success() {
    let mut lb = Lb::start("retry", &[]).await;
    let live = HttpBackend::start("live").await;
    let dead = HttpBackend::start("dead").await;
    dead.kill();
    // No active checks: only the retry and passive ejection protect the client.
    lb.route("demo.fog", none(), None, &[&live, &dead]).await;
    let http = Http::new(lb.http);
    for i in 0..40 {
        let r = http.get("demo.fog", "/whoami", &[]).await.expect("request");
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (200, "live"),
            "request {i}"
        );
    }
    // Five consecutive connect failures ejected the dead one.
    let states = lb.states("demo.fog").await;
    assert!(
        states.contains(&("dead".into(), pb::BackendState::Ejected)),
        "{states:?}"
    );
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn a_killed_backend_leaves_rotation_within_interval_times_fall_and_comes_back() {
    let mut lb = Lb::start("health", &[]).await;
    let bs = backends(2).await;
    let (interval, fall) = (200u32, 3u32);
    lb.route(
        "demo.fog",
        none(),
        Some(checks(interval, fall)),
        &[&bs[0], &bs[1]],
    )
    .await;
    bs[1].set_healthy(false);
    let t0 = Instant::now();
    assert_eventually!(
        async {
            lb.states("demo.fog")
                .await
                .contains(&("b1".into(), pb::BackendState::Ejected))
        },
        "b1 ejected"
    );
    let took = t0.elapsed();
    // One interval of phase, one of slack for a loaded machine and this test's polling,
    // on top of interval x fall.
    let bound =
        Duration::from_millis(u64::from(interval * (fall + 2))) + Duration::from_millis(500);
    assert!(took <= bound, "ejected after {took:?}, bound {bound:?}");
    let http = Http::new(lb.http);
    for _ in 0..20 {
        let r = http.get("demo.fog", "/whoami", &[]).await.expect("request");
        assert_eq!(r.body, "b0");
    }
    bs[1].set_healthy(true);
    assert_eventually!(
        async {
            lb.states("demo.fog")
                .await
                .contains(&("b1".into(), pb::BackendState::Active))
        },
        "b1 back after rise passed checks"
    );
    stop_gracefully(&mut lb.svc).await;
}

/// Sends `n` requests to `/healthz` of demo.fog, whose backends all answer 503: each
/// must get a backend's 503, not the balancer's own (which has `Retry-After`), so no
/// ejection left the route without a backend taking new requests.
async fn all_answered_by_a_failing_backend(lb: &Lb, n: usize) {
    let http = Http::new(lb.http);
    for i in 0..n {
        let r = http
            .get("demo.fog", "/healthz", &[])
            .await
            .expect("request");
        assert_eq!(r.status.as_u16(), 503, "request {i}");
        assert!(
            r.headers.get("retry-after").is_none(),
            "request {i} was answered by the balancer, not a backend: no backend serving"
        );
    }
}

#[tokio::test]
async fn failures_every_backend_shares_eject_at_most_half_of_them() {
    let mut lb = Lb::start("eject-half", &[]).await;
    let bs = [
        HttpBackend::start("b0").await,
        HttpBackend::start("b1").await,
    ];
    // Both answer 503 on /healthz: an error of the application, not of one instance.
    for b in &bs {
        b.set_healthy(false);
    }
    lb.route("demo.fog", none(), None, &[&bs[0], &bs[1]]).await;
    all_answered_by_a_failing_backend(&lb, 40).await;
    let states = lb.states("demo.fog").await;
    let ejected = states
        .iter()
        .filter(|(_, s)| *s == pb::BackendState::Ejected)
        .count();
    assert_eq!(ejected, 1, "one of two may go, not both: {states:?}");
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn an_ejection_limit_of_0_keeps_a_failing_backend_in_rotation() {
    let mut lb = Lb::start_configured("eject-off", "max_ejection_percent = 0\n").await;
    let bs = [
        HttpBackend::start("b0").await,
        HttpBackend::start("b1").await,
    ];
    // b0 alone fails: with the default limit its fifth failure in a row ejects it.
    bs[0].set_healthy(false);
    lb.route("demo.fog", none(), None, &[&bs[0], &bs[1]]).await;
    let http = Http::new(lb.http);
    let mut failed = 0;
    for _ in 0..40 {
        let r = http
            .get("demo.fog", "/healthz", &[])
            .await
            .expect("request");
        failed += usize::from(r.status.as_u16() == 503);
    }
    assert!(failed >= 5, "b0 answered {failed} of 40 requests");
    let states = lb.states("demo.fog").await;
    assert!(
        states.iter().all(|(_, s)| *s == pb::BackendState::Active),
        "passive ejection is off: {states:?}"
    );
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn passive_ejection_never_takes_the_last_backend_serving_new_requests() {
    let mut lb = Lb::start("eject-last", &[]).await;
    let (old, new) = (
        HttpBackend::start("old").await,
        HttpBackend::start("new").await,
    );
    for b in [&old, &new] {
        b.set_healthy(false);
    }
    // A rolling replacement: `old` drains for a minute, `new` alone takes new requests.
    lb.control
        .upsert_route(pb::UpsertRouteRequest {
            route: Some(pb::Route {
                domain: "demo.fog".into(),
                cluster_id: "demo".into(),
                drain: Some(pb::ConnectionDrainConfig {
                    grace_period_seconds: 60,
                    wait_for_connections: false,
                    notify_clients: false,
                }),
                backends: vec![common::backend(&old), common::backend(&new)],
                ..Default::default()
            }),
        })
        .await
        .expect("route");
    lb.set_backends_draining("demo.fog", &[&new]).await;
    assert!(
        lb.states("demo.fog")
            .await
            .contains(&("old".into(), pb::BackendState::Draining)),
        "old drains"
    );
    all_answered_by_a_failing_backend(&lb, 20).await;
    let states = lb.states("demo.fog").await;
    assert!(
        states.contains(&("new".into(), pb::BackendState::Active)),
        "{states:?}"
    );
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn stats_count_requests_latency_and_errors_per_backend() {
    let mut lb = Lb::start("stats", &[]).await;
    let b = HttpBackend::start("b0").await;
    lb.route("demo.fog", none(), None, &[&b]).await;
    let http = Http::new(lb.http);
    for _ in 0..10 {
        http.get("demo.fog", "/slow/5", &[]).await.expect("request");
    }
    let stats = lb.stats("demo.fog").await;
    let s = &stats.backends[0];
    assert_eq!(
        (s.id.as_str(), s.requests_total, s.errors_total, s.in_flight),
        ("b0", 10, 0, 0)
    );
    assert!(
        s.latency_p50_ms >= 4.0 && s.latency_p99_ms >= s.latency_p50_ms,
        "{s:?}"
    );
    assert!(s.requests_per_second > 0.0, "{s:?}");
    let err = lb
        .control
        .get_stats(pb::GetStatsRequest {
            domain: "nowhere.fog".into(),
        })
        .await
        .expect_err("unknown route");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // The same figures reach Prometheus.
    let metrics = lb.svc.addr("metrics").expect("metrics address");
    assert_eventually!(
        async {
            form_testkit::probe::http_get(metrics, "/metrics")
                .await
                .is_ok_and(|(_, body)| {
                    body.contains(
                        "form_rplb_backend_requests_total{domain=\"demo.fog\",backend=\"b0\"} 10",
                    )
                })
        },
        "metrics published"
    );
    // A backend taken out of the route takes its series with it.
    let b1 = HttpBackend::start("b1").await;
    lb.route("demo.fog", none(), None, &[&b1]).await;
    let (_, body) = form_testkit::probe::http_get(metrics, "/metrics")
        .await
        .expect("metrics");
    assert!(!body.contains("backend=\"b0\""), "{body}");
    assert!(
        body.contains("form_rplb_backend_in_flight{domain=\"demo.fog\",backend=\"b1\"} 0"),
        "{body}"
    );
    assert!(body.contains("form_rplb_routes 1\n"), "{body}");
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn route_changes_take_effect_at_once_without_dropping_requests_in_flight() {
    let mut lb = Lb::start("swap", &[]).await;
    let bs = backends(2).await;
    lb.route("demo.fog", none(), None, &[&bs[0]]).await;
    let http = Http::new(lb.http);
    let slow = {
        let http = http.clone();
        tokio::spawn(async move { http.get("demo.fog", "/slow/1500", &[]).await })
    };
    assert_eventually!(async { bs[0].hits() == 1 }, "slow request reached b0");
    lb.set_backends("demo.fog", &[&bs[1]]).await;
    for _ in 0..5 {
        let r = http.get("demo.fog", "/whoami", &[]).await.expect("request");
        assert_eq!(r.body, "b1", "the new set serves at once");
    }
    let r = slow.await.expect("join").expect("slow request");
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "b0"));
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn bad_control_requests_are_refused_with_what_is_accepted() {
    let mut lb = Lb::start("control", &[]).await;
    let err = lb
        .control
        .upsert_route(pb::UpsertRouteRequest {
            route: Some(pb::Route {
                domain: "bad domain".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("bad domain");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("'bad domain'") && err.message().contains("expected"),
        "{}",
        err.message()
    );
    let err = lb
        .control
        .set_backends(pb::SetBackendsRequest {
            domain: "nowhere.fog".into(),
            backends: vec![],
            drain_removed: false,
        })
        .await
        .expect_err("no route");
    assert_eq!(err.code(), tonic::Code::NotFound);
    lb.route("demo.fog", none(), None, &[]).await;
    let err = lb
        .control
        .set_backends(pb::SetBackendsRequest {
            domain: "demo.fog".into(),
            backends: vec![pb::Backend {
                id: "x".into(),
                address: "no-port".into(),
                weight: 1,
                state: 0,
            }],
            drain_removed: false,
        })
        .await
        .expect_err("bad address");
    assert!(
        err.message().contains("backend 'x' address"),
        "{}",
        err.message()
    );
    // The cloud metadata service is never a backend (it would hand out the node's
    // credentials to whoever reaches the balancer).
    let err = lb
        .control
        .set_backends(pb::SetBackendsRequest {
            domain: "demo.fog".into(),
            backends: vec![pb::Backend {
                id: "meta".into(),
                address: "169.254.169.254:80".into(),
                weight: 1,
                state: 0,
            }],
            drain_removed: false,
        })
        .await
        .expect_err("metadata address");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("link-local"), "{}", err.message());
    let err = lb
        .control
        .drain_backend(pb::DrainBackendRequest {
            domain: "demo.fog".into(),
            backend_id: "ghost".into(),
            drain: None,
        })
        .await
        .expect_err("no backend");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("'ghost'"), "{}", err.message());
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn sigterm_stops_accepting_and_finishes_requests_in_flight() {
    let mut lb = Lb::start("sigterm", &[]).await;
    let b = HttpBackend::start("b0").await;
    lb.route("demo.fog", none(), None, &[&b]).await;
    let http = Http::new(lb.http);
    let slow = {
        let http = http.clone();
        tokio::spawn(async move { http.get("demo.fog", "/slow/1500", &[]).await })
    };
    assert_eventually!(async { b.hits() == 1 }, "slow request in flight");
    lb.svc
        .signal(form_testkit::Signal::SIGTERM)
        .expect("SIGTERM");
    // While the slow request is still in flight, new connections are refused.
    assert_eventually!(
        async { tokio::net::TcpStream::connect(lb.http).await.is_err() },
        "stopped accepting"
    );
    assert!(!slow.is_finished(), "the slow request was still in flight");
    let r = slow.await.expect("join").expect("finished after SIGTERM");
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "b0"));
    let status = lb
        .svc
        .wait_timeout(Duration::from_secs(5))
        .await
        .expect("wait")
        .expect("exited within the grace");
    assert_eq!(status.code(), Some(0), "{}", lb.svc.log_tail());
    assert!(
        !lb.svc.log_tail().contains("grace period over"),
        "requests finished within the grace: {}",
        lb.svc.log_tail()
    );
}

/// Reads up to the end of a request head (with what came after it); None if the
/// connection ended first.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(got)
}

/// A backend that answers one request per connection without saying so (no
/// `Connection: close`) and then closes it: every pooled connection goes stale.
async fn closing_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn pooled_connections_closed_by_the_backend_are_replaced_without_failing_requests() {
    let mut lb = Lb::start("stale", &[]).await;
    let (addr, task) = closing_backend().await;
    lb.route_to("demo.fog", "closer", addr).await;
    let http = Http::new(lb.http);
    for i in 0..60 {
        let r = http.get("demo.fog", "/", &[]).await.expect("request");
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (200, "stale"),
            "request {i}"
        );
        // Sometimes right away (the close not yet seen), sometimes after it.
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}

/// A backend that answers one keep-alive request and reports when the balancer closes
/// the connection.
async fn one_request_backend() -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        if read_head(&mut s).await.is_none() {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nkept")
            .await;
        // Keep-alive as long as the balancer wants: until it closes its end.
        let mut buf = [0u8; 512];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    (addr, closed_rx, task)
}

#[tokio::test]
async fn an_idle_upstream_connection_closes_though_no_request_follows() {
    let mut lb = Lb::start("idle-sweep", &[]).await;
    let (addr, closed, task) = one_request_backend().await;
    lb.route_to("demo.fog", "keeper", addr).await;
    let r = Http::new(lb.http)
        .get("demo.fog", "/", &[])
        .await
        .expect("request");
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "kept"));
    // Expired after 4 s idle, swept by the thread's timer within another 4 s.
    tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("the pooled connection is closed within 20 s")
        .expect("the backend saw the close");
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}

/// A backend that answers a POST as soon as its head arrives (as a server refusing an
/// upload does), then reads the body slowly; GETs get "get".
async fn early_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Some(got) = read_head(&mut s).await else {
                        return;
                    };
                    let post = got.starts_with(b"POST");
                    let reply: &[u8] = if post {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nget"
                    };
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                    if post {
                        // Drain the upload as it trickles in, forever.
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                        }
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_connection_still_uploading_an_earlier_body_is_not_reused() {
    let mut lb = Lb::start_configured("early", "http_workers = 1\n").await;
    let (addr, task) = early_backend().await;
    lb.route_to("demo.fog", "early", addr).await;
    // An upload that stalls after its first bytes, answered early.
    let mut uploader = tokio::net::TcpStream::connect(lb.http)
        .await
        .expect("connect");
    uploader
        .write_all(
            b"POST /up HTTP/1.1\r\nhost: demo.fog\r\ncontent-length: 1000000\r\n\r\nfirst bytes",
        )
        .await
        .expect("write");
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), uploader.read(&mut head))
        .await
        .expect("early answer")
        .expect("read");
    assert!(String::from_utf8_lossy(&head[..n]).contains("early"));
    // The same thread's next requests must not wait for that upload.
    let http = Http::new(lb.http);
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(5), http.get("demo.fog", "/", &[]))
            .await
            .expect("not stuck behind the upload")
            .expect("request");
        assert_eq!(r.body, "get");
    }
    drop(uploader);
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn backends_outside_the_backend_networks_are_refused_naming_them() {
    let mut lb = Lb::start(
        "rplb-backend-networks",
        &["--backend-networks", "10.9.0.0/16"],
    )
    .await;
    let set = |address: &str| pb::SetBackendsRequest {
        domain: "demo.fog".into(),
        backends: vec![pb::Backend {
            id: "b".into(),
            address: address.into(),
            weight: 1,
            state: 0,
        }],
        drain_removed: false,
    };
    let err = lb
        .control
        .upsert_route(pb::UpsertRouteRequest {
            route: Some(pb::Route {
                domain: "demo.fog".into(),
                cluster_id: "demo".into(),
                backends: set("127.0.0.1:8080").backends,
                ..Default::default()
            }),
        })
        .await
        .expect_err("loopback is outside");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for w in ["backend 'b' address", "127.0.0.1", "10.9.0.0/16"] {
        assert!(err.message().contains(w), "'{w}' not in {}", err.message());
    }
    // A name could resolve anywhere: with networks set, only IPs are taken.
    let err = lb
        .control
        .set_backends(set("instance.example:8080"))
        .await
        .expect_err("a name");
    assert!(err.message().contains("is a name"), "{}", err.message());
    lb.control
        .upsert_route(pb::UpsertRouteRequest {
            route: Some(pb::Route {
                domain: "demo.fog".into(),
                cluster_id: "demo".into(),
                backends: set("10.9.1.2:8080").backends,
                ..Default::default()
            }),
        })
        .await
        .expect("inside the networks");
    assert_eq!(lb.listed("demo.fog").await.backends.len(), 1);
    stop_gracefully(&mut lb.svc).await;
}
