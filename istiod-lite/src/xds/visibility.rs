//! Which caller is sent which resource.
//!
//! Authorization (L4): to a node, those that can apply to a workload on it
//! (mesh-wide ones, namespace-wide ones of namespaces it has workloads in, and
//! the selector policies its workloads name). A node enforces policy only for
//! its own workloads, so the others are none of its business, and a
//! compromised node learns no more than it needs. A waypoint enforces no
//! workload's L4 policy: it is sent the mesh-wide ones only, what any caller
//! sees.
//!
//! L7 types (HTTPRoute, HTTPAuthorization, TrafficPolicy): only to waypoint
//! pods, and only what concerns the Gateways they serve: routes whose parent
//! is such a Gateway or a Service using it; policies targeting that Gateway,
//! such a Service or such a route; traffic policies targeting such a Service
//! or route, or a Service such a route sends (or mirrors) to, whose limits
//! apply to the waypoint's requests. A node is sent none: waypoints have
//! their own credential, so a node's needs no L7 config.
//!
//! A node named by the client itself (plaintext test port, unauthenticated)
//! is believed and sent what that node and the waypoints on it would get.
//!
//! Addresses are not filtered: any workload may be a destination.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use mesh_core::config::{
    BackendTarget, HttpRoute, MeshConfig, ParentKind, PolicyScope, TargetKind,
};
use mesh_core::proto::{
    AUTHORIZATION_TYPE, HTTP_AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, TRAFFIC_POLICY_TYPE,
};

/// Who a stream serves, for filtering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Viewer {
    /// An authenticated node proxy.
    Node(String),
    /// An authenticated waypoint pod, `namespace/name`.
    Waypoint(String),
    /// A node the client named itself, on the unauthenticated test port.
    ClaimedNode(String),
}

impl fmt::Display for Viewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Viewer::Node(n) => write!(f, "node {n}"),
            Viewer::Waypoint(p) => write!(f, "waypoint pod {p}"),
            Viewer::ClaimedNode(n) => write!(f, "node {n} (unauthenticated)"),
        }
    }
}

/// The types whose resources are sent to some callers only.
pub fn filtered(type_url: &str) -> bool {
    type_url == AUTHORIZATION_TYPE || l7_type(type_url).is_some()
}

/// The L7 types, as the `&'static str` keys [`Visibility`] stores.
fn l7_type(type_url: &str) -> Option<&'static str> {
    [
        HTTP_ROUTE_TYPE,
        HTTP_AUTHORIZATION_TYPE,
        TRAFFIC_POLICY_TYPE,
    ]
    .into_iter()
    .find(|t| *t == type_url)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Audience {
    Everyone,
    Namespace(String),
    Selected,
}

/// A waypoint pod of the model.
#[derive(Debug, Default)]
pub struct WaypointPod {
    pub service_account: String,
    /// The Gateways (`namespace/name`) it serves.
    gateways: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct Visibility {
    /// Authorization resource name → who may see it. Names not listed (and
    /// every other resource type) are visible to all.
    audience: HashMap<String, Audience>,
    node_namespaces: HashMap<String, BTreeSet<String>>,
    node_selected: HashMap<String, BTreeSet<String>>,
    /// Namespace → its namespace-wide policies.
    by_namespace: HashMap<String, Vec<String>>,
    /// L7 type → Gateway → the names its waypoints are sent. Names not
    /// listed are sent to no one.
    l7: HashMap<&'static str, HashMap<String, BTreeSet<String>>>,
    /// Waypoint pods (`native_tunnel` workloads) by `namespace/name`.
    waypoint_pods: HashMap<String, WaypointPod>,
    /// Node → the Gateways whose waypoint pods run there (plaintext port).
    node_gateways: HashMap<String, BTreeSet<String>>,
}

impl Visibility {
    pub fn of(config: &MeshConfig) -> Self {
        let mut v = Visibility::default();
        for p in &config.policies {
            let audience = match p.scope {
                PolicyScope::Global => Audience::Everyone,
                PolicyScope::Namespace if p.namespace == config.root_namespace => {
                    Audience::Everyone
                }
                PolicyScope::Namespace => {
                    v.by_namespace
                        .entry(p.namespace.clone())
                        .or_default()
                        .push(p.key());
                    Audience::Namespace(p.namespace.clone())
                }
                PolicyScope::WorkloadSelector => Audience::Selected,
            };
            v.audience.insert(p.key(), audience);
        }
        // Clones only what is new: most workloads share their node's sets.
        for w in &config.workloads {
            if !v.node_namespaces.contains_key(&w.node) {
                v.node_namespaces.insert(w.node.clone(), BTreeSet::new());
                v.node_selected.insert(w.node.clone(), BTreeSet::new());
            }
            if let Some(set) = v.node_namespaces.get_mut(&w.node) {
                if !set.contains(&w.namespace) {
                    set.insert(w.namespace.clone());
                }
            }
            if let Some(set) = v.node_selected.get_mut(&w.node) {
                for p in &w.authorization_policies {
                    if !set.contains(p) {
                        set.insert(p.clone());
                    }
                }
            }
        }
        // A waypoint pod serves the Gateway its Service is named after
        // (Istio: the waypoint Service is the Gateway's); its `services`
        // name it.
        for w in config.workloads.iter().filter(|w| w.native_tunnel) {
            let gateways: BTreeSet<String> = w.services.iter().cloned().collect();
            v.node_gateways
                .entry(w.node.clone())
                .or_default()
                .extend(gateways.iter().cloned());
            v.waypoint_pods.insert(
                format!("{}/{}", w.namespace, w.name),
                WaypointPod {
                    service_account: w.service_account.clone(),
                    gateways,
                },
            );
        }
        v.l7 = l7_audiences(config, &v.node_gateways);
        v
    }

