//! The tests' certificate authority: every service a test starts gets a certificate
//! of its kind from it (so every test runs with mutual TLS, as the platform does), and
//! test clients connect with one of their own.
//!
//! One CA per test process, in `<tmp>/form-test-pki-<pid>`; directories of test
//! processes that are gone are removed when the next one starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use form_runtime::tls::pki::{self, Ca};
use form_runtime::tls::{Identity, Kind};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{ClientTlsConfig, Endpoint};

/// Lifetime of the tests' certificates.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);

struct Pki {
    root: PathBuf,
    ca: Ca,
    issued: Mutex<HashMap<(Kind, String), PathBuf>>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale(&tmp);
        let root = tmp.join(format!("form-test-pki-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&root));
        let ca = Ca::load_or_generate(&root.join("ca"), "form test CA")
            .unwrap_or_else(|e| panic!("test CA: {e}"));
        Pki {
            root,
            ca,
            issued: Mutex::new(HashMap::new()),
        }
    })
}

/// Removes the CA directories of test processes that no longer run.
fn remove_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("form-test-pki-")
            .and_then(|p| p.parse::<i32>().ok())
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
        {
            drop(std::fs::remove_dir_all(e.path()));
        }
    }
}

/// The tests' CA (to issue odd certificates with).
pub fn ca() -> &'static Ca {
    &pki().ca
}

/// A TLS directory for `kind`/`id`, issued once per test process.
pub fn tls_dir(kind: Kind, id: &str) -> PathBuf {
    let p = pki();
    let mut issued = p
        .issued
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    issued
        .entry((kind, id.to_owned()))
        .or_insert_with(|| {
            let dir = p.root.join(format!("{kind}-{id}"));
            let who = Identity::new(kind, id).unwrap_or_else(|e| panic!("{e}"));
            p.ca.issue_into(&dir, &who, LIFETIME)
                .unwrap_or_else(|e| panic!("issuing {who}: {e}"));
            dir
        })
        .clone()
}

/// The TLS directory of a test calling as `kind` (its id: `test-<kind>`).
fn caller_dir(kind: Kind) -> PathBuf {
    tls_dir(kind, &format!("test-{kind}"))
}

/// The TLS directory a service binary gets when a test starts it (by its file name),
/// with `id` as its id; `None` for a binary that is not a service.
pub fn service_tls_dir(bin: &Path, id: &str) -> Option<PathBuf> {
    let name = bin.file_name()?.to_str()?;
    let kind = Kind::of_service(name)?;
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    Some(tls_dir(kind, &id))
}

static PLAINTEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, services started by this process speak plaintext gRPC
/// (`--insecure-plaintext`) and [`crate::probe`]'s channels do too (`false` goes back
/// to mutual TLS). For benchmarks that compare the two; tests keep TLS.
pub fn use_plaintext(on: bool) {
    PLAINTEXT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`use_plaintext`] is on.
pub fn plaintext() -> bool {
    PLAINTEXT.load(std::sync::atomic::Ordering::Relaxed)
}

/// The flags that give `bin` its certificate (or, after [`use_plaintext`], that make
/// it speak plaintext), unless `args` already choose.
pub fn service_args(bin: &Path, id: &str, args: &[String]) -> Vec<String> {
    if args
        .iter()
        .any(|a| a == "--tls-dir" || a == "--insecure-plaintext")
    {
        return Vec::new();
    }
    if plaintext() && service_tls_dir(bin, id).is_some() {
        return vec!["--insecure-plaintext".to_owned()];
    }
    service_tls_dir(bin, id)
        .map(|d| vec!["--tls-dir".to_owned(), d.display().to_string()])
        .unwrap_or_default()
}

