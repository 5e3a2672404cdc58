//! Shared building blocks of the Ambit mesh.
//!
//! * [`identity`]: SPIFFE workload identities.
//! * [`tls`]: workload certificates, trust roots and the mTLS configs built from them.
//! * [`ca`]: certificate issuance (the mesh CA, also used by tests).
//! * [`cli`]: the command-line arguments of config and certificate sources.
//! * [`ca_client`]: proxies fetch and renew their workloads' certificates from the CA.
//! * [`drain`]: graceful shutdown of a proxy's connections.
//! * [`hbone`]: HTTP/2 CONNECT tunnels over mTLS (client, pool, server, copy).
//! * [`config`]: the mesh data model (workloads, services, policies) and its YAML form.
//! * [`admin`]: the admin, metrics and readiness HTTP servers of a proxy.
//! * [`authz`]: L4 authorization decisions.
//! * [`telemetry`]: OTLP span export, W3C trace context, the proxies' log subscriber.
//! * [`log_writer`]: batched log output (one write per 50 ms, not per line).
//! * [`grpc`]: channels from proxies to the control plane (TLS, bearer token).
//! * [`reload`]: polling a proxy's static config file and certificate directory.
//! * [`proto`]: generated xDS, Istio workload/authorization and CA types.
//! * [`xds`]: the mesh model as Istio's xDS resources, and back.

pub mod admin;
pub mod authz;
pub mod backoff;
pub mod ca;
pub mod ca_client;
pub mod cli;
pub mod config;
pub mod drain;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod log_writer;
pub mod proto;
pub mod reload;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod xds;

pub use identity::Identity;
