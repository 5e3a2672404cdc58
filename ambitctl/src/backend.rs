//! What a command needs from where the mesh runs: its objects, its
//! components and a way to reach their HTTP endpoints, and a way to declare a
//! waypoint. Two implementations: [`crate::local::LocalBackend`] (a
//! network-namespace cluster described by a file) and
//! [`crate::kubernetes::KubeBackend`] (the API server of a kubeconfig).

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::Value;

use crate::http::Reply;
use crate::inventory::Inventory;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentKind {
    ControlPlane,
    Ztunnel,
    Waypoint,
}

impl ComponentKind {
    pub fn label(self) -> &'static str {
        match self {
            ComponentKind::ControlPlane => "istiod-lite",
            ComponentKind::Ztunnel => "ztunnel",
            ComponentKind::Waypoint => "waypoint",
        }
    }
}

/// How a component's HTTP port (admin for proxies, monitoring for
/// istiod-lite) is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Endpoint {
    /// Directly, from inside network namespace `netns` (the caller's when none).
    Tcp {
        netns: Option<String>,
        addr: SocketAddr,
    },
    /// Through the API server's pod proxy subresource.
    PodProxy {
        namespace: String,
        pod: String,
        port: u16,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { netns: None, addr } => write!(f, "{addr}"),
            Endpoint::Tcp {
                netns: Some(ns),
                addr,
            } => write!(f, "{addr} in netns {ns}"),
            Endpoint::PodProxy {
                namespace,
                pod,
                port,
            } => write!(f, "pod {namespace}/{pod}:{port} (API server proxy)"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub kind: ComponentKind,
    /// istiod-lite: its pod or `istiod-lite`; ztunnel: its node; waypoint:
    /// its Gateway as `namespace/name`.
    pub name: String,
    pub node: Option<String>,
    /// The pod it runs in, as `namespace/name`, when known.
    pub pod: Option<String>,
    pub endpoint: Endpoint,
}

/// `ambitctl waypoint apply`'s request.
#[derive(Clone, Debug)]
pub struct WaypointApply {
    pub namespace: String,
    pub name: String,
    /// Label the namespace `istio.io/use-waypoint=<name>`.
    pub enroll_namespace: bool,
}

/// What `waypoint apply` did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    /// `created`, `unchanged` or `written`.
    pub gateway: String,
    /// Where: the API server, or the manifest file written.
    pub location: String,
    pub namespace_labelled: bool,
    pub object: Value,
}

// Commands are generic over the backend and run on the main task, so the
// futures need no `Send` bound; the trait is not meant for other crates.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// Where this is pointed, for messages (`local cluster <file>`, `kubernetes context <ctx>`).
    fn describe(&self) -> String;

    /// Namespaces, pods, services, Gateways, AuthorizationPolicies and
    /// PeerAuthentications.
    async fn inventory(&self) -> anyhow::Result<Inventory>;

    /// istiod-lite, the ztunnels and the waypoints, as deployed.
    async fn components(&self) -> anyhow::Result<Vec<Component>>;

    /// GET `path` from a component's HTTP port.
    async fn get(&self, component: &Component, path: &str) -> anyhow::Result<Reply>;

    /// Declares a waypoint: a Gateway of class `istio-waypoint`.
    async fn apply_waypoint(&self, req: &WaypointApply) -> anyhow::Result<ApplyOutcome>;
}

/// The Gateway `waypoint apply` creates, as `istioctl waypoint apply` does:
/// class `istio-waypoint`, one listener `mesh` on 15008, protocol HBONE.
pub fn waypoint_gateway(namespace: &str, name: &str) -> Value {
    serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
        },
        "spec": {
            "gatewayClassName": crate::inventory::WAYPOINT_CLASS,
            "listeners": [{
                "name": "mesh",
                "port": mesh_core::config::WAYPOINT_HBONE_PORT,
                "protocol": "HBONE",
            }],
        },
    })
}