    /// The waypoint pod `namespace/name`, if the model has one.
    pub fn waypoint_pod(&self, key: &str) -> Option<&WaypointPod> {
        self.waypoint_pods.get(key)
    }

    /// The Gateways whose L7 resources `viewer` is sent.
    fn gateways_of(&self, viewer: &Viewer) -> Option<&BTreeSet<String>> {
        match viewer {
            Viewer::Node(_) => None,
            Viewer::Waypoint(pod) => self.waypoint_pods.get(pod).map(|p| &p.gateways),
            Viewer::ClaimedNode(node) => self.node_gateways.get(node),
        }
    }

    /// The L7 names of `type_url` that `viewer` is sent.
    fn l7_names(&self, t: &'static str, viewer: &Viewer) -> BTreeSet<String> {
        let Some(by_gateway) = self.l7.get(t) else {
            return BTreeSet::new();
        };
        self.gateways_of(viewer)
            .into_iter()
            .flatten()
            .filter_map(|g| by_gateway.get(g))
            .flatten()
            .cloned()
            .collect()
    }

    /// Whether `viewer` is sent the resource `name` of `type_url`; a client
    /// that did not say who it is (plaintext test port) sees all.
    pub fn visible(&self, type_url: &str, viewer: Option<&Viewer>, name: &str) -> bool {
        let Some(viewer) = viewer else { return true };
        if let Some(t) = l7_type(type_url) {
            let Some(by_gateway) = self.l7.get(t) else {
                return false;
            };
            return self
                .gateways_of(viewer)
                .into_iter()
                .flatten()
                .any(|g| by_gateway.get(g).is_some_and(|names| names.contains(name)));
        }
        if type_url != AUTHORIZATION_TYPE {
            return true;
        }
        let node = match viewer {
            Viewer::Node(n) | Viewer::ClaimedNode(n) => n,
            Viewer::Waypoint(_) => {
                return matches!(self.audience.get(name), None | Some(Audience::Everyone));
            }
        };
        match self.audience.get(name) {
            None | Some(Audience::Everyone) => true,
            Some(Audience::Namespace(ns)) => self
                .node_namespaces
                .get(node)
                .is_some_and(|s| s.contains(ns)),
            Some(Audience::Selected) => self
                .node_selected
                .get(node)
                .is_some_and(|s| s.contains(name)),
        }
    }

