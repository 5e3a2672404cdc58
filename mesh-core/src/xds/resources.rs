//! The mesh model as Istio's ambient xDS resources (`istio.workload.Address`,
//! `istio.security.Authorization`), and back.
//!
//! Names follow Istio: a workload is named by its uid, a service by
//! `<namespace>/<hostname>`, a policy by `<namespace>/<name>`. STRICT peer
//! authentication travels as Istio does, as a DENY policy for connections
//! without a peer identity, attached to each workload it covers.

use std::collections::HashMap;
use std::net::IpAddr;

use prost::Message;
use prost_types::Any;

use super::l7::L7Config;
use crate::config::{
    Cidr, DestinationMatch, LoadBalancing, MeshConfig, MtlsMode, PeerAuthentication, Policy,
    PolicyAction, PolicyScope, Rule, Service, ServicePort, SourceMatch, WaypointRef, Workload,
};
use crate::identity::DEFAULT_TRUST_DOMAIN;
use crate::proto::ambit::extensions as ext;
use crate::proto::istio::security as pb_authz;
use crate::proto::istio::workload as pb;
use crate::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// Extension on a Workload: ports the capture leaves alone.
pub const CAPTURE_EXCLUSIONS: &str = "ambit.dev/capture-exclusions";
/// Extension on a Service: the endpoint picking algorithm.
pub const LOAD_BALANCING: &str = "ambit.dev/load-balancing";
/// The deny-all stand-in for a policy a local workload names but this node
/// does not have (see [`assemble`]).
pub const MISSING_POLICY: &str = "ambit-missing-policy-deny-all";
/// Istio's name for the policy that stands for STRICT mTLS.
pub const STRICT_POLICY: &str = "istio_converted_static_strict";

const CAPTURE_EXCLUSIONS_TYPE: &str = "type.googleapis.com/ambit.extensions.v1.CaptureExclusions";
const LOAD_BALANCING_TYPE: &str = "type.googleapis.com/ambit.extensions.v1.LoadBalancing";

pub fn workload_uid(namespace: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{namespace}/{name}")
}

/// A resource ready to be served.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedResource {
    pub name: String,
    pub resource: Any,
}

/// A whole config as resources, per type.
#[derive(Clone, Debug, Default)]
pub struct EncodedConfig {
    pub addresses: Vec<NamedResource>,
    pub authorizations: Vec<NamedResource>,
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).map_err(|_| "bad IPv4")?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).map_err(|_| "bad IPv6")?,
        )),
        n => Err(format!("an IP address has 4 or 16 bytes, not {n}")),
    }
}

fn ports_u32(ports: &[u16]) -> Vec<u32> {
    ports.iter().map(|p| u32::from(*p)).collect()
}

fn port_u16(p: u32, what: &str) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{what} {p} is not a port"))
}

/// As Istio names a waypoint: the namespaced hostname of its Service.
fn gateway_address(wp: &WaypointRef, trust_domain: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: wp.namespace.clone(),
                hostname: wp.hostname_in(trust_domain),
            },
        )),
        hbone_mtls_port: u32::from(wp.hbone_port),
    }
}

/// The model's form of a `GatewayAddress`. The Gateway's name is the first
/// label of a `<name>.<namespace>.svc.<trust domain>` hostname; any other
/// hostname is kept, and [`assemble`] names it after the service it belongs to.
fn decode_waypoint(
    gw: Option<pb::GatewayAddress>,
    trust_domain: &str,
) -> Result<Option<WaypointRef>, String> {
    use pb::gateway_address::Destination;
    let Some(gw) = gw else { return Ok(None) };
    let nh = match gw.destination {
        Some(Destination::Hostname(nh)) => nh,
        // A bare IP names no Service, so neither its waypoint pods nor its
        // policies can be found; refusing the resource keeps the last good one.
        Some(Destination::Address(_)) => {
            return Err("a waypoint given by address is not supported, only by hostname".into())
        }
        None => return Err("a waypoint without a destination".into()),
    };
    if gw.hbone_mtls_port == 0 {
        return Err(format!("waypoint {:?}: hbone_mtls_port 0", nh.hostname));
    }
    let hbone_port = port_u16(gw.hbone_mtls_port, "waypoint hbone_mtls_port")?;
    let suffix = format!(".{}.svc.{trust_domain}", nh.namespace);
    let canonical = nh
        .hostname
        .strip_suffix(&suffix)
        .filter(|n| !n.is_empty() && !n.contains('.'))
        .map(str::to_string);
    let (name, hostname) = match canonical {
        Some(name) => (name, None),
        None => (
            nh.hostname
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string(),
            Some(nh.hostname),
        ),
    };
    Ok(Some(WaypointRef {
        namespace: nh.namespace,
        name,
        hostname,
        hbone_port,
    }))
}

