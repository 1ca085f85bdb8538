//! HTTPS for the public side (the balancer's data plane, the gateway): certificates
//! from a directory, one per domain, chosen by the name the client asks for (SNI).
//!
//! The directory holds pairs `<name>.crt` (the chain, leaf first, PEM) and
//! `<name>.key` (its private key, PEM). A pair serves every DNS name its leaf
//! certificate lists, wildcards (`*.example.com`, one label) included; an exact name
//! wins over a wildcard. The pair named `default` also serves clients that ask for no
//! name or a name no certificate lists; without it those handshakes are refused. The
//! files are read again when they change (every [`super::RELOAD_CHECK`]); a directory
//! that no longer reads whole keeps the certificates in force, with a warning.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Extension of a certificate chain file.
pub const CERT_EXT: &str = "crt";
/// Extension of a private key file.
pub const KEY_EXT: &str = "key";
/// Stem of the pair that serves unknown names.
pub const DEFAULT_STEM: &str = "default";

/// The certificates of one reading of the directory.
#[derive(Debug, Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by what follows `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl Table {
    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return Some(k.clone());
        }
        self.default.clone()
    }

    /// Reads every pair of `dir`; the error names the file and what is wrong.
    fn load(dir: &Path) -> Result<(Self, Vec<String>), String> {
        let provider = super::provider();
        let mut table = Self::default();
        let mut names = Vec::new();
        let pairs = pairs(dir)?;
        if pairs.is_empty() {
            return Err(format!(
                "{} holds no certificate: expected <name>.{CERT_EXT} with <name>.{KEY_EXT} beside it",
                dir.display()
            ));
        }
        for (stem, (cert_path, key_path)) in pairs {
            let (chain, key) = read_pair(&cert_path, &key_path)?;
            let dns = dns_names(&chain[0]).map_err(|e| format!("{}: {e}", cert_path.display()))?;
            let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                format!(
                    "{}: the key {} does not fit the certificate: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
            let certified = Arc::new(certified);
            if stem == DEFAULT_STEM {
                table.default = Some(certified.clone());
            }
            if dns.is_empty() && stem != DEFAULT_STEM {
                return Err(format!(
                    "{}: the certificate lists no DNS name (subjectAltName), so no client could ask for it; name the pair {DEFAULT_STEM} to serve every name",
                    cert_path.display()
                ));
            }
            for name in dns {
                let name = name.to_ascii_lowercase();
                let slot = match name.strip_prefix("*.") {
                    Some(parent) => table.wildcard.entry(parent.to_owned()),
                    None => table.exact.entry(name.clone()),
                };
                // The first pair (in name order) that lists a name keeps it.
                slot.or_insert_with(|| certified.clone());
                names.push(name);
            }
        }
        names.sort();
        names.dedup();
        Ok((table, names))
    }
}

/// `<stem>` → (`<stem>.crt`, `<stem>.key`), in name order; a `.crt` without its key
/// is an error.
fn pairs(dir: &Path) -> Result<BTreeMap<String, (PathBuf, PathBuf)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some(CERT_EXT) {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let key = path.with_extension(KEY_EXT);
        if !key.is_file() {
            return Err(format!(
                "{}: no private key {} beside it",
                path.display(),
                key.display()
            ));
        }
        out.insert(stem.to_owned(), (path, key));
    }
    Ok(out)
}

fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok((chain, key))
}

fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect())
}

fn stamps(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            // Through symlinks: an ACME client renews the file a link points to.
            let m = std::fs::metadata(e.path()).and_then(|m| m.modified()).ok();
            (e.path(), m)
        })
        .collect();
    v.sort();
    v
}

/// The public certificates of a directory, kept in memory and read again when the
/// files change.
#[derive(Debug)]
pub struct PublicCerts {
    dir: PathBuf,
    table: RwLock<Arc<Table>>,
    names: RwLock<Vec<String>>,
    stamp: RwLock<Vec<(PathBuf, Option<SystemTime>)>>,
}