    /// Names of `type_url` whose visibility for `viewer` may differ between
    /// `self` and `other` although the resources themselves did not change.
    pub fn shifted(
        &self,
        other: &Visibility,
        type_url: &str,
        viewer: Option<&Viewer>,
    ) -> Vec<String> {
        let Some(viewer) = viewer else {
            return Vec::new();
        };
        if let Some(t) = l7_type(type_url) {
            return self
                .l7_names(t, viewer)
                .symmetric_difference(&other.l7_names(t, viewer))
                .cloned()
                .collect();
        }
        if type_url != AUTHORIZATION_TYPE {
            return Vec::new();
        }
        let node = match viewer {
            Viewer::Node(n) | Viewer::ClaimedNode(n) => n,
            // Only an audience change shifts what a waypoint sees, and that
            // changes the resource itself.
            Viewer::Waypoint(_) => return Vec::new(),
        };
        let empty = BTreeSet::new();
        let mut out = Vec::new();
        let (a, b) = (
            self.node_namespaces.get(node).unwrap_or(&empty),
            other.node_namespaces.get(node).unwrap_or(&empty),
        );
        for ns in a.symmetric_difference(b) {
            for v in [self, other] {
                out.extend(v.by_namespace.get(ns).into_iter().flatten().cloned());
            }
        }
        let (a, b) = (
            self.node_selected.get(node).unwrap_or(&empty),
            other.node_selected.get(node).unwrap_or(&empty),
        );
        out.extend(a.symmetric_difference(b).cloned());
        out
    }
}

/// Which L7 resources concern each Gateway that has waypoint pods: see the
/// module comment. Work is proportional to the L7 objects and the waypoint
/// pods, not to the mesh.
fn l7_audiences(
    config: &MeshConfig,
    node_gateways: &HashMap<String, BTreeSet<String>>,
) -> HashMap<&'static str, HashMap<String, BTreeSet<String>>> {
    let hosts: BTreeSet<&str> = node_gateways
        .values()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut out: HashMap<&'static str, HashMap<String, BTreeSet<String>>> = HashMap::new();
    if hosts.is_empty() {
        return out;
    }
    // Service `ns/name` → the Gateway `ns/name` of its waypoint.
    let waypoint_of: HashMap<String, String> = config
        .services
        .iter()
        .filter_map(|s| Some((s.key(), s.waypoint.as_ref()?.key())))
        .collect();
    let mut grant = |type_url: &'static str, gateway: &str, name: String| {
        if hosts.contains(gateway) {
            out.entry(type_url)
                .or_default()
                .entry(gateway.to_string())
                .or_default()
                .insert(name);
        }
    };

    // Route `ns/name` → the Gateways it concerns; Service → the Gateways
    // whose routes send to it.
    let mut route_gateways: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut backend_gateways: HashMap<String, BTreeSet<String>> = HashMap::new();
    for r in &config.http_routes {
        let gateways: BTreeSet<String> = r
            .parents
            .iter()
            .filter_map(|p| {
                let key = format!("{}/{}", p.namespace, p.name);
                match p.kind {
                    ParentKind::Gateway => Some(key),
                    ParentKind::Service => waypoint_of.get(&key).cloned(),
                }
            })
            .collect();
        for g in &gateways {
            grant(HTTP_ROUTE_TYPE, g, r.key());
        }
        for backend in backends(r) {
            backend_gateways
                .entry(backend)
                .or_default()
                .extend(gateways.iter().cloned());
        }
        route_gateways.insert(r.key(), gateways);
    }

    let concerned = |namespace: &str, kind: TargetKind, name: &str| -> BTreeSet<String> {
        let key = format!("{namespace}/{name}");
        match kind {
            TargetKind::Gateway => BTreeSet::from([key]),
            TargetKind::GatewayClass => hosts.iter().map(|g| g.to_string()).collect(),
            TargetKind::Service => waypoint_of.get(&key).cloned().into_iter().collect(),
            TargetKind::HttpRoute => route_gateways.get(&key).cloned().unwrap_or_default(),
        }
    };
    for p in &config.http_policies {
        for t in &p.targets {
            for g in concerned(&p.namespace, t.kind, &t.name) {
                grant(HTTP_AUTHORIZATION_TYPE, &g, p.key());
            }
        }
    }
    for p in &config.traffic_policies {
        let mut gateways = concerned(&p.namespace, p.target.kind, &p.target.name);
        if p.target.kind == TargetKind::Service {
            let key = format!("{}/{}", p.namespace, p.target.name);
            gateways.extend(backend_gateways.get(&key).into_iter().flatten().cloned());
        }
        for g in gateways {
            grant(TRAFFIC_POLICY_TYPE, &g, p.key());
        }
    }
    out
}

