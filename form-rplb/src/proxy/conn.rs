//! Client connections: HTTP/1.1 or cleartext HTTP/2 (told apart by the preface), each
//! served by one task that also closes it gracefully (GOAWAY on HTTP/2) when the
//! balancer stops, when a draining backend asks clients to reconnect, or when it has
//! been idle too long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::core::Core;

/// What the request handler knows of its connection.
#[derive(Debug)]
pub struct ConnCtx {
    /// The client's address.
    pub peer: SocketAddr,
    epoch: Instant,
    active: AtomicU32,
    last_ms: AtomicU64,
    goaway: AtomicBool,
    notify: Notify,
}

impl ConnCtx {
    fn new(peer: SocketAddr) -> Self {
        Self {
            peer,
            epoch: Instant::now(),
            active: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
            goaway: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A request begins on this connection.
    pub fn request_started(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// A request (with its response body) ended.
    pub fn request_ended(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// Asks for the connection to close gracefully (HTTP/2: GOAWAY) once its
    /// requests are done.
    pub fn go_away(&self) {
        if !self.goaway.swap(true, Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.epoch.elapsed().saturating_sub(last))
    }
}

/// The connection builder with the configured limits and timeouts.
fn builder(core: &Core) -> auto::Builder<TokioExecutor> {
    let c = &core.config;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(c.header_read_timeout_ms))
        .max_buf_size(c.max_header_bytes)
        .max_headers(c.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(c.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts and serves client connections until `stop`; then stops accepting, lets
/// every connection finish its requests (HTTP/1 closes after the current response,
/// HTTP/2 gets a GOAWAY) for up to `grace`, and returns.
pub async fn serve(
    listener: TcpListener,
    core: Arc<Core>,
    mut stop: form_runtime::shutdown::Shutdown,
    grace: Duration,
) {
    let builder = Arc::new(builder(&core));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(builder.clone(), core.clone(), stream, peer, closing_rx.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.requested() => break,
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let open = conns.len();
    tracing::info!(
        connections = open,
        ?grace,
        "stopped accepting; finishing requests"
    );
    let finished =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(left = conns.len(), "grace period over; closing connections");
        conns.abort_all();
    }
}

async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    core: Arc<Core>,
    stream: TcpStream,
    peer: SocketAddr,
    mut closing: watch::Receiver<bool>,
) {
    let ctx = Arc::new(ConnCtx::new(peer));
    ctx.touch();
    let idle = Duration::from_millis(core.config.idle_timeout_ms);
    let svc = {
        let ctx = ctx.clone();
        service_fn(move |req| super::handler::handle(core.clone(), ctx.clone(), req))
    };
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutting = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = closing.wait_for(|c| *c), if !shutting => {
                conn.as_mut().graceful_shutdown();
                shutting = true;
            }
            _ = ctx.notify.notified(), if !shutting => {
                conn.as_mut().graceful_shutdown();
                shutting = true;
            }
            _ = tick.tick(), if !shutting => {
                if ctx.idle_for().is_some_and(|d| d >= idle) {
                    conn.as_mut().graceful_shutdown();
                    shutting = true;
                }
            }
        }
    }
}
