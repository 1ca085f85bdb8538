//! Upstream connections of one data-plane thread: HTTP/1.1 connections to backends,
//! kept alive and reused. The proxy asks for a connection before it hands over the
//! request, so a failed connect is known before anything is sent, and the one retry
//! on another backend needs no copy of the request. A pooled connection that turns out
//! closed gives the request back unsent (`try_send_request`).
//!
//! A connection goes back to the pool when its response body ended; one whose response
//! was abandoned is closed. Idle connections older than [`IDLE`] are dropped (backends
//! close theirs too), and a pooled one that turns out closed is skipped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::Authority;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::body::UpBody;
use super::idle::{IDLE, IdleLists};

/// Time to open a TCP connection to a backend before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection ready for one request.
#[derive(Debug)]
pub struct Upstream {
    /// The request sender.
    pub sender: SendRequest<UpBody>,
    /// Whether it came from the pool: the backend may have closed it meanwhile.
    pub reused: bool,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect to {0}: {1}")]
    Io(String, std::io::Error),
    /// TCP connect took too long.
    #[error("connect to {0}: no answer within {1:?}")]
    Timeout(String, Duration),
    /// The HTTP/1 handshake failed.
    #[error("HTTP/1 handshake with {0}: {1}")]
    Handshake(String, hyper::Error),
}

/// The pool of one data-plane thread.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<IdleLists<SendRequest<UpBody>>>,
}

impl Pool {
    /// A connection to `to`: an idle one unless `fresh`, else a new one.
    pub async fn get(&self, to: &Authority, fresh: bool) -> Result<Upstream, ConnectError> {
        if !fresh && let Some(sender) = self.pop_ready(to) {
            return Ok(Upstream {
                sender,
                reused: true,
            });
        }
        let addr = to.as_str();
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(ConnectError::Io(addr.to_owned(), e)),
                Err(_) => return Err(ConnectError::Timeout(addr.to_owned(), CONNECT_TIMEOUT)),
            };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(addr.to_owned(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Upstream {
            sender,
            reused: false,
        })
    }

    /// An idle connection that can take a request now. One still busy (its previous
    /// request's body is still uploading after an early response) stays in the pool
    /// for later; closed and expired ones go.
    fn pop_ready(&self, to: &Authority) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.pop(to, |s| (!s.is_closed()).then(|| s.is_ready()))
    }

    /// Takes back a connection whose response ended.
    pub fn put(&self, to: &Authority, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.put(to, sender);
    }

    /// Closes the connections idle for too long.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.sweep_expired();
    }
}

/// A connection to give back once its response body ended.
#[derive(Debug)]
pub struct Lease {
    /// The pool.
    pub pool: Arc<Pool>,
    /// The backend.
    pub to: Authority,
    /// The connection.
    pub sender: SendRequest<UpBody>,
}

impl Lease {
    /// Returns the connection to its pool once it can take a request: at once when its
    /// driver already said so, else when it does (a connection still uploading the body
    /// of a request answered early waits outside the pool, for [`IDLE`] at most).
    pub fn give_back(mut self) {
        if self.sender.is_ready() {
            self.pool.put(&self.to, self.sender);
            return;
        }
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(IDLE, self.sender.ready()).await {
                self.pool.put(&self.to, self.sender);
            }
        });
    }
}
