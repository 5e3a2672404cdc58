//! The parts of Gateway API objects (`gateway.networking.k8s.io/v1`)
//! istiod-lite reads: which Gateways are waypoints (and which routes their
//! listeners allow), and HTTPRoutes. Unknown fields are tolerated here, as
//! the API server would keep them; an HTTPRoute's rules are kept as raw YAML
//! and read strictly during translation, so a route using something Ambit
//! does not implement is refused with a status condition instead of being
//! dropped by the source.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The Gateway class that declares a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The label on a Gateway's pods (and Service) naming their Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const GROUP: &str = "gateway.networking.k8s.io";

#[derive(Debug, Clone, Deserialize)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: i32,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    pub kinds: Option<Vec<RouteGroupKind>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Not evaluated: a selector using it matches nothing (fail closed).
    #[serde(default)]
    pub match_expressions: Vec<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RouteGroupKind {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
}

impl Gateway {
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.metadata.labels.as_ref().unwrap_or(&EMPTY)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Read strictly by translation (`translate::routes`).
    #[serde(default)]
    pub rules: Vec<serde_yaml::Value>,
    /// Spec fields Ambit does not read: translation refuses a route with
    /// any, rather than apply it without them.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// Serialized back as it was written (absent fields stay absent): Gateway
/// API matches status entries to parentRefs by these fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Absent means `gateway.networking.k8s.io`; `""` is the core group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Absent means `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Absent means the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// What a parent reference attaches a route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// A Service (GAMMA: the route applies to traffic addressed to it).
    Service(String),
    /// A Gateway, `namespace/name`.
    Gateway(String),
    Other,
}

impl ParentRef {
    pub fn parent(&self, route_namespace: &str) -> Parent {
        let key = format!(
            "{}/{}",
            self.namespace.as_deref().unwrap_or(route_namespace),
            self.name
        );
        match (
            self.group.as_deref().unwrap_or(GROUP),
            self.kind.as_deref().unwrap_or("Gateway"),
        ) {
            ("", "Service") => Parent::Service(key),
            (GROUP, "Gateway") => Parent::Gateway(key),
            _ => Parent::Other,
        }
    }
}