/// Encodes `config` for serving.
pub fn encode(config: &MeshConfig) -> EncodedConfig {
    let td = &config.trust_domain;
    let service_ports: HashMap<String, (String, Vec<pb::Port>)> = config
        .services
        .iter()
        .map(|s| {
            let ports = s
                .ports
                .iter()
                .map(|p| pb::Port {
                    service_port: u32::from(p.port),
                    target_port: u32::from(p.target()),
                })
                .collect();
            (
                s.key(),
                (format!("{}/{}", s.namespace, s.hostname_in(td)), ports),
            )
        })
        .collect();

    let strict_key = format!("{}/{STRICT_POLICY}", config.root_namespace);
    let mut any_strict = false;
    let mut addresses = Vec::with_capacity(config.workloads.len() + config.services.len());
    for w in &config.workloads {
        let mut policies = w.authorization_policies.clone();
        if config.mtls_mode(&w.namespace, &w.name) == MtlsMode::Strict {
            policies.push(strict_key.clone());
            any_strict = true;
        }
        let mut extensions = Vec::new();
        if !w.excluded_outbound_ports.is_empty() || !w.excluded_inbound_ports.is_empty() {
            extensions.push(pb::Extension {
                name: CAPTURE_EXCLUSIONS.to_string(),
                config: Some(any(
                    CAPTURE_EXCLUSIONS_TYPE,
                    &ext::CaptureExclusions {
                        outbound_ports: ports_u32(&w.excluded_outbound_ports),
                        inbound_ports: ports_u32(&w.excluded_inbound_ports),
                    },
                )),
            });
        }
        let uid = workload_uid(&w.namespace, &w.name);
        let workload = pb::Workload {
            uid: uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses: w.addresses.iter().map(ip_bytes).collect(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            native_tunnel: w.native_tunnel,
            waypoint: w.waypoint.as_ref().map(|wp| gateway_address(wp, td)),
            trust_domain: if td == DEFAULT_TRUST_DOMAIN {
                String::new()
            } else {
                td.clone()
            },
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            canonical_name: w.name.clone(),
            workload_name: w.name.clone(),
            workload_type: pb::WorkloadType::Pod as i32,
            services: w
                .services
                .iter()
                .filter_map(|key| service_ports.get(key))
                .map(|(host_key, ports)| {
                    (
                        host_key.clone(),
                        pb::PortList {
                            ports: ports.clone(),
                        },
                    )
                })
                .collect(),
            authorization_policies: policies,
            extensions,
            ..Default::default()
        };
        addresses.push(NamedResource {
            name: uid,
            resource: any(
                ADDRESS_TYPE,
                &pb::Address {
                    r#type: Some(pb::address::Type::Workload(workload)),
                },
            ),
        });
    }
    for s in &config.services {
        let hostname = s.hostname_in(td);
        let mut extensions = Vec::new();
        if s.load_balancing != LoadBalancing::RoundRobin {
            extensions.push(pb::Extension {
                name: LOAD_BALANCING.to_string(),
                config: Some(any(
                    LOAD_BALANCING_TYPE,
                    &ext::LoadBalancing {
                        algorithm: ext::load_balancing::Algorithm::LeastConnections as i32,
                    },
                )),
            });
        }
        let service = pb::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: hostname.clone(),
            addresses: s
                .addresses
                .iter()
                .map(|ip| pb::NetworkAddress {
                    network: String::new(),
                    address: ip_bytes(ip),
                })
                .collect(),
            ports: service_ports
                .get(&s.key())
                .map(|(_, p)| p.clone())
                .unwrap_or_default(),
            waypoint: s.waypoint.as_ref().map(|wp| gateway_address(wp, td)),
            extensions,
            ..Default::default()
        };
        addresses.push(NamedResource {
            name: format!("{}/{hostname}", s.namespace),
            resource: any(
                ADDRESS_TYPE,
                &pb::Address {
                    r#type: Some(pb::address::Type::Service(service)),
                },
            ),
        });
    }

    let mut authorizations: Vec<NamedResource> = config
        .policies
        .iter()
        .map(|p| NamedResource {
            name: p.key(),
            resource: any(AUTHORIZATION_TYPE, &encode_policy(p)),
        })
        .collect();
    if any_strict {
        let strict = Policy {
            name: STRICT_POLICY.to_string(),
            namespace: config.root_namespace.clone(),
            scope: PolicyScope::WorkloadSelector,
            action: PolicyAction::Deny,
            rules: vec![Rule {
                from: vec![SourceMatch {
                    not_principals: vec!["*".to_string()],
                    ..Default::default()
                }],
                to: vec![],
            }],
        };
        authorizations.push(NamedResource {
            name: strict.key(),
            resource: any(AUTHORIZATION_TYPE, &encode_policy(&strict)),
        });
    }
    EncodedConfig {
        addresses,
        authorizations,
    }
}

fn string_match(pattern: &str) -> pb_authz::StringMatch {
    use pb_authz::string_match::MatchType;
    let m = if pattern == "*" {
        MatchType::Presence(())
    } else if let Some(p) = pattern.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else if let Some(s) = pattern.strip_prefix('*') {
        MatchType::Suffix(s.to_string())
    } else {
        MatchType::Exact(pattern.to_string())
    };
    pb_authz::StringMatch {
        match_type: Some(m),
    }
}

