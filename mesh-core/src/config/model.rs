use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::Cidr;

fn default_trust_domain() -> String {
    crate::identity::DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_root_namespace() -> String {
    "istio-system".to_string()
}

fn default_service_account() -> String {
    "default".to_string()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The port a waypoint takes HBONE on (Istio's fixed `hbone_mtls_port`).
pub const WAYPOINT_HBONE_PORT: u16 = 15008;

fn default_waypoint_port() -> u16 {
    WAYPOINT_HBONE_PORT
}

/// Everything a proxy needs to know about the mesh.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Policies and peer authentications here apply mesh-wide (Istio's root namespace).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    /// L7 configuration, read by waypoints only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<super::HttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_policies: Vec<super::HttpPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic_policies: Vec<super::TrafficPolicy>,
}

impl MeshConfig {
    /// The effective mTLS mode of a workload: workload-level beats
    /// namespace-level beats mesh-wide (root namespace).
    pub fn mtls_mode(&self, namespace: &str, name: &str) -> MtlsMode {
        let pas = &self.peer_authentications;
        pas.iter()
            .find(|p| p.namespace == namespace && p.workloads.iter().any(|w| w == name))
            .or_else(|| {
                pas.iter()
                    .find(|p| p.namespace == namespace && p.workloads.is_empty())
            })
            .or_else(|| {
                pas.iter()
                    .find(|p| p.namespace == self.root_namespace && p.workloads.is_empty())
            })
            .map(|p| p.mode)
            .unwrap_or_default()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    /// Services this workload is an endpoint of, as `namespace/name`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Policies of scope `WorkloadSelector` that select this workload, as `namespace/name`.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// Destination ports of the workload's own connections that bypass capture
    /// (from pod annotations; an Ambit extension of Istio's model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_outbound_ports: Vec<u16>,
    /// Ports of the workload that incoming connections reach without capture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_inbound_ports: Vec<u16>,
    /// Traffic addressed to this workload directly (not via a service) goes
    /// through this waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    /// The workload speaks HBONE itself (a waypoint; Istio's `native_tunnel`):
    /// it is not captured, and peers tunnel straight to its HBONE port
    /// instead of through its node's ztunnel.
    #[serde(default, skip_serializing_if = "is_false")]
    pub native_tunnel: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Defaults to `<name>.<namespace>.svc.<trust domain>`.
    #[serde(default)]
    pub hostname: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Traffic addressed to this service goes through this waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// The waypoint a destination's traffic must pass, as Istio's
/// `GatewayAddress` names it: the waypoint Service's namespaced hostname and
/// its HBONE port. The Service is named after its Gateway.
///
/// The Service need not be in the config: a reference that does not resolve
/// means the waypoint is unavailable, and traffic that needs it is refused
/// rather than sent around it (which would skip its L7 policy).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    pub namespace: String,
    /// The Gateway, and the Service in front of its pods.
    pub name: String,
    /// Defaults to `<name>.<namespace>.svc.<trust domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default = "default_waypoint_port")]
    pub hbone_port: u16,
}

impl WaypointRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        WaypointRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
            hostname: None,
            hbone_port: WAYPOINT_HBONE_PORT,
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The explicit hostname, or `<name>.<namespace>.svc.<trust domain>`.
    pub fn hostname_in(&self, trust_domain: &str) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc.{trust_domain}", self.name, self.namespace))
    }
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The explicit hostname, or `<name>.<namespace>.svc.<trust domain>`.
    pub fn hostname_in(&self, trust_domain: &str) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc.{trust_domain}", self.name, self.namespace))
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    LeastConnections,
}

/// An L4 authorization policy (the L4 subset of Istio's AuthorizationPolicy).
///
/// The policy matches a connection when any rule matches; a rule matches when
/// every one of its non-empty `from`/`to` lists has an entry that matches; an
/// entry matches when all of its fields do. `rules: []` matches nothing and
/// `rules: [{}]` matches everything, as in Istio.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub scope: PolicyScope,
    pub action: PolicyAction,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum PolicyScope {
    Global,
    #[default]
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<SourceMatch>,
    #[serde(default)]
    pub to: Vec<DestinationMatch>,
}

/// Principals use Istio's form (`cluster.local/ns/NS/sa/SA`) with `*` as a
/// prefix, suffix or presence wildcard.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceMatch {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub not_ip_blocks: Vec<Cidr>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationMatch {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

/// Whether plaintext may reach a workload (Istio's PeerAuthentication, L4 part).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub mode: MtlsMode,
    /// Workload names in `namespace` this applies to; empty means the whole
    /// namespace (or the whole mesh in the root namespace).
    #[serde(default)]
    pub workloads: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}
