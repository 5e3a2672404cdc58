//! Cluster objects → the mesh model proxies consume: which pods are in the
//! mesh (Istio's labels), their identities and addresses, services with their
//! endpoints, the L4 part of authorization and peer authentication, which
//! waypoint each service and workload uses ([`waypoints`]), and what
//! waypoints enforce: HTTPRoutes ([`routes`], with their status), targeted
//! AuthorizationPolicies and TrafficPolicies ([`l7_policies`]).

pub mod l7_policies;
pub mod routes;
pub mod waypoints;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::config::{
    Cidr, DestinationMatch, MeshConfig, MtlsMode, PeerAuthentication, Policy, PolicyAction,
    PolicyScope, Rule, Service, ServicePort, SourceMatch, Workload,
};

use crate::exclusions::ExcludedPorts;
use crate::istio_types::{AuthorizationPolicy, PeerAuthentication as IstioPeerAuthentication};
use crate::sources::{ClusterState, Rejected};

/// Istio's label: `ambient` on a namespace (or pod) enrolls, `none` on a pod opts out.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The model, plus what was left out and why.
pub struct Translation {
    pub config: MeshConfig,
    pub rejected: Vec<Rejected>,
    /// Objects accepted but only partly applicable at L4 (say, L7 rules).
    pub notes: Vec<String>,
    /// Every HTTPRoute's conditions (Kubernetes status, `/debug/routes`).
    pub route_status: Vec<routes::RouteStatus>,
}

/// What the translation settles on, beyond the source objects.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub trust_domain: String,
    /// Policies here apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// Accept loopback pod addresses: a single-host test mesh puts every
    /// pod on 127.0.0.0/8. Never in a real cluster.
    pub allow_loopback_pods: bool,
}

impl MeshOptions {
    pub fn new(trust_domain: &str, root_namespace: &str) -> Self {
        MeshOptions {
            trust_domain: trust_domain.to_string(),
            root_namespace: root_namespace.to_string(),
            allow_loopback_pods: false,
        }
    }
}

pub fn translate(state: &ClusterState, options: &MeshOptions) -> Translation {
    let (trust_domain, root_namespace) = (&options.trust_domain, &options.root_namespace);
    let mut t = Translator {
        state,
        trust_domain,
        root_namespace,
        allow_loopback_pods: options.allow_loopback_pods,
        waypoints: BTreeMap::new(),
        rejected: Vec::new(),
        notes: Vec::new(),
    };
    t.waypoints = t.waypoint_gateways();
    let mut workloads = t.workloads();
    let mut services = t.services(&mut workloads);
    let policies = t.policies(&mut workloads);
    t.assign_waypoints(&mut workloads, &mut services);
    let peer_authentications = t.peer_authentications(&workloads);
    let (http_routes, route_status) = t.http_routes(&services);
    let http_policies = t.http_policies();
    let traffic_policies = t.traffic_policies();
    let config = MeshConfig {
        trust_domain: trust_domain.to_string(),
        root_namespace: root_namespace.to_string(),
        workloads: workloads.into_values().map(|(w, _)| w).collect(),
        services,
        policies,
        peer_authentications,
        http_routes,
        http_policies,
        traffic_policies,
    };
    Translation {
        config,
        rejected: t.rejected,
        notes: t.notes,
        route_status,
    }
}

struct Translator<'a> {
    state: &'a ClusterState,
    trust_domain: &'a str,
    root_namespace: &'a str,
    allow_loopback_pods: bool,
    /// Gateways of class istio-waypoint, by `namespace/name`.
    waypoints: BTreeMap<String, waypoints::WaypointKind>,
    rejected: Vec<Rejected>,
    notes: Vec<String>,
}

type Labels = BTreeMap<String, String>;

/// Workloads by `namespace/name`, with their pod labels (for selectors).
type Workloads = BTreeMap<String, (Workload, Labels)>;

/// The workloads of namespace `ns`: a key range, so selecting is O(pods in
/// the namespace) rather than O(pods in the mesh).
fn in_namespace<'w>(
    workloads: &'w Workloads,
    ns: &str,
) -> impl Iterator<Item = (&'w String, &'w (Workload, Labels))> + 'w {
    let prefix = format!("{ns}/");
    workloads
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
}