/// The Services a route sends requests to, mirrors included.
fn backends(r: &HttpRoute) -> impl Iterator<Item = String> + '_ {
    let ns = r.namespace.as_str();
    r.rules.iter().flat_map(move |rule| {
        let filters = rule
            .filters
            .iter()
            .chain(rule.backend_refs.iter().flat_map(|b| &b.filters));
        let mirrors = filters
            .filter_map(|f| f.request_mirror.as_ref())
            .map(move |m| m.backend_ref.service_key(ns));
        rule.backend_refs
            .iter()
            .map(move |b| BackendTarget::service_key(&b.target(), ns))
            .chain(mirrors)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::parse_mesh_config;

    #[test]
    fn nodes_see_what_can_apply_to_their_workloads() {
        let config = parse_mesh_config(
            r#"
workloads:
- {name: a, namespace: red, node: n1, addresses: [198.19.1.2], authorizationPolicies: [red/sel]}
- {name: b, namespace: blue, node: n2, addresses: [198.19.2.2]}
policies:
- {name: all, namespace: istio-system, scope: Global, action: Deny, rules: []}
- {name: ns, namespace: red, scope: Namespace, action: Allow, rules: []}
- {name: sel, namespace: red, scope: WorkloadSelector, action: Allow, rules: []}
- {name: ns, namespace: blue, scope: Namespace, action: Allow, rules: []}
"#,
        )
        .unwrap();
        let v = Visibility::of(&config);
        let sees = |node: &str| -> Vec<&str> {
            ["istio-system/all", "red/ns", "red/sel", "blue/ns"]
                .into_iter()
                .filter(|n| {
                    v.visible(
                        AUTHORIZATION_TYPE,
                        Some(&Viewer::ClaimedNode(node.into())),
                        n,
                    )
                })
                .collect()
        };
        assert_eq!(sees("n1"), ["istio-system/all", "red/ns", "red/sel"]);
        assert_eq!(sees("n2"), ["istio-system/all", "blue/ns"]);
        assert_eq!(sees("n9"), ["istio-system/all"]);
        assert!(v.visible(AUTHORIZATION_TYPE, None, "red/sel"));
    }

    #[test]
    fn waypoint_nodes_see_what_concerns_their_waypoints() {
        let config = parse_mesh_config(
            r#"
workloads:
- {name: wp1-0, namespace: red, node: n1, addresses: [198.19.1.9], services: [red/wp1], nativeTunnel: true}
- {name: wp2-0, namespace: red, node: n2, addresses: [198.19.2.9], services: [red/wp2], nativeTunnel: true}
- {name: app, namespace: red, node: n3, addresses: [198.19.3.2], services: [red/app]}
services:
- {name: wp1, namespace: red, addresses: [198.18.0.1], ports: [{port: 15008}]}
- {name: wp2, namespace: red, addresses: [198.18.0.2], ports: [{port: 15008}]}
- {name: app, namespace: red, addresses: [198.18.0.3], ports: [{port: 80}], waypoint: {namespace: red, name: wp1}}
- {name: db, namespace: red, addresses: [198.18.0.4], ports: [{port: 5432}], waypoint: {namespace: red, name: wp2}}
- {name: shadow, namespace: blue, addresses: [198.18.0.5], ports: [{port: 80}]}
httpRoutes:
- name: app
  namespace: red
  parents: [{kind: Service, namespace: red, name: app, port: 80}]
  rules:
  - backendRefs: [{name: app, port: 80}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, namespace: blue, port: 80}}}]
- name: gw2-all
  namespace: red
  parents: [{kind: Gateway, namespace: red, name: wp2}]
httpPolicies:
- {name: gw1, namespace: red, targets: [{kind: Gateway, name: wp1}], action: Deny}
- {name: via-route, namespace: red, targets: [{kind: HTTPRoute, name: gw2-all}], action: Allow}
- {name: db, namespace: red, targets: [{kind: Service, name: db}], action: Audit}
trafficPolicies:
- {name: app, namespace: red, target: {kind: Service, name: app}}
- {name: shadow, namespace: blue, target: {kind: Service, name: shadow}}
- {name: route, namespace: red, target: {kind: HTTPRoute, name: gw2-all}}
"#,
        )
        .unwrap();
        let v = Visibility::of(&config);
        let sees = |node: &str, type_url: &str, names: &[&'static str]| -> Vec<&'static str> {
            names
                .iter()
                .copied()
                .filter(|n| v.visible(type_url, Some(&Viewer::ClaimedNode(node.into())), n))
                .collect()
        };
        let routes = ["red/app", "red/gw2-all"];
        let policies = ["red/gw1", "red/via-route", "red/db"];
        let traffic = ["red/app", "blue/shadow", "red/route"];
        assert_eq!(sees("n1", HTTP_ROUTE_TYPE, &routes), ["red/app"]);
        assert_eq!(sees("n2", HTTP_ROUTE_TYPE, &routes), ["red/gw2-all"]);
        assert_eq!(sees("n1", HTTP_AUTHORIZATION_TYPE, &policies), ["red/gw1"]);
        assert_eq!(
            sees("n2", HTTP_AUTHORIZATION_TYPE, &policies),
            ["red/via-route", "red/db"]
        );
        // The mirror target's limits apply to the requests wp1 sends it.
        assert_eq!(
            sees("n1", TRAFFIC_POLICY_TYPE, &traffic),
            ["red/app", "blue/shadow"]
        );
        assert_eq!(sees("n2", TRAFFIC_POLICY_TYPE, &traffic), ["red/route"]);
        for t in [
            HTTP_ROUTE_TYPE,
            HTTP_AUTHORIZATION_TYPE,
            TRAFFIC_POLICY_TYPE,
        ] {
            assert!(sees("n3", t, &routes).is_empty() && sees("n3", t, &policies).is_empty());
            assert!(v.visible(t, None, "red/app"), "no node named: all");
        }
        assert!(filtered(HTTP_ROUTE_TYPE) && filtered(AUTHORIZATION_TYPE));
        assert!(!filtered(mesh_core::proto::ADDRESS_TYPE));
    }
}
