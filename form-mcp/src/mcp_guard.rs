//! What the `/mcp` endpoint checks before rmcp sees a request, so that every answer
//! is one the protocol expects:
//! - a POST body that is not JSON: JSON-RPC `-32700` (parse error);
//! - a JSON-RPC batch (an array) or a message that is not a JSON-RPC 2.0 object:
//!   `-32600` (invalid request); the protocol has no batches since 2025-06-18;
//! - `tools/call` whose params lack a string `name` or carry non-object `arguments`:
//!   `-32602` (invalid params);
//! - a session `DELETE` answers 200 (rmcp says 202, which clients report as a failure);
//! - each token keeps at most `MAX_SESSIONS_PER_TOKEN` sessions: a new one closes the
//!   token's oldest.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use serde_json::{Value, json};

/// Sessions one token may hold open.
pub const MAX_SESSIONS_PER_TOKEN: usize = 16;
/// The header naming a session.
const SESSION: &str = "mcp-session-id";

/// Sessions by token, oldest first, and the manager that can close them.
#[derive(Debug, Default)]
pub struct Sessions {
    by_token: Mutex<HashMap<String, VecDeque<String>>>,
    manager: Arc<LocalSessionManager>,
}

impl Sessions {
    /// Over `manager`, the one rmcp's service uses.
    pub fn new(manager: Arc<LocalSessionManager>) -> Self {
        Self {
            by_token: Mutex::default(),
            manager,
        }
    }

    /// Records a new session of `token`; returns the sessions to close.
    fn opened(&self, token: &str, id: String) -> Vec<String> {
        let mut m = self.by_token.lock().unwrap_or_else(PoisonError::into_inner);
        let q = m.entry(token.to_owned()).or_default();
        q.push_back(id);
        let mut close = Vec::new();
        while q.len() > MAX_SESSIONS_PER_TOKEN {
            close.extend(q.pop_front());
        }
        close
    }

    fn closed(&self, token: &str, id: &str) {
        let mut m = self.by_token.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(q) = m.get_mut(token) {
            q.retain(|s| s != id);
        }
    }
}

fn rpc_error(code: i64, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}})
            .to_string(),
    )
        .into_response()
}

/// Why a JSON-RPC message is refused before rmcp sees it, if it is.
fn check(body: &[u8]) -> Option<Response> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Some(rpc_error(-32700, "parse error: the body is not JSON"));
    };
    let Value::Object(m) = &v else {
        return Some(rpc_error(
            -32600,
            "invalid request: batches are not supported; send one JSON-RPC 2.0 object",
        ));
    };
    if m.get("jsonrpc") != Some(&json!("2.0")) {
        return Some(rpc_error(
            -32600,
            "invalid request: expected \"jsonrpc\": \"2.0\"",
        ));
    }
    if m.get("method") == Some(&json!("tools/call")) {
        let p = m.get("params");
        let name_ok = p.and_then(|p| p.get("name")).is_some_and(Value::is_string);
        let args_ok = p
            .and_then(|p| p.get("arguments"))
            .is_none_or(|a| a.is_object() || a.is_null());
        if !name_ok || !args_ok {
            return Some(rpc_error(
                -32602,
                "invalid params: tools/call takes {\"name\": string, \"arguments\": object}",
            ));
        }
    }
    None
}

/// The guard, as an axum middleware (after the token check).
pub async fn guard(State(sessions): State<Arc<Sessions>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let session = req
        .headers()
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let method = req.method().clone();
    let req = if method == Method::POST {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, crate::rest::BODY_LIMIT).await else {
            return rpc_error(
                -32600,
                "invalid request: the body is too large or unreadable",
            );
        };
        if let Some(refused) = check(&bytes) {
            return refused;
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    let mut resp = next.run(req).await;
    if method == Method::DELETE {
        if let Some(id) = &session {
            sessions.closed(&token, id);
        }
        if resp.status() == StatusCode::ACCEPTED {
            *resp.status_mut() = StatusCode::OK;
        }
    }
    if session.is_none()
        && let Some(id) = resp.headers().get(SESSION).and_then(|v| v.to_str().ok())
    {
        for old in sessions.opened(&token, id.to_owned()) {
            tracing::info!(session = %old, "closing a token's oldest MCP session: too many open");
            let _ = sessions.manager.close_session(&old.into()).await;
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(r: Option<Response>) -> Option<StatusCode> {
        r.map(|r| r.status())
    }

    #[test]
    fn malformed_messages_get_their_json_rpc_error() {
        assert!(check(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).is_none());
        for bad in [&b"{nope"[..], b"[]", br#"{"id":1}"#] {
            assert_eq!(code_of(check(bad)), Some(StatusCode::BAD_REQUEST));
        }
        assert!(
            check(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{}}}"#)
                .is_none()
        );
        assert!(
            check(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#)
                .is_some()
        );
    }

    #[test]
    fn a_token_keeps_a_bounded_number_of_sessions() {
        let s = Sessions::default();
        let mut closed = Vec::new();
        for k in 0..MAX_SESSIONS_PER_TOKEN + 2 {
            closed.extend(s.opened("t", format!("s{k}")));
        }
        assert_eq!(closed, ["s0", "s1"]);
        s.closed("t", "s5");
        assert!(
            s.opened("t", "new".into()).is_empty(),
            "a closed one frees a place"
        );
        assert!(s.opened("u", "other".into()).is_empty(), "per token");
    }
}
