//! The gateway's HTTPS listener: TLS with certificates chosen by SNI
//! (`form_runtime::tls::public`), handshakes each in its own task, for axum.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use form_runtime::tls::public::PublicCerts;
use form_runtime::tls::server::{Conn, incoming_public};
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};

/// Connections that completed their TLS handshake.
pub(crate) struct HttpsListener {
    conns: std::pin::Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Serves HTTPS on `listener` with `certs`.
    pub(crate) fn new(listener: TcpListener, certs: &Arc<PublicCerts>) -> Result<Self, String> {
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        Ok(Self {
            conns: Box::pin(incoming_public(listener, certs)?),
            local,
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let addr = conn.peer().addr.unwrap_or(self.local);
                    return (conn, addr);
                }
                Some(Err(_)) => {}
                // The accept loop ends only when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