impl PublicCerts {
    /// Reads `dir`; an error names the file and what is wrong with it.
    pub fn load(dir: &Path) -> Result<Arc<Self>, String> {
        let stamp = stamps(dir);
        let (table, names) = Table::load(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            table: RwLock::new(Arc::new(table)),
            names: RwLock::new(names),
            stamp: RwLock::new(stamp),
        }))
    }

    /// The DNS names served now (sorted; wildcards as `*.parent`).
    pub fn names(&self) -> Vec<String> {
        self.names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether a certificate in force serves `name` (a default pair serves every name).
    pub fn serves(&self, name: &str) -> bool {
        self.table().pick(Some(name)).is_some()
    }

    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the directory again if its files changed; returns whether new
    /// certificates are in force.
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
        match Table::load(&self.dir) {
            Ok((table, names)) => {
                tracing::info!(dir = %self.dir.display(), ?names, "HTTPS certificates changed; new connections use them");
                *self
                    .table
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
                *self
                    .names
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
                *self
                    .stamp
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "HTTPS certificates changed but do not read whole; keeping the ones in force");
                false
            }
        }
    }

    /// Checks the files every [`super::RELOAD_CHECK`] until `shutdown`.
    pub fn spawn_reloader(self: &Arc<Self>, shutdown: crate::shutdown::Shutdown) {
        let this = self.clone();
        super::every_reload_check(shutdown, move || {
            this.reload_if_changed();
        });
    }

    /// The certificates of the setting `https_certs`, if given; an error names the
    /// setting and the file.
    pub fn from_setting(dir: Option<&Path>) -> Result<Option<Arc<Self>>, crate::ConfigError> {
        dir.map(|d| Self::load(d).map_err(|e| crate::ConfigError::invalid("https_certs", e)))
            .transpose()
    }

    /// An acceptor for TLS 1.2 and 1.3 that offers HTTP/2 and HTTP/1.1 (ALPN), picks
    /// the certificate by SNI at each handshake and resumes sessions with tickets.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        let mut config = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A client of public HTTPS servers that trusts the authorities in `roots_pem` (a
/// bundle may hold certificates rustls cannot use: the others still count) and offers
/// the ALPN protocols `alpn`; an error when none is usable.
pub fn client_config(roots_pem: &[u8], alpn: &[&[u8]]) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem) {
        let _ = roots.add(c.map_err(|e| e.to_string())?);
    }
    if roots.is_empty() {
        return Err("no usable PEM certificate".into());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[derive(Debug)]
struct Resolver(Arc<PublicCerts>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let picked = self.0.table().pick(hello.server_name());
        if picked.is_none() {
            metrics::counter!("form_https_unknown_name_total").increment(1);
        }
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        std::fs::write(dir.join(format!("{stem}.{CERT_EXT}")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{stem}.{KEY_EXT}")), key.serialize_pem()).expect("write");
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("form-public-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn picks_exact_then_wildcard_then_default() {
        let d = tmp("pick");
        write_pair(&d, "a", &["a.example.com"]);
        write_pair(&d, "wild", &["*.example.com"]);
        let certs = PublicCerts::load(&d).expect("load");
        let t = certs.table();
        let a = t.pick(Some("a.example.com")).expect("a");
        let b = t.pick(Some("B.Example.com.")).expect("wildcard");
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(
            t.pick(Some("x.y.example.com")).is_none(),
            "a wildcard covers one label"
        );
        assert!(t.pick(Some("other.org")).is_none());
        assert!(t.pick(None).is_none());
        assert_eq!(certs.names(), vec!["*.example.com", "a.example.com"]);
        write_pair(&d, DEFAULT_STEM, &[]);
        assert!(certs.reload_if_changed());
        assert!(certs.serves("other.org"));
        assert!(certs.table().pick(None).is_some());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn errors_name_the_file() {
        let d = tmp("errors");
        let e = PublicCerts::load(&d).expect_err("empty");
        assert!(e.contains("holds no certificate"), "{e}");
        write_pair(&d, "a", &["a.example.com"]);
        std::fs::remove_file(d.join("a.key")).expect("rm");
        let e = PublicCerts::load(&d).expect_err("no key");
        assert!(e.contains("a.crt") && e.contains("no private key"), "{e}");
        write_pair(&d, "a", &["a.example.com"]);
        write_pair(&d, "b", &["b.example.com"]);
        std::fs::copy(d.join("a.key"), d.join("b.key")).expect("cp");
        let e = PublicCerts::load(&d).expect_err("mismatch");
        assert!(e.contains("b.crt") && e.contains("does not fit"), "{e}");
        write_pair(&d, "b", &[]);
        let e = PublicCerts::load(&d).expect_err("no names");
        assert!(e.contains("lists no DNS name"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_broken_renewal_keeps_what_is_in_force() {
        let d = tmp("renew");
        write_pair(&d, "a", &["a.example.com"]);
        let certs = PublicCerts::load(&d).expect("load");
        std::fs::write(d.join("a.crt"), "not pem").expect("write");
        assert!(!certs.reload_if_changed());
        assert!(certs.serves("a.example.com"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
