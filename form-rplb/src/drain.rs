//! Draining a backend: from the moment a drain starts it takes no new unpinned
//! request; sessions pinned to it continue until the grace period ends; with
//! `wait_for_connections` the drain completes as soon as its in-flight requests reach
//! zero. Its responses meanwhile ask clients to reconnect when `notify_clients` is set.
//! Progress is published on a watch channel every [`PROGRESS_INTERVAL`] until the
//! result; any number of `DrainBackend` streams follow it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use form_proto::rplb::v1 as pb;
use tokio::sync::watch;

use crate::core::Core;
use crate::routes::backend::{Admin, BackendRt};
use crate::routes::settings::DrainSettings;

/// How often progress is published.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Why a drain could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// No such route.
    #[error("no route for domain '{0}'")]
    NoRoute(String),
    /// No such backend.
    #[error("route '{domain}' has no backend '{backend}'")]
    NoBackend {
        /// The route.
        domain: String,
        /// The backend asked for.
        backend: String,
    },
}

fn progress(
    b: &BackendRt,
    until: Instant,
    now: Instant,
    result: pb::DrainResult,
) -> pb::DrainProgress {
    pb::DrainProgress {
        in_flight: u32::try_from(b.in_flight()).unwrap_or(u32::MAX),
        pinned_sessions: b.pinned_sessions(now),
        seconds_left: until.saturating_duration_since(now).as_secs_f64(),
        result: result.into(),
    }
}

/// Starts draining `backend_id` of `domain` (or joins the drain that runs); returns the
/// progress channel.
pub fn start(
    core: &Arc<Core>,
    domain: &str,
    backend_id: &str,
    settings: DrainSettings,
) -> Result<watch::Receiver<pb::DrainProgress>, DrainError> {
    let route = core
        .table
        .get(domain)
        .ok_or_else(|| DrainError::NoRoute(domain.to_owned()))?;
    let backend = route
        .backend(backend_id)
        .cloned()
        .ok_or_else(|| DrainError::NoBackend {
            domain: domain.to_owned(),
            backend: backend_id.to_owned(),
        })?;
    let now = Instant::now();
    let until = now + settings.grace;
    let (tx, rx) = watch::channel(progress(&backend, until, now, pb::DrainResult::Unspecified));
    let draining = Admin::Draining {
        until,
        notify: settings.notify_clients,
    };
    if !backend.begin_drain(draining, &rx) {
        // Draining or drained already: follow that drain. A drained backend that was
        // meanwhile removed with `drain_removed` leaves now.
        if backend.admin() == Admin::Drained && backend.is_leaving() {
            core.table.drop_backend(domain, &backend);
        }
        if let Some(rx) = backend.drain_progress() {
            return Ok(rx);
        }
        let done = progress(&backend, now, now, pb::DrainResult::Completed);
        return Ok(watch::channel(done).1);
    }
    core.table.refresh(domain);
    tracing::info!(domain, backend = backend_id, grace = ?settings.grace, wait_for_connections = settings.wait_for_connections, "drain started");
    tokio::spawn(run(
        core.clone(),
        domain.to_owned(),
        backend,
        until,
        settings,
        tx,
    ));
    Ok(rx)
}

async fn run(
    core: Arc<Core>,
    domain: String,
    backend: Arc<BackendRt>,
    until: Instant,
    settings: DrainSettings,
    tx: watch::Sender<pb::DrainProgress>,
) {
    loop {
        let now = Instant::now();
        if backend.is_removed() {
            tx.send_replace(progress(&backend, until, now, pb::DrainResult::Cancelled));
            tracing::info!(domain, backend = %backend.id, "drain cancelled: backend removed");
            return;
        }
        let idle = backend.in_flight() == 0;
        let result = if settings.wait_for_connections && idle {
            Some(pb::DrainResult::Completed)
        } else if now >= until {
            Some(if idle {
                pb::DrainResult::Completed
            } else {
                pb::DrainResult::TimedOut
            })
        } else {
            None
        };
        match result {
            Some(mut r) => {
                backend.set_admin(Admin::Drained);
                if backend.is_leaving() {
                    core.table.drop_backend(&domain, &backend);
                } else {
                    core.table.refresh(&domain);
                }
                // A request that chose this backend before it was marked drained and
                // counted itself in flight before it could see the mark goes on
                // (`Attempt::begin`); it finishes before the drain is reported done.
                while r == pb::DrainResult::Completed && backend.in_flight() > 0 {
                    if Instant::now() >= until {
                        r = pb::DrainResult::TimedOut;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let now = Instant::now();
                tx.send_replace(progress(&backend, until, now, r));
                tracing::info!(domain, backend = %backend.id, result = ?r, "drain ended");
                return;
            }
            None => {
                tx.send_replace(progress(&backend, until, now, pb::DrainResult::Unspecified));
            }
        }
        tokio::time::sleep(
            PROGRESS_INTERVAL
                .min(until.saturating_duration_since(now))
                .max(Duration::from_millis(1)),
        )
        .await;
    }
}