fn strings(patterns: &[String]) -> Vec<pb_authz::StringMatch> {
    patterns.iter().map(|p| string_match(p)).collect()
}

fn cidrs(blocks: &[Cidr]) -> Vec<pb_authz::Address> {
    blocks
        .iter()
        .map(|c| pb_authz::Address {
            address: ip_bytes(&c.addr()),
            length: u32::from(c.prefix()),
        })
        .collect()
}

fn encode_policy(p: &Policy) -> pb_authz::Authorization {
    let rules = p
        .rules
        .iter()
        .map(|r| {
            let mut clauses = Vec::new();
            if !r.from.is_empty() {
                clauses.push(pb_authz::Clause {
                    matches: r
                        .from
                        .iter()
                        .map(|s| pb_authz::Match {
                            principals: strings(&s.principals),
                            not_principals: strings(&s.not_principals),
                            namespaces: strings(&s.namespaces),
                            not_namespaces: strings(&s.not_namespaces),
                            source_ips: cidrs(&s.ip_blocks),
                            not_source_ips: cidrs(&s.not_ip_blocks),
                            ..Default::default()
                        })
                        .collect(),
                });
            }
            if !r.to.is_empty() {
                clauses.push(pb_authz::Clause {
                    matches: r
                        .to
                        .iter()
                        .map(|d| pb_authz::Match {
                            destination_ports: ports_u32(&d.ports),
                            not_destination_ports: ports_u32(&d.not_ports),
                            ..Default::default()
                        })
                        .collect(),
                });
            }
            pb_authz::Rule { clauses }
        })
        .collect();
    pb_authz::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            PolicyScope::Global => pb_authz::Scope::Global,
            PolicyScope::Namespace => pb_authz::Scope::Namespace,
            PolicyScope::WorkloadSelector => pb_authz::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            PolicyAction::Allow => pb_authz::Action::Allow,
            PolicyAction::Deny => pb_authz::Action::Deny,
        } as i32,
        rules,
    }
}

/// A decoded `istio.workload.Address`.
#[derive(Clone, Debug)]
pub enum DecodedAddress {
    /// The workload, with its services still keyed `<namespace>/<hostname>`.
    Workload(Workload),
    Service(Service),
}

/// Decodes one Address resource. `trust_domain` is the mesh's: a workload of
/// another trust domain cannot be represented and is refused.
pub fn decode_address(resource: &Any, trust_domain: &str) -> Result<DecodedAddress, String> {
    if resource.type_url != ADDRESS_TYPE {
        return Err(format!(
            "type {:?} is not {ADDRESS_TYPE}",
            resource.type_url
        ));
    }
    let address =
        pb::Address::decode(resource.value.as_slice()).map_err(|e| format!("decoding: {e}"))?;
    match address.r#type {
        Some(pb::address::Type::Workload(w)) => decode_workload(w, trust_domain),
        Some(pb::address::Type::Service(s)) => decode_service(s, trust_domain),
        None => Err("address is neither a workload nor a service".into()),
    }
}

fn decode_workload(w: pb::Workload, trust_domain: &str) -> Result<DecodedAddress, String> {
    let td = if w.trust_domain.is_empty() {
        DEFAULT_TRUST_DOMAIN
    } else {
        w.trust_domain.as_str()
    };
    if td != trust_domain {
        return Err(format!(
            "workload {}/{} is in trust domain {td:?}, the mesh is {trust_domain:?}",
            w.namespace, w.name
        ));
    }
    if w.addresses.is_empty() {
        return Err(format!(
            "workload {}/{} has no address (hostname-only workloads are not supported)",
            w.namespace, w.name
        ));
    }
    let addresses = w
        .addresses
        .iter()
        .map(|a| ip_from_bytes(a))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut excluded_outbound_ports, mut excluded_inbound_ports) = (Vec::new(), Vec::new());
    for e in &w.extensions {
        if e.name != CAPTURE_EXCLUSIONS {
            continue;
        }
        let Some(config) = &e.config else { continue };
        let x = ext::CaptureExclusions::decode(config.value.as_slice())
            .map_err(|e| format!("decoding {CAPTURE_EXCLUSIONS}: {e}"))?;
        for p in x.outbound_ports {
            excluded_outbound_ports.push(port_u16(p, "excluded port")?);
        }
        for p in x.inbound_ports {
            excluded_inbound_ports.push(port_u16(p, "excluded port")?);
        }
    }
    let mut services: Vec<String> = w.services.into_keys().collect();
    services.sort();
    let waypoint = decode_waypoint(w.waypoint, trust_domain)
        .map_err(|e| format!("workload {}/{}: {e}", w.namespace, w.name))?;
    Ok(DecodedAddress::Workload(Workload {
        name: w.name,
        namespace: w.namespace,
        service_account: if w.service_account.is_empty() {
            "default".to_string()
        } else {
            w.service_account
        },
        node: w.node,
        addresses,
        services,
        authorization_policies: w.authorization_policies,
        excluded_outbound_ports,
        excluded_inbound_ports,
        waypoint,
        native_tunnel: w.native_tunnel,
    }))
}

