//! Which waypoint each service and workload uses: Istio's labels, plus
//! Ambit's *auto* waypoints that take only services carrying L7 config.
//!
//! A reference that cannot be honoured (no such Gateway, or not a waypoint)
//! is rejected with a reason but kept in the model: the data plane then
//! refuses the traffic instead of sending it around the waypoint, which would
//! skip its L7 policy.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use k8s_openapi::api::core::v1::Pod;
use mesh_core::config::{Service, WaypointRef};

use super::{in_namespace, matches, Labels, Translator, Workloads};
use crate::sources::gateway_api::{Parent, GATEWAY_NAME_LABEL};

/// Istio's label selecting a waypoint (`none` opts out), on a namespace,
/// service or pod.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Istio's label: the namespace of the waypoint `istio.io/use-waypoint` names.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Istio's label on a waypoint Gateway: `service`, `workload`, `all`, `none`.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Ambit's annotation on a waypoint Gateway: `auto` or `all`.
pub const WAYPOINT_MODE: &str = "ambit.dev/waypoint-mode";

/// How a waypoint Gateway wants to be used.
#[derive(Clone, Copy, Debug)]
pub(super) struct WaypointKind {
    services: bool,
    workloads: bool,
    /// Only services with L7 config, and no workloads.
    auto: bool,
}

/// A waypoint asked for by labels, and where the label was.
struct Request {
    namespace: String,
    name: String,
    /// On the namespace rather than the object: reported once per namespace.
    from_namespace: bool,
}

impl Request {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
}

