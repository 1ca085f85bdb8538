//! The direct HTTP/1.1 path against a backend that answers with every framing a
//! response can have: lengths, chunks with trailers, until close, interim responses
//! and HEAD; pipelined requests; and a connection handed to the general path midway.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Http, Lb};
use form_testkit::conformance::stop_gracefully;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the backend read it.
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Reads one request (head and `Content-Length` body) from `s`; `None` at the end.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        if let Ok(httparse::Status::Complete(head)) = req.parse(buf) {
            let len: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            if buf.len() >= head + len {
                let seen = Seen {
                    method: req.method.unwrap_or("").to_owned(),
                    path: req.path.unwrap_or("").to_owned(),
                    body: buf[head..head + len].to_vec(),
                };
                buf.drain(..head + len);
                return Some(seen);
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A backend whose answer depends on the path; each connection has a number, which
/// the default answer names, so reuse shows.
async fn framing_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = conns.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(req) = read_request(&mut s, &mut buf).await {
                    let reply: Vec<u8> = match (req.method.as_str(), req.path.as_str()) {
                        (_, "/chunked") => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
                        (_, "/hints") => b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                        // A buggy backend: a body after the head of a HEAD response.
                        ("HEAD", "/buggy") => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789".to_vec(),
                        ("HEAD", _) => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n".to_vec(),
                        (_, "/hang") => {
                            // Never answers; holds the connection until the client's
                            // side goes.
                            let mut rest = [0u8; 64];
                            while let Ok(n) = s.read(&mut rest).await {
                                if n == 0 {
                                    break;
                                }
                            }
                            return;
                        }
                        (_, "/close") => {
                            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil close").await;
                            return;
                        }
                        (m, p) => {
                            let body = format!(
                                "{m} {p} body={} conn={n}",
                                String::from_utf8_lossy(&req.body)
                            );
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                                .into_bytes()
                        }
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Sends `request` on a new connection and reads until the balancer closes it.
async fn exchange(lb: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(lb).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the balancer closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The number of the backend connection a default answer came on.
fn conn_of(body: &str) -> &str {
    body.rsplit_once("conn=").map_or("", |(_, n)| n)
}

#[tokio::test]
async fn every_response_framing_is_relayed_and_backend_connections_are_reused_after_it() {
    let mut lb = Lb::start("direct-framing", &[]).await;
    let (addr, task) = framing_backend().await;
    lb.route_to("demo.fog", "b", addr).await;

    // One client connection: chunks with trailers, then the same backend connection.
    let chunked = exchange(
        lb.http,
        b"GET /chunked HTTP/1.1\r\nhost: demo.fog\r\n\r\nGET /after HTTP/1.1\r\nhost: demo.fog\r\n\r\nGET /again HTTP/1.1\r\nhost: demo.fog\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        chunked.contains("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\nHTTP/1.1 200 OK"),
        "{chunked}"
    );
    let after = chunked.split("GET /after body= ").nth(1).unwrap_or("");
    let again = chunked.split("GET /again body= ").nth(1).unwrap_or("");
    assert_eq!(
        conn_of(after.split("HTTP/1.1").next().unwrap_or("")),
        conn_of(again),
        "{chunked}"
    );
    assert!(chunked.contains("connection: close\r\n"), "{chunked}");

    // Interim responses come before the final one.
    let hints = exchange(
        lb.http,
        b"GET /hints HTTP/1.1\r\nhost: demo.fog\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        hints.starts_with("HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{hints}"
    );
    assert!(hints.ends_with("\r\n\r\nok"), "{hints}");

    // A body delimited by the backend's close ends the client's connection too.
    let close = exchange(lb.http, b"GET /close HTTP/1.1\r\nhost: demo.fog\r\n\r\n").await;
    assert!(close.starts_with("HTTP/1.1 200 OK\r\n"), "{close}");
    assert!(close.contains("connection: close\r\n"), "{close}");
    assert!(close.ends_with("\r\n\r\nuntil close"), "{close}");

    // A response to HEAD has no body, whatever its length says.
    let head = exchange(
        lb.http,
        b"HEAD /x HTTP/1.1\r\nhost: demo.fog\r\n\r\nGET /next HTTP/1.1\r\nhost: demo.fog\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        head.contains("content-length: 10\r\n\r\nHTTP/1.1 200 OK"),
        "{head}"
    );
    assert!(head.contains("GET /next body="), "{head}");

    // And hyper's client agrees with all of it.
    let http = Http::new(lb.http);
    let r = http
        .get("demo.fog", "/chunked", &[])
        .await
        .expect("chunked");
    assert_eq!(r.body, "hello world");
    let r = http.get("demo.fog", "/hints", &[]).await.expect("hints");
    assert_eq!(r.body, "ok");
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_a_handoff_to_the_general_path() {
    let mut lb = Lb::start("direct-handoff", &[]).await;
    let (addr, task) = framing_backend().await;
    lb.route_to("demo.fog", "b", addr).await;
    // Plain, plain with a body, then an absolute-form target (the general path's),
    // then plain again: all on one connection, sent at once.
    let out = exchange(
        lb.http,
        b"GET /a HTTP/1.1\r\nhost: demo.fog\r\n\r\n\
          POST /b HTTP/1.1\r\nhost: demo.fog\r\ncontent-length: 3\r\n\r\nxyz\
          GET http://demo.fog/c HTTP/1.1\r\nhost: demo.fog\r\n\r\n\
          GET /d HTTP/1.1\r\nhost: demo.fog\r\nconnection: close\r\n\r\n",
    )
    .await;
    let order: Vec<usize> = [
        "GET /a body=",
        "POST /b body=xyz",
        "GET /c body=",
        "GET /d body=",
    ]
    .iter()
    .map(|m| {
        out.find(m)
            .unwrap_or_else(|| panic!("{m} missing from {out}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 4, "{out}");
    // Unknown hosts are answered by the balancer on the direct path too.
    let unknown = exchange(
        lb.http,
        b"GET / HTTP/1.1\r\nhost: nowhere.fog\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        unknown.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{unknown}"
    );
    assert!(
        unknown.ends_with("no route for host 'nowhere.fog'\n"),
        "{unknown}"
    );
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn bytes_a_backend_sends_beyond_its_response_never_reach_the_next_request() {
    let mut lb = Lb::start("direct-beyond", &[]).await;
    let (addr, task) = framing_backend().await;
    lb.route_to("demo.fog", "b", addr).await;
    let out = exchange(
        lb.http,
        b"HEAD /buggy HTTP/1.1\r\nhost: demo.fog\r\n\r\nGET /next HTTP/1.1\r\nhost: demo.fog\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(!out.contains("0123456789"), "{out}");
    assert!(
        out.contains("content-length: 10\r\n\r\nHTTP/1.1 200 OK"),
        "{out}"
    );
    assert!(
        out.ends_with("GET /next body= conn=1"),
        "a new backend connection: {out}"
    );
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}

/// Requests in flight to the route's only backend.
async fn in_flight(lb: &mut Lb) -> u32 {
    lb.stats("demo.fog").await.backends[0].in_flight
}

#[tokio::test]
async fn slow_heads_idle_connections_and_clients_that_hang_up_are_let_go() {
    let mut lb = Lb::start_configured("direct-timeouts", "header_read_timeout_ms = 400\n").await;
    let (addr, task) = framing_backend().await;
    lb.route_to("demo.fog", "b", addr).await;

    // A head that never ends, and a connection idle after a request: both closed
    // after the header timeout, not the minute of the idle timeout.
    let mut slow = TcpStream::connect(lb.http).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nhost: demo.fog\r\n")
        .await
        .expect("write");
    let mut idle = TcpStream::connect(lb.http).await.expect("connect");
    idle.write_all(b"GET /a HTTP/1.1\r\nhost: demo.fog\r\n\r\n")
        .await
        .expect("write");
    for (name, s) in [("slow head", &mut slow), ("idle", &mut idle)] {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{name}: still open after 5 s"))
            .expect("read");
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains("400") && !text.contains("408"),
            "{name}: {text}"
        );
    }

    // A client that hangs up while the backend works frees its place at once.
    let mut gone = TcpStream::connect(lb.http).await.expect("connect");
    gone.write_all(b"GET /hang HTTP/1.1\r\nhost: demo.fog\r\n\r\n")
        .await
        .expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_flight(&mut lb).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(gone);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_flight(&mut lb).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still in flight 5 s after the client left (the request timeout is 60 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    stop_gracefully(&mut lb.svc).await;
}
