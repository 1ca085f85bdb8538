//! The HTTP routes of the gateway: the REST API, MCP and `/healthz` (`/metrics` is on
//! the metrics listener only).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::get;

use crate::rest::{self, App};

/// Every route the gateway serves.
pub(crate) fn router(
    app: Arc<App>,
    mcp_hosts: Vec<String>,
    mcp_origins: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> Router {
    rest::router(app.clone())
        .merge(crate::mcp::router(app, mcp_hosts, mcp_origins, stop))
        // /metrics only on --metrics-listen: the API port is for token holders.
        .route("/healthz", get(healthz))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