fn decode_service(s: pb::Service, trust_domain: &str) -> Result<DecodedAddress, String> {
    let waypoint = decode_waypoint(s.waypoint, trust_domain)
        .map_err(|e| format!("service {}/{}: {e}", s.namespace, s.hostname))?;
    let addresses = s
        .addresses
        .iter()
        .map(|a| ip_from_bytes(&a.address))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            Ok(ServicePort {
                port: port_u16(p.service_port, "service port")?,
                target_port: Some(port_u16(p.target_port, "target port")?),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut load_balancing = LoadBalancing::RoundRobin;
    for e in &s.extensions {
        if e.name != LOAD_BALANCING {
            continue;
        }
        let Some(config) = &e.config else { continue };
        let lb = ext::LoadBalancing::decode(config.value.as_slice())
            .map_err(|e| format!("decoding {LOAD_BALANCING}: {e}"))?;
        if lb.algorithm == ext::load_balancing::Algorithm::LeastConnections as i32 {
            load_balancing = LoadBalancing::LeastConnections;
        }
    }
    Ok(DecodedAddress::Service(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: Some(s.hostname),
        addresses,
        ports,
        load_balancing,
        waypoint,
    }))
}

/// Decodes one Authorization resource. Shapes the model cannot express
/// (destination IPs, several source clauses in one rule) fail closed: an
/// ALLOW rule becomes one that matches nothing, a DENY rule one that matches
/// everything; the returned note says what was narrowed.
pub fn decode_authorization(resource: &Any) -> Result<(Policy, Vec<String>), String> {
    if resource.type_url != AUTHORIZATION_TYPE {
        return Err(format!(
            "type {:?} is not {AUTHORIZATION_TYPE}",
            resource.type_url
        ));
    }
    let a = pb_authz::Authorization::decode(resource.value.as_slice())
        .map_err(|e| format!("decoding: {e}"))?;
    let scope = match pb_authz::Scope::try_from(a.scope) {
        Ok(pb_authz::Scope::Global) => PolicyScope::Global,
        Ok(pb_authz::Scope::Namespace) => PolicyScope::Namespace,
        Ok(pb_authz::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", a.scope)),
    };
    let action = match pb_authz::Action::try_from(a.action) {
        Ok(pb_authz::Action::Allow) => PolicyAction::Allow,
        Ok(pb_authz::Action::Deny) => PolicyAction::Deny,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let mut notes = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in a.rules.iter().enumerate() {
        match decode_rule(r) {
            Ok(Some(rule)) => rules.push(rule),
            // A clause without matches can never match: neither can the rule.
            Ok(None) => {}
            Err(why) => {
                notes.push(format!("rule {i}: {why}"));
                if action == PolicyAction::Deny {
                    rules.push(Rule::default());
                }
            }
        }
    }
    Ok((
        Policy {
            name: a.name,
            namespace: a.namespace,
            scope,
            action,
            rules,
        },
        notes,
    ))
}

fn decode_rule(r: &pb_authz::Rule) -> Result<Option<Rule>, String> {
    let mut rule = Rule::default();
    let (mut have_from, mut have_to) = (false, false);
    for clause in &r.clauses {
        if clause.matches.is_empty() {
            return Ok(None);
        }
        let is_source = |m: &pb_authz::Match| {
            m.destination_ports.is_empty() && m.not_destination_ports.is_empty()
        };
        let is_dest = |m: &pb_authz::Match| {
            m.principals.is_empty()
                && m.not_principals.is_empty()
                && m.namespaces.is_empty()
                && m.not_namespaces.is_empty()
                && m.source_ips.is_empty()
                && m.not_source_ips.is_empty()
        };
        for m in &clause.matches {
            if !m.destination_ips.is_empty() || !m.not_destination_ips.is_empty() {
                return Err("destination IP matches are not supported".into());
            }
        }
        if clause.matches.iter().all(is_source) && !have_from {
            have_from = true;
            for m in &clause.matches {
                rule.from.push(SourceMatch {
                    principals: patterns(&m.principals)?,
                    not_principals: patterns(&m.not_principals)?,
                    namespaces: patterns(&m.namespaces)?,
                    not_namespaces: patterns(&m.not_namespaces)?,
                    ip_blocks: blocks(&m.source_ips)?,
                    not_ip_blocks: blocks(&m.not_source_ips)?,
                });
            }
        } else if clause.matches.iter().all(is_dest) && !have_to {
            have_to = true;
            for m in &clause.matches {
                rule.to.push(DestinationMatch {
                    ports: m
                        .destination_ports
                        .iter()
                        .map(|p| port_u16(*p, "port"))
                        .collect::<Result<_, _>>()?,
                    not_ports: m
                        .not_destination_ports
                        .iter()
                        .map(|p| port_u16(*p, "port"))
                        .collect::<Result<_, _>>()?,
                });
            }
        } else {
            return Err(
                "clauses mixing or repeating source and destination matches are not supported"
                    .into(),
            );
        }
    }
    Ok(Some(rule))
}

fn patterns(ms: &[pb_authz::StringMatch]) -> Result<Vec<String>, String> {
    use pb_authz::string_match::MatchType;
    ms.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) if s.starts_with('*') || s.ends_with('*') => {
                Err(format!("exact match {s:?} cannot be told from a wildcard"))
            }
            Some(MatchType::Exact(s)) => Ok(s.clone()),
            Some(MatchType::Prefix(p)) => Ok(format!("{p}*")),
            Some(MatchType::Suffix(s)) => Ok(format!("*{s}")),
            Some(MatchType::Presence(())) => Ok("*".to_string()),
            None => Err("empty string match".into()),
        })
        .collect()
}

