//! Client connections: HTTP/1.1 or HTTP/2, in cleartext or over TLS (the HTTPS
//! listener: certificates by SNI, see `form_runtime::tls::public`), each served by one
//! task. The task starts on the direct path ([`super::direct`]), which serves plain HTTP/1.1
//! requests; the first message it does not take hands the connection to hyper's server
//! (HTTP/1.1 or HTTP/2, told apart by the preface). Either closes the connection
//! gracefully (GOAWAY on HTTP/2) when the balancer stops, when a draining backend asks
//! clients to reconnect, or when it has been idle too long.
//!
//! The data plane runs on `http_workers` threads, each with a single-threaded runtime
//! and its own upstream pools (as nginx's workers do): a request, its upstream
//! connection and both their tasks stay on one thread, and no wake-up crosses threads.
//! One acceptor hands each new connection to the thread with the fewest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use tokio_rustls::TlsAcceptor;

use super::client_io::ClientIo;
use super::direct::{self, End, pool::RawPool};
use super::idle::IDLE;
use super::upstream::Pool;
use crate::core::Core;

/// The upstream pools of one data-plane thread: the general path's and the direct
/// path's.
type Pools = (Arc<Pool>, Arc<RawPool>);

/// What the request handler knows of its connection.
#[derive(Debug)]
pub struct ConnCtx {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the client came over TLS (the HTTPS listener).
    pub tls: bool,
    /// The upstream connections of this connection's thread (general path).
    pub pool: Arc<Pool>,
    /// The upstream connections of this connection's thread (direct path).
    pub raw: Arc<RawPool>,
    epoch: Instant,
    active: AtomicU32,
    last_ms: AtomicU64,
    goaway: AtomicBool,
    notify: Notify,
}

impl ConnCtx {
    fn new(peer: SocketAddr, tls: bool, pools: &Pools) -> Self {
        Self {
            peer,
            tls,
            pool: pools.0.clone(),
            raw: pools.1.clone(),
            epoch: Instant::now(),
            active: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
            goaway: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// `https` or `http`: how the client reached the balancer.
    pub fn scheme(&self) -> &'static str {
        super::headers::scheme(self.tls)
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

    /// Whether the connection was asked to close (see [`Self::go_away`]).
    pub fn wants_close(&self) -> bool {
        self.goaway.load(Ordering::Relaxed)
    }

    /// Completes when the connection is asked to close.
    pub async fn go_away_asked(&self) {
        if !self.wants_close() {
            self.notify.notified().await;
        }
    }

    /// How long the connection has been without a request, if it has none now.
    pub fn idle_for(&self) -> Option<Duration> {
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

/// A data-plane listener: plain HTTP, or HTTPS with this acceptor.
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// The TLS acceptor of an HTTPS listener.
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("socket", &self.socket)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A connection handed to a worker thread.
type Handed = (std::net::TcpStream, SocketAddr, Option<TlsAcceptor>);

/// A worker thread as the acceptor sees it.
struct Lane {
    tx: tokio::sync::mpsc::UnboundedSender<Handed>,
    open: Arc<AtomicUsize>,
}

/// Serves the data plane until `stop`: one task per listener accepts and hands each
/// connection to the worker thread with the fewest open connections; on `stop` they
/// stop accepting, and each worker lets its connections finish their requests
/// (HTTP/1 closes after the current response, HTTP/2 gets a GOAWAY) for up to
/// `grace`. The TLS handshake of an HTTPS connection runs on its worker thread.
pub async fn serve(
    listeners: Vec<Listener>,
    core: Arc<Core>,
    stop: form_runtime::shutdown::Shutdown,
    grace: Duration,
    workers: usize,
) -> std::io::Result<()> {
    let mut lanes = Vec::new();
    let mut done = Vec::new();
    for i in 0..workers.max(1) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let (core, counter) = (core.clone(), open.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("rplb-http-{i}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(rx, core, counter, grace)),
                    Err(e) => tracing::error!(error = %e, "cannot start a data-plane thread"),
                }
                drop(done_tx);
            })?;
        lanes.push(Lane { tx, open });
        done.push(done_rx);
    }
    let lanes = Arc::new(lanes);
    let mut accepting = JoinSet::new();
    for l in listeners {
        accepting.spawn(accept(l, lanes.clone(), stop.clone()));
    }
    while accepting.join_next().await.is_some() {}
    drop(lanes);
    for rx in done {
        let _ = rx.await;
    }
    Ok(())
}

/// Accepts on one listener until `stop`.
async fn accept(l: Listener, lanes: Arc<Vec<Lane>>, mut stop: form_runtime::shutdown::Shutdown) {
    loop {
        tokio::select! {
            accepted = l.socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let lane = lanes
                        .iter()
                        .min_by_key(|l| l.open.load(Ordering::Relaxed))
                        .unwrap_or_else(|| unreachable!("at least one worker"));
                    lane.open.fetch_add(1, Ordering::Relaxed);
                    if let Ok(std_stream) = stream.into_std() {
                        let _ = lane.tx.send((std_stream, peer, l.tls.clone()));
                    }
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.requested() => return,
        }
    }
}

/// One data-plane thread: serves the connections handed to it until the acceptor
/// stops, then finishes them within `grace`.
async fn worker(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Handed>,
    core: Arc<Core>,
    open: Arc<AtomicUsize>,
    grace: Duration,
) {
    let builder = Arc::new(builder(&core));
    let pools: Pools = (Arc::default(), Arc::default());
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    // Idle upstream connections expire even when this thread gets no more requests.
    let mut sweep = tokio::time::interval(IDLE);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            handed = incoming.recv() => match handed {
                Some((stream, peer, tls)) => match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        conns.spawn(connection(builder.clone(), core.clone(), pools.clone(), (stream, tls), peer, closing_rx.clone()));
                    }
                    Err(e) => {
                        open.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "cannot serve an accepted connection");
                    }
                },
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {
                open.fetch_sub(1, Ordering::Relaxed);
            }
            _ = sweep.tick() => {
                pools.0.sweep();
                pools.1.sweep();
            }
        }
    }
    let _ = closing_tx.send(true);
    let left = conns.len();
    if left > 0 {
        tracing::info!(
            connections = left,
            ?grace,
            "stopped accepting; finishing requests"
        );
    }
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
    pools: Pools,
    (stream, tls): (TcpStream, Option<TlsAcceptor>),
    peer: SocketAddr,
    mut closing: watch::Receiver<bool>,
) {
    let stream = match tls {
        None => ClientIo::Plain(stream),
        Some(acceptor) => {
            // A client gets as long for its handshake as for a request head.
            let limit = Duration::from_millis(core.config.header_read_timeout_ms);
            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                Ok(Ok(s)) => ClientIo::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    metrics::counter!("form_rplb_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!("form_rplb_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let ctx = Arc::new(ConnCtx::new(peer, stream.is_tls(), &pools));
    ctx.touch();
    let stream = match direct::serve(stream, &core, &ctx, &mut closing).await {
        End::Closed => return,
        End::Handoff(rest) => rest,
    };
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
