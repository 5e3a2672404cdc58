use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use super::{
    identity_from_cert, provider, CertError, ExpectedIdentityVerifier, TrustRoots,
    WorkloadCertificate,
};
use crate::identity::Identity;

pub const ALPN_H2: &[u8] = b"h2";

/// Client side of an mTLS connection made *as* `cert`'s identity *to* one of `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: &TrustRoots,
    expected: Vec<Identity>,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = ExpectedIdentityVerifier::new(roots.store(), expected);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Tunnels are long-lived and pooled; resumption would skip the client
    // certificate check on the server side for nothing.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Server side presenting `cert`, requiring a client certificate that chains to `roots`.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: &TrustRoots,
) -> Result<ServerConfig, rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.store(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain().to_vec(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The identity of the peer of an established connection (from its leaf certificate).
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity, CertError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(CertError::NoCertificate)?;
    identity_from_cert(leaf)
}
