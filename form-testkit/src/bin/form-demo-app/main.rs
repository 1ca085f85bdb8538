//! form-demo-app: the demo stateful workload. An HTTP service on `$PORT` whose state
//! lives in memory, so only a snapshot or the state contract carries it elsewhere:
//!
//! - `PUT /kv/{key}` stores the body; `GET /kv/{key}` returns it (404 when missing);
//!   `DELETE /kv/{key}` deletes it; a write's answer names the instance that took it
//!   (`x-instance`);
//! - `GET /session`: a per-session counter keyed by the `demo_session` cookie;
//! - `GET /whoami`: `{instance_id, generation, restored_from, keys, resources}`, where
//!   `resources` is what the instance sees of its CPUs and memory (`resources.rs`);
//! - `GET /burn?ms=N`: burns CPU for N ms (at most 10 s);
//! - `GET /healthz`: 200 once serving.
//!
//! Snapshot hook: on `$FORM_ADMIN_ADDR`, `POST /_form/snapshot` with `{"dir": PATH}`
//! (default `$FORM_SNAPSHOT_DIR`) writes `state.json` there and fsyncs it before
//! answering. A clone starts with `$FORM_RESTORE_DIR` pointing at such a directory and
//! `$FORM_RESTORED_FROM` naming the snapshot; it takes its new `$FORM_INSTANCE_ID`.
//! A VM clone restored from memory is given its identity with `POST /_form/identity`.
//!
//! State contract (docs/workload-contract.md), on the admin address too:
//! `GET /_form/cursor`, `GET /_form/changes?since=&max_bytes=`, `POST /_form/merge`.
//! The state is a CRDT (`store.rs`), so instances converge by merging each other's
//! changes. `POST /_form/close` closes the admin address (for fault tests).

mod contract;
mod resources;
mod store;

/// Merges allocate a string per key and value; mimalloc keeps that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use store::Store;

/// Longest burn accepted.
const MAX_BURN: Duration = Duration::from_secs(10);
/// Largest value accepted by `PUT /kv/{key}`.
const MAX_VALUE: usize = store::MAX_VALUE;
/// Name of the session cookie.
const COOKIE: &str = "demo_session";
/// Name of the cookie carrying the clock reading of the session's last write.
const HLC_COOKIE: &str = "demo_hlc";
/// The header a write's answer names the instance that took it with.
const INSTANCE_HEADER: &str = "x-instance";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    instance_id: String,
    restored_from: Option<String>,
}

/// Body of `POST /_form/identity`.
#[derive(Debug, Deserialize)]
struct NewIdentity {
    instance_id: String,
    restored_from: Option<String>,
    /// Fresh entropy from the host (hex), mixed into the kernel's pool: a restored VM
    /// would otherwise share its source's random state.
    #[serde(default)]
    seed: String,
}

#[derive(Debug)]
struct App {
    identity: Mutex<Identity>,
    data: Mutex<Store>,
    /// Closes the admin address (`POST /_form/close`).
    close_admin: tokio::sync::Notify,
}

type Shared = Arc<App>;

fn lock(app: &App) -> std::sync::MutexGuard<'_, Store> {
    app.data
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh number naming this run's change log in cursors.
fn incarnation() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => now_ms() ^ (u64::from(std::process::id()) << 40),
    }
}

/// A cookie named `name` of the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('='))
                .map(str::to_owned)
        })
}

fn bad(code: StatusCode, text: String) -> Response {
    (code, format!("{text}\n")).into_response()
}

/// A write of `key` (`None` deletes) with the rules every instance checks when it
/// merges, so no local write can make a batch that others refuse. The session's
/// `demo_hlc` cookie (the clock reading of its last write, on whichever instance)
/// is observed first, so a session's write is ordered after its earlier writes even
/// when it moved to an instance whose clock is behind; the answer sets it anew.
fn write(app: &App, headers: &HeaderMap, key: &str, value: Option<String>) -> Response {
    if key.len() > store::MAX_KEY {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("key is {} bytes; at most {}", key.len(), store::MAX_KEY),
        );
    }
    if let Some(v) = &value
        && v.len() > MAX_VALUE
    {
        return bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("value is {} bytes as UTF-8; at most {MAX_VALUE}", v.len()),
        );
    }
    let now = now_ms();
    let mut data = lock(app);
    if let Some(seen) = cookie(headers, HLC_COOKIE).and_then(|c| store::Hlc::parse(&c)) {
        data.observe(seen, now);
    }
    let ts = data.put(key, value, now);
    let me = data.me.clone();
    drop(data);
    (
        StatusCode::NO_CONTENT,
        [
            (
                header::SET_COOKIE,
                format!("{HLC_COOKIE}={}; Path=/; HttpOnly", ts.text()),
            ),
            // Which instance took the write (for a client that traces where it went).
            (header::HeaderName::from_static(INSTANCE_HEADER), me),
        ],
    )
        .into_response()
}

