//! Mutual TLS on every gRPC connection.
//!
//! Each process holds a TLS directory (`--tls-dir`: `ca.pem`, `cert.pem`, `key.pem`,
//! see [`pki`]). Servers accept only TLS 1.3 connections whose client certificate the
//! CA signed and that names a kind and id ([`identity`]); the name reaches every
//! request as a [`Peer`] and [`crate::authz`] decides on it. Clients present their own
//! certificate and accept a server only when its certificate names the kind they
//! dialled. The files are read again when they change (renewed certificates), without
//! a restart: new handshakes use the new files, open connections keep theirs.
//!
//! A process started with `--insecure-plaintext` instead speaks plaintext and trusts
//! every caller: for development only, and said so in its log.

pub mod client;
pub mod identity;
pub mod pki;
pub mod public;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

pub use identity::{Identity, Kind};

/// How often the files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Who is at the other end of a server's connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its address.
    pub addr: Option<std::net::SocketAddr>,
    /// What its certificate names; `None` on a plaintext server.
    pub identity: Option<Identity>,
}

/// One reading of a TLS directory.
pub struct Material {
    /// Who this process is.
    pub identity: Identity,
    /// When its certificate expires (seconds since the epoch).
    pub not_after: i64,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The ring provider, the only one built in (aws-lc builds large C code; rustls marks
/// ring deprecated for its lack of post-quantum key exchange, which this local,
/// short-lived PKI accepts).
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    /// Seconds until the certificate expires (negative once it has).
    pub fn seconds_left(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.not_after - now
    }

    /// Reads `dir`; the error names the file and what is wrong with it.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))
        };
        let (ca_pem, cert_pem, key_pem) = (
            read(pki::CA_FILE)?,
            read(pki::CERT_FILE)?,
            read(pki::KEY_FILE)?,
        );
        let certs = |pem: &[u8], f: &str| -> Result<Vec<CertificateDer<'static>>, String> {
            use rustls::pki_types::pem::PemObject;
            let v: Vec<_> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", dir.join(f).display()))?;
            if v.is_empty() {
                return Err(format!(
                    "{} holds no PEM certificate",
                    dir.join(f).display()
                ));
            }
            Ok(v)
        };
        let cas = certs(&ca_pem, pki::CA_FILE)?;
        let chain = certs(&cert_pem, pki::CERT_FILE)?;
        let key = {
            use rustls::pki_types::pem::PemObject;
            PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("{}: {e}", dir.join(pki::KEY_FILE).display()))?
        };
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| format!("{}: {e}", dir.join(pki::CA_FILE).display()))?;
        }
        let roots = Arc::new(roots);
        let identity = Identity::from_der(&chain[0])
            .map_err(|e| format!("{}: {e}", dir.join(pki::CERT_FILE).display()))?;
        let not_after = {
            use x509_parser::prelude::{FromDer, X509Certificate};
            X509Certificate::from_der(&chain[0])
                .map(|(_, c)| c.validity().not_after.timestamp())
                .unwrap_or(0)
        };
        let provider = provider();
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            format!(
                "{}: the key does not fit the certificate: {e}",
                dir.display()
            )
        })?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("{}: {e}", dir.join(pki::CA_FILE).display()))?;
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| format!("{}: {e}", dir.join(pki::CA_FILE).display()))?;
        Ok(Self {
            identity,
            not_after,
            cert_pem,
            key_pem,
            certified: Arc::new(certified),
            client_verifier,
            server_verifier,
        })
    }
}

