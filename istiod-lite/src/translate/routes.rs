//! Gateway API `HTTPRoute` → the model's [`HttpRoute`], with the route's
//! status conditions per parent.
//!
//! * A route is all or nothing: a field Ambit does not implement (an unknown
//!   spec or rule field such as `sessionPersistence`, a filter such as
//!   `ExtensionRef` or `CORS`) or a rule that does not validate refuses the
//!   whole route (`Accepted=False`, `UnsupportedValue`) rather than apply it
//!   without the part it could not read.
//! * Parents: a core `Service` (GAMMA), or a Gateway of class
//!   `istio-waypoint` whose listeners allow the route. A Gateway of another
//!   class belongs to another controller: it gets no status entry from us.
//! * Backends: core Services only. An unresolvable backend stays in the
//!   model with its weight, so its share of requests gets 500 as Gateway API
//!   requires; one that must not be reached (another kind, or another
//!   namespace without a ReferenceGrant, which Ambit does not read) is
//!   renamed to `<Reason>.<name>`, which no Service can be called (Service
//!   names are lower-case), so it resolves to nothing.

use std::collections::BTreeMap;

use mesh_core::config::{
    validate_mesh_config, HttpRoute, MeshConfig, ParentKind, ParentRef as ModelParent, RouteRule,
    Service,
};
use serde::Serialize;
use serde_json::{json, Value};
use serde_yaml::Value as Yaml;

use super::Translator;
use crate::sources::gateway_api::{self, Gateway, Listener, ParentRef, GROUP};

/// The `controllerName` of the status entries istiod-lite writes.
pub const CONTROLLER_NAME: &str = "ambit.dev/istiod-lite";

/// One route's conditions, per parentRef that is ours to report on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` the conditions describe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

