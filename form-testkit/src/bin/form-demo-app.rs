//! form-demo-app: the demo stateful workload. An HTTP service on `$PORT` whose state
//! lives in memory, so only a snapshot carries it to a clone:
//!
//! - `PUT /kv/{key}` stores the body; `GET /kv/{key}` returns it (404 when missing);
//! - `GET /session`: a per-session counter keyed by the `demo_session` cookie;
//! - `GET /whoami`: `{instance_id, generation, restored_from}`;
//! - `GET /burn?ms=N`: burns CPU for N ms (at most 10 s);
//! - `GET /healthz`: 200 once serving.
//!
//! Snapshot hook: on `$FORM_ADMIN_ADDR`, `POST /_form/snapshot` with `{"dir": PATH}`
//! (default `$FORM_SNAPSHOT_DIR`) writes `state.json` there and fsyncs it before
//! answering. A clone starts with `$FORM_RESTORE_DIR` pointing at such a directory and
//! `$FORM_RESTORED_FROM` naming the snapshot; it takes its new `$FORM_INSTANCE_ID`.
//! A VM clone restored from memory is given its identity with `POST /_form/identity`.

use std::collections::BTreeMap;
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

/// Longest burn accepted.
const MAX_BURN: Duration = Duration::from_secs(10);
/// Largest value accepted by `PUT /kv/{key}`.
const MAX_VALUE: usize = 1024 * 1024;
/// Name of the session cookie.
const COOKIE: &str = "demo_session";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Saved {
    kv: BTreeMap<String, String>,
    sessions: BTreeMap<String, u64>,
    generation: u64,
    next_session: u64,
}

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
    data: Mutex<Saved>,
}

type Shared = Arc<App>;

fn lock(app: &App) -> std::sync::MutexGuard<'_, Saved> {
    app.data
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn put_kv(State(app): State<Shared>, UrlPath(key): UrlPath<String>, body: Bytes) -> Response {
    if body.len() > MAX_VALUE {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("value is {} bytes; at most {MAX_VALUE}\n", body.len()),
        )
            .into_response();
    }
    let value = String::from_utf8_lossy(&body).into_owned();
    lock(&app).kv.insert(key, value);
    StatusCode::NO_CONTENT.into_response()
}

async fn get_kv(State(app): State<Shared>, UrlPath(key): UrlPath<String>) -> Response {
    match lock(&app).kv.get(&key) {
        Some(v) => v.clone().into_response(),
        None => (StatusCode::NOT_FOUND, format!("no key {key}\n")).into_response(),
    }
}

fn identity(app: &App) -> Identity {
    app.identity
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

async fn whoami(State(app): State<Shared>) -> Response {
    let generation = lock(&app).generation;
    let id = identity(&app);
    axum::Json(serde_json::json!({
        "instance_id": id.instance_id,
        "generation": generation,
        "restored_from": id.restored_from,
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
    data.generation += 1;
    *app.identity
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Identity {
        instance_id: new.instance_id,
        restored_from: new.restored_from,
    };
    let g = data.generation;
    (
        StatusCode::OK,
        format!("generation {g} clock_synced {clock} seeded {seeded}\n"),
    )
        .into_response()
}

async fn session(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let existing = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
        .next();
    let me = identity(&app).instance_id;
    let mut data = lock(&app);
    let id = existing.unwrap_or_else(|| {
        data.next_session += 1;
        format!("{me}-{}", data.next_session)
    });
    let count = {
        let c = data.sessions.entry(id.clone()).or_insert(0);
        *c += 1;
        *c
    };
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
    let saved = lock(&app).clone();
    match save(&dir, &saved) {
        Ok(()) => (StatusCode::OK, format!("saved {} keys\n", saved.kv.len())).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot save to {}: {e}\n", dir.display()),
        )
            .into_response(),
    }
}

fn save(dir: &Path, saved: &Saved) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("state.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(saved).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("state.json"))
}

fn restore() -> Result<(Saved, Option<String>), String> {
    let Some(dir) = std::env::var_os("FORM_RESTORE_DIR").map(PathBuf::from) else {
        return Ok((Saved::default(), None));
    };
    let path = dir.join("state.json");
    let mut saved: Saved = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?,
        // A snapshot taken without the hook (directory copy only) has no state file.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    saved.generation += 1;
    let from = std::env::var("FORM_RESTORED_FROM")
        .ok()
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok((saved, from))
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
    let (saved, restored_from) = restore()?;
    let app = Arc::new(App {
        identity: Mutex::new(Identity {
            instance_id: std::env::var("FORM_INSTANCE_ID").unwrap_or_else(|_| "standalone".into()),
            restored_from,
        }),
        data: Mutex::new(saved),
    });
    let routes = Router::new()
        .route("/kv/{key}", get(get_kv).put(put_kv))
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
            .with_state(app.clone());
        let l = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|e| format!("cannot listen on {admin}: {e}"))?;
        tokio::spawn(async move { axum::serve(l, admin_routes).await });
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
