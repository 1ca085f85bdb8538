//! Clients that tests use to look at a running service: gRPC health, reflection in
//! both versions, and plain HTTP/1.1 GET.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use form_runtime::tls::Kind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Time a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected gRPC channel to `addr`; each call may take 5 s.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    channel_with_timeout(addr, PROBE_TIMEOUT).await
}

/// A connected gRPC channel to `addr` whose calls may take `timeout` (booting a VM
/// under emulation on a busy machine takes longer than 5 s).
///
/// The test calls as the platform's own caller of the server it finds there (its
/// certificate says what it is; see [`crate::pki::natural_caller`]).
pub async fn channel_with_timeout(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Channel> {
    if crate::pki::plaintext() {
        let e = Endpoint::from_shared(format!("http://{addr}"))?;
        return connect(e, addr, timeout).await;
    }
    let kind = crate::pki::server_kind(addr)
        .await
        .with_context(|| format!("reading what the server at {addr} is"))?;
    channel_as_with_timeout(addr, crate::pki::natural_caller(kind), timeout).await
}

/// A connected gRPC channel to `addr` as a caller of `kind` (mutual TLS with a
/// certificate of the tests' CA).
pub async fn channel_as(addr: SocketAddr, kind: Kind) -> anyhow::Result<Channel> {
    channel_as_with_timeout(addr, kind, PROBE_TIMEOUT).await
}

/// [`channel_as`] whose calls may take `timeout`.
pub async fn channel_as_with_timeout(
    addr: SocketAddr,
    kind: Kind,
    timeout: Duration,
) -> anyhow::Result<Channel> {
    connect(crate::pki::endpoint_as(addr, kind)?, addr, timeout).await
}

/// A connected gRPC channel to `addr` presenting the certificate of the TLS
/// directory `dir` (for a stack with a CA of its own, such as `formctl up`'s).
pub async fn channel_with(addr: SocketAddr, dir: &std::path::Path) -> anyhow::Result<Channel> {
    connect(crate::pki::endpoint_with(addr, dir)?, addr, PROBE_TIMEOUT).await
}

/// A connected plaintext gRPC channel to `addr` (to services started with
/// `--insecure-plaintext`, or to show that a TLS server refuses plaintext).
pub async fn plaintext_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    connect(
        Endpoint::from_shared(format!("http://{addr}"))?,
        addr,
        PROBE_TIMEOUT,
    )
    .await
}

async fn connect(e: Endpoint, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Channel> {
    e.connect_timeout(PROBE_TIMEOUT)
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// `grpc.health.v1.Health/Check` of `service` ("" for the whole server).
pub async fn health(addr: SocketAddr, service: &str) -> anyhow::Result<ServingStatus> {
    let mut client = HealthClient::new(channel(addr).await?);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

macro_rules! list_services {
    ($name:ident, $version:ident, $doc:literal) => {
        #[doc = $doc]
        pub async fn $name(addr: SocketAddr) -> anyhow::Result<Vec<String>> {
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            let mut client = ServerReflectionClient::new(channel(addr).await?);
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = client
                .server_reflection_info(tokio_stream::iter([req]))
                .await?
                .into_inner();
            let resp = stream.message().await?.context("reflection stream ended")?;
            match resp.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                    names.sort();
                    Ok(names)
                }
                other => bail!("unexpected reflection response {other:?}"),
            }
        }
    };
}

list_services!(
    reflection_services_v1,
    v1,
    "Service names listed by `grpc.reflection.v1.ServerReflection`."
);
list_services!(
    reflection_services_v1alpha,
    v1alpha,
    "Service names listed by `grpc.reflection.v1alpha.ServerReflection`."
);

/// The `name=value` of cookie `name` set in a response head (`Set-Cookie`), if any.
pub fn set_cookie(head: &str, name: &str) -> Option<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| v.split(';').next())
        .map(str::trim)
        .find(|c| c.strip_prefix(name).is_some_and(|r| r.starts_with('=')))
        .map(str::to_owned)
}

/// An HTTP/1.1 `GET path` to `addr`; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path, b"").await
}

/// An HTTP/1.1 request with extra header lines (`Name: value`, a `Host` among them
/// replaces the default) and a body; returns the status code, the response head and the
/// body.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    exchange(addr, method, path, headers, body, Duration::from_secs(30)).await
}

/// An HTTP/1.1 request with a body; returns the status code and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let (code, _, body) = exchange(addr, method, path, &[], body, PROBE_TIMEOUT).await?;
    Ok((code, body))
}

/// What an instance of the demo app sees of its CPUs and memory from inside
/// (`/whoami`'s `resources`: `cpus_online`, `memory_total_mib`, `cpu_limit`,
/// `memory_limit_mib`, `effective_cpus`, `effective_memory_mib`).
pub async fn resources_seen(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (code, body) = http_get(addr, "/whoami").await?;
    anyhow::ensure!(code == 200, "/whoami answered {code}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).context("/whoami is not JSON")?;
    Ok(v["resources"].clone())
}

/// Waits up to `within` until what the instance sees satisfies `ok` (a guest brings
/// hot-plugged CPUs online, gives balloon pages back, at its own pace); returns the last
/// view either way, for the caller's assertion.
pub async fn wait_resources(
    addr: SocketAddr,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen = resources_seen(addr).await.unwrap_or_default();
        if ok(&seen) || tokio::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> anyhow::Result<(u16, String, String)> {
    let fut = async {
        let s = tokio::net::TcpStream::connect(addr).await?;
        exchange_on(s, addr, method, path, headers, body).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .context("HTTP request timed out")?
}

/// A client of a public HTTPS server: the authority it trusts (PEM) and the name it
/// asks for (SNI).
#[derive(Debug, Clone)]
pub struct HttpsClient {
    /// The trusted authority, PEM.
    pub ca_pem: String,
    /// The server name asked for.
    pub sni: String,
}

impl HttpsClient {
    /// A TLS connection to `addr` offering the ALPN protocols `alpn`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        self.handshake(tcp, alpn).await
    }

    /// A TLS connection over a TCP stream the caller made (to set its buffers).
    pub async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use rustls::pki_types::ServerName;
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let config = form_runtime::tls::public::client_config(self.ca_pem.as_bytes(), alpn)
            .map_err(invalid)?;
        let name = ServerName::try_from(self.sni.clone()).map_err(|e| invalid(e.to_string()))?;
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// An HTTP/1.1 request over TLS (as [`http_call`]): status, head and body.
    pub async fn call(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, String, String)> {
        let fut = async {
            let s = self.connect(addr, &[b"http/1.1"]).await?;
            exchange_on(s, addr, method, path, headers, body).await
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .context("HTTPS request timed out")?
    }
}

/// One request on `s` (closed after it): status, head and body.
async fn exchange_on(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf).await {
        // A TLS peer that closes without close_notify still sent the whole answer.
        anyhow::ensure!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty(),
            e
        );
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, head.to_owned(), body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Pids of the processes whose environment holds `key=value` (to see that an instance
/// runs, or that nothing of it is left).
pub fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    form_runtime::procenv::pids_with_env(key, value)
}