async fn put_kv(
    State(app): State<Shared>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > MAX_VALUE {
        return bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("value is {} bytes; at most {MAX_VALUE}", body.len()),
        );
    }
    let value = String::from_utf8_lossy(&body).into_owned();
    write(&app, &headers, &key, Some(value))
}

async fn get_kv(State(app): State<Shared>, UrlPath(key): UrlPath<String>) -> Response {
    match lock(&app).get(&key) {
        Some(v) => v.to_owned().into_response(),
        None => (StatusCode::NOT_FOUND, format!("no key {key}\n")).into_response(),
    }
}

/// `DELETE /kv/{key}`: a delete marker, so no older write brings the key back.
async fn delete_kv(
    State(app): State<Shared>,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    write(&app, &headers, &key, None)
}

fn identity(app: &App) -> Identity {
    app.identity
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

async fn whoami(State(app): State<Shared>) -> Response {
    let (generation, keys) = {
        let s = lock(&app);
        (s.generation, s.len())
    };
    let id = identity(&app);
    axum::Json(serde_json::json!({
        "instance_id": id.instance_id,
        "generation": generation,
        "restored_from": id.restored_from,
        "keys": keys,
        "resources": resources::seen(),
    }))
    .into_response()
}

/// `POST /_form/identity {"instance_id", "restored_from"}`: a VM restored from a
/// memory snapshot still runs as its source; the hypervisor gives it its own identity
/// (a new generation, and new session ids from here on).
async fn set_identity(State(app): State<Shared>, body: Bytes) -> Response {
    let new: NewIdentity = match serde_json::from_slice(&body) {
        Ok(i) => i,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"instance_id\": ID, \"restored_from\": ID}}: {e}\n"),
            )
                .into_response();
        }
    };
    // The clock of a restored VM stands where the snapshot left it: reread the RTC
    // (QEMU's follows the host). Outside a VM, or without the tool, this does nothing.
    let clock = std::process::Command::new("hwclock")
        .arg("-s")
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let seeded = !new.seed.is_empty()
        && std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .and_then(|mut f| f.write_all(new.seed.as_bytes()))
            .is_ok();
    let mut data = lock(&app);
    let mut identity = app
        .identity
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The same identity again (a hypervisor that retried a call whose answer it did not
    // get in time) is no new generation.
    if identity.instance_id != new.instance_id || identity.restored_from != new.restored_from {
        data.generation += 1;
        data.rename(&new.instance_id, incarnation());
        *identity = Identity {
            instance_id: new.instance_id,
            restored_from: new.restored_from,
        };
    }
    drop(identity);
    let g = data.generation;
    (
        StatusCode::OK,
        format!("generation {g} clock_synced {clock} seeded {seeded}\n"),
    )
        .into_response()
}

async fn session(State(app): State<Shared>, headers: HeaderMap) -> Response {
    // A session id the others would refuse in a batch starts a new session instead.
    let existing = cookie(&headers, COOKIE).filter(|c| store::id_ok(c));
    let me = identity(&app).instance_id;
    let mut data = lock(&app);
    let id = existing.unwrap_or_else(|| {
        data.next_session += 1;
        format!("{me}-{}", data.next_session)
    });
    let count = data.bump(&id);
    drop(data);
    let body = axum::Json(serde_json::json!({ "session": id, "count": count, "instance_id": me }));
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}={id}; Path=/; HttpOnly"),
        )],
        body,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct Burn {
    ms: u64,
}

async fn burn(Query(q): Query<Burn>) -> Response {
    let d = Duration::from_millis(q.ms).min(MAX_BURN);
    let spent = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut x: u64 = 1;
        while start.elapsed() < d {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
        }
        start.elapsed()
    })
    .await
    .unwrap_or_default();
    format!("burned {} ms\n", spent.as_millis()).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct SnapshotRequest {
    dir: Option<PathBuf>,
}