fn matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Translator<'_> {
    fn reject(&mut self, object: String, reason: impl Into<String>) {
        self.rejected.push(Rejected {
            origin: "translation".into(),
            object,
            reason: reason.into(),
        });
    }

    fn enrolled(&self, pod: &Pod, namespace: &str) -> bool {
        let pod_mode = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(DATAPLANE_MODE));
        match pod_mode.map(String::as_str) {
            Some("none") => false,
            Some("ambient") => true,
            _ => self
                .state
                .namespaces
                .get(namespace)
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(DATAPLANE_MODE))
                .is_some_and(|m| m == "ambient"),
        }
    }

    fn workloads(&mut self) -> Workloads {
        let mut out = Workloads::new();
        for (key, pod) in &self.state.pods {
            let ns = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            // A waypoint's pods are in the mesh whatever their labels say
            // (Istio's own waypoint pods carry dataplane-mode none): they
            // speak HBONE themselves, so nothing captures them.
            let waypoint_pod = self.is_waypoint_pod(pod, &ns);
            if !waypoint_pod && !self.enrolled(pod, &ns) {
                continue;
            }
            // Finished or host-network pods are not workloads of the mesh: a
            // finished pod's address may already belong to another pod, and a
            // host-network pod's address is the node's.
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed"))
                || pod.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
                self.notes
                    .push(format!("Pod {key}: hostNetwork pods are not captured"));
                continue;
            }
            let spec = pod.spec.as_ref();
            let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
                self.reject(
                    format!("Pod {key}"),
                    "no spec.nodeName (manifests must place pods on a node)",
                );
                continue;
            };
            let status = pod.status.as_ref();
            let mut ips: Vec<String> = status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|v| v.iter().map(|p| p.ip.clone()).collect())
                .unwrap_or_default();
            if ips.is_empty() {
                ips.extend(status.and_then(|s| s.pod_ip.clone()));
            }
            let mut addresses = Vec::new();
            let mut bad = None;
            for ip in &ips {
                match ip.parse::<IpAddr>() {
                    Ok(a) if !usable(a, self.allow_loopback_pods) => {
                        bad = Some(format!("status.podIP {a} is not a usable pod address"))
                    }
                    Ok(a) => addresses.push(a),
                    Err(_) => bad = Some(format!("status.podIP {ip:?} is not an IP address")),
                }
            }
            if let Some(reason) = bad {
                self.reject(format!("Pod {key}"), reason);
                continue;
            }
            if addresses.is_empty() {
                self.reject(
                    format!("Pod {key}"),
                    "no status.podIP (manifests must give pod addresses)",
                );
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            let workload = Workload {
                name,
                namespace: ns,
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                node,
                addresses,
                services: Vec::new(),
                authorization_policies: Vec::new(),
                excluded_outbound_ports: Vec::new(),
                excluded_inbound_ports: Vec::new(),
                waypoint: None,
                native_tunnel: waypoint_pod,
            };
            let mut workload = workload;
            match ExcludedPorts::from_annotations(
                pod.metadata
                    .annotations
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            ) {
                Ok(ex) => {
                    workload.excluded_outbound_ports = ex.outbound.into_iter().collect();
                    workload.excluded_inbound_ports = ex.inbound.into_iter().collect();
                }
                // Fail safe: a bad exclusion captures everything rather than
                // guessing which ports were meant.
                Err(e) => self.reject(
                    format!("Pod {key} annotation"),
                    format!("{e}; no ports excluded"),
                ),
            }
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            out.insert(key.clone(), (workload, labels));
        }
        // Two pods claiming one address: neither can be trusted with it (one
        // may be stale), so both are left out rather than the first winning.
        let mut claims: HashMap<IpAddr, Vec<&str>> = HashMap::with_capacity(out.len());
        for (key, (w, _)) in &out {
            for a in &w.addresses {
                claims.entry(*a).or_default().push(key);
            }
        }
        let conflicts: Vec<(IpAddr, Vec<String>)> = claims
            .into_iter()
            .filter(|(_, k)| k.len() > 1)
            .map(|(a, k)| (a, k.into_iter().map(str::to_string).collect()))
            .collect();
        for (addr, keys) in conflicts {
            for key in &keys {
                if out.remove(key).is_some() {
                    self.reject(
                        format!("Pod {key}"),
                        format!(
                            "address {addr} is claimed by {} pods: {}",
                            keys.len(),
                            keys.join(", ")
                        ),
                    );
                }
            }
        }
        out
    }

    fn services(&mut self, workloads: &mut Workloads) -> Vec<Service> {
        let mut out = Vec::new();
        let mut used: HashSet<IpAddr> = workloads
            .values()
            .flat_map(|(w, _)| w.addresses.clone())
            .collect();
        for (key, svc) in &self.state.services {
            let object = format!("Service {key}");
            let ns = svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let Some(selector) = spec.selector.clone().filter(|s| !s.is_empty()) else {
                continue; // no selector: endpoints are managed elsewhere
            };
            let mut vips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
            if vips.is_empty() {
                vips.extend(spec.cluster_ip.clone());
            }
            vips.retain(|v| v != "None" && !v.is_empty());
            if vips.is_empty() {
                continue; // headless: clients reach pods by their own addresses
            }
            let mut addresses = Vec::new();
            let mut bad = None;
            for v in &vips {
                match v.parse::<IpAddr>() {
                    Ok(a) if used.contains(&a) => {
                        bad = Some(format!("clusterIP {a} is already in use"))
                    }
                    Ok(a) => addresses.push(a),
                    Err(_) => bad = Some(format!("clusterIP {v:?} is not an IP address")),
                }
            }
            if let Some(reason) = bad {
                self.reject(object, reason);
                continue;
            }
            let endpoints: Vec<String> = in_namespace(workloads, &ns)
                .filter(|(_, (_, labels))| matches(&selector, labels))
                .map(|(k, _)| k.clone())
                .collect();
            let mut ports = Vec::new();
            let mut port_err = None;
            for p in spec.ports.iter().flatten() {
                let Ok(port) = u16::try_from(p.port) else {
                    port_err = Some(format!("port {} out of range", p.port));
                    break;
                };
                let target = match &p.target_port {
                    None => Some(port),
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(name)) => self.named_port(&endpoints, name),
                };
                match target {
                    Some(t) => ports.push(ServicePort {
                        port,
                        target_port: Some(t),
                    }),
                    None => {
                        port_err = Some(format!(
                            "targetPort of port {port} does not resolve on any endpoint"
                        ));
                        break;
                    }
                }
            }
            if let Some(reason) = port_err {
                self.reject(object, reason);
                continue;
            }
            if ports.is_empty() {
                continue;
            }
            used.extend(&addresses);
            let svc_key = format!("{ns}/{}", svc.metadata.name.clone().unwrap_or_default());
            for ep in &endpoints {
                if let Some((w, _)) = workloads.get_mut(ep) {
                    w.services.push(svc_key.clone());
                }
            }
            out.push(Service {
                name: svc.metadata.name.clone().unwrap_or_default(),
                namespace: ns,
                hostname: None,
                addresses,
                ports,
                load_balancing: Default::default(),
                waypoint: None,
            });
        }
        out
    }

    /// A named targetPort, resolved on the first endpoint that declares it.
    fn named_port(&self, endpoints: &[String], name: &str) -> Option<u16> {
        endpoints.iter().find_map(|ep| {
            let pod = self.state.pods.get(ep)?;
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name))
                    .and_then(|p| u16::try_from(p.container_port).ok())
            })
        })
    }

    fn policies(&mut self, workloads: &mut Workloads) -> Vec<Policy> {
        let mut out = Vec::new();
        for (key, ap) in &self.state.authorization_policies {
            let object = format!("AuthorizationPolicy {key}");
            let translated = match self.policy(key, ap) {
                Err(reason) => {
                    // Dropping a policy would widen access (a lost ALLOW makes
                    // the workload allow-all, a lost DENY lets through what it
                    // denied), so a policy we cannot read fails closed instead.
                    self.reject(object, format!("{reason}; enforced as deny-all"));
                    Some(fail_closed(ap))
                }
                Ok(p) => p,
            };
            if let Some(mut policy) = translated {
                if let Some(sel) = ap
                    .spec
                    .selector
                    .as_ref()
                    .filter(|s| !s.match_labels.is_empty())
                {
                    policy.scope = PolicyScope::WorkloadSelector;
                    let everywhere = policy.namespace == self.root_namespace;
                    let selected: Vec<String> = if everywhere {
                        workloads
                            .iter()
                            .filter(|(_, (_, labels))| matches(&sel.match_labels, labels))
                            .map(|(k, _)| k.clone())
                            .collect()
                    } else {
                        in_namespace(workloads, &policy.namespace)
                            .filter(|(_, (_, labels))| matches(&sel.match_labels, labels))
                            .map(|(k, _)| k.clone())
                            .collect()
                    };
                    for k in selected {
                        if let Some((w, _)) = workloads.get_mut(&k) {
                            w.authorization_policies.push(policy.key());
                        }
                    }
                } else if policy.namespace == self.root_namespace {
                    policy.scope = PolicyScope::Global;
                }
                out.push(policy);
            }
        }
        out
    }

    fn policy(&mut self, key: &str, ap: &AuthorizationPolicy) -> Result<Option<Policy>, String> {
        let targeted = !ap.spec.target_refs.is_empty() || ap.spec.target_ref.is_some();
        let selector = ap
            .spec
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty());
        if targeted && selector {
            // Istio refuses this combination; which one was meant is
            // unknown, so the selected workloads fail closed.
            return Err("both selector and targetRefs are set".into());
        }
        if targeted {
            // A waypoint's policy, even one that does not parse: see
            // l7_policies, which enforces it (or its stand-in) there.
            self.notes.push(format!(
                "AuthorizationPolicy {key}: targetRefs (a waypoint's job), not enforced by ztunnel"
            ));
            return Ok(None);
        }
        if let Some(reason) = &ap.broken {
            return Err(reason.clone());
        }
        let action = match ap.spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => PolicyAction::Allow,
            "DENY" => PolicyAction::Deny,
            other @ ("AUDIT" | "CUSTOM") => {
                let provider = ap
                    .spec
                    .provider
                    .as_ref()
                    .map(|p| format!(" (provider {p:?})"))
                    .unwrap_or_default();
                self.notes.push(format!("AuthorizationPolicy {key}: action {other}{provider} is not enforced by ztunnel"));
                return Ok(None);
            }
            other => return Err(format!("unknown action {other:?}")),
        };
        let mut rules = Vec::new();
        for (i, r) in ap.spec.rules.iter().flatten().enumerate() {
            let l7 = r.has_l7();
            if l7 && action == PolicyAction::Allow {
                // ztunnel cannot see these attributes: the rule can never be
                // proven to match, so it allows nothing (fail safe).
                self.notes.push(format!("AuthorizationPolicy {key} rule {i}: L7 attributes; this ALLOW rule matches nothing at L4"));
                continue;
            }
            if l7 {
                // A DENY is enforced on its L4 part alone: broader, never weaker.
                self.notes.push(format!("AuthorizationPolicy {key} rule {i}: L7 attributes ignored; DENY applies on its L4 part"));
            }
            let mut from = Vec::new();
            for f in &r.from {
                from.push(source_match(&f.source)?);
            }
            let mut to = Vec::new();
            for t in &r.to {
                to.push(DestinationMatch {
                    ports: ports(&t.operation.ports)?,
                    not_ports: ports(&t.operation.not_ports)?,
                });
            }
            rules.push(Rule { from, to });
        }
        let name = ap.metadata.name.clone().unwrap_or_default();
        let namespace = ap
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        Ok(Some(Policy {
            name,
            namespace,
            scope: PolicyScope::Namespace,
            action,
            rules,
        }))
    }

    fn peer_authentications(&mut self, workloads: &Workloads) -> Vec<PeerAuthentication> {
        let mut out = Vec::new();
        for (key, pa) in &self.state.peer_authentications {
            match self.peer_authentication(key, pa, workloads) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => {}
                Err(reason) => self.reject(format!("PeerAuthentication {key}"), reason),
            }
        }
        out
    }

    fn peer_authentication(
        &mut self,
        key: &str,
        pa: &IstioPeerAuthentication,
        workloads: &Workloads,
    ) -> Result<Option<PeerAuthentication>, String> {
        if let Some(reason) = &pa.broken {
            self.reject(
                format!("PeerAuthentication {key}"),
                format!("{reason}; enforced as STRICT"),
            );
        }
        let mode = match pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
            _ if pa.broken.is_some() => MtlsMode::Strict,
            None | Some("UNSET") if pa.spec.port_level_mtls.is_none() => return Ok(None),
            None | Some("UNSET") => MtlsMode::Permissive,
            Some("STRICT") => MtlsMode::Strict,
            Some("PERMISSIVE") => MtlsMode::Permissive,
            Some("DISABLE") => {
                self.notes.push(format!("PeerAuthentication {key}: DISABLE is treated as PERMISSIVE (ambient always offers mTLS)"));
                MtlsMode::Permissive
            }
            Some(other) => {
                // Fail closed: an unreadable mode must not leave plaintext open.
                self.reject(
                    format!("PeerAuthentication {key}"),
                    format!("unknown mtls mode {other:?}; enforced as STRICT"),
                );
                MtlsMode::Strict
            }
        };
        let mode = if pa.spec.port_level_mtls.is_some() && mode != MtlsMode::Strict {
            self.notes.push(format!(
                "PeerAuthentication {key}: portLevelMtls is not modelled per port yet; the whole workload is STRICT"
            ));
            MtlsMode::Strict
        } else {
            mode
        };
        let namespace = pa
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut selected = Vec::new();
        if let Some(sel) = pa
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())
        {
            let names: BTreeSet<String> = workloads
                .values()
                .filter(|(w, labels)| {
                    w.namespace == namespace && matches(&sel.match_labels, labels)
                })
                .map(|(w, _)| w.name.clone())
                .collect();
            if names.is_empty() {
                // Selecting nothing must not widen into the whole namespace.
                return Ok(None);
            }
            selected.extend(names);
        }
        Ok(Some(PeerAuthentication {
            name: pa.metadata.name.clone().unwrap_or_default(),
            namespace,
            mode,
            workloads: selected,
        }))
    }
}

