//! Upstream connections of the direct path on one data-plane thread: plain TCP
//! streams to backends, kept alive between requests. Nothing reads an idle stream, so
//! its liveness is read from the runtime's readiness: the last read of a response left
//! the stream not readable, and any event since (the backend closing it, or sending
//! what nobody asked for) means it cannot be reused.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use http::uri::Authority;
use tokio::net::TcpStream;

use crate::balance::KeyHash;
use crate::proxy::upstream::{CONNECT_TIMEOUT, ConnectError, IDLE};

/// Idle connections kept per backend.
const MAX_IDLE: usize = 512;

/// The direct path's upstream connections of one data-plane thread.
#[derive(Debug, Default)]
pub struct RawPool {
    idle: Mutex<Idle>,
}

/// Idle connections by backend, and when they were last all looked at.
#[derive(Debug, Default)]
struct Idle {
    by_backend: HashMap<Authority, VecDeque<(TcpStream, Instant)>, KeyHash>,
    swept: Option<Instant>,
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
        let list = idle.by_backend.get_mut(to)?;
        while let Some((s, since)) = list.pop_back() {
            if since.elapsed() < IDLE && quiet(&s) {
                return Some(s);
            }
        }
        None
    }

    /// Keeps a connection whose response ended cleanly for the next request.
    pub fn put(&self, to: &Authority, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Every backend's list, those of backends no longer used too, now and then.
        if idle.swept.is_none_or(|t| now - t >= IDLE) {
            idle.swept = Some(now);
            idle.by_backend.retain(|_, list| {
                expire(list, now);
                !list.is_empty()
            });
        }
        let list = idle.by_backend.entry(to.clone()).or_default();
        expire(list, now);
        if list.len() < MAX_IDLE {
            list.push_back((stream, now));
        }
    }
}

/// Drops the connections idle for too long (the oldest are in front).
fn expire(list: &mut VecDeque<(TcpStream, Instant)>, now: Instant) {
    while list.front().is_some_and(|(_, since)| now - *since >= IDLE) {
        list.pop_front();
    }
}

/// Whether nothing happened on an idle stream since its last read.
fn quiet(s: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(s.poll_read_ready(&mut cx), Poll::Pending)
}
