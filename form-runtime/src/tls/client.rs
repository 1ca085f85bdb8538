//! The client side: endpoints that speak TLS with this process's certificate and
//! accept only a server of the kind dialled, and channels that take renewed files in.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{Kind, Mode, Tls};
use crate::addr::HostPort;

#[derive(Debug)]
struct Current(Arc<Tls>);

impl ServerCertVerifier for Current {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().server_verifier.supported_verify_schemes()
    }
}

/// An endpoint for the server of `kind` at `addr`, in `mode`: TLS with the files in
/// force now, or plaintext.
pub fn endpoint_in(mode: &Mode, addr: &HostPort, kind: Kind) -> Result<Endpoint, String> {
    match mode {
        Mode::Plaintext => {
            Endpoint::from_shared(addr.http_uri()).map_err(|e| format!("'{addr}': {e}"))
        }
        Mode::Mutual(tls) => {
            let m = tls.current();
            let config = ClientTlsConfig::new()
                .domain_name(kind.dns_name())
                .identity(tonic::transport::Identity::from_pem(
                    &m.cert_pem,
                    &m.key_pem,
                ));
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| format!("'{addr}': {e}"))?
                .tls_config_with_verifier(config, Arc::new(Current(tls.clone())))
                .map_err(|e| format!("'{addr}': TLS: {e}"))
        }
    }
}

/// An endpoint for the server of `kind` at `addr`, as this process speaks.
pub fn endpoint(addr: &HostPort, kind: Kind) -> Result<Endpoint, String> {
    endpoint_in(&super::mode(), addr, kind)
}

/// A lazily connected channel balanced over `addrs` (servers of `kind`), each endpoint
/// shaped by `shape`; when the TLS files are renewed the endpoints are made again, so
/// new connections present the new certificate. Must be called in a tokio runtime.
pub fn channel(
    kind: Kind,
    addrs: &[HostPort],
    shape: impl Fn(Endpoint) -> Endpoint + Send + 'static,
) -> Result<Channel, String> {
    let mode = super::mode();
    let addrs: Vec<HostPort> = addrs.to_vec();
    let make = move |mode: &Mode| -> Result<Vec<Endpoint>, String> {
        addrs
            .iter()
            .map(|a| endpoint_in(mode, a, kind).map(&shape))
            .collect()
    };
    let first = make(&mode)?;
    let (channel, tx) = Channel::balance_channel::<usize>(first.len().max(1) * 2);
    for (i, e) in first.into_iter().enumerate() {
        // Capacity is twice the endpoints: never full here.
        let _ = tx.try_send(Change::Insert(i, e));
    }
    if let Mode::Mutual(tls) = &mode {
        let mut generation = tls.generation();
        let mode = mode.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = generation.changed() => if changed.is_err() { return },
                }
                match make(&mode) {
                    Ok(eps) => {
                        for (i, e) in eps.into_iter().enumerate() {
                            if tx.send(Change::Insert(i, e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot remake endpoints with the renewed files")
                    }
                }
            }
        });
    }
    Ok(channel)
}
