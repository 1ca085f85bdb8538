//! The balancer's HTTPS listener against the real binary: certificates chosen by SNI
//! (exact names, wildcards, a default), HTTP/1.1 and HTTP/2 (ALPN) over TLS, the
//! scheme told to backends, renewed files taken without a restart, and what it refuses.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{BIN, Http, Lb, none};
use form_runtime::tls::pki::Ca;
use form_testkit::TestDir;
use form_testkit::backend::HttpBackend;
use form_testkit::conformance::{self, stop_gracefully};
use form_testkit::probe::HttpsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const LIFETIME: Duration = Duration::from_secs(3600);

async fn connect(
    addr: SocketAddr,
    ca: &Ca,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    client(ca, sni).connect(addr, alpn).await
}

fn client(ca: &Ca, sni: &str) -> HttpsClient {
    HttpsClient {
        ca_pem: ca.cert_pem.clone(),
        sni: sni.to_owned(),
    }
}

/// GET `path` for `host` over HTTP/1.1 on TLS with SNI `sni`: status and body.
async fn get(addr: SocketAddr, ca: &Ca, sni: &str, host: &str, path: &str) -> (u16, String) {
    let (status, _, body) = client(ca, sni)
        .call(addr, "GET", path, &[("host", host)], b"")
        .await
        .unwrap_or_else(|e| panic!("GET {path} over TLS to {sni}: {e}"));
    (status, body)
}

/// The DNS names of the certificate served for `sni`.
async fn served_names(addr: SocketAddr, ca: &Ca, sni: &str) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let s = connect(addr, ca, sni, &[]).await.expect("TLS");
    let der = s.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    let (_, cert) = X509Certificate::from_der(&der).expect("x509");
    let san = cert.subject_alternative_name().expect("san").expect("san");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// A balancer serving HTTPS with certificates for `a.test` and `*.wild.test`.
async fn start(name: &str) -> (Lb, Ca, TestDir, SocketAddr) {
    let ca = Ca::generate("rplb https test").expect("CA");
    let certs = TestDir::new(&format!("{name}-certs"));
    for names in [&["a.test"][..], &["*.wild.test"][..]] {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        ca.issue_domains(&names, LIFETIME)
            .and_then(|i| i.write_pair(certs.path(), &names[0].replace('*', "_")))
            .expect("certificate");
    }
    let dir = certs.path().to_str().expect("utf-8").to_owned();
    let lb = Lb::start(
        name,
        &["--listen-https", "127.0.0.1:0", "--https-certs", &dir],
    )
    .await;
    let https = lb.svc.addr("https").expect("https address");
    (lb, ca, certs, https)
}

#[tokio::test]
async fn serves_each_domain_its_certificate_and_tells_backends_the_scheme() {
    let (mut lb, ca, _certs, https) = start("rplb-https-sni").await;
    let b = HttpBackend::start("b1").await;
    lb.route("a.test", none(), None, &[&b]).await;
    lb.route("x.wild.test", none(), None, &[&b]).await;

    assert_eq!(served_names(https, &ca, "a.test").await, ["a.test"]);
    assert_eq!(
        served_names(https, &ca, "x.wild.test").await,
        ["*.wild.test"]
    );

    // The direct path (a plain GET) over TLS, with the scheme given to the backend.
    let (status, body) = get(https, &ca, "a.test", "a.test", "/headers").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    assert!(body.contains("proto=https"), "{body}");
    let (status, body) = get(https, &ca, "x.wild.test", "x.wild.test", "/whoami").await;
    assert_eq!((status, body.as_str()), (200, "b1"));
    // The plain listener still says http.
    let plain = Http::new(lb.http)
        .get("a.test", "/headers", &[])
        .await
        .expect("http");
    assert_eq!(plain.status, 200);
    assert!(
        plain.body.contains("x-forwarded-proto: http\n"),
        "{}",
        plain.body
    );

    // The general path: a chunked request body is handed to hyper.
    let mut s = connect(https, &ca, "a.test", &[b"http/1.1"])
        .await
        .expect("TLS");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with("\r\n\r\n5"), "{raw}");
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn speaks_http2_when_the_client_offers_it() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (mut lb, ca, _certs, https) = start("rplb-https-h2").await;
    let b = HttpBackend::start("h2-backend").await;
    lb.route("a.test", none(), None, &[&b]).await;
    let s = connect(https, &ca, "a.test", &[b"h2", b"http/1.1"])
        .await
        .expect("TLS");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let req = http::Request::get("https://a.test/headers")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    driver.abort();
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn refuses_names_it_has_no_certificate_for_until_a_default_is_added() {
    let (mut lb, ca, certs, https) = start("rplb-https-unknown").await;
    let b = HttpBackend::start("u1").await;
    lb.route("other.test", none(), None, &[&b]).await;
    let e = connect(https, &ca, "other.test", &[])
        .await
        .expect_err("no certificate");
    assert!(
        e.to_string().contains("UnrecognisedName") || e.to_string().contains("alert"),
        "{e}"
    );
    // A wildcard covers one label only.
    assert!(connect(https, &ca, "a.b.wild.test", &[]).await.is_err());
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(https).await.expect("tcp");
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: other.test\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut raw)).await;
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // A default pair, added while it runs, serves every other name.
    ca.issue_domains(&["fallback.test".into()], LIFETIME)
        .and_then(|i| i.write_pair(certs.path(), "default"))
        .expect("default");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if connect(https, &ca, "fallback.test", &[]).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the default pair was not taken in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It answers other.test with the default certificate (which a verifying client
    // then refuses: it does not name other.test).
    let e = connect(https, &ca, "other.test", &[])
        .await
        .expect_err("name mismatch");
    assert!(
        e.to_string().contains("not valid for name") && e.to_string().contains("fallback.test"),
        "{e}"
    );
    stop_gracefully(&mut lb.svc).await;
}

