//! One proxied request: route by host, choose a backend (affinity, drain and health
//! states), forward with the forwarding fields, retry once elsewhere when the
//! connection to the backend failed before any body byte was sent, and stream the
//! response back with the session cookie and, from a draining backend, the request to
//! reconnect.

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use super::answer::Answer;
use super::body::{Guard, ResBody, UpBody};
use super::conn::ConnCtx;
use super::headers::{self, Fields};
use super::upstream::Lease;
use crate::balance::health::Passive;
use crate::balance::p2c::Rng;
use crate::balance::select::{Affinity, Decision, Loads, RequestKey};
use crate::core::Core;
use crate::routes::RouteView;
use crate::routes::backend::{Admin, BackendRt};

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

/// Choices made again because the chosen backend's drain had just ended, at most.
pub(super) const MAX_REDRAWS: u32 = 3;

/// A backend chosen for a request.
pub(super) struct Choice {
    /// The selector's decision.
    pub(super) decision: Decision,
    /// The session (hash of its cookie) the request belongs to, if any.
    pub(super) session: Option<u64>,
}

/// The backend for a request with `req_headers` and `query` from `client_ip` (not
/// `exclude`, the one a connect just failed to), and the session it belongs to.
pub(super) fn choose(
    core: &Core,
    route: &RouteView,
    req_headers: &impl Fields,
    query: Option<&str>,
    client_ip: std::net::IpAddr,
    exclude: Option<usize>,
) -> Option<Choice> {
    let affinity = &route.settings.affinity;
    let cookie = match affinity {
        Affinity::Cookie { name, .. } => headers::cookie(req_headers, name),
        _ => None,
    };
    let hash_value = match affinity {
        Affinity::Hash { parameter } => headers::hash_value(parameter, req_headers, query),
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

/// What the data plane picks for a request to `host` from `client_ip` with `headers`
/// (their cookie and hash parameter count): the route it read, and the backend, as
/// `choose` picks one for every proxied request; `None` without a route or a
/// backend that can take it. For checks of the balancer's picks without sockets (the
/// in-process platform's traffic).
pub fn pick(
    core: &Core,
    host: &str,
    headers: &http::HeaderMap,
    client_ip: std::net::IpAddr,
) -> Option<(Arc<RouteView>, Decision)> {
    let route = core.table.get(host)?;
    let choice = choose(core, &route, headers, None, client_ip, None)?;
    Some((route, choice.decision))
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
            return Err(answer(Answer::NoHost));
        }
    };
    let Some(mut route) = core.table.get(&host) else {
        return Err(answer(Answer::NoRoute(&host)));
    };
    let peer = conn.peer.ip();
    let peer_trusted = core.trusted.contains(peer);
    let client_ip = headers::client_ip(peer, req.headers(), &core.trusted);
    let pick = |route: &RouteView, fields: &http::HeaderMap, query: Option<&str>, exclude| {
        choose(core, route, fields, query, client_ip, exclude)
    };
    let Some(mut choice) = pick(&route, req.headers(), req.uri().query(), None) else {
        return Err(no_backend(&host));
    };

    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::set_forwarded(&mut parts.headers, peer, &host, peer_trusted, conn.scheme());
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
    let mut redrawn = 0;
    loop {
        let Some(attempt) = Attempt::begin(&route, &choice, guard) else {
            redrawn += 1;
            let (Some(req), Some(now)) = (pending.as_ref(), core.table.get(&host)) else {
                return Err(no_backend(&host));
            };
            route = now;
            choice = pick(&route, req.headers(), req.uri().query(), None)
                .filter(|_| redrawn <= MAX_REDRAWS)
                .ok_or_else(|| no_backend(&host))?;
            continue;
        };
        let backend = attempt.backend.clone();
        // A connection first: a failed connect is known before anything is sent.
        let up = match conn.pool.get(&backend.authority, fresh).await {
            Ok(up) => up,
            Err(e) => {
                attempt.failed(core, &route, guard);
                let Some(req) = pending.as_ref() else {
                    return Err(no_backend(&host));
                };
                if !retried {
                    retried = true;
                    fresh = false;
                    tracing::debug!(backend = %backend.id, error = %e, "connect failed; retrying on another backend");
                    choice = pick(
                        &route,
                        req.headers(),
                        req.uri().query(),
                        Some(choice.decision.backend),
                    )
                    .ok_or_else(|| no_backend(&host))?;
                    continue;
                }
                tracing::warn!(domain = %host, backend = %backend.id, error = %e, "backend unreachable");
                return Err(answer(Answer::Unreachable(&host)));
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
        match result {
            Ok(Ok(mut resp)) => {
                attempt.answered(core, &route, !resp.status().is_server_error());
                headers::strip_hop_by_hop(resp.headers_mut());
                if let Some(v) = session_cookie(&choice, &route, conn.tls)
                    && let Ok(v) = HeaderValue::from_str(&v)
                {
                    resp.headers_mut().append(header::SET_COOKIE, v);
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
                attempt.answered(core, &route, false);
                tracing::debug!(backend = %backend.id, error = %e, "backend request failed");
                tracing::warn!(domain = %host, backend = %backend.id, error = %error_chain(&e), "backend request failed");
                return Err(answer(Answer::Failed(&host)));
            }
            Err(_) => {
                guard.release_backend();
                // A request whose body the client never finished may time out through
                // no fault of the backend: only body-less ones count against it.
                let now = attempt.recorded(false);
                if repeatable {
                    passive(core, &route, &backend, false, now);
                }
                return Err(answer(Answer::Timeout(
                    &host,
                    core.config.request_timeout_ms,
                )));
            }
        }
    }
}

fn no_backend(host: &str) -> Response<ResBody> {
    answer(Answer::NoBackend(host))
}

fn answer(a: Answer<'_>) -> Response<ResBody> {
    local(a.status(), a.text())
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

/// One attempt of a request at a backend, counted in its in-flight requests from the
/// start (a drain waiting for zero sees the connect too), its session touched.
pub(super) struct Attempt {
    /// The backend.
    pub(super) backend: Arc<BackendRt>,
    start: Instant,
}

impl Attempt {
    /// Begins an attempt at the backend of `choice`; `None` when that backend's drain
    /// ended since the choice (choose again, on the route as it is now).
    ///
    /// The request counts in flight before it reads the drain state, and a drain sets
    /// that state before it waits for zero in flight (both under the state's lock):
    /// either the drain sees this request and waits for it, or this request sees the
    /// drain's end and goes elsewhere. No request reaches a backend reported drained.
    pub(super) fn begin(route: &RouteView, choice: &Choice, guard: &mut Guard) -> Option<Self> {
        let backend = route.backends[choice.decision.backend].clone();
        guard.to_backend(backend.clone());
        if backend.admin() == Admin::Drained {
            guard.release_backend();
            return None;
        }
        if let Some(s) = choice.session {
            backend.touch_session(s, Instant::now());
        }
        Some(Self {
            backend,
            start: Instant::now(),
        })
    }

    /// The attempt failed (to connect, or to get a response): it leaves the backend's
    /// in-flight requests and counts against it.
    pub(super) fn failed(&self, core: &Core, route: &RouteView, guard: &mut Guard) {
        guard.release_backend();
        self.answered(core, route, false);
    }

    /// The attempt ended with a response head (`ok` unless a server error) or failed:
    /// recorded in the backend's statistics and health.
    pub(super) fn answered(&self, core: &Core, route: &RouteView, ok: bool) {
        let now = self.recorded(ok);
        passive(core, route, &self.backend, ok, now);
    }

    /// Records the attempt in the backend's statistics only; the time now.
    pub(super) fn recorded(&self, ok: bool) -> Instant {
        let now = Instant::now();
        self.backend.stats.record(now - self.start, ok, now);
        now
    }
}

/// The `Set-Cookie` value that pins the request's new (or re-pinned) session.
pub(super) fn session_cookie(choice: &Choice, route: &RouteView, tls: bool) -> Option<String> {
    // Over HTTPS the browser must not send it back in clear.
    let secure = if tls { "; Secure" } else { "" };
    match (&choice.decision.set_cookie, &route.settings.affinity) {
        (Some(c), Affinity::Cookie { name, ttl_seconds }) => Some(format!(
            "{name}={c}; Path=/; Max-Age={ttl_seconds}; HttpOnly; SameSite=Lax{secure}"
        )),
        _ => None,
    }
}

/// Passive ejections are decided one at a time, so two cannot both pass the limit.
static EJECTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Records a request outcome in the backend's health; a change rebuilds the route.
/// Passive ejection may take at most `max_ejection_percent` of a route's serving
/// backends out, and never the last one (Envoy's maximum ejection percentage):
/// failures that every backend shares, an application error or an overload, must not
/// turn into no backend at all.
pub(super) fn passive(core: &Core, route: &RouteView, backend: &BackendRt, ok: bool, now: Instant) {
    if ok || !backend.with_health(|h| h.failure_reaches_threshold()) {
        // Nothing to decide (a failure counted meanwhile elsewhere lets the next decide).
        backend.with_health(|h| h.on_request(ok, now, false));
        return;
    }
    let _one_at_a_time = EJECTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limit = core.config.max_ejection_percent;
    let may_eject = route_may_lose(route, backend, limit);
    let domain = &route.settings.domain;
    match backend.with_health(|h| h.on_request(false, now, may_eject)) {
        Passive::Unchanged => {}
        Passive::Ejected => {
            tracing::warn!(%domain, backend = %backend.id, "backend ejected after consecutive failures");
            core.table.refresh(domain);
        }
        Passive::Held => {
            tracing::warn!(%domain, backend = %backend.id, max_ejection_percent = limit, "backend failing but kept in rotation: the route's ejection limit is reached");
        }
    }
}

/// Whether `route` can lose `backend` to passive ejection: one that takes no new
/// requests anyway (draining, leaving) always; a serving one while, with it out, at
/// most `limit_percent` of the serving backends would be ejected and one would still
/// serve. Each backend's lock is taken alone, `backend`'s too.
fn route_may_lose(route: &RouteView, backend: &BackendRt, limit_percent: u8) -> bool {
    let serving = |b: &BackendRt| b.admin() == Admin::Active && !b.is_leaving();
    if !serving(backend) {
        return true;
    }
    let (mut serving_n, mut out) = (0usize, 0usize);
    for b in route.backends.iter().filter(|b| serving(b)) {
        serving_n += 1;
        if !b.with_health(|h| h.is_healthy()) {
            out += 1;
        }
    }
    out + 1 < serving_n && (out + 1) * 100 <= serving_n * usize::from(limit_percent)
}
