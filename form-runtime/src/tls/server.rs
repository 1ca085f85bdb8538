//! The server side: a rustls configuration that asks the files in force at each
//! handshake, and the stream of accepted connections tonic serves, each carrying its
//! [`Peer`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{Identity, Mode, Peer, Tls};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a public client (the gateway's HTTPS) may take for its handshake.
pub const PUBLIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more wait for the accept loop.
const MAX_HANDSHAKES: usize = 256;
/// Connections served at once; more wait in the listen backlog until one closes.
pub const MAX_CONNECTIONS: usize = 4096;

#[derive(Debug)]
struct Current(Arc<Tls>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ClientCertVerifier for Current {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

/// A server configuration that requires a client certificate from the CA in force,
/// TLS 1.3 and HTTP/2.
pub fn config(tls: &Arc<Tls>) -> Result<Arc<rustls::ServerConfig>, String> {
    let current = Arc::new(Current(tls.clone()));
    let mut c = rustls::ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(current.clone())
        .with_cert_resolver(current);
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// An accepted connection: TLS with a named peer, or plaintext.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    peer: Peer,
    /// Its place among [`MAX_CONNECTIONS`], given back when it closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Who is at the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connections accepted on `listener` in `mode`: TLS handshakes run each in its
/// own task (a slow or silent client holds only itself), and a connection that fails
/// its handshake (no certificate, another CA, expired, not TLS) is counted and
/// dropped. Ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    mode: Mode,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> + Send + 'static {
    let acceptor = match &mode {
        Mode::Mutual(tls) => match config(tls) {
            Ok(c) => Some(TlsAcceptor::from(c)),
            Err(e) => {
                tracing::error!(error = %e, "cannot make the TLS configuration; refusing every connection");
                None
            }
        },
        Mode::Plaintext => None,
    };
    let plaintext = matches!(mode, Mode::Plaintext);
    accept_loop(listener, (!plaintext).then_some(acceptor), true)
}

/// The connections accepted on `listener` for a public HTTPS server (the gateway's):
/// as [`incoming`], with the certificates of `certs` chosen by SNI and no client
/// certificate asked for.
pub fn incoming_public(
    listener: TcpListener,
    certs: &Arc<super::public::PublicCerts>,
) -> Result<impl tokio_stream::Stream<Item = io::Result<Conn>> + Send + 'static, String> {
    Ok(accept_loop(listener, Some(Some(certs.acceptor()?)), false))
}

/// Accepts on `listener`: plaintext when `tls` is `None`, else TLS with the acceptor
/// (none: every connection refused); `identify` requires a client certificate.
fn accept_loop(
    listener: TcpListener,
    tls: Option<Option<TlsAcceptor>>,
    identify: bool,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(conn_slot) = open.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = &tls else {
                let peer = Peer {
                    addr: Some(addr),
                    identity: None,
                };
                if tx
                    .send(Ok(Conn {
                        io: Io::Plain(tcp),
                        peer,
                        _slot: conn_slot,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let Some(acceptor) = acceptor.clone() else {
                continue;
            };
            // The public side drops a connection when every handshake slot is taken
            // (silent clients must not stall the port); platform callers wait.
            let slot = if identify {
                match slots.clone().acquire_owned().await {
                    Ok(s) => s,
                    Err(_) => return,
                }
            } else {
                match slots.clone().try_acquire_owned() {
                    Ok(s) => s,
                    Err(tokio::sync::TryAcquireError::Closed) => return,
                    Err(tokio::sync::TryAcquireError::NoPermits) => {
                        metrics::counter!("form_tls_handshakes_refused_total").increment(1);
                        continue;
                    }
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match handshake(acceptor, tcp, addr, conn_slot, identify).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(reason) => {
                        metrics::counter!("form_tls_handshakes_refused_total").increment(1);
                        // Anyone may knock on the public side: not worth a line each.
                        if identify {
                            tracing::info!(peer = %addr, reason = %reason, "TLS handshake refused");
                        } else {
                            tracing::debug!(peer = %addr, reason = %reason, "TLS handshake refused");
                        }
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    identify: bool,
) -> Result<Conn, String> {
    let limit = if identify {
        HANDSHAKE_TIMEOUT
    } else {
        PUBLIC_HANDSHAKE_TIMEOUT
    };
    let tls = tokio::time::timeout(limit, acceptor.accept(tcp))
        .await
        .map_err(|_| format!("no handshake within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    let identity = if !identify {
        None
    } else {
        let (_, session) = tls.get_ref();
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        Some(Identity::from_der(leaf)?)
    };
    Ok(Conn {
        io: Io::Tls(Box::new(tls)),
        peer: Peer {
            addr: Some(addr),
            identity,
        },
        _slot: slot,
    })
}
