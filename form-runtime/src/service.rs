//! The `main` of every service binary:
//!
//! ```text
//! parse flags ──bad──> one line, exit 2
//!   │ load config file, apply env and flags, validate ──bad──> one line, exit 2
//!   │ install logs and metrics, bind every listener ──in use──> exit 75, ──fail──> exit 1
//!   │ run the service; when it says ready, write the ready file
//!   │ SIGTERM: graceful, wait for the service up to GRACEFUL_DEADLINE, exit 0
//!   └ SIGINT: exit 130 at once
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::cli::{self, CommonArgs, EXIT_USAGE};
use crate::config::ServiceConfig;
use crate::ready::{self, ReadyInfo};
use crate::shutdown::{self, GRACEFUL_DEADLINE, Shutdown, ShutdownKind};
use crate::{ConfigError, RuntimeError, logging, metrics};

/// Name of the listener that serves `/metrics`; the runtime serves it itself.
pub const METRICS_LISTENER: &str = "metrics";
/// Exit code after SIGINT (128 + signal number, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code when a listen address is already in use (`EX_TEMPFAIL` of sysexits.h: the
/// same command may succeed later, or on other ports). A supervisor that chose the
/// ports itself (`formctl up --auto-ports`) picks new ones and starts again.
pub const EXIT_ADDR_IN_USE: u8 = 75;
/// Time left to blocking tasks when the runtime is torn down.
const RUNTIME_TEARDOWN: Duration = Duration::from_millis(200);

/// A service binary, as the runtime drives it.
pub trait Service: Sized + Send + 'static {
    /// Binary name, e.g. `form-state`.
    const NAME: &'static str;
    /// The binary's flags (they flatten [`CommonArgs`]).
    type Args: clap::Parser;
    /// The service's configuration.
    type Config: ServiceConfig;

    /// Builds the service from its flags: reads the config file named by the common
    /// flags, applies environment variables and flags on top, validates. Binds nothing.
    fn configure(args: Self::Args) -> Result<(Self, CommonArgs), ConfigError>;

    /// Every address to bind, by listener name; include [`METRICS_LISTENER`].
    fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)>;

    /// How long a graceful shutdown (SIGTERM) may take before what still runs is
    /// abandoned.
    fn graceful_deadline(&self) -> Duration {
        GRACEFUL_DEADLINE
    }

    /// Runs until `ctx.shutdown` asks it to stop; calls `ctx.ready()` once serving.
    fn run(self, ctx: RunContext) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

/// What a running service gets from the runtime.
#[derive(Debug)]
pub struct RunContext {
    listeners: BTreeMap<&'static str, TcpListener>,
    /// The shutdown signal.
    pub shutdown: Shutdown,
    ready: Option<oneshot::Sender<()>>,
}

impl RunContext {
    /// Takes the bound listener `name`.
    pub fn take_listener(&mut self, name: &str) -> Result<TcpListener, RuntimeError> {
        self.listeners
            .remove(name)
            .ok_or_else(|| RuntimeError::Service(format!("no listener named {name}")))
    }

    /// The bound address of listener `name`, while it has not been taken.
    pub fn local_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        self.listeners.get(name).and_then(|l| l.local_addr().ok())
    }

    /// Tells the runtime that the service serves; writes the ready file.
    pub fn ready(&mut self) {
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(());
        }
    }
}

