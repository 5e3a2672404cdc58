//! Where istiod-lite learns about the cluster. The manifests directory is the
//! embedded default; the Kubernetes API source ([`kubernetes`], kube-rs
//! watchers) fills the same [`ClusterState`].

pub mod gateway_api;
pub mod kubernetes;
pub mod manifests;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};

use crate::ambit_types::TrafficPolicy;
use crate::istio_types::{AuthorizationPolicy, PeerAuthentication};
use gateway_api::{Gateway, HttpRoute};

/// Every object a source knows about, keyed by `namespace/name` (`name` for
/// namespaces), in a deterministic order.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<String, Pod>,
    pub services: BTreeMap<String, Service>,
    pub authorization_policies: BTreeMap<String, AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<String, PeerAuthentication>,
    pub gateways: BTreeMap<String, Gateway>,
    pub http_routes: BTreeMap<String, HttpRoute>,
    pub traffic_policies: BTreeMap<String, TrafficPolicy>,
}

/// An object that was not accepted, and why. The rest of the state still flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where it came from (file and document for manifests).
    pub origin: String,
    /// `Kind namespace/name`, as far as it could be read.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.object, self.origin, self.reason)
    }
}
