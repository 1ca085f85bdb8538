//! The balancer's own answers to a request it could not proxy, the same on every path.

use http::StatusCode;

/// Why the balancer answers itself.
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    /// The request names no host.
    NoHost,
    /// No route has this domain.
    NoRoute(&'a str),
    /// No backend of the domain can take a request now.
    NoBackend(&'a str),
    /// The chosen backends could not be reached.
    Unreachable(&'a str),
    /// The backend failed before its response.
    Failed(&'a str),
    /// The backend sent no response within this many milliseconds.
    Timeout(&'a str, u64),
}

impl Answer<'_> {
    /// The status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoHost => StatusCode::BAD_REQUEST,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unreachable(_) | Self::Failed(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The text of the body.
    pub fn text(&self) -> String {
        match self {
            Self::NoHost => "request names no host: send a Host header (or an :authority) with the cluster's domain\n".into(),
            Self::NoRoute(host) => format!("no route for host '{host}'\n"),
            Self::NoBackend(host) => {
                format!("no backend of '{host}' can take the request now; retry shortly\n")
            }
            Self::Unreachable(host) => format!("the backend of '{host}' is unreachable\n"),
            Self::Failed(host) => format!("the backend of '{host}' failed to answer\n"),
            Self::Timeout(host, ms) => {
                format!("the backend of '{host}' sent no response within {ms} ms\n")
            }
        }
    }
}
