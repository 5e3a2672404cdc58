//! istiod-lite, Ambit's control plane, as a library: the binary (`main.rs`)
//! is only its command line, and integration tests drive the same code.
//!
//! * [`sources`] → [`translate`] → [`pipeline`]: cluster objects become the
//!   mesh model and versioned [`xds::Snapshot`]s.
//! * [`xds`]: the delta ADS server; [`ca_service`]: the gRPC CA;
//!   [`node_auth`], [`waypoint_tokens`] and [`kube_auth`]: who is calling;
//!   [`tls_serve`]: TLS for both.
//! * [`serve`]: the running process; [`monitoring`] and [`metrics`]: 15014.
//! * [`waypoint_deployer`]: in Kubernetes, a waypoint (Deployment, Service,
//!   ServiceAccount) for every `istio-waypoint` Gateway.

pub mod ambit_types;
pub mod ca_service;
pub mod ca_store;
pub mod exclusions;
pub mod istio_types;
pub mod kube_auth;
pub mod metrics;
pub mod monitoring;
pub mod node_auth;
pub mod pipeline;
pub mod serve;
pub mod sources;
pub mod tls_serve;
pub mod translate;
pub mod waypoint_deployer;
pub mod waypoint_tokens;
pub mod xds;

#[cfg(test)]
mod tests_translate;
