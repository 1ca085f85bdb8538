//! A client of form-mcp's REST API, over HTTP or HTTPS ([`crate::transport`]). Errors
//! say what to do: an unreachable server names the URL and how to point formctl
//! elsewhere, a 401 how to pass a token, other statuses the API's own message.
//! Each call is one connection: a CLI makes few.

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::transport::Target;

/// An error of the API, or of reaching it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// No answer.
    #[error(
        "cannot reach the API at {url}: {reason}; is `formctl up` running? (set --api or FORM_API)"
    )]
    Unreachable { url: String, reason: String },
    /// 401.
    #[error("the API refused the token (401): {0}; pass --token or set FORM_TOKEN")]
    Unauthorized(String),
    /// Any other error status.
    #[error("{status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The API's message.
        message: String,
    },
}

impl ApiError {
    /// The HTTP status, if the API answered.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Unreachable { .. } => None,
            ApiError::Unauthorized(_) => Some(StatusCode::UNAUTHORIZED),
            ApiError::Status { status, .. } => Some(*status),
        }
    }
}

/// The API at `base` (e.g. `http://127.0.0.1:3010`, `https://api.example:3010`) with a
/// bearer token.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    base: String,
    token: Option<String>,
    /// Where to connect, or why `base` cannot be reached.
    target: Result<Target, String>,
}

impl Api {
    /// A client of `base`.
    pub(crate) fn new(base: &str, token: Option<String>) -> Self {
        let base = base.trim_end_matches('/').to_owned();
        Self {
            target: Target::parse(&base),
            base,
            token,
        }
    }

    /// The base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `method path` with an optional JSON body and extra headers; the JSON reply.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value, ApiError> {
        if let Some(bad) = path
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-')))
        {
            return Err(ApiError::Status {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "{bad:?} in '{path}' is not accepted; names are letters, digits, '.', '_' and '-'"
                ),
            });
        }
        let unreachable = |reason: String| ApiError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let target = self.target.as_ref().map_err(|e| unreachable(e.clone()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, target.host_header());
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bytes = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| unreachable(e.to_string()))?;
        let call = async {
            let stream = target
                .connect()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let driver = tokio::spawn(conn);
            let sent = send.send_request(req).await;
            let resp = sent.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                unreachable(msg)
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            driver.abort();
            Ok::<_, ApiError>((status, body))
        };
        let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(60), call)
            .await
            .map_err(|_| unreachable("no answer within 60 s".into()))??;
        let json: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        if status.is_success() {
            return Ok(json);
        }
        let message = json["error"]["message"]
            .as_str()
            .map(cli_words)
            .unwrap_or_else(|| json.to_string());
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::Unauthorized(message));
        }
        Err(ApiError::Status { status, message })
    }

    /// `GET path`.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.call(Method::GET, path, None, &[]).await
    }

    /// `POST path` with `body`.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.call(Method::POST, path, Some(body), &[]).await
    }
}

/// The API's message in the words of this CLI: fields named as the flags a user types.
fn cli_words(message: &str) -> String {
    message.replace("set immediate to", "pass --immediate to")
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_fields_are_named_as_flags() {
        assert_eq!(
            super::cli_words("in its cooldown for 60 more seconds; set immediate to skip it"),
            "in its cooldown for 60 more seconds; pass --immediate to skip it"
        );
    }
}
