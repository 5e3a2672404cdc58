//! istiod-lite's servers as a library, so the binary and the integration tests
//! share them: the gRPC CA, node authentication, TLS serving and metrics.

pub mod ca_service;
pub mod metrics;
pub mod node_auth;
pub mod tls_serve;
