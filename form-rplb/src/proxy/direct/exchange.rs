//! One request on the direct path: the backend is chosen as on the general path, the
//! request goes out in one write on a pooled (or new) connection, and the response is
//! relayed as it comes, its head rewritten and its body copied until its framing ends.
//! A failed connect is retried once on another backend; an idempotent request whose
//! pooled connection turned out closed before any response byte is repeated once on a
//! new connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::framing::Framing;
use super::request::Plain;
use super::response::{self, Extra, Head};
use crate::core::Core;
use crate::proxy::answer::Answer;
use crate::proxy::body::Guard;
use crate::proxy::client_io::ClientIo;
use crate::proxy::conn::ConnCtx;
use crate::proxy::handler::{Attempt, MAX_REDRAWS, choose, session_cookie};
use crate::proxy::headers;
use crate::routes::RouteView;

/// Read buffer of an upstream response.
const READ_SIZE: usize = 16 * 1024;

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Reads the next request.
    KeepAlive,
    /// Closes after flushing what was written.
    Close,
    /// Drops the connection: a response could not be finished.
    Abort,
}

/// A client connection on the direct path, with its buffers.
pub(super) struct Client {
    /// The client's stream.
    pub(super) stream: ClientIo,
    core: Arc<Core>,
    ctx: Arc<ConnCtx>,
    /// The request for the backend.
    req_out: Vec<u8>,
    /// The response head (and first body bytes) for the client.
    out: Vec<u8>,
    /// Bytes from the backend.
    up_buf: BytesMut,
}

/// Why no response head came.
enum Failure {
    /// The connection ended (or broke) before any byte of a response.
    Closed,
    /// Anything else, with what it was.
    Other(String),
    /// Nothing within the request timeout.
    Timeout,
    /// The client closed its connection meanwhile.
    ClientGone,
}

impl Client {
    /// Wraps a client connection.
    pub(super) fn new(stream: ClientIo, core: Arc<Core>, ctx: Arc<ConnCtx>) -> Self {
        Self {
            stream,
            core,
            ctx,
            req_out: Vec::with_capacity(1024),
            out: Vec::with_capacity(1024),
            up_buf: BytesMut::with_capacity(READ_SIZE),
        }
    }