/// The whole `main` of a service binary.
pub fn main<S: Service>() -> ExitCode {
    let args = match cli::parse_service::<S::Args>(
        S::Config::DEFAULT_LISTEN,
        S::Config::DEFAULT_METRICS_LISTEN,
    ) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let (service, common) = match S::configure(args) {
        Ok(v) => v,
        Err(e) => {
            cli::usage_error(&e.to_string());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = logging::init(&common) {
        cli::usage_error(&e.to_string());
        return ExitCode::from(EXIT_USAGE);
    }
    match crate::tls::from_flags(
        S::NAME,
        common.tls_dir.as_deref(),
        common.insecure_plaintext,
    ) {
        Ok(mode) => {
            match &mode {
                crate::tls::Mode::Mutual(t) => {
                    tracing::info!(identity = %t.identity(), "gRPC is mutual TLS");
                }
                crate::tls::Mode::Plaintext => tracing::warn!(
                    "--insecure-plaintext: gRPC is plaintext and every caller is trusted; for development only"
                ),
            }
            crate::tls::install(mode);
        }
        Err(e) => {
            cli::usage_error(&e.to_string());
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: error: cannot start the async runtime: {e}", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run_service(service, common.ready_file));
    runtime.shutdown_timeout(RUNTIME_TEARDOWN);
    code
}

async fn run_service<S: Service>(service: S, ready_file: Option<PathBuf>) -> ExitCode {
    metrics::install();
    let (handle, shutdown) = shutdown::channel();
    if let Some(tls) = crate::tls::active() {
        tls.spawn_reloader(shutdown.clone());
    }
    if let Err(e) = shutdown::spawn_signal_listener(handle.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    let (mut listeners, addresses) = match bind_all(service.listen_addrs()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("{}: error: {e}", S::NAME);
            return match e {
                RuntimeError::Bind { source, .. }
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    ExitCode::from(EXIT_ADDR_IN_USE)
                }
                _ => ExitCode::FAILURE,
            };
        }
    };
    if let Some(l) = listeners.remove(METRICS_LISTENER) {
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(l, sd).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let (ready_tx, ready_rx) = oneshot::channel();
    let ctx = RunContext {
        listeners,
        shutdown: shutdown.clone(),
        ready: Some(ready_tx),
    };
    let deadline = service.graceful_deadline();
    let mut run = tokio::spawn(service.run(ctx));

    tokio::select! {
        r = ready_rx => {
            if r.is_ok() {
                tracing::info!(service = S::NAME, addresses = ?addresses, "ready");
                if let Some(path) = &ready_file {
                    let info = ReadyInfo {
                        service: S::NAME.to_owned(),
                        pid: std::process::id(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        addresses: addresses.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
                    };
                    if let Err(e) = ready::write(path, &info) {
                        tracing::error!(error = %e, "cannot write ready file");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        r = &mut run => return finish_after(r, &shutdown, ready_file.as_deref()),
    }

    let mut sd = shutdown.clone();
    let kind = tokio::select! {
        // A fast request must win over the service stopping because of it.
        biased;
        k = sd.requested() => k,
        r = &mut run => return finish_after(r, &shutdown, ready_file.as_deref()),
    };
    remove_ready_file(ready_file.as_deref());
    match kind {
        ShutdownKind::Fast => ExitCode::from(EXIT_INTERRUPTED),
        ShutdownKind::Graceful => match tokio::time::timeout(deadline, &mut run).await {
            Ok(r) => finish(r, None),
            Err(_) => {
                tracing::warn!(deadline = ?deadline, "graceful shutdown deadline passed; abandoning what is still running");
                run.abort();
                ExitCode::SUCCESS
            }
        },
    }
}

async fn bind_all(
    addrs: Vec<(&'static str, SocketAddr)>,
) -> Result<
    (
        BTreeMap<&'static str, TcpListener>,
        BTreeMap<&'static str, SocketAddr>,
    ),
    RuntimeError,
> {
    let mut listeners = BTreeMap::new();
    let mut bound = BTreeMap::new();
    for (name, addr) in addrs {
        let err = |source| RuntimeError::Bind { name, addr, source };
        let l = TcpListener::bind(addr).await.map_err(err)?;
        bound.insert(name, l.local_addr().map_err(err)?);
        listeners.insert(name, l);
    }
    Ok((listeners, bound))
}

/// `finish`, unless a fast stop was asked for: the service may see the request and
/// stop before the caller's select does, and SIGINT still exits 130.
fn finish_after(
    r: Result<Result<(), RuntimeError>, tokio::task::JoinError>,
    shutdown: &Shutdown,
    ready_file: Option<&Path>,
) -> ExitCode {
    if shutdown.current() == Some(ShutdownKind::Fast) {
        remove_ready_file(ready_file);
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    finish(r, ready_file)
}

fn finish(
    r: Result<Result<(), RuntimeError>, tokio::task::JoinError>,
    ready_file: Option<&Path>,
) -> ExitCode {
    remove_ready_file(ready_file);
    match r {
        Ok(Ok(())) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "service failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "service panicked");
            ExitCode::FAILURE
        }
    }
}

fn remove_ready_file(path: Option<&Path>) {
    if let Some(p) = path {
        drop(std::fs::remove_file(p));
    }
}
