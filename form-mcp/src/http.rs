//! The HTTP routes of the gateway: the REST API, `/healthz` and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::get;

use crate::rest::{self, App};

/// Every route the gateway serves.
pub(crate) fn router(app: Arc<App>) -> Router {
    rest::router(app)
        .route("/healthz", get(healthz))
        .route("/metrics", get(form_runtime::metrics::handler))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