fn blocks(addrs: &[pb_authz::Address]) -> Result<Vec<Cidr>, String> {
    addrs
        .iter()
        .map(|a| {
            let ip = ip_from_bytes(&a.address)?;
            u8::try_from(a.length)
                .ok()
                .and_then(|len| Cidr::new(ip, len))
                .ok_or_else(|| format!("bad prefix length {} for {ip}", a.length))
        })
        .collect()
}

/// The policy [`encode`] makes of STRICT: deny when there is no peer identity.
fn is_strict_shape(p: &Policy) -> bool {
    p.action == PolicyAction::Deny
        && p.scope == PolicyScope::WorkloadSelector
        && matches!(p.rules.as_slice(), [r] if r.to.is_empty()
            && matches!(r.from.as_slice(), [f] if f.not_principals == ["*"]
                && f.principals.is_empty() && f.namespaces.is_empty()
                && f.not_namespaces.is_empty() && f.ip_blocks.is_empty()
                && f.not_ip_blocks.is_empty()))
}

/// Builds a validated [`MeshConfig`] from decoded resources. Workloads name
/// their services by `<namespace>/<hostname>`; references to services not
/// present are dropped (they may simply not be served to this node).
///
/// A workload on `local_node` that names a policy not present (not yet
/// arrived, or refused on arrival) is denied everything until it arrives:
/// running without it could admit what it denies. Remote workloads simply
/// lose the name (this node does not enforce for them, and is not sent
/// their policies).
pub fn assemble(
    trust_domain: &str,
    root_namespace: &str,
    local_node: Option<&str>,
    addresses: impl IntoIterator<Item = DecodedAddress>,
    policies: impl IntoIterator<Item = Policy>,
) -> Result<MeshConfig, String> {
    assemble_with_l7(
        trust_domain,
        root_namespace,
        local_node,
        addresses,
        policies,
        L7Config::default(),
    )
}