async fn snapshot(State(app): State<Shared>, body: Bytes) -> Response {
    let req: SnapshotRequest = if body.is_empty() {
        SnapshotRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"dir\": PATH}}: {e}\n"),
                )
                    .into_response();
            }
        }
    };
    let Some(dir) = req
        .dir
        .or_else(|| std::env::var_os("FORM_SNAPSHOT_DIR").map(PathBuf::from))
    else {
        return (
            StatusCode::BAD_REQUEST,
            "no dir given and FORM_SNAPSHOT_DIR is not set\n",
        )
            .into_response();
    };
    let (json, keys) = {
        let s = lock(&app);
        (serde_json::to_vec(&*s).unwrap_or_default(), s.len())
    };
    match save(&dir, &json) {
        Ok(()) => (StatusCode::OK, format!("saved {keys} keys\n")).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot save to {}: {e}\n", dir.display()),
        )
            .into_response(),
    }
}

fn save(dir: &Path, json: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("state.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("state.json"))
}

fn restore(me: &str) -> Result<(Store, Option<String>), String> {
    let Some(dir) = std::env::var_os("FORM_RESTORE_DIR").map(PathBuf::from) else {
        return Ok((Store::new(me, incarnation()), None));
    };
    let path = dir.join("state.json");
    let mut saved = match std::fs::read(&path) {
        Ok(b) => {
            Store::restore(&b, me, incarnation()).map_err(|e| format!("{}: {e}", path.display()))?
        }
        // A snapshot taken without the hook (directory copy only) has no state file.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store::new(me, incarnation()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    saved.generation += 1;
    let from = std::env::var("FORM_RESTORED_FROM")
        .ok()
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok((saved, from))
}

/// `POST /_form/close`: stops listening on the admin address (a fault for tests: the
/// platform then cannot read or merge this instance's changes).
async fn close_admin(State(app): State<Shared>) -> Response {
    app.close_admin.notify_one();
    (StatusCode::OK, "admin address closing\n").into_response()
}

fn env_addr(name: &str, default_host: &str) -> Result<Option<std::net::SocketAddr>, String> {
    match std::env::var(name) {
        Ok(v) if v.contains(':') => v
            .parse()
            .map(Some)
            .map_err(|e| format!("{name}={v}: {e}; expected IP:PORT")),
        Ok(v) => format!("{default_host}:{v}")
            .parse()
            .map(Some)
            .map_err(|e| format!("{name}={v}: {e}; expected a port number or IP:PORT")),
        Err(_) => Ok(None),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("form-demo-app: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let host = std::env::var("FORM_BIND_HOST").unwrap_or_else(|_| "0.0.0.0".into());
    let addr =
        env_addr("PORT", &host)?.ok_or("PORT is not set; expected a port number or IP:PORT")?;
    let admin = env_addr("FORM_ADMIN_ADDR", &host)?;
    let me = std::env::var("FORM_INSTANCE_ID").unwrap_or_else(|_| "standalone".into());
    let (saved, restored_from) = restore(&me)?;
    let app = Arc::new(App {
        identity: Mutex::new(Identity {
            instance_id: me,
            restored_from,
        }),
        data: Mutex::new(saved),
        close_admin: tokio::sync::Notify::new(),
    });
    let routes = Router::new()
        .route("/kv/{key}", get(get_kv).put(put_kv).delete(delete_kv))
        .route("/whoami", get(whoami))
        .route("/session", get(session))
        .route("/burn", get(burn))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app.clone());
    // The admin endpoint first: once the service answers, its snapshot hook does too.
    if let Some(admin) = admin {
        let admin_routes = Router::new()
            .route("/_form/snapshot", post(snapshot))
            .route("/_form/identity", post(set_identity))
            .route("/_form/cursor", get(contract::cursor))
            .route("/_form/changes", get(contract::changes))
            .route("/_form/merge", post(contract::merge))
            .route("/_form/close", post(close_admin))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(app.clone());
        let l = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|e| format!("cannot listen on {admin}: {e}"))?;
        let closing = app.clone();
        tokio::spawn(async move {
            axum::serve(l, admin_routes)
                .with_graceful_shutdown(async move { closing.close_admin.notified().await })
                .await
        });
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    eprintln!(
        "form-demo-app: {} serving on {addr}",
        identity(&app).instance_id
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    axum::serve(listener, routes)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await
        .map_err(|e| e.to_string())
}
