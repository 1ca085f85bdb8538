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

/// Renders part of the exposition at scrape time; `None` once its source is gone.
type Section = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Sections rendered at every scrape, after the recorder's metrics.
static SECTIONS: std::sync::Mutex<Vec<Section>> = std::sync::Mutex::new(Vec::new());

/// Adds `section` to every scrape: for series read from live state when scraped, which
/// disappear with what they describe (a recorder keeps a series it has seen forever).
/// The section is dropped the first time it returns `None`. Each section must own its
/// metric names (its `# TYPE` lines): a family written twice makes the scrape invalid.
pub fn add_section(section: impl Fn() -> Option<String> + Send + Sync + 'static) {
    SECTIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Box::new(section));
}

/// A label value escaped for the text exposition (backslash, quote, newline).
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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

/// The Prometheus text exposition of every metric recorded in this process, and of
/// every live section.
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    let mut out = handle.render();
    SECTIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|section| match section() {
            Some(text) => {
                out.push_str(&text);
                true
            }
            None => false,
        });
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_rendered_until_their_source_is_gone() {
        let source = std::sync::Arc::new("x_live 1\n".to_owned());
        let weak = std::sync::Arc::downgrade(&source);
        add_section(move || weak.upgrade().map(|s| s.to_string()));
        assert!(render().contains("x_live 1\n"));
        drop(source);
        assert!(!render().contains("x_live"));
        assert!(!render().contains("x_live"), "and it stays gone");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