    /// Answers request `req` (in `buf`).
    pub(super) async fn exchange(
        &mut self,
        buf: &[u8],
        req: &Plain<'_, '_>,
        closing: &watch::Receiver<bool>,
    ) -> Next {
        let core = self.core.clone();
        let ctx = self.ctx.clone();
        let mut guard = Guard::new(ctx.clone());
        let host: &str = &req.host;
        // Whether the client or the balancer asked to close the connection (read again
        // when the response is ready: a stop may come meanwhile).
        let close_asked = || req.close || *closing.borrow() || ctx.wants_close();
        let Some(mut route) = core.table.get(host) else {
            return self.answer(Answer::NoRoute(host), close_asked()).await;
        };
        let peer = ctx.peer.ip();
        let peer_trusted = core.trusted.contains(peer);
        let client_ip = headers::client_ip(peer, &req.fields, &core.trusted);
        let pick = |route: &RouteView, exclude| {
            choose(&core, route, &req.fields, req.query(), client_ip, exclude)
        };
        let Some(mut choice) = pick(&route, None) else {
            return self.answer(Answer::NoBackend(host), close_asked()).await;
        };
        req.write_upstream(
            buf,
            &req.forwarding(peer, peer_trusted, ctx.scheme()),
            &mut self.req_out,
        );
        let timeout = Duration::from_millis(core.config.request_timeout_ms);
        let (mut retried, mut fresh) = (false, false);
        let mut redrawn = 0;
        loop {
            let Some(attempt) = Attempt::begin(&route, &choice, &mut guard) else {
                redrawn += 1;
                let again = match core.table.get(host) {
                    Some(now) if redrawn <= MAX_REDRAWS => {
                        route = now;
                        pick(&route, None)
                    }
                    _ => None,
                };
                match again {
                    Some(c) => choice = c,
                    None => return self.answer(Answer::NoBackend(host), close_asked()).await,
                }
                continue;
            };
            let backend = attempt.backend.clone();
            let (mut up, reused) = match ctx.raw.get(&backend.authority, fresh).await {
                Ok(c) => c,
                Err(e) => {
                    attempt.failed(&core, &route, &mut guard);
                    if retried {
                        tracing::warn!(domain = %host, backend = %backend.id, error = %e, "backend unreachable");
                        return self.answer(Answer::Unreachable(host), close_asked()).await;
                    }
                    retried = true;
                    fresh = false;
                    tracing::debug!(backend = %backend.id, error = %e, "connect failed; retrying on another backend");
                    match pick(&route, Some(choice.decision.backend)) {
                        Some(c) => choice = c,
                        None => return self.answer(Answer::NoBackend(host), close_asked()).await,
                    }
                    continue;
                }
            };
            let close = close_asked() || backend.notifies_clients();
            let cookie = session_cookie(&choice, &route, ctx.tls);
            let extra = Extra {
                set_cookie: cookie.as_deref(),
                close,
            };
            let head = match tokio::time::timeout(
                timeout,
                self.send(&mut up, req.method == "HEAD", &extra),
            )
            .await
            {
                Ok(Ok(head)) => head,
                failed => {
                    let failure = match failed {
                        Ok(Err(f)) => f,
                        _ => Failure::Timeout,
                    };
                    if let Failure::ClientGone = failure {
                        // Not the backend's fault: nothing is recorded against it.
                        guard.release_backend();
                        return Next::Abort;
                    }
                    if let Failure::Closed = failure
                        && reused
                        && !fresh
                        && req.idempotent()
                    {
                        guard.release_backend();
                        tracing::debug!(backend = %backend.id, "pooled connection closed under the request; repeating it on a new one");
                        fresh = true;
                        continue;
                    }
                    // The body came whole with the head: a timeout is the backend's.
                    attempt.failed(&core, &route, &mut guard);
                    return match failure {
                        Failure::Timeout => {
                            let ms = core.config.request_timeout_ms;
                            self.answer(Answer::Timeout(host, ms), close_asked()).await
                        }
                        Failure::Closed | Failure::Other(_) | Failure::ClientGone => {
                            let why = match &failure {
                                Failure::Other(w) => w.as_str(),
                                _ => "connection closed before a response",
                            };
                            tracing::warn!(domain = %host, backend = %backend.id, error = why, "backend request failed");
                            self.answer(Answer::Failed(host), close_asked()).await
                        }
                    };
                }
            };
            attempt.answered(&core, &route, head.status < 500);
            let reusable = self.relay_body(&mut up, &head, &mut guard).await;
            let next = match reusable {
                Some(true) => {
                    if head.keep_alive {
                        ctx.raw.put(&backend.authority, up);
                    }
                    if close { Next::Close } else { Next::KeepAlive }
                }
                Some(false) => {
                    if close || head.framing == Framing::UntilClose {
                        Next::Close
                    } else {
                        Next::KeepAlive
                    }
                }
                None => Next::Abort,
            };
            drop(guard);
            return next;
        }
    }

