//! Active health checks of one backend: every `interval`, GET the route's check path
//! (2xx or 3xx within `timeout` passes); `fall` failures eject it, `rise` passes bring
//! it back. A route without a check path checks only passively ejected backends, by
//! opening a TCP connection once their cool-off ended. Each change of health rebuilds
//! the route's selector.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;

use crate::core::Core;
use crate::routes::backend::BackendRt;
use crate::routes::settings::CheckSettings;

/// Pause between passes when a route has no check path.
const PASSIVE_RECHECK: Duration = Duration::from_millis(500);

/// Checks `backend` of `domain` until it leaves the route.
pub async fn run(core: Arc<Core>, domain: String, backend: Arc<BackendRt>) {
    loop {
        if backend.is_removed() {
            return;
        }
        let Some(route) = core.table.get(&domain) else {
            return;
        };
        let settings = route.settings.check.clone();
        drop(route);
        let now = Instant::now();
        let pause = if settings.path.is_empty() {
            PASSIVE_RECHECK
        } else {
            settings.interval
        };
        let ejected = !backend.with_health(|h| h.is_healthy());
        let due = backend.with_health(|h| h.check_due(now));
        if due && (!settings.path.is_empty() || ejected) {
            let passed = probe(&core, &backend, &settings).await;
            if backend.with_health(|h| h.on_check(passed, Instant::now())) {
                let healthy = backend.with_health(|h| h.is_healthy());
                if healthy {
                    tracing::info!(domain, backend = %backend.id, "backend back in rotation");
                } else {
                    tracing::warn!(domain, backend = %backend.id, "backend ejected by health checks");
                }
                core.table.refresh(&domain);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

async fn probe(core: &Core, backend: &BackendRt, settings: &CheckSettings) -> bool {
    if settings.path.is_empty() {
        let addr = backend.authority.as_str().to_owned();
        return matches!(
            tokio::time::timeout(settings.timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
    }
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(backend.authority.clone())
        .path_and_query(settings.path.as_str())
        .build()
    else {
        return false;
    };
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("form-rplb-health-check"),
    );
    match tokio::time::timeout(settings.timeout, core.check_client.request(req)).await {
        Ok(Ok(resp)) => resp.status().is_success() || resp.status().is_redirection(),
        _ => false,
    }
}