/// Stands in for a policy that could not be translated: same name, namespace
/// and selector, allowing nothing (as an ALLOW with no rules) or denying
/// everything (a DENY with one empty rule).
fn fail_closed(ap: &AuthorizationPolicy) -> Policy {
    let deny = !matches!(ap.spec.action.as_deref(), None | Some("ALLOW"));
    Policy {
        name: ap.metadata.name.clone().unwrap_or_default(),
        namespace: ap
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        scope: PolicyScope::Namespace,
        action: if deny {
            PolicyAction::Deny
        } else {
            PolicyAction::Allow
        },
        rules: if deny {
            vec![Rule::default()]
        } else {
            Vec::new()
        },
    }
}

/// `namespace/name` service accounts as principals of any trust domain.
/// An Istio `Source` as the model's match. Ambit trusts no proxy in front
/// of a proxy (Istio's default, numTrustedProxies 0): the remote address is
/// the connection's source, so `remoteIpBlocks` mean what `ipBlocks` do.
pub(crate) fn source_match(s: &crate::istio_types::Source) -> Result<SourceMatch, String> {
    Ok(SourceMatch {
        principals: [s.principals.clone(), sa_principals(&s.service_accounts)?].concat(),
        not_principals: [
            s.not_principals.clone(),
            sa_principals(&s.not_service_accounts)?,
        ]
        .concat(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        ip_blocks: cidrs(&[s.ip_blocks.clone(), s.remote_ip_blocks.clone()].concat())?,
        not_ip_blocks: cidrs(&[s.not_ip_blocks.clone(), s.not_remote_ip_blocks.clone()].concat())?,
    })
}

fn sa_principals(v: &[String]) -> Result<Vec<String>, String> {
    v.iter()
        .map(|sa| match sa.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(format!("*/ns/{ns}/sa/{name}"))
            }
            _ => Err(format!("serviceAccount {sa:?} is not namespace/name")),
        })
        .collect()
}

/// An address a pod can really have (not the node's loopback, a wildcard,
/// multicast or link-local).
fn usable(a: IpAddr, allow_loopback: bool) -> bool {
    let link_local = match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(a.is_unspecified() || (a.is_loopback() && !allow_loopback) || a.is_multicast() || link_local)
}

fn cidrs(v: &[String]) -> Result<Vec<Cidr>, String> {
    v.iter().map(|s| s.parse::<Cidr>()).collect()
}

fn ports(v: &[String]) -> Result<Vec<u16>, String> {
    v.iter()
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| format!("port {p:?} is not a port number"))
        })
        .collect()
}
