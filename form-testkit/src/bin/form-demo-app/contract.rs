//! The workload state contract on the admin address (docs/workload-contract.md):
//! `GET /_form/cursor`, `GET /_form/changes?since=CURSOR&max_bytes=N[&own=true]
//! [&prefixes=P,Q]` and `POST /_form/merge`.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::store::{Batch, CursorError, FORMAT, Store};
use crate::{Shared, lock, now_ms};

/// Largest batch `POST /_form/merge` takes.
pub(crate) const MAX_MERGE: usize = 16 * 1024 * 1024;
/// Batch size when `max_bytes` is not given.
const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// Largest `max_bytes` accepted.
const MAX_MAX_BYTES: usize = MAX_MERGE;
/// Smallest `max_bytes` accepted.
const MIN_MAX_BYTES: usize = 1024;

fn error(code: StatusCode, text: String) -> Response {
    (code, format!("{text}\n")).into_response()
}

fn json(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /_form/cursor`: where this instance's change log stands.
pub(crate) async fn cursor(State(app): State<Shared>) -> Response {
    let s = lock(&app);
    let body = serde_json::json!({
        "format": FORMAT,
        "origin": s.me,
        "cursor": s.cursor(),
        "head": s.head(),
        "writes": s.writes(),
    });
    json(body.to_string().into_bytes())
}

/// Query of `GET /_form/changes`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChangesQuery {
    #[serde(default)]
    since: String,
    max_bytes: Option<usize>,
    /// Only this instance's own writes, not those it merged.
    #[serde(default)]
    own: bool,
    /// Only keys with one of these prefixes, comma-separated.
    #[serde(default)]
    prefixes: String,
}

/// `GET /_form/changes?since=CURSOR&max_bytes=N`.
pub(crate) async fn changes(State(app): State<Shared>, Query(q): Query<ChangesQuery>) -> Response {
    let max = q.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    if !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&max) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("max_bytes {max} is not accepted; expected {MIN_MAX_BYTES} to {MAX_MAX_BYTES}"),
        );
    }
    let prefixes: Vec<String> = q
        .prefixes
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    match lock(&app).changes(&q.since, max, q.own, &prefixes) {
        Ok(body) => json(body),
        Err(CursorError::Malformed(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(CursorError::Gone(e)) => error(StatusCode::GONE, e),
    }
}

/// Why a body that is not a batch was refused: another format version is named as
/// such (read from the body alone, only on this error path), anything else is
/// malformed.
fn refused(bytes: &[u8], e: serde_json::Error) -> Response {
    #[derive(Deserialize)]
    struct Head {
        format: Option<String>,
    }
    match serde_json::from_slice::<Head>(bytes) {
        Ok(Head { format: Some(f) }) if f != FORMAT => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("batch format '{f}' is not accepted; expected '{FORMAT}'"),
        ),
        Ok(_) => error(
            StatusCode::BAD_REQUEST,
            format!(
                "the batch is malformed: {e}; expected the body of GET /_form/changes ({FORMAT})"
            ),
        ),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("the batch is not JSON: {e}; expected the body of GET /_form/changes"),
        ),
    }
}

/// `POST /_form/merge` with a batch: all of it is merged, or nothing.
pub(crate) async fn merge(State(app): State<Shared>, body: Body) -> Response {
    let bytes = match axum::body::to_bytes(body, MAX_MERGE).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the batch is larger than {MAX_MERGE} bytes; read smaller ones (GET /_form/changes?max_bytes=N)"
                ),
            );
        }
    };
    let batch: Batch = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return refused(&bytes, e),
    };
    if let Err(e) = Store::check(&batch, now_ms()) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("batch refused: {e}"),
        );
    }
    let merged = lock(&app).merge(batch);
    json(serde_json::to_vec(&merged).unwrap_or_default())
}
