//! The direct HTTP/1.1 path: a client connection's plain requests are relayed byte
//! for byte by the connection's own task, to backends over plain pooled TCP streams,
//! with no request or response objects, channels or other tasks in between (as nginx
//! and HAProxy do). It serves the common case only: the first message it does not take
//! (another protocol version, HTTP/2's preface, an absolute-form target, a chunked or
//! large request body, `Expect`, `Upgrade`, anything malformed or over a limit) hands
//! the connection, with the bytes read so far, to hyper's server, which serves the
//! rest of it with the general path and answers errors as it always does.
//!
//! The choice of backend, the retries, the accounting and the answers are those of
//! the general path ([`super::handler`]); see docs/rplb.md.

mod exchange;
pub mod framing;
pub mod pool;
pub mod prefixed;
pub mod request;
pub mod response;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use self::exchange::{Client, Next};
use self::prefixed::Prefixed;
use self::request::{MAX_FIELDS, Read};
use super::client_io::ClientIo;
use super::conn::ConnCtx;
use crate::core::Core;

/// A request larger than this (head and body) goes to hyper, which streams its body.
const MAX_MESSAGE: usize = 64 * 1024;
/// Read buffer of a client connection.
const READ_SIZE: usize = 8 * 1024;

/// How a connection left the direct path.
#[derive(Debug)]
pub enum End {
    /// It is closed (or to be closed).
    Closed,
    /// Hyper serves the rest of it.
    Handoff(Prefixed),
}

/// Serves a client connection's plain requests until it closes, the balancer stops
/// (`closing`), the connection is asked to go away, it idles too long, or a message
/// comes that the direct path does not take.
pub async fn serve(
    stream: ClientIo,
    core: &Arc<Core>,
    ctx: &Arc<ConnCtx>,
    closing: &mut watch::Receiver<bool>,
) -> End {
    let cfg = &core.config;
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let header_timeout = Duration::from_millis(cfg.header_read_timeout_ms);
    let max_head = cfg.max_header_bytes.min(MAX_MESSAGE);
    // Between requests a connection may wait for the next head as long as a head may
    // take to arrive, as on the general path, and never longer than the idle timeout.
    let keep_alive = idle.min(header_timeout);
    let mut tick = tokio::time::interval((keep_alive / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client = Client::new(stream, core.clone(), ctx.clone());
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    // When the first byte of a message not yet whole arrived.
    let mut started: Option<Instant> = None;
    // Waits that last the connection's life: registered once, not per request.
    let mut stop = closing.clone();
    let stop = stop.wait_for(|c| *c);
    let go_away = ctx.go_away_asked();
    tokio::pin!(stop, go_away);
    loop {
        if !buf.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            let nfields = cfg.max_headers.min(MAX_FIELDS);
            match request::read(&buf, &mut fields[..nfields]) {
                Read::Plain(req) if req.head_len <= max_head => {
                    let used = req.message_len();
                    let next = client.exchange(&buf, &req, closing).await;
                    drop(req);
                    buf.advance(used);
                    started = None;
                    match next {
                        Next::KeepAlive => continue,
                        Next::Close => {
                            let _ = client.stream.shutdown().await;
                            return End::Closed;
                        }
                        Next::Abort => return End::Closed,
                    }
                }
                Read::Partial(None) if buf.len() <= max_head => {
                    started.get_or_insert_with(Instant::now);
                }
                Read::Partial(Some(need)) if need <= MAX_MESSAGE => {
                    started.get_or_insert_with(Instant::now);
                }
                Read::Plain(_) | Read::Partial(_) | Read::Other => {
                    return End::Handoff(Prefixed::new(buf, client.stream));
                }
            }
        } else if *closing.borrow() || ctx.wants_close() {
            return End::Closed;
        }
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        tokio::select! {
            read = client.stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            },
            _ = &mut stop, if buf.is_empty() => return End::Closed,
            _ = &mut go_away, if buf.is_empty() => return End::Closed,
            // A message begun must arrive whole within the header timeout (a timer
            // only for messages that did not come in one read).
            _ = async {
                if let Some(s) = started {
                    tokio::time::sleep_until(s + header_timeout).await;
                }
            }, if started.is_some() => return End::Closed,
            _ = tick.tick(), if started.is_none() => {
                if ctx.idle_for().is_some_and(|d| d >= keep_alive) {
                    return End::Closed;
                }
            }
        }
    }
}
