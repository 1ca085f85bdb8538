//! The HTTP routes of the gateway.

use axum::Json;
use axum::Router;
use axum::routing::get;

/// Every route the gateway serves.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(form_runtime::metrics::handler))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
