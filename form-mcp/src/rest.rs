//! The REST API (`/api/v1`): each route parses its request into an [`Action`], checks the
//! bearer token (401 without a known one, 403 for a read token on a write) and runs it.
//! Bodies are JSON with unknown fields refused, at most [`BODY_LIMIT`] bytes.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;

use crate::api::action::Action;
use crate::api::backends::Backends;
use crate::api::model::{CreateCluster, Drain, PolicyUpdate, ScaleRequest, StateSync};
use crate::auth::{self, Tokens};
use crate::error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What the routes share.
#[derive(Debug)]
pub struct App {
    /// The services behind the gateway.
    pub backends: Backends,
    /// Accepted tokens; without any, every API request is refused.
    pub tokens: Option<Tokens>,
}

type Shared = State<Arc<App>>;

/// Every route of the REST API.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/clusters", get(list).post(create))
        .route("/api/v1/clusters/{id}", get(get_cluster).delete(delete))
        .route("/api/v1/clusters/{id}/policy", put(set_policy))
        .route("/api/v1/clusters/{id}/state-sync", put(set_state_sync))
        .route("/api/v1/clusters/{id}/scale", post(scale))
        .route("/api/v1/clusters/{id}/status", get(status))
        .route(
            "/api/v1/clusters/{id}/instances/{instance}/drain",
            post(drain),
        )
        .route(
            "/api/v1/clusters/{id}/instances/{instance}/undrain",
            post(undrain),
        )
        .route("/api/v1/clusters/{id}/drain", put(set_drain))
        .route("/api/v1/operations/{id}", get(operation))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{id}/cordon", post(cordon))
        .route("/api/v1/nodes/{id}/uncordon", post(uncordon))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/{*rest}", axum::routing::any(unknown))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app)
}

/// Every error of the API is the documented JSON: an error that axum answers itself
/// (405 for a method a route lacks, 400 for a path that is not UTF-8 ...) gets the
/// same `{"error": {"code", "message"}}` as the gateway's own.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!(
                "this route does not take that method; it takes {}",
                allow
                    .as_ref()
                    .and_then(|a| a.to_str().ok())
                    .unwrap_or("the methods of the OpenAPI document")
            ),
        ),
        StatusCode::BAD_REQUEST => ("invalid_argument", text),
        _ => ("internal", text),
    };
    let mut out = ApiError::new(status, code, message).into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(axum::http::header::ALLOW, a);
    }
    out
}

impl App {
    /// Whether the bearer token of `headers` may run `action`: 401 without a known
    /// token, 403 for a read token on a write. Returns who it is, for logs.
    pub fn authorize(&self, headers: &HeaderMap, action: &Action) -> Result<String, ApiError> {
        let (role, who) = self.authenticate(headers)?;
        if action.writes() {
            auth::require_write(role)?;
        }
        Ok(who)
    }

    /// The role of the bearer token of `headers`, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<(auth::Role, String), ApiError> {
        let tokens = self.tokens.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the gateway has no tokens configured (--tokens-file); every API request is refused",
            )
        })?;
        tokens.check(headers).map(|(r, who)| (r, who.to_owned()))
    }

    /// Runs `action` for the holder of `headers`' token; the JSON reply.
    pub async fn execute(
        &self,
        headers: &HeaderMap,
        action: Action,
    ) -> Result<crate::api::action::Reply, ApiError> {
        let who = self.authorize(headers, &action)?;
        let name = action.name();
        tracing::debug!(action = name, token = %who, "request");
        let r = if action.writes() {
            // A write runs to its end in a task of its own: a client that goes away
            // mid-create (or mid-delete) must not leave a cluster half made, a template
            // instance without its member, or an instance without its cluster.
            let backends = self.backends.clone();
            tokio::spawn(async move { action.run(&backends).await })
                .await
                .unwrap_or_else(|e| {
                    Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("the request's task failed: {e}"),
                    ))
                })
        } else {
            action.run(&self.backends).await
        };
        metrics::counter!("form_mcp_actions_total", "action" => name, "outcome" => if r.is_ok() { "ok" } else { "error" }).increment(1);
        r
    }
}