/// A TLS directory kept in memory, read again when its files change.
#[derive(Debug)]
pub struct Tls {
    dir: PathBuf,
    current: RwLock<Arc<Material>>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Tls {
    /// Reads `dir` once.
    pub fn load(dir: &Path) -> Result<Arc<Self>, String> {
        let m = Material::load(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            current: RwLock::new(Arc::new(m)),
            stamp: RwLock::new(stamps(dir)),
            generation: tokio::sync::watch::channel(0).0,
        }))
    }

    /// What is in force now.
    pub fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Who this process is.
    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    /// Changes each time new files are taken in.
    pub fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reads the files again if they changed since the last reading; a directory
    /// that does not read whole keeps what was in force. Returns whether it changed.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.dir);
        if *self
            .stamp
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == now
        {
            return false;
        }
        match Material::load(&self.dir) {
            Ok(m) => {
                let was = self.identity();
                if m.identity != was {
                    tracing::error!(now = %m.identity, was = %was, "the renewed certificate names someone else; keeping the old one");
                    return false;
                }
                tracing::info!(identity = %m.identity, not_after = m.not_after, "TLS files changed; new connections use them");
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(m);
                *self
                    .stamp
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
                self.generation.send_modify(|g| *g += 1);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but do not read whole; keeping the ones in force");
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_CHECK`] until `shutdown`.
    pub fn spawn_reloader(self: &Arc<Self>, shutdown: crate::shutdown::Shutdown) {
        let this = self.clone();
        every_reload_check(shutdown, move || {
            this.reload_if_changed();
            let left = this.current().seconds_left();
            metrics::gauge!("form_tls_certificate_seconds_left").set(left as f64);
        });
    }
}

/// Runs `check` every [`RELOAD_CHECK`] until `shutdown`.
pub(crate) fn every_reload_check(
    mut shutdown: crate::shutdown::Shutdown,
    check: impl Fn() + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.requested() => return,
                _ = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            check();
        }
    });
}

fn stamps(dir: &Path) -> Vec<Option<SystemTime>> {
    [pki::CA_FILE, pki::CERT_FILE, pki::KEY_FILE]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

/// How this process speaks gRPC.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Mutual TLS with these files.
    Mutual(Arc<Tls>),
    /// Plaintext, trusting every caller (`--insecure-plaintext`).
    Plaintext,
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// Sets how this process speaks gRPC; once, at start.
pub fn install(mode: Mode) {
    let _ = MODE.set(mode);
}

/// How this process speaks gRPC: what [`install`] set, else plaintext (tests that run
/// a service inside the test process).
pub fn mode() -> Mode {
    MODE.get().cloned().unwrap_or(Mode::Plaintext)
}

/// The TLS files in force, when this process speaks TLS.
pub fn active() -> Option<Arc<Tls>> {
    match mode() {
        Mode::Mutual(t) => Some(t),
        Mode::Plaintext => None,
    }
}

/// Reads the mode a service asked for: `--tls-dir` (whose certificate must name the
/// service's own kind) or `--insecure-plaintext`; neither is an error.
pub fn from_flags(
    service: &str,
    tls_dir: Option<&Path>,
    insecure_plaintext: bool,
) -> Result<Mode, crate::ConfigError> {
    match (tls_dir, insecure_plaintext) {
        (Some(_), true) => Err(crate::ConfigError::invalid(
            "tls_dir",
            "--tls-dir and --insecure-plaintext exclude each other; give one",
        )),
        (Some(dir), false) => {
            let tls = Tls::load(dir).map_err(|e| crate::ConfigError::invalid("tls_dir", e))?;
            let have = tls.identity();
            if let Some(want) = Kind::of_service(service)
                && have.kind != want
            {
                return Err(crate::ConfigError::invalid(
                    "tls_dir",
                    format!(
                        "{}/{} names {have}, but this is a {want} service; give it a certificate of kind {want}",
                        dir.display(),
                        pki::CERT_FILE
                    ),
                ));
            }
            Ok(Mode::Mutual(tls))
        }
        (None, true) => Ok(Mode::Plaintext),
        (None, false) => Err(crate::ConfigError::invalid(
            "tls_dir",
            "no TLS directory given; expected --tls-dir DIR holding ca.pem, cert.pem and key.pem \
             (formctl certs issue makes one), or --insecure-plaintext to run without TLS and \
             without authorization (development only)",
        )),
    }
}