/// [`assemble`], with the L7 sections a waypoint was sent: they are
/// validated together with the rest, in the same single pass.
pub fn assemble_with_l7(
    trust_domain: &str,
    root_namespace: &str,
    local_node: Option<&str>,
    addresses: impl IntoIterator<Item = DecodedAddress>,
    policies: impl IntoIterator<Item = Policy>,
    l7: L7Config,
) -> Result<MeshConfig, String> {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for a in addresses {
        match a {
            DecodedAddress::Workload(w) => workloads.push(w),
            DecodedAddress::Service(s) => services.push(s),
        }
    }
    let by_host: HashMap<String, String> = services
        .iter()
        .map(|s| {
            (
                format!("{}/{}", s.namespace, s.hostname_in(trust_domain)),
                s.key(),
            )
        })
        .collect();
    let name_waypoint = |wp: &mut Option<WaypointRef>| {
        if let Some(wp) = wp.as_mut().filter(|wp| wp.hostname.is_some()) {
            let host = format!("{}/{}", wp.namespace, wp.hostname_in(trust_domain));
            if let Some((_, name)) = by_host.get(&host).and_then(|k| k.split_once('/')) {
                wp.name = name.to_string();
            }
        }
    };
    for s in &mut services {
        name_waypoint(&mut s.waypoint);
    }
    let mut policies: Vec<Policy> = policies.into_iter().collect();
    // STRICT travels as a policy; back in the model it is STRICT again, so
    // plaintext is refused as such (reason `mtls_required`), not as RBAC.
    let strict_key = format!("{root_namespace}/{STRICT_POLICY}");
    let strict = policies
        .iter()
        .position(|p| p.key() == strict_key && is_strict_shape(p))
        .map(|i| policies.remove(i))
        .is_some();
    let mut strict_workloads: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let missing_key = format!("{root_namespace}/{MISSING_POLICY}");
    let mut missing_used = false;
    let known_policies: std::collections::HashSet<String> =
        policies.iter().map(Policy::key).collect();
    for w in &mut workloads {
        w.services = w
            .services
            .iter()
            .filter_map(|h| by_host.get(h).cloned())
            .collect();
        let had_strict = strict && w.authorization_policies.contains(&strict_key);
        if had_strict {
            strict_workloads
                .entry(w.namespace.clone())
                .or_default()
                .push(w.name.clone());
        }
        // A selector policy this node was not sent cannot be applied; keeping
        // the dangling name would fail validation of everything else.
        let before = w.authorization_policies.len();
        w.authorization_policies
            .retain(|k| known_policies.contains(k));
        if Some(w.node.as_str()) == local_node
            && before - w.authorization_policies.len() > usize::from(had_strict)
        {
            w.authorization_policies.push(missing_key.clone());
            missing_used = true;
        }
        name_waypoint(&mut w.waypoint);
        // A waypoint does not use a waypoint, whatever a control plane says.
        if w.native_tunnel {
            w.waypoint = None;
        }
    }
    if missing_used {
        policies.push(Policy {
            name: MISSING_POLICY.to_string(),
            namespace: root_namespace.to_string(),
            scope: PolicyScope::WorkloadSelector,
            action: PolicyAction::Deny,
            rules: vec![Rule::default()],
        });
    }
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    services.sort_by_key(Service::key);
    let config = MeshConfig {
        trust_domain: trust_domain.to_string(),
        root_namespace: root_namespace.to_string(),
        workloads,
        services,
        policies,
        peer_authentications: strict_workloads
            .into_iter()
            .map(|(namespace, workloads)| PeerAuthentication {
                name: STRICT_POLICY.to_string(),
                namespace,
                mode: MtlsMode::Strict,
                workloads,
            })
            .collect(),
        http_routes: l7.http_routes,
        http_policies: l7.http_policies,
        traffic_policies: l7.traffic_policies,
    };
    crate::config::validate_mesh_config(&config).map_err(|e| e.to_string())?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{authorize, ConnectionAttributes};
    use crate::config::{parse_mesh_config, MeshState};
    use crate::Identity;

    const MESH: &str = r#"
workloads:
- {name: client, namespace: demo, serviceAccount: sleep, node: n1, addresses: [198.19.1.2]}
- name: server
  namespace: demo
  serviceAccount: echo
  node: n2
  addresses: [198.19.2.2, "2001:2::2"]
  services: [demo/echo]
  authorizationPolicies: [demo/only-sleep]
  excludedOutboundPorts: [53]
  excludedInboundPorts: [9090]
- {name: loose, namespace: open, node: n2, addresses: [198.19.2.3]}
services:
- name: echo
  namespace: demo
  addresses: [198.18.100.1]
  ports: [{port: 80, targetPort: 8080}]
  loadBalancing: LeastConnections
policies:
- name: only-sleep
  namespace: demo
  scope: WorkloadSelector
  action: Allow
  rules:
  - from: [{principals: ["cluster.local/ns/demo/sa/sleep", "*/sa/admin"], notIpBlocks: [10.0.0.0/8]}]
    to: [{ports: [8080], notPorts: [9]}]
- name: no-bad
  namespace: istio-system
  scope: Global
  action: Deny
  rules: [{from: [{namespaces: ["bad*"]}]}]
peerAuthentications:
- {name: strict, namespace: demo, mode: Strict}
"#;

    fn round_trip(config: &MeshConfig) -> MeshConfig {
        let enc = encode(config);
        let addresses = enc
            .addresses
            .iter()
            .map(|r| decode_address(&r.resource, &config.trust_domain).unwrap());
        let policies = enc
            .authorizations
            .iter()
            .map(|r| decode_authorization(&r.resource).unwrap().0);
        assemble(
            &config.trust_domain,
            &config.root_namespace,
            None,
            addresses,
            policies,
        )
        .unwrap()
    }

    #[test]
    fn config_survives_the_wire() {
        let original = parse_mesh_config(MESH).unwrap();
        let back = round_trip(&original);
        let server = back.workloads.iter().find(|w| w.name == "server").unwrap();
        assert_eq!(server.addresses, original.workloads[1].addresses);
        assert_eq!(server.services, vec!["demo/echo".to_string()]);
        assert_eq!(server.service_account, "echo");
        assert_eq!(server.excluded_outbound_ports, vec![53]);
        assert_eq!(server.excluded_inbound_ports, vec![9090]);
        // STRICT went out as a policy and came back as STRICT.
        assert_eq!(
            server.authorization_policies,
            vec!["demo/only-sleep".to_string()]
        );
        assert!(back.policies.iter().all(|p| p.name != STRICT_POLICY));
        assert_eq!(back.mtls_mode("demo", "server"), MtlsMode::Strict);
        assert_eq!(back.mtls_mode("demo", "client"), MtlsMode::Strict);
        assert_eq!(back.mtls_mode("open", "loose"), MtlsMode::Permissive);
        let loose = back.workloads.iter().find(|w| w.name == "loose").unwrap();
        assert_eq!(loose.service_account, "default");
        assert!(
            loose.authorization_policies.is_empty(),
            "PERMISSIVE namespace"
        );
        let echo = &back.services[0];
        assert_eq!(echo.ports[0].port, 80);
        assert_eq!(echo.ports[0].target(), 8080);
        assert_eq!(echo.load_balancing, LoadBalancing::LeastConnections);
        assert_eq!(
            echo.hostname.as_deref(),
            Some("echo.demo.svc.cluster.local")
        );
        let allow = back
            .policies
            .iter()
            .find(|p| p.name == "only-sleep")
            .unwrap();
        assert_eq!(
            allow.rules[0].from[0].principals,
            original.policies[0].rules[0].from[0].principals
        );
        assert_eq!(
            allow.rules[0].from[0].not_ip_blocks[0].to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(allow.rules[0].to[0].ports, vec![8080]);
        assert_eq!(allow.rules[0].to[0].not_ports, vec![9]);
        let deny = back.policies.iter().find(|p| p.name == "no-bad").unwrap();
        assert_eq!(deny.scope, PolicyScope::Global);
        assert_eq!(deny.rules[0].from[0].namespaces, vec!["bad*".to_string()]);
    }

    const WAYPOINTS: &str = r#"
workloads:
- {name: wp-0, namespace: demo, serviceAccount: waypoint, node: n2, addresses: [198.19.2.9], services: [demo/waypoint], nativeTunnel: true}
- {name: app, namespace: demo, node: n2, addresses: [198.19.2.2], services: [demo/app], waypoint: {namespace: demo, name: waypoint}}
- {name: gone, namespace: demo, node: n2, addresses: [198.19.2.3], waypoint: {namespace: other, name: missing}}
services:
- {name: waypoint, namespace: demo, addresses: [198.18.100.9], ports: [{port: 15008}]}
- {name: app, namespace: demo, addresses: [198.18.100.1], ports: [{port: 80}], waypoint: {namespace: demo, name: waypoint}}
- {name: odd, namespace: demo, hostname: odd.example.org, addresses: [198.18.100.2], ports: [{port: 80}]}
- {name: uses-odd, namespace: demo, addresses: [198.18.100.3], ports: [{port: 80}], waypoint: {namespace: demo, name: odd, hostname: odd.example.org}}
"#;

    #[test]
    fn waypoints_survive_the_wire_as_istio_sends_them() {
        let original = parse_mesh_config(WAYPOINTS).unwrap();
        let enc = encode(&original);
        let app = enc
            .addresses
            .iter()
            .find(|r| r.name == workload_uid("demo", "app"))
            .unwrap();
        let Some(pb::address::Type::Workload(w)) =
            pb::Address::decode(app.resource.value.as_slice())
                .unwrap()
                .r#type
        else {
            panic!("not a workload");
        };
        assert_eq!(
            w.waypoint,
            Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Hostname(
                    pb::NamespacedHostname {
                        namespace: "demo".into(),
                        hostname: "waypoint.demo.svc.cluster.local".into(),
                    }
                )),
                hbone_mtls_port: 15008,
            })
        );

        let back = round_trip(&original);
        for w in &original.workloads {
            let got = back.workloads.iter().find(|b| b.name == w.name).unwrap();
            assert_eq!(got.waypoint, w.waypoint, "workload {}", w.name);
            assert_eq!(got.native_tunnel, w.native_tunnel, "workload {}", w.name);
        }
        for s in &original.services {
            let got = back.services.iter().find(|b| b.name == s.name).unwrap();
            assert_eq!(got.waypoint, s.waypoint, "service {}", s.name);
        }
        let state = MeshState::new(back);
        let dst = state.resolve("198.18.100.1:80".parse().unwrap()).unwrap();
        assert!(matches!(
            state.waypoint_for(&dst),
            Some(crate::config::WaypointRoute::Ready { .. })
        ));
    }

    #[test]
    fn waypoint_by_address_or_port_zero_is_refused() {
        let with = |gw: pb::GatewayAddress| {
            any(
                ADDRESS_TYPE,
                &pb::Address {
                    r#type: Some(pb::address::Type::Service(pb::Service {
                        name: "s".into(),
                        namespace: "n".into(),
                        hostname: "s.n.svc.cluster.local".into(),
                        waypoint: Some(gw),
                        ..Default::default()
                    })),
                },
            )
        };
        let by_address = with(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Address(
                pb::NetworkAddress {
                    network: String::new(),
                    address: vec![198, 18, 100, 9],
                },
            )),
            hbone_mtls_port: 15008,
        });
        assert!(decode_address(&by_address, "cluster.local")
            .unwrap_err()
            .contains("by address"));
        let port_zero = with(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Hostname(
                pb::NamespacedHostname {
                    namespace: "n".into(),
                    hostname: "w.n.svc.cluster.local".into(),
                },
            )),
            hbone_mtls_port: 0,
        });
        assert!(decode_address(&port_zero, "cluster.local").is_err());
    }

    #[test]
    fn strict_peer_authentication_refuses_plaintext_after_the_wire() {
        let back = round_trip(&parse_mesh_config(MESH).unwrap());
        let state = MeshState::new(back);
        let server = state.workload_by_ip("198.19.2.2".parse().unwrap()).unwrap();
        let sleep = Identity::new("cluster.local", "demo", "sleep").unwrap();
        let attrs = |source| ConnectionAttributes {
            source,
            source_ip: "198.19.1.2".parse().unwrap(),
            destination_port: 8080,
        };
        assert!(authorize(state.policies_for(server), &attrs(Some(&sleep))).is_allowed());
        assert_eq!(state.mtls_mode(server), MtlsMode::Strict);
        let loose = state.workload_by_ip("198.19.2.3".parse().unwrap()).unwrap();
        assert!(authorize(state.policies_for(loose), &attrs(None)).is_allowed());
    }

    #[test]
    fn unsupported_policy_shapes_fail_closed() {
        let with_dest_ip = |action: pb_authz::Action| {
            any(
                AUTHORIZATION_TYPE,
                &pb_authz::Authorization {
                    name: "p".into(),
                    namespace: "demo".into(),
                    scope: pb_authz::Scope::Namespace as i32,
                    action: action as i32,
                    rules: vec![pb_authz::Rule {
                        clauses: vec![pb_authz::Clause {
                            matches: vec![pb_authz::Match {
                                destination_ips: vec![pb_authz::Address {
                                    address: vec![10, 0, 0, 1],
                                    length: 32,
                                }],
                                ..Default::default()
                            }],
                        }],
                    }],
                },
            )
        };
        let (allow, notes) = decode_authorization(&with_dest_ip(pb_authz::Action::Allow)).unwrap();
        assert!(
            allow.rules.is_empty(),
            "an ALLOW that cannot be read admits nothing"
        );
        assert_eq!(notes.len(), 1);
        let (deny, _) = decode_authorization(&with_dest_ip(pb_authz::Action::Deny)).unwrap();
        assert_eq!(deny.rules.len(), 1);
        assert!(deny.rules[0].from.is_empty() && deny.rules[0].to.is_empty());
    }

    #[test]
    fn a_local_workload_missing_its_policy_is_denied_everything() {
        let config = parse_mesh_config(MESH).unwrap();
        let enc = encode(&config);
        let addresses: Vec<_> = enc
            .addresses
            .iter()
            .map(|r| decode_address(&r.resource, "cluster.local").unwrap())
            .collect();
        // demo/only-sleep never arrived (refused, or not yet sent).
        let policies: Vec<_> = enc
            .authorizations
            .iter()
            .map(|r| decode_authorization(&r.resource).unwrap().0)
            .filter(|p| p.name != "only-sleep")
            .collect();
        let sleep = Identity::new("cluster.local", "demo", "sleep").unwrap();
        let attrs = ConnectionAttributes {
            source: Some(&sleep),
            source_ip: "198.19.1.2".parse().unwrap(),
            destination_port: 8080,
        };
        // On the server's own node it fails closed...
        let local = assemble(
            "cluster.local",
            "istio-system",
            Some("n2"),
            addresses.clone(),
            policies.clone(),
        )
        .unwrap();
        let state = MeshState::new(local);
        let server = state.workload_by_ip("198.19.2.2".parse().unwrap()).unwrap();
        assert!(!authorize(state.policies_for(server), &attrs).is_allowed());
        assert_eq!(
            state.mtls_mode(server),
            MtlsMode::Strict,
            "STRICT is not a missing policy"
        );
        // ...elsewhere the name is just dropped: that node does not enforce it.
        let remote = assemble(
            "cluster.local",
            "istio-system",
            Some("n1"),
            addresses,
            policies,
        )
        .unwrap();
        assert!(remote.policies.iter().all(|p| p.name != MISSING_POLICY));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let junk = Any {
            type_url: ADDRESS_TYPE.into(),
            value: vec![0xff, 0xff, 0xff, 0x01, 0x02],
        };
        assert!(decode_address(&junk, "cluster.local").is_err());
        let wrong_type = Any {
            type_url: "type.googleapis.com/nope".into(),
            value: vec![],
        };
        assert!(decode_address(&wrong_type, "cluster.local").is_err());
        assert!(decode_authorization(&wrong_type).is_err());
        let bad_ip = any(
            ADDRESS_TYPE,
            &pb::Address {
                r#type: Some(pb::address::Type::Workload(pb::Workload {
                    name: "w".into(),
                    namespace: "n".into(),
                    addresses: vec![vec![1, 2, 3]],
                    ..Default::default()
                })),
            },
        );
        assert!(decode_address(&bad_ip, "cluster.local")
            .unwrap_err()
            .contains("4 or 16 bytes"));
        let other_td = any(
            ADDRESS_TYPE,
            &pb::Address {
                r#type: Some(pb::address::Type::Workload(pb::Workload {
                    name: "w".into(),
                    namespace: "n".into(),
                    trust_domain: "evil.example".into(),
                    addresses: vec![vec![1, 2, 3, 4]],
                    ..Default::default()
                })),
            },
        );
        assert!(decode_address(&other_td, "cluster.local").is_err());
    }
}
