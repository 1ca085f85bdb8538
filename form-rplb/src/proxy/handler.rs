//! One proxied request: route by host, choose a backend (affinity, drain and health
//! states), forward with the forwarding fields, retry once elsewhere when the
//! connection to the backend failed before any body byte was sent, and stream the
//! response back with the session cookie and, from a draining backend, the request to
//! reconnect.

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use super::body::{Guard, ResBody, UpBody};
use super::conn::ConnCtx;
use super::headers;
use super::upstream::Lease;
use crate::balance::p2c::Rng;
use crate::balance::select::{Affinity, Decision, Loads, RequestKey};
use crate::core::Core;
use crate::routes::RouteView;
use crate::routes::backend::BackendRt;

thread_local! {
    static RNG: RefCell<Rng> = RefCell::new(Rng::new(seed()));
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let thread = format!("{:?}", std::thread::current().id());
    crate::balance::hash64(&[&t.to_le_bytes()[..], thread.as_bytes()].concat())
}

struct Live<'a>(&'a [Arc<BackendRt>]);

impl Loads for Live<'_> {
    fn load(&self, index: usize) -> u64 {
        self.0.get(index).map_or(0, |b| b.in_flight())
    }
}

/// Answers one request.
pub async fn handle(
    core: Arc<Core>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, Infallible> {
    let mut guard = Guard::new(conn.clone());
    let resp = proxy(&core, &conn, req, &mut guard).await;
    Ok(match resp {
        Ok((r, lease)) => r.map(|body| ResBody::Upstream {
            body,
            guard: Some(guard),
            lease: Some(lease),
            done: false,
        }),
        Err(local) => local,
    })
}

/// A response of the balancer's own.
pub fn local(status: StatusCode, text: String) -> Response<ResBody> {
    let mut r = Response::new(ResBody::text(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

struct Choice {
    decision: Decision,
    session: Option<u64>,
}

fn choose(
    core: &Core,
    route: &RouteView,
    req_headers: &http::HeaderMap,
    uri: &Uri,
    client_ip: std::net::IpAddr,
    exclude: Option<usize>,
) -> Option<Choice> {
    let affinity = &route.settings.affinity;
    let cookie = match affinity {
        Affinity::Cookie { name, .. } => headers::cookie(req_headers, name),
        _ => None,
    };
    let hash_value = match affinity {
        Affinity::Hash { parameter } => headers::hash_value(parameter, req_headers, uri.query()),
        _ => None,
    };
    let key = RequestKey {
        client_ip: Some(client_ip),
        hash_value,
        cookie,
    };
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let decision = RNG.with(|rng| {
        route.selector.select(
            affinity,
            key,
            &Live(&route.backends),
            exclude,
            &core.signer,
            Instant::now(),
            now_unix,
            &mut rng.borrow_mut(),
        )
    })?;
    let session = if decision.pinned {
        cookie.map(|c| crate::balance::hash64(c.as_bytes()))
    } else {
        decision
            .set_cookie
            .as_ref()
            .map(|c| crate::balance::hash64(c.as_bytes()))
    };
    Some(Choice { decision, session })
}

async fn proxy(
    core: &Arc<Core>,
    conn: &ConnCtx,
    req: Request<Incoming>,
    guard: &mut Guard,
) -> Result<(Response<Incoming>, Lease), Response<ResBody>> {
    let host = match headers::host(req.uri(), req.headers()) {
        Some(h) => h.into_owned(),
        None => {
            return Err(local(
                StatusCode::BAD_REQUEST,
                "request names no host: send a Host header (or an :authority) with the cluster's domain\n".into(),
            ));
        }
    };
    let Some(route) = core.table.get(&host) else {
        return Err(local(
            StatusCode::NOT_FOUND,
            format!("no route for host '{host}'\n"),
        ));
    };
    let peer = conn.peer.ip();
    let peer_trusted = core.trusted.contains(peer);
    let client_ip = headers::client_ip(peer, req.headers(), &core.trusted);
    let Some(mut choice) = choose(core, &route, req.headers(), req.uri(), client_ip, None) else {
        return Err(no_backend(&host));
    };

    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::set_forwarded(&mut parts.headers, peer, &host, peer_trusted);
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    parts.version = Version::HTTP_11;
    // The upstream request, built once; a connection that turns out closed before it
    // left gives it back whole, and a failed connect never took it.
    // An idempotent request without a body may be repeated once on a fresh connection
    // when a pooled one fails before any response (the backend closed it as the request
    // left, RFC 9110 9.2.2); for those the head is kept.
    let repeatable = parts.method.is_idempotent() && body.is_end_stream();
    let mut pending = Some(Request::from_parts(parts, UpBody::Client(body)));
    let mut retried = false;
    let mut fresh = false;
    let timeout = Duration::from_millis(core.config.request_timeout_ms);
    loop {
        let backend = route.backends[choice.decision.backend].clone();
        if let Some(s) = choice.session {
            backend.touch_session(s, Instant::now());
        }
        let start = Instant::now();
        // Counted in flight from now: a drain waiting for zero sees the connect too.
        guard.to_backend(backend.clone());
        // A connection first: a failed connect is known before anything is sent.
        let up = match conn.pool.get(&backend.authority, fresh).await {
            Ok(up) => up,
            Err(e) => {
                guard.release_backend();
                let now = Instant::now();
                backend.stats.record(now - start, false, now);
                passive(core, &route, &backend, false, now);
                let Some(req) = pending.as_ref() else {
                    return Err(no_backend(&host));
                };
                if !retried {
                    retried = true;
                    fresh = false;
                    tracing::debug!(backend = %backend.id, error = %e, "connect failed; retrying on another backend");
                    choice = choose(
                        core,
                        &route,
                        req.headers(),
                        req.uri(),
                        client_ip,
                        Some(choice.decision.backend),
                    )
                    .ok_or_else(|| no_backend(&host))?;
                    continue;
                }
                tracing::warn!(domain = %host, backend = %backend.id, error = %e, "backend unreachable");
                return Err(local(
                    StatusCode::BAD_GATEWAY,
                    format!("the backend of '{host}' is unreachable\n"),
                ));
            }
        };
        let Some(req) = pending.take() else {
            return Err(no_backend(&host));
        };
        let copy = (repeatable && up.reused && !fresh).then(|| {
            let mut c = Request::new(UpBody::Empty);
            *c.method_mut() = req.method().clone();
            *c.uri_mut() = req.uri().clone();
            *c.version_mut() = req.version();
            *c.headers_mut() = req.headers().clone();
            c
        });
        let mut sender = up.sender;
        let result = tokio::time::timeout(timeout, sender.try_send_request(req)).await;
        let now = Instant::now();
        match result {
            Ok(Ok(mut resp)) => {
                let ok = !resp.status().is_server_error();
                backend.stats.record(now - start, ok, now);
                passive(core, &route, &backend, ok, now);
                headers::strip_hop_by_hop(resp.headers_mut());
                if let (Some(c), Affinity::Cookie { name, ttl_seconds }) =
                    (&choice.decision.set_cookie, &route.settings.affinity)
                {
                    let v = format!(
                        "{name}={c}; Path=/; Max-Age={ttl_seconds}; HttpOnly; SameSite=Lax"
                    );
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                if backend.notifies_clients() {
                    if version == Version::HTTP_2 {
                        conn.go_away();
                    } else {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                }
                let lease = Lease {
                    pool: conn.pool.clone(),
                    to: backend.authority.clone(),
                    sender,
                };
                return Ok((resp, lease));
            }
            Ok(Err(mut e)) => {
                guard.release_backend();
                if let Some(req) = e.take_message()
                    && !fresh
                {
                    // The pooled connection closed under us; nothing was sent.
                    pending = Some(req);
                    fresh = true;
                    continue;
                }
                if let Some(c) = copy {
                    // Sent on a pooled connection that failed before any response.
                    tracing::debug!(backend = %backend.id, error = %e.error(), "pooled connection failed; repeating the idempotent request on a fresh one");
                    pending = Some(c);
                    fresh = true;
                    continue;
                }
                let e = e.into_error();
                backend.stats.record(now - start, false, now);
                passive(core, &route, &backend, false, now);
                tracing::debug!(backend = %backend.id, error = %e, "backend request failed");
                tracing::warn!(domain = %host, backend = %backend.id, error = %error_chain(&e), "backend request failed");
                return Err(local(
                    StatusCode::BAD_GATEWAY,
                    format!("the backend of '{host}' failed to answer\n"),
                ));
            }
            Err(_) => {
                guard.release_backend();
                backend.stats.record(now - start, false, now);
                // A request whose body the client never finished may time out through
                // no fault of the backend: only body-less ones count against it.
                if repeatable {
                    passive(core, &route, &backend, false, now);
                }
                return Err(local(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the backend of '{host}' sent no response within {} ms\n",
                        core.config.request_timeout_ms
                    ),
                ));
            }
        }
    }
}

fn no_backend(host: &str) -> Response<ResBody> {
    local(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no backend of '{host}' can take the request now; retry shortly\n"),
    )
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Records a request outcome in the backend's health; a change rebuilds the route.
fn passive(core: &Core, route: &RouteView, backend: &BackendRt, ok: bool, now: Instant) {
    if backend.with_health(|h| h.on_request(ok, now)) {
        tracing::warn!(domain = %route.settings.domain, backend = %backend.id, "backend ejected after consecutive failures");
        core.table.refresh(&route.settings.domain);
    }
}