/// Accepts a server whose certificate the CA signed and that names any kind of ours
/// (a test's probe does not always know what it dials).
#[derive(Debug)]
struct AnyKind(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyKind {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no kind".into());
        for k in Kind::ALL {
            let Ok(name) = ServerName::try_from(k.dns_name()) else {
                continue;
            };
            match self
                .0
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The three files of the TLS directory `dir`: (CA, certificate, key), in PEM.
fn read_tls_dir(dir: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let read = |f: &str| std::fs::read(dir.join(f));
    Ok((
        read(pki::CA_FILE)?,
        read(pki::CERT_FILE)?,
        read(pki::KEY_FILE)?,
    ))
}

/// A verifier of servers of any kind signed by the CAs in `ca_pem`.
fn any_kind(ca_pem: &[u8]) -> anyhow::Result<Arc<AnyKind>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c?)?;
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), form_runtime::tls::provider())
            .build()?;
    Ok(Arc::new(AnyKind(verifier)))
}

/// An endpoint to `addr` with `config` (its domain name set here) and `verifier`.
fn tls_endpoint(
    addr: std::net::SocketAddr,
    config: ClientTlsConfig,
    verifier: Arc<AnyKind>,
) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config_with_verifier(config.domain_name(Kind::State.dns_name()), verifier)?)
}

/// An endpoint to the service at `addr` presenting the certificate in `dir`.
pub fn endpoint_with(addr: std::net::SocketAddr, dir: &Path) -> anyhow::Result<Endpoint> {
    let (ca, cert, key) = read_tls_dir(dir)?;
    let config = ClientTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
    tls_endpoint(addr, config, any_kind(&ca)?)
}

/// An endpoint to the service at `addr` that presents no certificate at all.
pub fn endpoint_without_certificate(addr: std::net::SocketAddr) -> anyhow::Result<Endpoint> {
    tls_endpoint(
        addr,
        ClientTlsConfig::new(),
        any_kind(ca().cert_pem.as_bytes())?,
    )
}

/// An endpoint to the service at `addr` as a caller of `kind`.
pub fn endpoint_as(addr: std::net::SocketAddr, kind: Kind) -> anyhow::Result<Endpoint> {
    endpoint_with(addr, &caller_dir(kind))
}

/// The DER of the certificate the gRPC server at `addr` presents (the handshake is
/// made as an operator, which every server accepts).
pub async fn served_certificate(addr: std::net::SocketAddr) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let (ca, cert, key) = read_tls_dir(&tls_dir(Kind::Operator, "test-probe"))?;
    let verifier = any_kind(&ca)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert).collect::<Result<_, _>>()?;
    let mut config = rustls::ClientConfig::builder_with_provider(form_runtime::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(&key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(Kind::State.dns_name())?, tcp),
    )
    .await??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("{addr} sent no certificate"))?;
    Ok(leaf.as_ref().to_vec())
}

/// The kind of the gRPC server at `addr`, read from its certificate.
pub async fn server_kind(addr: std::net::SocketAddr) -> anyhow::Result<Kind> {
    let der = served_certificate(addr).await?;
    Identity::from_der(&der)
        .map(|i| i.kind)
        .map_err(anyhow::Error::msg)
}

/// Who a test is when it calls a server of `kind` without saying: the platform's own
/// caller of it (the controller calls form-state, vmm nodes and balancers; the
/// gateway calls the controller).
pub fn natural_caller(kind: Kind) -> Kind {
    match kind {
        Kind::State | Kind::Vmm | Kind::Rplb => Kind::Scaler,
        Kind::Scaler => Kind::Gateway,
        Kind::Gateway | Kind::Operator => Kind::Operator,
    }
}

/// Makes this test process speak mutual TLS as a caller of `kind` in the platform's
/// own clients (`form_runtime::upstream`, `form_runtime::tls::client`), for tests
/// that use them in-process. Once per process: the first kind asked for stays.
pub fn install_client(kind: Kind) {
    let tls = form_runtime::tls::Tls::load(&caller_dir(kind)).unwrap_or_else(|e| panic!("{e}"));
    form_runtime::tls::install(form_runtime::tls::Mode::Mutual(tls));
}
