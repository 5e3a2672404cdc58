//! xDS: the mesh model as Istio's ambient resources, and the delta ADS client
//! proxies use to follow the control plane.

pub mod client;
pub mod resources;

pub use resources::{
    assemble, decode_address, decode_authorization, encode, DecodedAddress, EncodedConfig,
    NamedResource,
};
