//! xDS: the mesh model as Istio's ambient resources (and Ambit's L7 ones),
//! the delta ADS client proxies use to follow the control plane, and the
//! handler that turns what it receives into a validated model.

pub mod client;
pub mod l7;
pub mod mesh_handler;
pub mod resources;

pub use l7::{
    decode_http_policy, decode_http_route, decode_traffic_policy, encode_http_policy,
    encode_http_route, encode_l7, encode_traffic_policy, EncodedL7, L7Config,
};
pub use mesh_handler::{MeshHandler, MeshSink, WAYPOINT_TYPES, ZTUNNEL_TYPES};
pub use resources::{
    assemble, assemble_with_l7, decode_address, decode_authorization, encode, DecodedAddress,
    EncodedConfig, NamedResource,
};