/// Checks the token of `headers` for `action`, then runs it.
pub async fn serve(app: &App, headers: &HeaderMap, action: Result<Action, ApiError>) -> Response {
    let result = match action {
        // An unauthenticated request learns nothing from validation errors.
        Err(e) => app.authenticate(headers).and(Err(e)),
        Ok(a) => app.execute(headers, a).await,
    };
    match result {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Refuses a body that says it is not JSON (a missing Content-Type is taken as JSON).
pub fn json_content(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence == "application/json" || essence.ends_with("+json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("Content-Type '{ct}' is not accepted; send application/json"),
    ))
}

/// Parses a JSON body; the error names what was wrong (the field, for a wrong type).
pub fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    shape: &str,
) -> Result<T, ApiError> {
    json_content(headers)?;
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {BODY_LIMIT} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", r.body_text())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is empty; expected JSON {shape}"),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (code, message) = if inner.is_data() {
            let field = if path == "." {
                String::new()
            } else {
                format!("{path}: ")
            };
            ("invalid_argument", format!("{field}{inner}"))
        } else {
            ("invalid_json", inner.to_string())
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            code,
            format!("{message}; expected JSON {shape}"),
        )
    })
}

async fn list(State(app): Shared, headers: HeaderMap) -> Response {
    serve(&app, &headers, Ok(Action::ListClusters)).await
}

async fn create(
    State(app): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let action = parse::<CreateCluster>(
        &headers,
        body,
        "{\"cluster_id\", \"workload\": {\"command\", ...}, ...}",
    )
    .map(|c| Action::CreateCluster(Box::new(c)));
    serve(&app, &headers, action).await
}

async fn get_cluster(State(app): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    serve(&app, &headers, Ok(Action::GetCluster(id))).await
}

async fn delete(State(app): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    serve(&app, &headers, Ok(Action::DeleteCluster(id))).await
}

async fn set_policy(
    State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let action = parse::<PolicyUpdate>(
        &headers,
        body,
        "{\"min_instances\"?, \"max_instances\"?, \"target_cpu_utilization\"?, ...} (fields left out keep their values)",
    )
    .map(|p| Action::SetPolicy(id, p));
    serve(&app, &headers, action).await
}

async fn set_state_sync(
    State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let action = parse::<StateSync>(
        &headers,
        body,
        "{\"mode\": \"none\"|\"on_scale\"|\"continuous\", \"interval_ms\", \"batch_bytes\", \"priority_prefixes\", \"refuse_unsynced_scale_in\"}",
    )
    .map(|s| Action::SetStateSync(id, s));
    serve(&app, &headers, action).await
}

async fn scale(
    State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_owned));
    let action = match key {
        Some(Err(_)) => Err(ApiError::invalid("Idempotency-Key must be visible ASCII")),
        Some(Ok(k)) => parse::<ScaleRequest>(&headers, body, SCALE_SHAPE)
            .map(|r| Action::Scale(id, r, Some(k))),
        None => {
            parse::<ScaleRequest>(&headers, body, SCALE_SHAPE).map(|r| Action::Scale(id, r, None))
        }
    };
    serve(&app, &headers, action).await
}

const SCALE_SHAPE: &str = "{\"operation\": \"scale_out\" | \"scale_in\" | \"resize\" | \"replace_instance\", \"target_count\", \"immediate\", \"drain_connections\", \"drain\", \"instance_ids_to_remove\", \"resources\", \"instance_id\"}";

async fn nodes(State(app): Shared, headers: HeaderMap) -> Response {
    serve(&app, &headers, Ok(Action::ListNodes)).await
}

async fn cordon(State(app): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    serve(&app, &headers, Ok(Action::CordonNode(id, true))).await
}

async fn uncordon(State(app): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    serve(&app, &headers, Ok(Action::CordonNode(id, false))).await
}

async fn status(State(app): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    serve(&app, &headers, Ok(Action::Status(id))).await
}

async fn drain(
    State(app): Shared,
    headers: HeaderMap,
    Path((id, instance)): Path<(String, String)>,
) -> Response {
    serve(&app, &headers, Ok(Action::DrainInstance(id, instance))).await
}

async fn undrain(
    State(app): Shared,
    headers: HeaderMap,
    Path((id, instance)): Path<(String, String)>,
) -> Response {
    serve(&app, &headers, Ok(Action::UndrainInstance(id, instance))).await
}

async fn set_drain(
    State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let action = parse::<Drain>(
        &headers,
        body,
        "{\"grace_period_seconds\": 0-3600, \"wait_for_connections\": bool, \"notify_clients\": bool}",
    )
    .map(|d| Action::SetDrain(id, d));
    serve(&app, &headers, action).await
}

async fn operation(State(app): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    serve(&app, &headers, Ok(Action::GetOperation(id))).await
}

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

async fn unknown(State(app): Shared, headers: HeaderMap) -> Response {
    let e = ApiError::not_found("no such API route; see /api/v1/openapi.json");
    serve(&app, &headers, Err(e)).await
}
