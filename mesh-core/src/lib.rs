//! Shared building blocks of the Ambit mesh.
//!
//! * [`identity`]: SPIFFE workload identities.
//! * [`tls`]: workload certificates, trust roots and the mTLS configs built from them.
//! * [`ca`]: certificate issuance (the mesh CA, also used by tests).
//! * [`hbone`]: HTTP/2 CONNECT tunnels over mTLS (client, pool, server, copy).
//! * [`config`]: the mesh data model (workloads, services, policies) and its YAML form.
//! * [`authz`]: L4 authorization decisions.

pub mod authz;
pub mod ca;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod sys;
pub mod tls;

pub use identity::Identity;