impl RouteStatus {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    /// As written in the route, so it matches the spec's entry.
    pub parent_ref: ParentRef,
    pub accepted: RouteCondition,
    pub resolved_refs: RouteCondition,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteCondition {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl RouteCondition {
    fn new(status: bool, reason: &str, message: impl Into<String>) -> Self {
        RouteCondition {
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// What one parentRef comes to.
enum ParentOutcome {
    Accepted(ModelParent),
    Refused(RouteCondition),
    /// Another controller's Gateway: no status entry, not in the model.
    NotOurs,
}

/// A backend that does not resolve, found while reading the rules.
struct RefIssue {
    reason: &'static str,
    message: String,
}

const FILTER_TYPES: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
];

impl Translator<'_> {
    /// The routes for the model and the status of every route, after
    /// services are translated (backends resolve against them).
    pub(super) fn http_routes(
        &mut self,
        services: &[Service],
    ) -> (Vec<HttpRoute>, Vec<RouteStatus>) {
        let routable: BTreeMap<String, &Service> = services.iter().map(|s| (s.key(), s)).collect();
        let mut routes = Vec::new();
        let mut statuses = Vec::new();
        for (key, route) in &self.state.http_routes {
            let object = format!("HTTPRoute {key}");
            let ns = route
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = route.metadata.name.clone().unwrap_or_default();
            let mut issues = Vec::new();
            let rules = read_rules(&ns, route, &routable, self, &mut issues);

            let mut parents: Vec<ModelParent> = Vec::new();
            let mut outcomes = Vec::new();
            for p in &route.spec.parent_refs {
                let outcome = self.parent(&ns, p);
                if let ParentOutcome::Accepted(m) = &outcome {
                    if !parents.contains(m) {
                        parents.push(m.clone());
                    }
                }
                outcomes.push((p, outcome));
            }

            let creation_timestamp = route
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| serde_json::to_value(t).ok())
                .and_then(|v| v.as_str().map(str::to_string));
            let refused = match rules {
                Err(reason) => Some(reason),
                Ok(rules) => {
                    let model = HttpRoute {
                        name: name.clone(),
                        namespace: ns.clone(),
                        creation_timestamp,
                        parents: parents.clone(),
                        hostnames: route.spec.hostnames.clone(),
                        rules,
                    };
                    match self.check_alone(&model) {
                        Err(reason) => Some(reason),
                        Ok(()) if parents.is_empty() => {
                            self.notes
                                .push(format!("{object}: no accepted parent; not applied"));
                            None
                        }
                        Ok(()) => {
                            routes.push(model);
                            None
                        }
                    }
                }
            };
            if let Some(reason) = &refused {
                self.reject(object, format!("{reason}; the route is not applied"));
            }

            let resolved = match issues.first() {
                None => RouteCondition::new(true, "ResolvedRefs", "all references resolved"),
                Some(first) => RouteCondition::new(
                    false,
                    first.reason,
                    issues
                        .iter()
                        .map(|i| i.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            let mut parent_statuses = Vec::new();
            for (p, outcome) in outcomes {
                let accepted = match (outcome, &refused) {
                    (ParentOutcome::NotOurs, _) => continue,
                    (ParentOutcome::Refused(c), _) => c,
                    (ParentOutcome::Accepted(_), Some(reason)) => {
                        RouteCondition::new(false, "UnsupportedValue", reason.clone())
                    }
                    (ParentOutcome::Accepted(_), None) => {
                        RouteCondition::new(true, "Accepted", "accepted by the waypoint")
                    }
                };
                parent_statuses.push(ParentStatus {
                    parent_ref: p.clone(),
                    accepted,
                    resolved_refs: resolved.clone(),
                });
            }
            statuses.push(RouteStatus {
                namespace: ns,
                name,
                generation: route.metadata.generation,
                parents: parent_statuses,
            });
        }
        (routes, statuses)
    }

    /// Runs the proxies' own validation on one route, so a route the
    /// waypoint would refuse is refused here alone instead of failing the
    /// whole build.
    fn check_alone(&self, route: &HttpRoute) -> Result<(), String> {
        let mut route = route.clone();
        if route.parents.is_empty() {
            // Only for the check: its rules deserve a verdict too.
            route.parents.push(ModelParent {
                kind: ParentKind::Service,
                namespace: route.namespace.clone(),
                name: "check".into(),
                port: None,
            });
        }
        let alone = MeshConfig {
            trust_domain: self.trust_domain.to_string(),
            http_routes: vec![route],
            ..MeshConfig::default()
        };
        validate_mesh_config(&alone).map_err(|e| {
            let e = e.to_string();
            // "httpRoutes[0]: route ns/name: <reason>" → "<reason>"
            match e.split_once(": route ") {
                Some((_, rest)) => rest
                    .split_once(": ")
                    .map_or(e.clone(), |(_, r)| r.to_string()),
                None => e,
            }
        })
    }

    fn parent(&self, route_ns: &str, p: &ParentRef) -> ParentOutcome {
        let ns = p.namespace.clone().unwrap_or_else(|| route_ns.to_string());
        let key = format!("{ns}/{}", p.name);
        let refused = |reason: &str, msg: String| {
            ParentOutcome::Refused(RouteCondition::new(false, reason, msg))
        };
        let group = p.group.as_deref().unwrap_or(GROUP);
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        match (group, kind) {
            ("", "Service") => {
                if ns != route_ns {
                    // A GAMMA consumer route binds only the route namespace's
                    // own clients; the waypoint cannot scope a route to its
                    // callers yet, and applying it to everyone would let any
                    // namespace reroute another's Service.
                    return refused(
                        "UnsupportedValue",
                        format!("Service {key} is in another namespace: consumer routes are not supported by Ambit yet"),
                    );
                }
                let Some(svc) = self.state.services.get(&key) else {
                    return refused("NoMatchingParent", format!("Service {key} does not exist"));
                };
                let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
                let mut port = p.port;
                if let Some(section) = &p.section_name {
                    match ports
                        .into_iter()
                        .flatten()
                        .find(|sp| sp.name.as_deref() == Some(section.as_str()))
                    {
                        Some(sp) if port.is_none_or(|n| n == sp.port) => port = Some(sp.port),
                        _ => {
                            return refused(
                                "NoMatchingParent",
                                format!("Service {key} has no port named {section:?}{}", match port {
                                    Some(n) => format!(" with number {n}"),
                                    None => String::new(),
                                }),
                            )
                        }
                    }
                }
                let port = match port {
                    None => None,
                    Some(n) => {
                        let has = ports.into_iter().flatten().any(|sp| sp.port == n);
                        match u16::try_from(n) {
                            Ok(n) if has && n != 0 => Some(n),
                            _ => return refused("NoMatchingParent", format!("Service {key} has no port {n}")),
                        }
                    }
                };
                ParentOutcome::Accepted(ModelParent {
                    kind: ParentKind::Service,
                    namespace: ns,
                    name: p.name.clone(),
                    port,
                })
            }
            (GROUP, "Gateway") => {
                let Some(gw) = self.state.gateways.get(&key) else {
                    return refused("NoMatchingParent", format!("Gateway {key} does not exist"));
                };
                if !gw.is_waypoint() {
                    return ParentOutcome::NotOurs;
                }
                let matching: Vec<&Listener> = gw
                    .spec
                    .listeners
                    .iter()
                    .filter(|l| p.section_name.as_ref().is_none_or(|s| *s == l.name))
                    .filter(|l| p.port.is_none_or(|n| n == l.port))
                    .collect();
                if matching.is_empty() {
                    return refused(
                        "NoMatchingParent",
                        format!("no listener of Gateway {key} matches the parentRef's sectionName/port"),
                    );
                }
                if !matching.iter().any(|l| self.allows(gw, l, route_ns)) {
                    return refused(
                        "NotAllowedByListeners",
                        format!("the listeners of Gateway {key} do not allow HTTPRoutes from namespace {route_ns}"),
                    );
                }
                ParentOutcome::Accepted(ModelParent {
                    kind: ParentKind::Gateway,
                    namespace: ns,
                    name: p.name.clone(),
                    port: None,
                })
            }
            (group, kind) => refused(
                "UnsupportedValue",
                format!("parentRef kind {kind:?} of group {group:?} is not supported (a core Service or a Gateway of class {:?})", gateway_api::WAYPOINT_CLASS),
            ),
        }
    }

    /// Whether listener `l` of `gw` takes HTTPRoutes from `route_ns`
    /// (`allowedRoutes`; Gateway API's default is the Gateway's namespace).
    fn allows(&self, gw: &Gateway, l: &Listener, route_ns: &str) -> bool {
        let gw_ns = gw.metadata.namespace.as_deref().unwrap_or("default");
        let allowed = l.allowed_routes.as_ref();
        let kind_ok = allowed.and_then(|a| a.kinds.as_ref()).is_none_or(|kinds| {
            kinds
                .iter()
                .any(|k| k.kind == "HTTPRoute" && k.group.as_deref().unwrap_or(GROUP) == GROUP)
        });
        let namespaces = allowed.and_then(|a| a.namespaces.as_ref());
        let ns_ok = match namespaces.and_then(|n| n.from.as_deref()) {
            None | Some("Same") => route_ns == gw_ns,
            Some("All") => true,
            Some("Selector") => {
                let Some(sel) = namespaces.and_then(|n| n.selector.as_ref()) else {
                    return false;
                };
                // matchExpressions are not evaluated, so such a selector
                // admits nothing rather than more than it says.
                let labels = self
                    .state
                    .namespaces
                    .get(route_ns)
                    .and_then(|n| n.metadata.labels.as_ref());
                sel.match_expressions.is_empty()
                    && sel
                        .match_labels
                        .iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            }
            Some(_) => false,
        };
        kind_ok && ns_ok
    }
}

/// The route's rules in the model's shape, with backends checked; `Err`
/// refuses the whole route.
fn read_rules(
    ns: &str,
    route: &gateway_api::HttpRoute,
    routable: &BTreeMap<String, &Service>,
    t: &Translator<'_>,
    issues: &mut Vec<RefIssue>,
) -> Result<Vec<RouteRule>, String> {
    if let Some(field) = route.spec.other.keys().next() {
        return Err(format!("spec.{field} is not supported by Ambit"));
    }
    let mut out = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let at = |e: String| format!("rules[{i}]: {e}");
        let mut rule = rule.clone();
        let Yaml::Mapping(m) = &mut rule else {
            return Err(at("not a mapping".into()));
        };
        check_filters(m.get_mut("filters"), ns, routable, t, issues).map_err(at)?;
        if let Some(Yaml::Sequence(refs)) = m.get_mut("backendRefs") {
            for (j, b) in refs.iter_mut().enumerate() {
                let at = |e: String| format!("rules[{i}].backendRefs[{j}]: {e}");
                let Yaml::Mapping(b) = b else {
                    return Err(at("not a mapping".into()));
                };
                check_backend(b, ns, routable, t, issues).map_err(at)?;
                check_filters(b.get_mut("filters"), ns, routable, t, issues).map_err(at)?;
            }
        }
        out.push(
            serde_yaml::from_value::<RouteRule>(rule)
                .map_err(|e| at(format!("{e} (not supported by Ambit, or not valid)")))?,
        );
    }
    Ok(out)
}

fn check_filters(
    filters: Option<&mut Yaml>,
    ns: &str,
    routable: &BTreeMap<String, &Service>,
    t: &Translator<'_>,
    issues: &mut Vec<RefIssue>,
) -> Result<(), String> {
    let Some(Yaml::Sequence(filters)) = filters else {
        return Ok(());
    };
    for f in filters {
        let kind = f
            .get("type")
            .and_then(Yaml::as_str)
            .unwrap_or_default()
            .to_string();
        if !FILTER_TYPES.contains(&kind.as_str()) {
            return Err(format!("filter type {kind:?} is not supported by Ambit"));
        }
        if let Some(Yaml::Mapping(b)) = f
            .get_mut("requestMirror")
            .and_then(|m| m.get_mut("backendRef"))
        {
            check_backend(b, ns, routable, t, issues)?;
        }
    }
    Ok(())
}

/// Checks one backend reference and strips what the model does not carry
/// (`group`, `kind`). A reference that must not be followed is renamed so
/// that it resolves to nothing, keeping its weight.
fn check_backend(
    b: &mut serde_yaml::Mapping,
    route_ns: &str,
    routable: &BTreeMap<String, &Service>,
    t: &Translator<'_>,
    issues: &mut Vec<RefIssue>,
) -> Result<(), String> {
    let text = |v: Option<Yaml>| v.and_then(|v| v.as_str().map(str::to_string));
    let group = text(b.remove("group")).unwrap_or_default();
    let kind = text(b.remove("kind")).unwrap_or_else(|| "Service".into());
    let name = b
        .get("name")
        .and_then(Yaml::as_str)
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err("a backendRef needs a name".into());
    }
    let ns = b
        .get("namespace")
        .and_then(Yaml::as_str)
        .unwrap_or(route_ns)
        .to_string();
    let key = format!("{ns}/{name}");
    let port = b.get("port").and_then(Yaml::as_u64);
    let mut unreachable = |reason: &'static str, message: String, b: &mut serde_yaml::Mapping| {
        issues.push(RefIssue { reason, message });
        b.insert("name".into(), format!("{reason}.{name}").into());
        if port.is_none() {
            // The model needs a port; this backend is never dialled.
            b.insert("port".into(), 1u64.into());
        }
    };
    if !(group.is_empty() && kind == "Service") {
        unreachable(
            "InvalidKind",
            format!("backendRef {name:?}: kind {kind:?} of group {group:?} is not supported (core Services only)"),
            b,
        );
        return Ok(());
    }
    let Some(port) = port else {
        return Err(format!("backendRef to Service {key} without a port"));
    };
    if ns != route_ns {
        unreachable(
            "RefNotPermitted",
            format!("backendRef to Service {key}: references to another namespace are refused (Ambit does not read ReferenceGrants)"),
            b,
        );
        return Ok(());
    }
    match routable.get(&key) {
        Some(svc) if svc.ports.iter().any(|p| u64::from(p.port) == port) => {}
        Some(_) => issues.push(RefIssue {
            reason: "BackendNotFound",
            message: format!("Service {key} has no port {port}"),
        }),
        None if t.state.services.contains_key(&key) => issues.push(RefIssue {
            reason: "BackendNotFound",
            message: format!("Service {key} has no cluster IP and selector Ambit can route to"),
        }),
        None => issues.push(RefIssue {
            reason: "BackendNotFound",
            message: format!("Service {key} does not exist"),
        }),
    }
    Ok(())
}

/// Lines for the log: each route whose status differs from before.
pub fn changes(old: &[RouteStatus], new: &[RouteStatus]) -> Vec<String> {
    let before: BTreeMap<String, &RouteStatus> = old.iter().map(|s| (s.key(), s)).collect();
    let mut out = Vec::new();
    for s in new {
        if before.get(&s.key()).is_some_and(|o| *o == s) {
            continue;
        }
        for p in &s.parents {
            let c = |c: &RouteCondition| {
                format!("{}={}", c.reason, if c.status { "True" } else { "False" })
            };
            out.push(format!(
                "HTTPRoute {} parent {}: Accepted {} ({}), ResolvedRefs {} ({})",
                s.key(),
                parent_label(&p.parent_ref, &s.namespace),
                c(&p.accepted),
                p.accepted.message,
                c(&p.resolved_refs),
                p.resolved_refs.message,
            ));
        }
    }
    out
}

fn parent_label(p: &ParentRef, route_ns: &str) -> String {
    format!(
        "{}/{}/{}",
        p.kind.as_deref().unwrap_or("Gateway"),
        p.namespace.as_deref().unwrap_or(route_ns),
        p.name
    )
}

fn condition_json(kind: &str, c: &RouteCondition, generation: Option<i64>, since: &str) -> Value {
    let mut v = json!({
        "type": kind,
        "status": if c.status { "True" } else { "False" },
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        v["observedGeneration"] = json!(g);
    }
    v
}

/// `status.parents` for a route whose current entries are `existing`:
/// other controllers' entries kept as they are, ours replaced by `s`.
/// `None` when ours are already what `s` says (nothing to write). A
/// condition whose status did not change keeps its `lastTransitionTime`.
pub fn merged_parents(existing: &[Value], s: &RouteStatus, now: &str) -> Option<Vec<Value>> {
    let ours = |e: &&Value| e["controllerName"] == CONTROLLER_NAME;
    let old: Vec<&Value> = existing.iter().filter(ours).collect();
    let mut new = Vec::new();
    for p in &s.parents {
        let parent_ref = serde_json::to_value(&p.parent_ref).unwrap_or(Value::Null);
        let previous = old.iter().find(|e| e["parentRef"] == parent_ref);
        let conditions: Vec<Value> = [
            ("Accepted", &p.accepted),
            ("ResolvedRefs", &p.resolved_refs),
        ]
        .into_iter()
        .map(|(kind, c)| {
            let was = previous.and_then(|e| {
                e["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == kind)
            });
            let status = if c.status { "True" } else { "False" };
            let since = match was {
                Some(w) if w["status"] == status => w["lastTransitionTime"].as_str().unwrap_or(now),
                _ => now,
            };
            condition_json(kind, c, s.generation, since)
        })
        .collect();
        new.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    let unchanged = old.len() == new.len() && old.iter().zip(&new).all(|(a, b)| *a == b);
    if unchanged {
        return None;
    }
    let mut out: Vec<Value> = existing.iter().filter(|e| !ours(e)).cloned().collect();
    // Gateway API allows 32 entries in all; other controllers' come first.
    let room = 32usize.saturating_sub(out.len());
    out.extend(new.into_iter().take(room));
    Some(out)
}
