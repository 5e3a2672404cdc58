//! The mesh data model a proxy works from, and its YAML form.
//!
//! The shape follows what the control plane will serve (Istio's `workload.proto`
//! and `authorization.proto`): workloads carry their identity, node, addresses and
//! service membership; services carry VIPs and port mappings; L4 authorization
//! policies are scoped globally, per namespace or to selected workloads.

mod cidr;
mod http;
mod model;
mod parse;
mod state;

pub use cidr::Cidr;
pub use http::*;
pub use model::*;
pub use parse::{parse_mesh_config, validate_mesh_config, ConfigError};
pub use state::{Destination, MeshState, ResolveError, ServiceInfo, WaypointRoute, WorkloadInfo};
