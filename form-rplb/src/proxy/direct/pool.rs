//! Upstream connections of the direct path on one data-plane thread: plain TCP
//! streams to backends, kept alive between requests. Nothing reads an idle stream, so
//! its liveness is read from the runtime's readiness: the last read of a response left
//! the stream not readable, and any event since (the backend closing it, or sending
//! what nobody asked for) means it cannot be reused.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use http::uri::Authority;
use tokio::net::TcpStream;

use crate::proxy::idle::IdleLists;
use crate::proxy::upstream::{CONNECT_TIMEOUT, ConnectError};

/// The direct path's upstream connections of one data-plane thread.
#[derive(Debug, Default)]
pub struct RawPool {
    idle: Mutex<IdleLists<TcpStream>>,
}

impl RawPool {
    /// A connection to `to`, and whether it was pooled: an idle one unless `fresh`,
    /// else a new one.
    pub async fn get(
        &self,
        to: &Authority,
        fresh: bool,
    ) -> Result<(TcpStream, bool), ConnectError> {
        if !fresh && let Some(s) = self.pop(to) {
            return Ok((s, true));
        }
        let addr = to.as_str();
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(addr.to_owned(), e)),
            Err(_) => return Err(ConnectError::Timeout(addr.to_owned(), CONNECT_TIMEOUT)),
        };
        let _ = stream.set_nodelay(true);
        Ok((stream, false))
    }

    fn pop(&self, to: &Authority) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.pop(to, |s| quiet(s).then_some(true))
    }

    /// Keeps a connection whose response ended cleanly for the next request.
    pub fn put(&self, to: &Authority, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.put(to, stream);
    }

    /// Closes the connections idle for too long.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.sweep_expired();
    }
}

/// Whether nothing happened on an idle stream since its last read.
fn quiet(s: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(s.poll_read_ready(&mut cx), Poll::Pending)
}