#[tokio::test]
async fn takes_renewed_files_without_a_restart_and_keeps_serving_through_a_bad_one() {
    let (mut lb, ca, certs, https) = start("rplb-https-renew").await;
    let b = HttpBackend::start("r1").await;
    lb.route("a.test", none(), None, &[&b]).await;
    let first = connect(https, &ca, "a.test", &[]).await.expect("TLS");
    let first = first.get_ref().1.peer_certificates().expect("cert")[0].clone();

    // A broken file keeps what is in force.
    std::fs::write(certs.path().join("a.test.crt"), "not a certificate").expect("write");
    tokio::time::sleep(form_runtime::tls::RELOAD_CHECK * 2).await;
    let (status, _) = get(https, &ca, "a.test", "a.test", "/whoami").await;
    assert_eq!(status, 200);

    // A renewed pair is served from the next handshake on.
    ca.issue_domains(&["a.test".into(), "www.a.test".into()], LIFETIME)
        .and_then(|i| i.write_pair(certs.path(), "a.test"))
        .expect("renewal");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = connect(https, &ca, "a.test", &[]).await.expect("TLS");
        if s.get_ref().1.peer_certificates().expect("cert")[0] != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed pair was not taken in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served_names(https, &ca, "www.a.test").await,
        ["a.test", "www.a.test"]
    );
    stop_gracefully(&mut lb.svc).await;
}

#[test]
fn https_settings_that_cannot_serve_exit_2_naming_what_is_wrong() {
    conformance::rejects_args(
        Path::new(BIN),
        &["--listen-https", "127.0.0.1:0"],
        &["https_certs", "is required with listen_https"],
    );
    let empty = TestDir::new("rplb-https-empty");
    let dir = empty.path().to_str().expect("utf-8");
    conformance::rejects_args(
        Path::new(BIN),
        &["--listen-https", "127.0.0.1:0", "--https-certs", dir],
        &["https_certs", "holds no certificate", "<name>.crt"],
    );
    let ca = Ca::generate("bad pairs").expect("CA");
    ca.issue_domains(&["a.test".into()], LIFETIME)
        .and_then(|i| i.write_pair(empty.path(), "a"))
        .expect("pair");
    ca.issue_domains(&["b.test".into()], LIFETIME)
        .and_then(|i| i.write_pair(empty.path(), "b"))
        .expect("pair");
    std::fs::copy(empty.path().join("a.key"), empty.path().join("b.key")).expect("copy");
    conformance::rejects_args(
        Path::new(BIN),
        &["--listen-https", "127.0.0.1:0", "--https-certs", dir],
        &["b.crt", "does not fit the certificate"],
    );
}

/// A backend that answers every request on a connection with `size` bytes
/// (keep-alive), counting the requests.
async fn big_backend(size: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let body = vec![b'x'; size];
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn large_responses_arrive_whole_on_a_kept_alive_tls_connection() {
    const SIZE: usize = 3 * 1024 * 1024;
    let (mut lb, ca, _certs, https) = start("rplb-https-keepalive").await;
    lb.route_to("a.test", "big", big_backend(SIZE).await).await;
    // A client with a small receive buffer that reads slowly: the balancer's socket is
    // full when it writes a response's last bytes, which TLS then holds in its session;
    // they must still arrive, and the next request on the connection be answered.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(https).await.expect("connect");
    let mut s = client(&ca, "a.test")
        .handshake(tcp, &[b"http/1.1"])
        .await
        .expect("TLS");
    for i in 0..3 {
        s.write_all(b"GET /big HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 4096];
        let whole = loop {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("response {i} stalled at {} bytes", got.len()))
                .expect("read");
            assert!(n > 0, "closed during response {i}");
            got.extend_from_slice(&chunk[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n")
                && got.len() >= end + 4 + SIZE
            {
                break end + 4 + SIZE;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        assert!(got.starts_with(b"HTTP/1.1 200"), "response {i}");
        assert_eq!(got.len(), whole, "response {i}: nothing after the body");
    }
    stop_gracefully(&mut lb.svc).await;
}