    /// Sends the request on `up` and reads the final response head, relaying interim
    /// ones. The head, rewritten, is left in `out`; the bytes after it in `up_buf`.
    async fn send(
        &mut self,
        up: &mut TcpStream,
        to_head: bool,
        extra: &Extra<'_>,
    ) -> Result<Head, Failure> {
        self.up_buf.clear();
        if let Err(e) = up.write_all(&self.req_out).await {
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    Failure::Closed
                }
                _ => Failure::Other(e.to_string()),
            });
        }
        let mut got_any = false;
        let mut watch_client = true;
        let mut probe = [0u8; 1];
        loop {
            if !self.up_buf.is_empty() {
                match response::read(&self.up_buf, to_head, extra, &mut self.out) {
                    response::Read::Head(h) if h.interim() => {
                        self.up_buf.advance(h.len);
                        if send(&mut self.stream, &self.out).await.is_err() {
                            return Err(Failure::ClientGone);
                        }
                        continue;
                    }
                    response::Read::Head(h) => return Ok(h),
                    response::Read::Partial => {}
                    response::Read::Invalid(what) => {
                        return Err(Failure::Other(format!("the backend sent {what}")));
                    }
                }
            }
            if self.up_buf.capacity() - self.up_buf.len() < READ_SIZE / 4 {
                self.up_buf.reserve(READ_SIZE);
            }
            // While the backend works, a client that hangs up ends the request (bytes
            // it sends meanwhile are its next request, and wait in the socket).
            let read = if watch_client {
                tokio::select! {
                    r = up.read_buf(&mut self.up_buf) => r,
                    p = self.stream.tcp().peek(&mut probe) => match p {
                        Ok(0) | Err(_) => return Err(Failure::ClientGone),
                        Ok(_) => {
                            watch_client = false;
                            continue;
                        }
                    },
                }
            } else {
                up.read_buf(&mut self.up_buf).await
            };
            match read {
                Ok(0) if !got_any => return Err(Failure::Closed),
                Ok(0) => return Err(Failure::Other("the backend closed mid-head".into())),
                Ok(_) => got_any = true,
                Err(e) if !got_any && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Failure::Closed);
                }
                Err(e) => return Err(Failure::Other(e.to_string())),
            }
        }
    }

    /// Writes the head in `out` and the body after it to the client. `Some(true)`
    /// when the body ended with nothing after it (the backend connection can be
    /// reused), `Some(false)` when it ended otherwise, `None` when it could not be
    /// finished (the client connection must be dropped).
    ///
    /// The request leaves the backend's in-flight count as soon as the backend sent
    /// the last byte, before the client has it (as on the general path): whoever reads
    /// the statistics after the response sees it done.
    async fn relay_body(
        &mut self,
        up: &mut TcpStream,
        head: &Head,
        guard: &mut Guard,
    ) -> Option<bool> {
        self.up_buf.advance(head.len);
        let mut framing = head.framing;
        let (n, mut done) = framing.feed(&self.up_buf).ok()?;
        self.out.extend_from_slice(&self.up_buf[..n]);
        let mut clean = n == self.up_buf.len();
        self.up_buf.advance(n);
        if done {
            guard.release_backend();
        }
        send(&mut self.stream, &self.out).await.ok()?;
        while !done {
            self.up_buf.clear();
            if self.up_buf.capacity() < READ_SIZE / 4 {
                self.up_buf.reserve(READ_SIZE);
            }
            match up.read_buf(&mut self.up_buf).await {
                Ok(0) if framing == Framing::UntilClose => {
                    guard.release_backend();
                    return Some(false);
                }
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let (n, end) = framing.feed(&self.up_buf).ok()?;
            done = end;
            clean = n == self.up_buf.len();
            if done {
                guard.release_backend();
            }
            send(&mut self.stream, &self.up_buf[..n]).await.ok()?;
        }
        Some(clean && framing.keeps_connection())
    }

    /// Writes one of the balancer's own answers.
    async fn answer(&mut self, a: Answer<'_>, close: bool) -> Next {
        use std::io::Write as _;
        let text = a.text();
        let status = a.status();
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            text.len()
        );
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            self.out.extend_from_slice(b"retry-after: 1\r\n");
        }
        if close {
            self.out.extend_from_slice(b"connection: close\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(text.as_bytes());
        match send(&mut self.stream, &self.out).await {
            Ok(()) if close => Next::Close,
            Ok(()) => Next::KeepAlive,
            Err(_) => Next::Abort,
        }
    }
}

/// Writes `bytes` to the client and flushes them (TLS keeps what it could not send in
/// its session until a flush).
async fn send(stream: &mut ClientIo, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}
