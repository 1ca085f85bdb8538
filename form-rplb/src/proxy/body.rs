//! Response bodies, streamed frame by frame (never buffered whole): [`ResBody`] is the
//! backend's body or the balancer's own short text, and holds the request's in-flight
//! accounting ([`Guard`]) and its upstream connection until the last byte.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::conn::ConnCtx;
use super::upstream::Lease;
use crate::routes::backend::BackendRt;

/// A request body going upstream: the client's, streamed, or nothing (a request
/// repeated on a fresh connection had an empty body).
#[derive(Debug)]
pub enum UpBody {
    /// The client's body.
    Client(Incoming),
    /// No body.
    Empty,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Client(b) => Pin::new(b).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client(b) => b.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client(b) => b.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Accounting of one request: released when the response body ends (or is dropped).
#[derive(Debug)]
pub struct Guard {
    backend: Option<Arc<BackendRt>>,
    conn: Arc<ConnCtx>,
}

impl Guard {
    /// A request on `conn` begins.
    pub fn new(conn: Arc<ConnCtx>) -> Self {
        conn.request_started();
        Self {
            backend: None,
            conn,
        }
    }

    /// The request goes to `backend` (counted in its in-flight requests).
    pub fn to_backend(&mut self, backend: Arc<BackendRt>) {
        self.release_backend();
        backend
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.backend = Some(backend);
    }

    /// The request left `backend` (a failed attempt).
    pub fn release_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            b.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release_backend();
        self.conn.request_ended();
    }
}

/// A response body.
#[derive(Debug)]
pub enum ResBody {
    /// The backend's body, streamed.
    Upstream {
        /// The body.
        body: Incoming,
        /// Released at the end.
        guard: Option<Guard>,
        /// The upstream connection, back to its pool once the body ended.
        lease: Option<Lease>,
        /// Whether the body ended.
        done: bool,
    },
    /// A short body of the balancer's own.
    Local(Option<Bytes>),
}

impl ResBody {
    /// A local text body.
    pub fn text(s: impl Into<Bytes>) -> Self {
        Self::Local(Some(s.into()))
    }
}

impl Drop for ResBody {
    fn drop(&mut self) {
        // A body nobody read because it was empty still frees its connection; an
        // abandoned one closes it (its state is unknown).
        if let Self::Upstream {
            body, lease, done, ..
        } = self
            && let Some(l) = lease.take()
            && (*done || body.is_end_stream())
        {
            l.give_back();
        }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream {
                body,
                guard,
                lease,
                done,
            } => {
                let r = Pin::new(body).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => {
                        *done = true;
                        if let Some(l) = lease.take() {
                            l.give_back();
                        }
                        guard.take();
                    }
                    Poll::Ready(Some(Err(_))) => {
                        lease.take();
                        guard.take();
                    }
                    _ => {}
                }
                r
            }
            Self::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