impl Translator<'_> {
    /// The Gateways of class istio-waypoint, by `namespace/name`.
    pub(super) fn waypoint_gateways(&mut self) -> BTreeMap<String, WaypointKind> {
        let mut out = BTreeMap::new();
        for (key, gw) in &self.state.gateways {
            if !gw.is_waypoint() {
                continue;
            }
            let object = format!("Gateway {key}");
            // Istio's default is `service`; Ambit's is `all`, so traffic sent
            // straight to a pod address cannot sidestep the L7 policy that
            // traffic through its service gets.
            let (services, workloads) = match gw.labels().get(WAYPOINT_FOR).map(String::as_str) {
                None | Some("all") => (true, true),
                Some("service") => (true, false),
                Some("workload") => (false, true),
                Some("none") => (false, false),
                Some(other) => {
                    self.reject(
                        object.clone(),
                        format!("{WAYPOINT_FOR}: unknown value {other:?}; serving all traffic"),
                    );
                    (true, true)
                }
            };
            let auto = match gw.annotation(WAYPOINT_MODE) {
                None | Some("all") => false,
                Some("auto") => true,
                // Fail safe: more traffic through the waypoint, never less.
                Some(other) => {
                    self.reject(
                        object,
                        format!("{WAYPOINT_MODE}: unknown value {other:?}; treated as \"all\""),
                    );
                    false
                }
            };
            out.insert(
                key.clone(),
                WaypointKind {
                    services,
                    workloads,
                    auto,
                },
            );
        }
        out
    }

    /// Whether `pod` is one of a waypoint's own pods.
    pub(super) fn is_waypoint_pod(&self, pod: &Pod, namespace: &str) -> bool {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            .is_some_and(|gw| self.waypoints.contains_key(&format!("{namespace}/{gw}")))
    }

    /// What the object's own labels, else its namespace's, ask for.
    fn requested(&self, labels: Option<&Labels>, namespace: &str) -> Option<Request> {
        let read = |l: &Labels, from_namespace: bool| {
            l.get(USE_WAYPOINT).map(|name| {
                (name.as_str() != "none").then(|| Request {
                    namespace: l
                        .get(USE_WAYPOINT_NAMESPACE)
                        .cloned()
                        .unwrap_or_else(|| namespace.to_string()),
                    name: name.clone(),
                    from_namespace,
                })
            })
        };
        if let Some(own) = labels.and_then(|l| read(l, false)) {
            return own;
        }
        let ns_labels = self
            .state
            .namespaces
            .get(namespace)
            .and_then(|n| n.metadata.labels.as_ref())?;
        read(ns_labels, true).flatten()
    }

    /// The waypoint for an object asking for `req`, or `None` when the
    /// waypoint does not take this kind of traffic. A reference that cannot
    /// be honoured is rejected but still returned (fail closed).
    fn resolve(
        &mut self,
        object: &str,
        req: &Request,
        wants: impl Fn(&WaypointKind) -> bool,
        reported: &mut HashSet<String>,
    ) -> Option<WaypointRef> {
        let key = req.key();
        if !dns_name(&req.namespace) || !dns_name(&req.name) {
            // No Gateway can have this name, so nothing can attach to it.
            self.reject(
                object.to_string(),
                format!("{USE_WAYPOINT}: {key:?} is not a Gateway name; no waypoint assigned"),
            );
            return None;
        }
        if let Some(kind) = self.waypoints.get(&key) {
            return wants(kind).then(|| WaypointRef::new(&req.namespace, &req.name));
        }
        let why = match self.state.gateways.get(&key) {
            Some(gw) => format!(
                "Gateway {key} is of class {:?}, not a waypoint",
                gw.spec.gateway_class_name
            ),
            None => format!("Gateway {key} does not exist"),
        };
        let object = if req.from_namespace {
            format!("Namespace {}", object_namespace(object))
        } else {
            object.to_string()
        };
        if reported.insert(object.clone()) {
            self.reject(
                object,
                format!(
                    "{USE_WAYPOINT}: {why}; the reference is kept, so traffic that needs this waypoint is refused"
                ),
            );
        }
        Some(WaypointRef::new(&req.namespace, &req.name))
    }

    /// Sets `waypoint` on services and workloads, after services and policies.
    pub(super) fn assign_waypoints(&mut self, workloads: &mut Workloads, services: &mut [Service]) {
        let mut reported = HashSet::new();
        let service_keys: BTreeSet<String> = services.iter().map(Service::key).collect();
        let l7 = if self.waypoints.values().any(|k| k.auto) {
            self.l7_targets(workloads)
        } else {
            L7Targets::default()
        };

        for svc in services.iter_mut() {
            let key = svc.key();
            let Some(source) = self.state.services.get(&key) else {
                continue;
            };
            // A waypoint's own Service: Istio names it after its Gateway and
            // selects the Gateway's pods by label.
            let own_gateway = source
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .and_then(|s| s.get(GATEWAY_NAME_LABEL))
                .or_else(|| source.metadata.labels.as_ref()?.get(GATEWAY_NAME_LABEL));
            if self.waypoints.contains_key(&key)
                || own_gateway.is_some_and(|g| {
                    self.waypoints
                        .contains_key(&format!("{}/{g}", svc.namespace))
                })
            {
                continue;
            }
            let Some(req) = self.requested(source.metadata.labels.as_ref(), &svc.namespace) else {
                continue;
            };
            let carries_l7 = l7.services.contains(&key) || l7.gateways.contains(&req.key());
            svc.waypoint = self.resolve(
                &format!("Service {key}"),
                &req,
                |k| k.services && (!k.auto || carries_l7),
                &mut reported,
            );
        }

        for (key, (w, labels)) in workloads.iter_mut() {
            if w.native_tunnel {
                continue;
            }
            let Some(req) = self.requested(Some(labels), &w.namespace) else {
                continue;
            };
            w.waypoint = self.resolve(
                &format!("Pod {key}"),
                &req,
                |k| k.workloads && !k.auto,
                &mut reported,
            );
        }

        // A waypoint without its Service cannot be reached; say so once.
        let used: BTreeSet<String> = services
            .iter()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(workloads.values().filter_map(|(w, _)| w.waypoint.as_ref()))
            .map(WaypointRef::key)
            .collect();
        for key in used {
            if self.waypoints.contains_key(&key) && !service_keys.contains(&key) {
                self.reject(
                    format!("Gateway {key}"),
                    format!("waypoint has no Service {key} in the mesh; traffic that needs it is refused"),
                );
            }
        }
    }

    /// What carries L7 config, for auto waypoints: services named by an
    /// HTTPRoute or by a policy's targetRefs, services whose pods an L7
    /// policy selects, and Gateways a route or policy attaches to directly
    /// (then every service using them counts).
    fn l7_targets(&self, workloads: &Workloads) -> L7Targets {
        let mut out = L7Targets::default();
        for route in self.state.http_routes.values() {
            let ns = route.metadata.namespace.as_deref().unwrap_or("default");
            for p in &route.spec.parent_refs {
                match p.parent(ns) {
                    Parent::Service(k) => out.services.insert(k),
                    Parent::Gateway(k) => out.gateways.insert(k),
                    Parent::Other => false,
                };
            }
        }
        for ap in self.state.authorization_policies.values() {
            let ns = ap.metadata.namespace.as_deref().unwrap_or("default");
            let targets: Vec<_> = ap
                .spec
                .target_refs
                .iter()
                .chain(ap.spec.target_ref.as_ref())
                .collect();
            if !targets.is_empty() {
                // Only a waypoint enforces a targeted policy, L7 or not.
                for t in targets {
                    let key = format!("{ns}/{}", t.name);
                    match (t.group.as_str(), t.kind.as_str()) {
                        ("", "Service") => out.services.insert(key),
                        ("gateway.networking.k8s.io", "Gateway") => out.gateways.insert(key),
                        _ => false,
                    };
                }
                continue;
            }
            let l7 = ap.broken.is_some() || ap.spec.rules.iter().flatten().any(|r| r.has_l7());
            if !l7 {
                continue;
            }
            let selector = ap
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default();
            let selected: Box<dyn Iterator<Item = _>> = if ns == self.root_namespace {
                Box::new(workloads.iter())
            } else {
                Box::new(in_namespace(workloads, ns))
            };
            for (_, (w, labels)) in selected {
                if matches(&selector, labels) {
                    out.services.extend(w.services.iter().cloned());
                }
            }
        }
        out
    }
}

#[derive(Default)]
struct L7Targets {
    /// `namespace/name` of services.
    services: HashSet<String>,
    /// `namespace/name` of Gateways.
    gateways: HashSet<String>,
}

/// The namespace in `"Kind namespace/name"`.
fn object_namespace(object: &str) -> &str {
    object
        .split_once(' ')
        .map_or(object, |(_, k)| k)
        .split_once('/')
        .map_or("", |(ns, _)| ns)
}
