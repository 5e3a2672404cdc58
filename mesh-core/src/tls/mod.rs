//! Workload certificates and the mTLS configurations built from them.
//!
//! TLS 1.3 only, ALPN `h2`. The server side accepts any client certificate that
//! chains to the trust roots and derives the peer identity from its URI SAN; the
//! client side accepts a server only if its certificate chains to the roots *and*
//! carries one of the identities expected for the destination.

mod cert;
mod config;
pub mod dir;
mod store;
mod verify;

pub use cert::{identity_from_cert, CertError, TrustRoots, WorkloadCertificate};
pub use config::{client_config, peer_identity, server_config, ALPN_H2};
pub use store::CertificateStore;
pub use verify::ExpectedIdentityVerifier;

use std::sync::Arc;

/// The one crypto provider Ambit uses everywhere (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Renders a TLS failure carried in an `io::Error` (as tokio-rustls reports it)
/// readably: certificate verification errors show our own reason text.
pub fn describe_io_error(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {other}")
        }
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}
