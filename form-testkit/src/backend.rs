//! Small HTTP backends on real sockets for balancer tests: each answers with its id,
//! counts its requests, can be made unhealthy, and stops when dropped.
//!
//! - `GET /whoami`: the id;
//! - `GET /healthz`: 200, or 503 once [`HttpBackend::set_healthy`] said false;
//! - `GET /headers`: the request's header fields, one `name: value` per line;
//! - `POST /echo`: the number of body bytes received;
//! - `GET /slow/{ms}`: the id, after `ms` milliseconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Shared {
    id: String,
    healthy: AtomicBool,
    hits: AtomicU64,
}

/// One backend; stops when dropped.
#[derive(Debug)]
pub struct HttpBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl HttpBackend {
    /// Starts backend `id` on a free port of 127.0.0.1.
    pub async fn start(id: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::on(listener, id)
    }

    /// Starts backend `id` on `listener`.
    pub fn on(listener: TcpListener, id: &str) -> Self {
        let addr = listener.local_addr().expect("backend address");
        let shared = Arc::new(Shared {
            id: id.to_owned(),
            healthy: AtomicBool::new(true),
            hits: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/whoami", get(whoami))
            .route("/healthz", get(healthz))
            .route("/headers", get(headers))
            .route("/echo", post(echo))
            .route("/slow/{ms}", get(slow))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(shared.clone());
        // Connections live in the serving task's set: killing it closes them all, as
        // a crashed process would.
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let app = app.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let mut app = app.clone();
                                async move { tower_service::Service::call(&mut app, req).await }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Self { addr, shared, task }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Requests it answered (health checks excluded).
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::Relaxed)
    }

    /// Makes `/healthz` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Stops it now (its port refuses connections afterwards).
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn whoami(State(s): State<Arc<Shared>>) -> String {
    s.hits.fetch_add(1, Ordering::Relaxed);
    s.id.clone()
}

async fn healthz(State(s): State<Arc<Shared>>) -> StatusCode {
    if s.healthy.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn headers(State(s): State<Arc<Shared>>, h: HeaderMap) -> String {
    s.hits.fetch_add(1, Ordering::Relaxed);
    h.iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

async fn echo(State(s): State<Arc<Shared>>, body: Bytes) -> String {
    s.hits.fetch_add(1, Ordering::Relaxed);
    body.len().to_string()
}

async fn slow(State(s): State<Arc<Shared>>, Path(ms): Path<u64>) -> String {
    s.hits.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    s.id.clone()
}
