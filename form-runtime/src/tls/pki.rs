//! A local certificate authority: made by `formctl up`, the compose set-up and the
//! tests, it signs one short-lived certificate per service instance (and one for
//! formctl). A TLS directory holds `ca.pem` (the authorities trusted), `cert.pem` and
//! `key.pem` (the holder's own); files are replaced by rename, so a reader never sees
//! half of one.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::identity::Identity;

/// The file of the trusted authorities in a TLS directory.
pub const CA_FILE: &str = "ca.pem";
/// The file of the holder's certificate.
pub const CERT_FILE: &str = "cert.pem";
/// The file of the holder's private key.
pub const KEY_FILE: &str = "key.pem";
/// The CA's private key, in the CA's own directory only.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long a certificate is valid unless told otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long the CA itself is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back a certificate's validity starts, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// A certificate authority: its certificate and key, in PEM.
#[derive(Clone)]
pub struct Ca {
    /// The CA certificate.
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

fn err(what: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn validity(params: &mut CertificateParams, lifetime: Duration, backdate: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - backdate;
    params.not_after = now + lifetime;
}

impl Ca {
    /// A new authority named `name`, valid for [`CA_LIFETIME`].
    pub fn generate(name: &str) -> Result<Self, String> {
        let key = KeyPair::generate().map_err(err("making the CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("CA"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_LIFETIME, BACKDATE);
        let cert = params.self_signed(&key).map_err(err("signing the CA"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The authority kept in `dir` (`ca.pem`, `ca-key.pem`).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| format!("reading {}: {e}", dir.join(f).display()))
        };
        Ok(Self {
            cert_pem: read(CA_FILE)?,
            key_pem: read(CA_KEY_FILE)?,
        })
    }

    /// Keeps the authority in `dir` (the key readable by its owner only).
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        write_file(dir, CA_FILE, &self.cert_pem, 0o644)?;
        write_file(dir, CA_KEY_FILE, &self.key_pem, 0o600)
    }

    /// The authority in `dir`, made there first if it has none.
    pub fn load_or_generate(dir: &Path, name: &str) -> Result<Self, String> {
        if dir.join(CA_KEY_FILE).exists() {
            return Self::load(dir);
        }
        let ca = Self::generate(name)?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// A certificate for `who`, valid from now (less a few minutes) for `lifetime`.
    pub fn issue(&self, who: &Identity, lifetime: Duration) -> Result<Issued, String> {
        self.issue_between(who, lifetime, BACKDATE)
    }

    /// A certificate for `who` whose validity started `backdate` ago and lasts
    /// `lifetime` from now (tests make expired ones with `backdate` > 0, `lifetime` 0).
    pub fn issue_between(
        &self,
        who: &Identity,
        lifetime: Duration,
        backdate: Duration,
    ) -> Result<Issued, String> {
        let mut params =
            CertificateParams::new(vec![who.kind.dns_name()]).map_err(err("certificate"))?;
        let uri = who
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| format!("{who}: {e}"))?;
        params.subject_alt_names.push(SanType::URI(uri));
        params
            .distinguished_name
            .push(DnType::CommonName, who.to_string());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, lifetime, backdate);
        self.sign(params)
    }

    /// Signs `params` (a leaf for digital signatures) for a new key.
    fn sign(&self, mut params: CertificateParams) -> Result<Issued, String> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(err("reading the CA key"))?;
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(err("reading the CA"))?;
        let key = KeyPair::generate().map_err(err("making a key"))?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(err("signing the certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for the DNS names `names` (a public HTTPS listener's:
    /// see [`super::public`]), valid from now for `lifetime`.
    pub fn issue_domains(&self, names: &[String], lifetime: Duration) -> Result<Issued, String> {
        if names.is_empty() {
            return Err("no DNS name to certify".into());
        }
        for name in names {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            if rustls::pki_types::DnsName::try_from(bare).is_err() || bare.contains('*') {
                return Err(format!(
                    "'{name}' is not a DNS name: expected names such as demo.localhost or *.apps.example"
                ));
            }
        }
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| format!("{}: {e}", names.join(", ")))?;
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, lifetime, BACKDATE);
        self.sign(params)
    }

    /// Issues a certificate for `who` into the TLS directory `dir` (with this CA as
    /// the one trusted), replacing what is there.
    pub fn issue_into(&self, dir: &Path, who: &Identity, lifetime: Duration) -> Result<(), String> {
        self.issue(who, lifetime)?.write(dir, &self.cert_pem)
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

impl Issued {
    /// Writes `ca.pem` (`trusted`), then the key, then the certificate: a reader that
    /// sees the new certificate also sees its key.
    pub fn write(&self, dir: &Path, trusted: &str) -> Result<(), String> {
        write_file(dir, CA_FILE, trusted, 0o644)?;
        write_file(dir, KEY_FILE, &self.key_pem, 0o600)?;
        write_file(dir, CERT_FILE, &self.cert_pem, 0o644)
    }
}

impl Issued {
    /// Writes the pair `<stem>.key` and `<stem>.crt` of a public certificate
    /// directory (see [`super::public`]), the key first.
    pub fn write_pair(&self, dir: &Path, stem: &str) -> Result<(), String> {
        use super::public::{CERT_EXT, KEY_EXT};
        write_file(dir, &format!("{stem}.{KEY_EXT}"), &self.key_pem, 0o600)?;
        write_file(dir, &format!("{stem}.{CERT_EXT}"), &self.cert_pem, 0o644)
    }
}

/// Writes `dir/name` through a temporary file and a rename, with `mode`.
fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    result.map_err(|e| format!("writing {}: {e}", path.display()))
}
