//! Prometheus metrics: the same per-backend figures as `GetStats`, read from the live
//! routes at each scrape, so a removed backend's series leave with it.

use std::fmt::Write as _;
use std::sync::{Arc, Weak};

use tokio::time::Instant;

use form_proto::rplb::v1 as pb;
use form_runtime::metrics::{add_section, label_value};

use crate::control::route_stats;
use crate::core::Core;

/// One per-backend metric: name, Prometheus type, how it is read.
type Family = (&'static str, &'static str, fn(&pb::BackendStats) -> f64);

const FAMILIES: [Family; 8] = [
    ("form_rplb_backend_in_flight", "gauge", |b| {
        f64::from(b.in_flight)
    }),
    ("form_rplb_backend_requests_total", "counter", |b| {
        b.requests_total as f64
    }),
    ("form_rplb_backend_errors_total", "counter", |b| {
        b.errors_total as f64
    }),
    ("form_rplb_backend_latency_p50_seconds", "gauge", |b| {
        b.latency_p50_ms / 1000.0
    }),
    ("form_rplb_backend_latency_p99_seconds", "gauge", |b| {
        b.latency_p99_ms / 1000.0
    }),
    ("form_rplb_backend_pinned_sessions", "gauge", |b| {
        f64::from(b.pinned_sessions)
    }),
    ("form_rplb_backend_requests_per_second", "gauge", |b| {
        b.requests_per_second
    }),
    ("form_rplb_backend_state", "gauge", |b| f64::from(b.state)),
];

/// Adds the balancer's metrics to every scrape of this process while `core` lives.
pub fn register(core: &Arc<Core>) {
    let core: Weak<Core> = Arc::downgrade(core);
    add_section(move || core.upgrade().map(|c| render(&c)));
}

/// The exposition of the routes' count and of every backend's figures.
fn render(core: &Core) -> String {
    let now = Instant::now();
    let routes: Vec<pb::RouteStats> = core
        .table
        .list()
        .iter()
        .map(|r| route_stats(r, now))
        .collect();
    let mut out = format!(
        "# TYPE form_rplb_routes gauge\nform_rplb_routes {}\n",
        routes.len()
    );
    for (name, kind, read) in FAMILIES {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for r in &routes {
            let domain = label_value(&r.domain);
            for b in &r.backends {
                let _ = writeln!(
                    out,
                    "{name}{{domain=\"{domain}\",backend=\"{}\"}} {}",
                    label_value(&b.id),
                    read(b)
                );
            }
        }
    }
    out
}
