//! Generated protobuf types and gRPC stubs (see `proto/`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod envoy {
    pub mod discovery {
        tonic::include_proto!("envoy.service.discovery.v3");
    }
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod ca {
        tonic::include_proto!("istio.v1.auth");
    }
}

pub mod ambit {
    pub mod extensions {
        tonic::include_proto!("ambit.extensions.v1");
    }
    pub mod route {
        tonic::include_proto!("ambit.route.v1");
    }
}

/// `type_url` of Istio's ambient address resources (workloads and services).
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// `type_url` of Istio's ambient L4 authorization resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// `type_url` of Ambit's L7 route resources (Gateway API HTTPRoute), for waypoints.
pub const HTTP_ROUTE_TYPE: &str = "type.googleapis.com/ambit.route.v1.HTTPRoute";
/// `type_url` of Ambit's L7 authorization resources (Istio AuthorizationPolicy
/// targeting a waypoint, a Service or an HTTPRoute), for waypoints.
pub const HTTP_AUTHORIZATION_TYPE: &str = "type.googleapis.com/ambit.route.v1.HTTPAuthorization";
/// `type_url` of Ambit's TrafficPolicy resources, for waypoints.
pub const TRAFFIC_POLICY_TYPE: &str = "type.googleapis.com/ambit.route.v1.TrafficPolicy";

/// Request metadata key of Istio's CA API: the SPIFFE ID a node proxy asks
/// for on behalf of one of its workloads.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
