//! The process-wide Prometheus recorder and the `/metrics` endpoint.

use std::sync::OnceLock;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::RuntimeError;
use crate::shutdown::Shutdown;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (later calls reuse it) and
/// returns its handle. Without it, `metrics` macros record nothing.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder installed first (an embedding program) keeps its place.
        drop(metrics::set_global_recorder(recorder));
        handle
    })
}

/// The Prometheus text exposition of every metric recorded in this process.
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    handle.render()
}

/// An axum handler answering with [`render`].
pub async fn handler() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, mut shutdown: Shutdown) -> Result<(), RuntimeError> {
    install();
    let app = Router::new().route("/metrics", get(handler));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.requested().await;
        })
        .await
        .map_err(|e| RuntimeError::Serve {
            name: "metrics",
            message: e.to_string(),
        })
}
