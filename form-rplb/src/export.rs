//! Prometheus metrics: the same per-backend figures as `GetStats`, published every
//! [`EVERY`] (the request path only touches atomics and its backend's window).

use std::sync::Arc;
use std::time::{Duration, Instant};

use form_runtime::shutdown::Shutdown;

use crate::control::route_stats;
use crate::core::Core;

/// Publication interval.
pub const EVERY: Duration = Duration::from_secs(1);

/// Publishes until shutdown.
pub async fn run(core: Arc<Core>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => publish(&core),
            _ = shutdown.requested() => return,
        }
    }
}

fn publish(core: &Core) {
    let now = Instant::now();
    let routes = core.table.list();
    metrics::gauge!("form_rplb_routes").set(routes.len() as f64);
    for r in routes {
        let s = route_stats(&r, now);
        for b in s.backends {
            let labels = [("domain", s.domain.clone()), ("backend", b.id.clone())];
            metrics::gauge!("form_rplb_backend_in_flight", &labels).set(f64::from(b.in_flight));
            metrics::counter!("form_rplb_backend_requests_total", &labels)
                .absolute(b.requests_total);
            metrics::counter!("form_rplb_backend_errors_total", &labels).absolute(b.errors_total);
            metrics::gauge!("form_rplb_backend_latency_p50_seconds", &labels)
                .set(b.latency_p50_ms / 1000.0);
            metrics::gauge!("form_rplb_backend_latency_p99_seconds", &labels)
                .set(b.latency_p99_ms / 1000.0);
            metrics::gauge!("form_rplb_backend_pinned_sessions", &labels)
                .set(f64::from(b.pinned_sessions));
            metrics::gauge!("form_rplb_backend_requests_per_second", &labels)
                .set(b.requests_per_second);
            metrics::gauge!("form_rplb_backend_state", &labels).set(f64::from(b.state));
        }
    }
}
