//! How formctl reaches the API: plain HTTP, or HTTPS (TLS with rustls) to a gateway
//! started with `--https-certs`. The server's certificate is checked against the
//! system's authorities (`/etc/ssl/certs/ca-certificates.crt`) or, with `FORM_API_CA`,
//! against the authority in that PEM file (the one `formctl certs domain` used).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

/// Where the system keeps the public authorities (Debian's ca-certificates).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A connection to the API.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The API's address, parsed from its base URL.
#[derive(Clone)]
pub(crate) struct Target {
    /// `host:port` to dial.
    pub(crate) authority: String,
    /// The host name, for `Host` and SNI.
    host: String,
    /// With HTTPS, how to speak it.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("authority", &self.authority)
            .field("https", &self.tls.is_some())
            .finish()
    }
}

impl Target {
    /// The API at `base` (`http://HOST:PORT` or `https://HOST:PORT`); the error says
    /// what is accepted.
    pub(crate) fn parse(base: &str) -> Result<Self, String> {
        let uri: http::Uri = base.parse().map_err(|_| {
            format!("'{base}' is not a URL; expected http://HOST:PORT or https://HOST:PORT")
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "'{base}' is not accepted; expected http://HOST:PORT or https://HOST:PORT"
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("'{base}' names no host; expected http://HOST:PORT"))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = format!("{host}:{port}");
        let tls = if https { Some(connector()?) } else { None };
        Ok(Self {
            authority,
            host,
            tls,
        })
    }

    /// The value of `Host`.
    pub(crate) fn host_header(&self) -> &str {
        &self.authority
    }

    /// A new connection.
    pub(crate) async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out after 3 s")
        })??;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let host = self
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let stream = tls.connect(name, tcp).await.map_err(|e| {
            if e.to_string().contains("certificate") {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e}; set FORM_API_CA to the PEM file of the authority that signed the API's certificate"
                    ),
                )
            } else {
                e
            }
        })?;
        Ok(Box::new(stream))
    }
}

/// A TLS client trusting `FORM_API_CA` or the system's authorities.
fn connector() -> Result<TlsConnector, String> {
    let path = std::env::var("FORM_API_CA").unwrap_or_else(|_| SYSTEM_ROOTS.to_owned());
    let pem = std::fs::read(&path).map_err(|e| {
        format!("reading the authorities to trust for HTTPS, {path}: {e}; set FORM_API_CA to the PEM file of the API's authority")
    })?;
    let config = form_runtime::tls::public::client_config(&pem, &[]).map_err(|e| {
        format!("{path}: {e}; set FORM_API_CA to the PEM file of the API's authority")
    })?;
    Ok(TlsConnector::from(Arc::new(config)))
}
