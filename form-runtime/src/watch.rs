//! Following form-state's `Watch`: a stream from sequence 0 (a `Reset`, the whole
//! state, `Synced`, then every change) is opened, each event handed on, and when the
//! stream ends, fails or stalls (nothing for [`STALLED`], while a replica sends a
//! progress mark every second when idle) the follower is told and a new one is opened
//! after a backoff (it starts with a whole snapshot again; the channel may have moved
//! to another replica meanwhile). The balancer keeps its routes this way,
//! and the controller its view of the clusters.

use std::future::Future;

use form_proto::state::v1 as pb;

use crate::shutdown::Shutdown;
use crate::upstream::{BACKOFF_MAX, BACKOFF_MIN};

/// A stream that sends nothing for this long (a replica sends a progress mark every
/// second when idle) is taken as stalled: a replica that hangs, or a link that went
/// silent, is left for another stream.
pub const STALLED: std::time::Duration = std::time::Duration::from_secs(5);

/// What follows the stream.
pub trait Follower {
    /// An event, in the stream's order.
    fn event(&mut self, ev: pb::WatchEvent);

    /// The stream ended or failed: events stop until a new stream's `Reset`.
    fn lost(&mut self) {}
}

/// The whole-state request a follower opens.
pub fn from_start() -> pb::WatchRequest {
    pb::WatchRequest {
        from_sequence: 0,
        cluster_id: String::new(),
    }
}

/// Follows until shutdown: `open` starts a stream (`who` names the follower in logs).
pub async fn follow<F, Fut>(who: &str, mut open: F, f: &mut impl Follower, mut shutdown: Shutdown)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Streaming<pb::WatchEvent>, tonic::Status>>,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        // Opening waits no longer than a stream may be silent: a hung replica does
        // not hold the follower on its second try either.
        let started = tokio::select! {
            r = tokio::time::timeout(STALLED, open()) => r.unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!("no answer to the watch within {STALLED:?}")))
            }),
            _ = shutdown.requested() => return,
        };
        match started {
            Ok(mut stream) => loop {
                let msg = tokio::select! {
                    m = tokio::time::timeout(STALLED, stream.message()) => m,
                    _ = shutdown.requested() => return,
                };
                let Ok(msg) = msg else {
                    tracing::warn!(who, after = ?STALLED, "the watch of form-state sent nothing, not even a progress mark; reconnecting");
                    f.lost();
                    break;
                };
                match msg {
                    Ok(Some(ev)) => {
                        backoff = BACKOFF_MIN;
                        f.event(ev);
                    }
                    Ok(None) => {
                        tracing::warn!(who, "form-state ended the watch; reconnecting");
                        f.lost();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(who, error = %e.message(), "watch of form-state failed; reconnecting");
                        f.lost();
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!(who, error = %e.message(), "cannot watch form-state yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.requested() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
