//! The L7 half of the model as Ambit's `ambit.route.v1` resources
//! (`proto/ambit/route.proto`), served to waypoints only, and back.
//!
//! The messages mirror the model field for field, so encoding never drops
//! anything. Decoding is strict: a value the model cannot hold (a port above
//! 65535, an unspecified enum, a sub-millisecond or negative duration, a
//! mirror without a backend) is an error, and so is anything the model's
//! validator refuses. The client NACKs such a resource and keeps the previous
//! one, rather than guessing what the control plane meant.

use std::net::IpAddr;
use std::time::Duration;

use prost::Message;
use prost_types::Any;

use super::resources::NamedResource;
use crate::config::{
    validate_mesh_config, BackendRef, BackendTarget, Cidr, Condition, ConnectionPool, FilterType,
    HeaderModifier, HeaderValue, HttpDuration, HttpPolicy, HttpPolicyAction, HttpRoute, HttpRule,
    LocalRateLimit, MeshConfig, Operation, OutlierDetection, ParentKind, ParentRef, PathMatch,
    PathMatchType, PathModifier, PathModifierType, PolicyTarget, RequestMirror, RequestRedirect,
    RetryPolicy, RouteFilter, RouteMatch, RouteRule, RouteTimeouts, SourceMatch, TargetKind,
    TrafficPolicy, UrlRewrite, ValueMatch, ValueMatchType,
};
use crate::proto::ambit::route as pb;
use crate::proto::{HTTP_AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, TRAFFIC_POLICY_TYPE};

/// The L7 sections of a config as resources, per type.
#[derive(Clone, Debug, Default)]
pub struct EncodedL7 {
    pub http_routes: Vec<NamedResource>,
    pub http_policies: Vec<NamedResource>,
    pub traffic_policies: Vec<NamedResource>,
}

/// The L7 sections of a config, decoded: what [`super::assemble_with_l7`]
/// puts next to the L4 model.
#[derive(Clone, Debug, Default)]
pub struct L7Config {
    pub http_routes: Vec<HttpRoute>,
    pub http_policies: Vec<HttpPolicy>,
    pub traffic_policies: Vec<TrafficPolicy>,
}

/// Encodes the L7 sections of `config` for serving, named `<namespace>/<name>`.
pub fn encode_l7(config: &MeshConfig) -> EncodedL7 {
    EncodedL7 {
        http_routes: config
            .http_routes
            .iter()
            .map(|r| NamedResource {
                name: r.key(),
                resource: encode_http_route(r),
            })
            .collect(),
        http_policies: config
            .http_policies
            .iter()
            .map(|p| NamedResource {
                name: p.key(),
                resource: encode_http_policy(p),
            })
            .collect(),
        traffic_policies: config
            .traffic_policies
            .iter()
            .map(|p| NamedResource {
                name: p.key(),
                resource: encode_traffic_policy(p),
            })
            .collect(),
    }
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

fn check_type(resource: &Any, want: &str) -> Result<(), String> {
    if resource.type_url == want {
        Ok(())
    } else {
        Err(format!("type {:?} is not {want}", resource.type_url))
    }
}

fn check_name(kind: &str, name: &str, namespace: &str) -> Result<(), String> {
    if name.is_empty() || namespace.is_empty() {
        return Err(format!("{kind} without a name or namespace"));
    }
    Ok(())
}

/// Runs the model's own validator over one object, so a resource is refused
/// on arrival for exactly what a static config would be refused for.
fn validate(config: &MeshConfig) -> Result<(), String> {
    validate_mesh_config(config).map_err(|e| e.to_string())
}

/// An otherwise empty config to validate one L7 object in; the L4 defaults
/// only need to pass their own checks.
fn holding(l7: L7Config) -> MeshConfig {
    MeshConfig {
        trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_string(),
        root_namespace: "istio-system".to_string(),
        http_routes: l7.http_routes,
        http_policies: l7.http_policies,
        traffic_policies: l7.traffic_policies,
        ..MeshConfig::default()
    }
}

// ---- scalars ------------------------------------------------------------

fn u16_of(v: u32, what: &str) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("{what} {v} is above 65535"))
}

fn duration(d: &HttpDuration) -> prost_types::Duration {
    prost_types::Duration {
        // Saturates only for durations no Gateway API text can spell, which
        // the decoder refuses anyway.
        seconds: i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX),
        nanos: d.0.subsec_nanos() as i32,
    }
}

/// The longest duration a Gateway API string can spell (four five-digit
/// parts: `99999h99999m99999s99999ms`).
const MAX_DURATION_SECS: i64 = 99_999 * 3600 + 99_999 * 60 + 99_999 + 100;

fn http_duration(d: &prost_types::Duration, what: &str) -> Result<HttpDuration, String> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(format!("{what}: negative or malformed duration"));
    }
    if d.seconds > MAX_DURATION_SECS {
        return Err(format!(
            "{what}: {} s is longer than Gateway API allows",
            d.seconds
        ));
    }
    if d.nanos % 1_000_000 != 0 {
        return Err(format!("{what}: not a whole number of milliseconds"));
    }
    Ok(HttpDuration(Duration::new(
        d.seconds as u64,
        d.nanos as u32,
    )))
}

fn opt_duration(
    d: &Option<prost_types::Duration>,
    what: &str,
) -> Result<Option<HttpDuration>, String> {
    d.as_ref().map(|d| http_duration(d, what)).transpose()
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_block(c: &Cidr) -> pb::IpBlock {
    pb::IpBlock {
        address: ip_bytes(&c.addr()),
        length: u32::from(c.prefix()),
    }
}

fn cidr(b: &pb::IpBlock) -> Result<Cidr, String> {
    let ip = match b.address.len() {
        4 => <[u8; 4]>::try_from(b.address.as_slice())
            .map(IpAddr::from)
            .ok(),
        16 => <[u8; 16]>::try_from(b.address.as_slice())
            .map(IpAddr::from)
            .ok(),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "an IP block address has 4 or 16 bytes, not {}",
            b.address.len()
        )
    })?;
    u8::try_from(b.length)
        .ok()
        .and_then(|len| Cidr::new(ip, len))
        .ok_or_else(|| format!("bad prefix length {} for {ip}", b.length))
}

// ---- HTTPRoute ----------------------------------------------------------

pub fn encode_http_route(r: &HttpRoute) -> Any {
    any(
        HTTP_ROUTE_TYPE,
        &pb::HttpRoute {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            creation_timestamp: r.creation_timestamp.clone(),
            parents: r.parents.iter().map(encode_parent).collect(),
            hostnames: r.hostnames.clone(),
            rules: r.rules.iter().map(encode_rule).collect(),
        },
    )
}

/// Decodes and validates one HTTPRoute resource.
pub fn decode_http_route(resource: &Any) -> Result<HttpRoute, String> {
    check_type(resource, HTTP_ROUTE_TYPE)?;
    let r =
        pb::HttpRoute::decode(resource.value.as_slice()).map_err(|e| format!("decoding: {e}"))?;
    check_name("HTTPRoute", &r.name, &r.namespace)?;
    let key = format!("{}/{}", r.namespace, r.name);
    let at = |e: String| format!("route {key}: {e}");
    let route = HttpRoute {
        parents: r
            .parents
            .iter()
            .map(decode_parent)
            .collect::<Result<_, _>>()
            .map_err(at)?,
        rules: r
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| decode_rule(rule).map_err(|e| format!("rules[{i}]: {e}")))
            .collect::<Result<_, _>>()
            .map_err(at)?,
        name: r.name,
        namespace: r.namespace,
        creation_timestamp: r.creation_timestamp,
        hostnames: r.hostnames,
    };
    let mut config = holding(L7Config {
        http_routes: vec![route],
        ..L7Config::default()
    });
    validate(&config)?;
    config
        .http_routes
        .pop()
        .ok_or_else(|| "route lost in validation (bug)".to_string())
}

fn encode_parent(p: &ParentRef) -> pb::ParentRef {
    use pb::parent_ref::Kind;
    pb::ParentRef {
        kind: match p.kind {
            ParentKind::Service => Kind::Service,
            ParentKind::Gateway => Kind::Gateway,
        } as i32,
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        port: p.port.map(u32::from),
    }
}

fn decode_parent(p: &pb::ParentRef) -> Result<ParentRef, String> {
    use pb::parent_ref::Kind;
    let kind = match Kind::try_from(p.kind) {
        Ok(Kind::Service) => ParentKind::Service,
        Ok(Kind::Gateway) => ParentKind::Gateway,
        Ok(Kind::Unspecified) | Err(_) => {
            return Err(format!("parent {}: unknown kind {}", p.name, p.kind))
        }
    };
    if p.name.is_empty() || p.namespace.is_empty() {
        return Err("a parent without a name or namespace".into());
    }
    Ok(ParentRef {
        kind,
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        port: p.port.map(|v| u16_of(v, "parent port")).transpose()?,
    })
}

fn encode_rule(r: &RouteRule) -> pb::RouteRule {
    pb::RouteRule {
        name: r.name.clone(),
        matches: r.matches.iter().map(encode_match).collect(),
        filters: r.filters.iter().map(encode_filter).collect(),
        backend_refs: r.backend_refs.iter().map(encode_backend).collect(),
        timeouts: r.timeouts.map(|t| pb::RouteTimeouts {
            request: t.request.as_ref().map(duration),
            backend_request: t.backend_request.as_ref().map(duration),
        }),
        retry: r.retry.as_ref().map(|r| pb::RetryPolicy {
            codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
            attempts: r.attempts,
            backoff: r.backoff.as_ref().map(duration),
        }),
    }
}

fn decode_rule(r: &pb::RouteRule) -> Result<RouteRule, String> {
    Ok(RouteRule {
        name: r.name.clone(),
        matches: r
            .matches
            .iter()
            .map(decode_match)
            .collect::<Result<_, _>>()?,
        filters: r
            .filters
            .iter()
            .map(decode_filter)
            .collect::<Result<_, _>>()?,
        backend_refs: r
            .backend_refs
            .iter()
            .map(decode_backend)
            .collect::<Result<_, _>>()?,
        timeouts: r
            .timeouts
            .as_ref()
            .map(|t| {
                Ok::<_, String>(RouteTimeouts {
                    request: opt_duration(&t.request, "timeouts.request")?,
                    backend_request: opt_duration(&t.backend_request, "timeouts.backendRequest")?,
                })
            })
            .transpose()?,
        retry: r
            .retry
            .as_ref()
            .map(|r| {
                Ok::<_, String>(RetryPolicy {
                    codes: r
                        .codes
                        .iter()
                        .map(|c| u16_of(*c, "retry code"))
                        .collect::<Result<_, _>>()?,
                    attempts: r.attempts,
                    backoff: opt_duration(&r.backoff, "retry.backoff")?,
                })
            })
            .transpose()?,
    })
}

fn encode_match(m: &RouteMatch) -> pb::RouteMatch {
    use pb::path_match::Type;
    pb::RouteMatch {
        path: m.path.as_ref().map(|p| pb::PathMatch {
            r#type: match p.kind {
                PathMatchType::Exact => Type::Exact,
                PathMatchType::PathPrefix => Type::PathPrefix,
                PathMatchType::RegularExpression => Type::RegularExpression,
            } as i32,
            value: p.value.clone(),
        }),
        headers: m.headers.iter().map(encode_value_match).collect(),
        query_params: m.query_params.iter().map(encode_value_match).collect(),
        method: m.method.clone(),
    }
}

fn decode_match(m: &pb::RouteMatch) -> Result<RouteMatch, String> {
    use pb::path_match::Type;
    let path = match &m.path {
        None => None,
        Some(p) => Some(PathMatch {
            kind: match Type::try_from(p.r#type) {
                Ok(Type::Exact) => PathMatchType::Exact,
                Ok(Type::PathPrefix) => PathMatchType::PathPrefix,
                Ok(Type::RegularExpression) => PathMatchType::RegularExpression,
                Ok(Type::Unspecified) | Err(_) => {
                    return Err(format!("unknown path match type {}", p.r#type))
                }
            },
            value: p.value.clone(),
        }),
    };
    Ok(RouteMatch {
        path,
        headers: m
            .headers
            .iter()
            .map(decode_value_match)
            .collect::<Result<_, _>>()?,
        query_params: m
            .query_params
            .iter()
            .map(decode_value_match)
            .collect::<Result<_, _>>()?,
        method: m.method.clone(),
    })
}

fn encode_value_match(v: &ValueMatch) -> pb::ValueMatch {
    use pb::value_match::Type;
    pb::ValueMatch {
        r#type: match v.kind {
            ValueMatchType::Exact => Type::Exact,
            ValueMatchType::RegularExpression => Type::RegularExpression,
        } as i32,
        name: v.name.clone(),
        value: v.value.clone(),
    }
}

fn decode_value_match(v: &pb::ValueMatch) -> Result<ValueMatch, String> {
    use pb::value_match::Type;
    let kind = match Type::try_from(v.r#type) {
        Ok(Type::Exact) => ValueMatchType::Exact,
        Ok(Type::RegularExpression) => ValueMatchType::RegularExpression,
        Ok(Type::Unspecified) | Err(_) => {
            return Err(format!("{:?}: unknown match type {}", v.name, v.r#type))
        }
    };
    Ok(ValueMatch {
        kind,
        name: v.name.clone(),
        value: v.value.clone(),
    })
}

fn encode_filter(f: &RouteFilter) -> pb::RouteFilter {
    use pb::route_filter::Type;
    pb::RouteFilter {
        r#type: match f.kind {
            FilterType::RequestHeaderModifier => Type::RequestHeaderModifier,
            FilterType::ResponseHeaderModifier => Type::ResponseHeaderModifier,
            FilterType::RequestRedirect => Type::RequestRedirect,
            FilterType::UrlRewrite => Type::UrlRewrite,
            FilterType::RequestMirror => Type::RequestMirror,
        } as i32,
        request_header_modifier: f.request_header_modifier.as_ref().map(encode_modifier),
        response_header_modifier: f.response_header_modifier.as_ref().map(encode_modifier),
        request_redirect: f.request_redirect.as_ref().map(|r| pb::RequestRedirect {
            scheme: r.scheme.clone(),
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(encode_path_modifier),
            port: r.port.map(u32::from),
            status_code: r.status_code.map(u32::from),
        }),
        url_rewrite: f.url_rewrite.as_ref().map(|r| pb::UrlRewrite {
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(encode_path_modifier),
        }),
        request_mirror: f.request_mirror.as_ref().map(|m| pb::RequestMirror {
            backend_ref: Some(encode_target(&m.backend_ref)),
            percent: m.percent,
        }),
    }
}

fn decode_filter(f: &pb::RouteFilter) -> Result<RouteFilter, String> {
    use pb::route_filter::Type;
    let kind = match Type::try_from(f.r#type) {
        Ok(Type::RequestHeaderModifier) => FilterType::RequestHeaderModifier,
        Ok(Type::ResponseHeaderModifier) => FilterType::ResponseHeaderModifier,
        Ok(Type::RequestRedirect) => FilterType::RequestRedirect,
        Ok(Type::UrlRewrite) => FilterType::UrlRewrite,
        Ok(Type::RequestMirror) => FilterType::RequestMirror,
        Ok(Type::Unspecified) | Err(_) => return Err(format!("unknown filter type {}", f.r#type)),
    };
    let request_redirect = match &f.request_redirect {
        None => None,
        Some(r) => Some(RequestRedirect {
            scheme: r.scheme.clone(),
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(decode_path_modifier).transpose()?,
            port: r.port.map(|p| u16_of(p, "redirect port")).transpose()?,
            status_code: r
                .status_code
                .map(|c| u16_of(c, "redirect statusCode"))
                .transpose()?,
        }),
    };
    let url_rewrite = match &f.url_rewrite {
        None => None,
        Some(r) => Some(UrlRewrite {
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(decode_path_modifier).transpose()?,
        }),
    };
    let request_mirror = match &f.request_mirror {
        None => None,
        Some(m) => Some(RequestMirror {
            backend_ref: decode_target(
                m.backend_ref
                    .as_ref()
                    .ok_or("a RequestMirror without a backendRef")?,
            )?,
            percent: m.percent,
        }),
    };
    Ok(RouteFilter {
        kind,
        request_header_modifier: f.request_header_modifier.as_ref().map(decode_modifier),
        response_header_modifier: f.response_header_modifier.as_ref().map(decode_modifier),
        request_redirect,
        url_rewrite,
        request_mirror,
    })
}

fn encode_modifier(m: &HeaderModifier) -> pb::HeaderModifier {
    let values = |v: &[HeaderValue]| {
        v.iter()
            .map(|h| pb::HeaderValue {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    pb::HeaderModifier {
        set: values(&m.set),
        add: values(&m.add),
        remove: m.remove.clone(),
    }
}

fn decode_modifier(m: &pb::HeaderModifier) -> HeaderModifier {
    let values = |v: &[pb::HeaderValue]| {
        v.iter()
            .map(|h| HeaderValue {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    HeaderModifier {
        set: values(&m.set),
        add: values(&m.add),
        remove: m.remove.clone(),
    }
}

fn encode_path_modifier(p: &PathModifier) -> pb::PathModifier {
    use pb::path_modifier::Type;
    pb::PathModifier {
        r#type: match p.kind {
            PathModifierType::ReplaceFullPath => Type::ReplaceFullPath,
            PathModifierType::ReplacePrefixMatch => Type::ReplacePrefixMatch,
        } as i32,
        replace_full_path: p.replace_full_path.clone(),
        replace_prefix_match: p.replace_prefix_match.clone(),
    }
}

fn decode_path_modifier(p: &pb::PathModifier) -> Result<PathModifier, String> {
    use pb::path_modifier::Type;
    let kind = match Type::try_from(p.r#type) {
        Ok(Type::ReplaceFullPath) => PathModifierType::ReplaceFullPath,
        Ok(Type::ReplacePrefixMatch) => PathModifierType::ReplacePrefixMatch,
        Ok(Type::Unspecified) | Err(_) => {
            return Err(format!("unknown path modifier type {}", p.r#type))
        }
    };
    Ok(PathModifier {
        kind,
        replace_full_path: p.replace_full_path.clone(),
        replace_prefix_match: p.replace_prefix_match.clone(),
    })
}

fn encode_target(t: &BackendTarget) -> pb::BackendTarget {
    pb::BackendTarget {
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        port: u32::from(t.port),
    }
}

fn decode_target(t: &pb::BackendTarget) -> Result<BackendTarget, String> {
    Ok(BackendTarget {
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        port: u16_of(t.port, "mirror backend port")?,
    })
}

fn encode_backend(b: &BackendRef) -> pb::BackendRef {
    pb::BackendRef {
        name: b.name.clone(),
        namespace: b.namespace.clone(),
        port: u32::from(b.port),
        weight: Some(b.weight),
        filters: b.filters.iter().map(encode_filter).collect(),
    }
}

fn decode_backend(b: &pb::BackendRef) -> Result<BackendRef, String> {
    Ok(BackendRef {
        name: b.name.clone(),
        namespace: b.namespace.clone(),
        port: u16_of(b.port, "backend port")?,
        // Gateway API's default: an unweighted backend takes one share.
        weight: b.weight.unwrap_or(1),
        filters: b
            .filters
            .iter()
            .map(decode_filter)
            .collect::<Result<_, _>>()?,
    })
}

// ---- HTTPAuthorization --------------------------------------------------

fn encode_target_ref(t: &PolicyTarget) -> pb::PolicyTarget {
    use pb::policy_target::Kind;
    pb::PolicyTarget {
        kind: match t.kind {
            TargetKind::Gateway => Kind::Gateway,
            TargetKind::Service => Kind::Service,
            TargetKind::HttpRoute => Kind::HttpRoute,
            TargetKind::GatewayClass => Kind::GatewayClass,
        } as i32,
        name: t.name.clone(),
    }
}

fn decode_target_ref(t: &pb::PolicyTarget) -> Result<PolicyTarget, String> {
    use pb::policy_target::Kind;
    let kind = match Kind::try_from(t.kind) {
        Ok(Kind::Gateway) => TargetKind::Gateway,
        Ok(Kind::Service) => TargetKind::Service,
        Ok(Kind::HttpRoute) => TargetKind::HttpRoute,
        Ok(Kind::GatewayClass) => TargetKind::GatewayClass,
        Ok(Kind::Unspecified) | Err(_) => {
            return Err(format!("target {:?}: unknown kind {}", t.name, t.kind))
        }
    };
    if t.name.is_empty() {
        return Err("a target without a name".into());
    }
    Ok(PolicyTarget {
        kind,
        name: t.name.clone(),
    })
}

pub fn encode_http_policy(p: &HttpPolicy) -> Any {
    use pb::http_authorization::Action;
    any(
        HTTP_AUTHORIZATION_TYPE,
        &pb::HttpAuthorization {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            targets: p.targets.iter().map(encode_target_ref).collect(),
            action: match p.action {
                HttpPolicyAction::Allow => Action::Allow,
                HttpPolicyAction::Deny => Action::Deny,
                HttpPolicyAction::Audit => Action::Audit,
            } as i32,
            rules: p.rules.iter().map(encode_http_rule).collect(),
        },
    )
}

/// Decodes and validates one HTTPAuthorization resource.
pub fn decode_http_policy(resource: &Any) -> Result<HttpPolicy, String> {
    use pb::http_authorization::Action;
    check_type(resource, HTTP_AUTHORIZATION_TYPE)?;
    let p = pb::HttpAuthorization::decode(resource.value.as_slice())
        .map_err(|e| format!("decoding: {e}"))?;
    check_name("HTTPAuthorization", &p.name, &p.namespace)?;
    let key = format!("{}/{}", p.namespace, p.name);
    let at = |e: String| format!("policy {key}: {e}");
    let action = match Action::try_from(p.action) {
        Ok(Action::Allow) => HttpPolicyAction::Allow,
        Ok(Action::Deny) => HttpPolicyAction::Deny,
        Ok(Action::Audit) => HttpPolicyAction::Audit,
        Ok(Action::Unspecified) | Err(_) => return Err(at(format!("unknown action {}", p.action))),
    };
    let policy = HttpPolicy {
        targets: p
            .targets
            .iter()
            .map(decode_target_ref)
            .collect::<Result<_, _>>()
            .map_err(at)?,
        action,
        rules: p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| decode_http_rule(r).map_err(|e| format!("rules[{i}]: {e}")))
            .collect::<Result<_, _>>()
            .map_err(at)?,
        name: p.name,
        namespace: p.namespace,
    };
    let mut config = holding(L7Config {
        http_policies: vec![policy],
        ..L7Config::default()
    });
    validate(&config)?;
    config
        .http_policies
        .pop()
        .ok_or_else(|| "policy lost in validation (bug)".to_string())
}

fn encode_http_rule(r: &HttpRule) -> pb::HttpRule {
    pb::HttpRule {
        from: r
            .from
            .iter()
            .map(|s| pb::SourceMatch {
                principals: s.principals.clone(),
                not_principals: s.not_principals.clone(),
                namespaces: s.namespaces.clone(),
                not_namespaces: s.not_namespaces.clone(),
                ip_blocks: s.ip_blocks.iter().map(ip_block).collect(),
                not_ip_blocks: s.not_ip_blocks.iter().map(ip_block).collect(),
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|o| pb::Operation {
                methods: o.methods.clone(),
                not_methods: o.not_methods.clone(),
                paths: o.paths.clone(),
                not_paths: o.not_paths.clone(),
                ports: o.ports.iter().map(|p| u32::from(*p)).collect(),
                not_ports: o.not_ports.iter().map(|p| u32::from(*p)).collect(),
                hosts: o.hosts.clone(),
                not_hosts: o.not_hosts.clone(),
            })
            .collect(),
        when: r
            .when
            .iter()
            .map(|c| pb::Condition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            })
            .collect(),
    }
}

fn decode_http_rule(r: &pb::HttpRule) -> Result<HttpRule, String> {
    let ports = |ps: &[u32]| -> Result<Vec<u16>, String> {
        ps.iter().map(|p| u16_of(*p, "port")).collect()
    };
    let blocks =
        |bs: &[pb::IpBlock]| -> Result<Vec<Cidr>, String> { bs.iter().map(cidr).collect() };
    Ok(HttpRule {
        from: r
            .from
            .iter()
            .map(|s| {
                Ok::<_, String>(SourceMatch {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: blocks(&s.ip_blocks)?,
                    not_ip_blocks: blocks(&s.not_ip_blocks)?,
                })
            })
            .collect::<Result<_, _>>()?,
        to: r
            .to
            .iter()
            .map(|o| {
                Ok::<_, String>(Operation {
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                    ports: ports(&o.ports)?,
                    not_ports: ports(&o.not_ports)?,
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                })
            })
            .collect::<Result<_, _>>()?,
        when: r
            .when
            .iter()
            .map(|c| Condition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            })
            .collect(),
    })
}

// ---- TrafficPolicy ------------------------------------------------------

pub fn encode_traffic_policy(p: &TrafficPolicy) -> Any {
    any(
        TRAFFIC_POLICY_TYPE,
        &pb::TrafficPolicy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            target: Some(encode_target_ref(&p.target)),
            connection_pool: p.connection_pool.map(|c| pb::ConnectionPool {
                max_requests: c.max_requests,
                max_pending_requests: c.max_pending_requests,
                max_connections: c.max_connections,
            }),
            outlier_detection: p.outlier_detection.map(|o| pb::OutlierDetection {
                consecutive_5xx: o.consecutive_5xx,
                base_ejection_time: Some(duration(&o.base_ejection_time)),
                max_ejection_percent: o.max_ejection_percent,
            }),
            rate_limit: p.rate_limit.map(|r| pb::LocalRateLimit {
                max_tokens: r.max_tokens,
                tokens_per_fill: r.tokens_per_fill,
                fill_interval: Some(duration(&r.fill_interval)),
            }),
        },
    )
}

/// Decodes and validates one TrafficPolicy resource.
pub fn decode_traffic_policy(resource: &Any) -> Result<TrafficPolicy, String> {
    check_type(resource, TRAFFIC_POLICY_TYPE)?;
    let p = pb::TrafficPolicy::decode(resource.value.as_slice())
        .map_err(|e| format!("decoding: {e}"))?;
    check_name("TrafficPolicy", &p.name, &p.namespace)?;
    let key = format!("{}/{}", p.namespace, p.name);
    let at = |e: String| format!("traffic policy {key}: {e}");
    let target =
        decode_target_ref(p.target.as_ref().ok_or_else(|| at("no target".into()))?).map_err(at)?;
    let outlier_detection = match &p.outlier_detection {
        None => None,
        Some(o) => Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            base_ejection_time: http_duration(
                o.base_ejection_time
                    .as_ref()
                    .ok_or_else(|| at("outlierDetection without baseEjectionTime".into()))?,
                "outlierDetection.baseEjectionTime",
            )
            .map_err(at)?,
            max_ejection_percent: o.max_ejection_percent,
        }),
    };
    let rate_limit = match &p.rate_limit {
        None => None,
        Some(r) => Some(LocalRateLimit {
            max_tokens: r.max_tokens,
            tokens_per_fill: r.tokens_per_fill,
            fill_interval: http_duration(
                r.fill_interval
                    .as_ref()
                    .ok_or_else(|| at("rateLimit without fillInterval".into()))?,
                "rateLimit.fillInterval",
            )
            .map_err(at)?,
        }),
    };
    let policy = TrafficPolicy {
        name: p.name,
        namespace: p.namespace,
        target,
        connection_pool: p.connection_pool.map(|c| ConnectionPool {
            max_requests: c.max_requests,
            max_pending_requests: c.max_pending_requests,
            max_connections: c.max_connections,
        }),
        outlier_detection,
        rate_limit,
    };
    let mut config = holding(L7Config {
        traffic_policies: vec![policy],
        ..L7Config::default()
    });
    validate(&config)?;
    config
        .traffic_policies
        .pop()
        .ok_or_else(|| "traffic policy lost in validation (bug)".to_string())
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const RICH_ROUTE: &str = r#"
name: reviews
namespace: bookinfo
creationTimestamp: "2024-05-01T10:00:00Z"
parents:
- {kind: Service, namespace: bookinfo, name: reviews, port: 9080}
- {kind: Gateway, namespace: bookinfo, name: waypoint}
hostnames: [reviews.example, "*.reviews.example"]
rules:
- name: canary
  matches:
  - path: {type: Exact, value: /a}
    headers: [{name: version, value: v2}, {type: RegularExpression, name: x-user, value: "^j.*"}]
    queryParams: [{type: RegularExpression, name: q, value: "^x"}, {name: debug, value: "1"}]
    method: GET
  - path: {type: RegularExpression, value: "/b/[0-9]+"}
  - path: {type: PathPrefix, value: /c}
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{name: x-set, value: "1"}]
      add: [{name: x-add, value: "2"}]
      remove: [x-remove]
  - type: ResponseHeaderModifier
    responseHeaderModifier: {set: [{name: x-r, value: "3"}], add: [{name: x-ra, value: "4"}], remove: [server]}
  - type: URLRewrite
    urlRewrite: {hostname: internal.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
  - type: RequestMirror
    requestMirror: {backendRef: {name: shadow, namespace: test, port: 8080}, percent: 10}
  backendRefs:
  - name: reviews-v1
    namespace: bookinfo
    port: 9080
    weight: 90
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-backend, value: v1}]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8081}}
  - {name: reviews-v2, port: 9080, weight: 0}
  - {name: reviews-v3, port: 9080}
  timeouts: {request: 2s, backendRequest: 500ms}
  retry: {codes: [502, 503], attempts: 2, backoff: 10ms}
- name: moved
  matches: [{path: {type: PathPrefix, value: /old}}]
  filters:
  - type: RequestRedirect
    requestRedirect:
      scheme: https
      hostname: new.example
      path: {type: ReplaceFullPath, replaceFullPath: /new}
      port: 8443
      statusCode: 301
  timeouts: {request: 1m30s}
  retry: {attempts: 0}
- {}
"#;

    const RICH_POLICY: &str = r#"
name: reviews-l7
namespace: bookinfo
targets: [{kind: Gateway, name: waypoint}, {kind: Service, name: reviews}, {kind: HTTPRoute, name: reviews}]
action: Deny
rules:
- from:
  - principals: ["cluster.local/ns/bookinfo/sa/productpage", "*/sa/admin"]
    notPrincipals: ["*"]
    namespaces: [bookinfo]
    notNamespaces: ["test*"]
    ipBlocks: [10.0.0.0/8, "2001:db8::/32"]
    notIpBlocks: [10.1.2.3/32]
  to:
  - methods: [GET, POST]
    notMethods: [DELETE]
    paths: ["/api/*", /health]
    notPaths: ["*/admin"]
    ports: [9080]
    notPorts: [15000]
    hosts: ["*.example"]
    notHosts: [evil.example]
  when:
  - {key: "request.headers[x-token]", values: [a, b], notValues: [c]}
  - {key: source.ip, notValues: [10.9.9.9]}
- {}
"#;

    const RICH_TRAFFIC: &str = r#"
name: reviews-resilience
namespace: bookinfo
target: {kind: Service, name: reviews}
connectionPool: {maxRequests: 100, maxPendingRequests: 10, maxConnections: 5}
outlierDetection: {consecutive5xx: 3, baseEjectionTime: 30s, maxEjectionPercent: 60}
rateLimit: {maxTokens: 50, tokensPerFill: 10, fillInterval: 1s}
"#;

    /// The model types lack `PartialEq` (regexes, nested lists); their
    /// serialized form is exact and says which field differs.
    fn same<T: serde::Serialize>(a: &T, b: &T) {
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
    }

    #[test]
    fn rich_examples_survive_the_wire() {
        let route: HttpRoute = serde_yaml::from_str(RICH_ROUTE).unwrap();
        let back = decode_http_route(&encode_http_route(&route)).unwrap();
        same(&route, &back);
        assert_eq!(back.rules[0].backend_refs[1].weight, 0);
        assert_eq!(back.rules[0].backend_refs[2].weight, 1);

        let policy: HttpPolicy = serde_yaml::from_str(RICH_POLICY).unwrap();
        same(
            &policy,
            &decode_http_policy(&encode_http_policy(&policy)).unwrap(),
        );

        let traffic: TrafficPolicy = serde_yaml::from_str(RICH_TRAFFIC).unwrap();
        same(
            &traffic,
            &decode_traffic_policy(&encode_traffic_policy(&traffic)).unwrap(),
        );

        let config = MeshConfig {
            http_routes: vec![route],
            http_policies: vec![policy],
            traffic_policies: vec![traffic],
            ..MeshConfig::default()
        };
        let enc = encode_l7(&config);
        assert_eq!(enc.http_routes[0].name, "bookinfo/reviews");
        assert_eq!(enc.http_policies[0].name, "bookinfo/reviews-l7");
        assert_eq!(enc.traffic_policies[0].name, "bookinfo/reviews-resilience");
        assert_eq!(enc.http_routes[0].resource.type_url, HTTP_ROUTE_TYPE);
    }

    fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
        &from[rng.random_range(0..from.len())]
    }

    /// Half the time `Some($v)`; a macro so `$v` may draw from `$rng` too.
    macro_rules! some {
        ($rng:expr, $v:expr $(,)?) => {
            if $rng.random_bool(0.5) {
                Some($v)
            } else {
                None
            }
        };
    }

    fn ms(rng: &mut StdRng, max: u64) -> HttpDuration {
        HttpDuration(Duration::from_millis(rng.random_range(1..=max)))
    }

    fn modifier(rng: &mut StdRng) -> HeaderModifier {
        let hv = |rng: &mut StdRng| HeaderValue {
            name: format!("x-{}", rng.random_range(0..100)),
            value: format!("v{}", rng.random_range(0..100)),
        };
        HeaderModifier {
            set: (0..rng.random_range(0..3)).map(|_| hv(rng)).collect(),
            add: (0..rng.random_range(0..3)).map(|_| hv(rng)).collect(),
            remove: (0..rng.random_range(0..3))
                .map(|i| format!("x-rm-{i}"))
                .collect(),
        }
    }

    fn path_modifier(rng: &mut StdRng) -> PathModifier {
        if rng.random_bool(0.5) {
            PathModifier {
                kind: PathModifierType::ReplaceFullPath,
                replace_full_path: Some("/full".into()),
                replace_prefix_match: None,
            }
        } else {
            PathModifier {
                kind: PathModifierType::ReplacePrefixMatch,
                replace_full_path: None,
                replace_prefix_match: Some("/prefix".into()),
            }
        }
    }

    fn target(rng: &mut StdRng) -> BackendTarget {
        BackendTarget {
            name: format!("svc{}", rng.random_range(0..5)),
            namespace: some!(rng, "other".to_string()),
            port: rng.random_range(1..=u16::MAX),
        }
    }

    /// A valid filter of a random type; never a redirect when `no_redirect`.
    fn filter(rng: &mut StdRng, no_redirect: bool) -> RouteFilter {
        let mut f = RouteFilter {
            kind: FilterType::RequestHeaderModifier,
            request_header_modifier: None,
            response_header_modifier: None,
            request_redirect: None,
            url_rewrite: None,
            request_mirror: None,
        };
        match rng.random_range(0..if no_redirect { 3 } else { 4 }) {
            0 => f.request_header_modifier = Some(modifier(rng)),
            1 => {
                f.kind = FilterType::ResponseHeaderModifier;
                f.response_header_modifier = Some(modifier(rng));
            }
            2 => {
                f.kind = FilterType::RequestMirror;
                f.request_mirror = Some(RequestMirror {
                    backend_ref: target(rng),
                    percent: some!(rng, rng.random_range(0..=100)),
                });
            }
            _ => {
                f.kind = FilterType::RequestRedirect;
                f.request_redirect = Some(RequestRedirect {
                    scheme: some!(rng, pick(rng, &["http", "https"]).to_string()),
                    hostname: some!(rng, "h.example".into()),
                    path: some!(rng, path_modifier(rng)),
                    port: some!(rng, rng.random_range(1..=u16::MAX)),
                    status_code: some!(rng, *pick(rng, &[301, 302])),
                });
            }
        }
        f
    }

    fn random_route(rng: &mut StdRng) -> HttpRoute {
        let rules = (0..rng.random_range(0..4))
            .map(|_| {
                let rewrite = rng.random_bool(0.3);
                let mut filters: Vec<RouteFilter> = (0..rng.random_range(0..3))
                    .map(|_| filter(rng, rewrite))
                    .collect();
                if rewrite {
                    filters.push(RouteFilter {
                        kind: FilterType::UrlRewrite,
                        request_header_modifier: None,
                        response_header_modifier: None,
                        request_redirect: None,
                        url_rewrite: Some(UrlRewrite {
                            hostname: some!(rng, "r.example".into()),
                            path: some!(rng, path_modifier(rng)),
                        }),
                        request_mirror: None,
                    });
                }
                let request = ms(rng, 100_000);
                RouteRule {
                    name: some!(rng, "rule".into()),
                    matches: (0..rng.random_range(0..3))
                        .map(|_| RouteMatch {
                            path: some!(
                                rng,
                                PathMatch {
                                    kind: *pick(
                                        rng,
                                        &[
                                            PathMatchType::Exact,
                                            PathMatchType::PathPrefix,
                                            PathMatchType::RegularExpression,
                                        ],
                                    ),
                                    value: "/p".into(),
                                },
                            ),
                            headers: (0..rng.random_range(0..3))
                                .map(|i| ValueMatch {
                                    kind: *pick(
                                        rng,
                                        &[ValueMatchType::Exact, ValueMatchType::RegularExpression],
                                    ),
                                    name: format!("h{i}"),
                                    value: "v".into(),
                                })
                                .collect(),
                            query_params: (0..rng.random_range(0..2))
                                .map(|i| ValueMatch {
                                    kind: ValueMatchType::Exact,
                                    name: format!("q{i}"),
                                    value: String::new(),
                                })
                                .collect(),
                            method: some!(rng, pick(rng, &["GET", "PUT", "PATCH"]).to_string()),
                        })
                        .collect(),
                    filters,
                    backend_refs: (0..rng.random_range(0..4))
                        .map(|_| BackendRef {
                            name: format!("b{}", rng.random_range(0..9)),
                            namespace: some!(rng, "other".into()),
                            port: rng.random_range(1..=u16::MAX),
                            weight: rng.random_range(0..=1_000_000),
                            filters: (0..rng.random_range(0..2))
                                .map(|_| filter(rng, true))
                                .collect(),
                        })
                        .collect(),
                    timeouts: some!(
                        rng,
                        RouteTimeouts {
                            request: Some(request),
                            backend_request: some!(
                                rng,
                                HttpDuration(Duration::from_millis(
                                    rng.random_range(1..=request.0.as_millis() as u64),
                                )),
                            ),
                        },
                    ),
                    retry: some!(
                        rng,
                        RetryPolicy {
                            codes: (0..rng.random_range(0..3))
                                .map(|_| rng.random_range(400..=599))
                                .collect(),
                            attempts: some!(rng, rng.random_range(0..=10)),
                            backoff: some!(rng, ms(rng, 10_000)),
                        },
                    ),
                }
            })
            .collect();
        HttpRoute {
            name: format!("r{}", rng.random_range(0..1000)),
            namespace: "ns".into(),
            creation_timestamp: some!(rng, "2024-01-01T00:00:00Z".into()),
            parents: (0..rng.random_range(1..3))
                .map(|i| ParentRef {
                    kind: *pick(rng, &[ParentKind::Service, ParentKind::Gateway]),
                    namespace: "ns".into(),
                    name: format!("p{i}"),
                    port: some!(rng, rng.random_range(1..=u16::MAX)),
                })
                .collect(),
            hostnames: (0..rng.random_range(0..3))
                .map(|i| format!("h{i}.example"))
                .collect(),
            rules,
        }
    }

    fn random_policy(rng: &mut StdRng) -> HttpPolicy {
        let strings = |rng: &mut StdRng, pool: &[&str]| -> Vec<String> {
            (0..rng.random_range(0..3))
                .map(|_| pick(rng, pool).to_string())
                .collect()
        };
        let blocks = |rng: &mut StdRng| -> Vec<Cidr> {
            (0..rng.random_range(0..3))
                .map(|_| {
                    let ip = if rng.random_bool(0.5) {
                        IpAddr::from(rng.random::<[u8; 4]>())
                    } else {
                        IpAddr::from(rng.random::<[u8; 16]>())
                    };
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    Cidr::new(ip, rng.random_range(0..=max)).unwrap()
                })
                .collect()
        };
        HttpPolicy {
            name: "p".into(),
            namespace: "ns".into(),
            targets: (0..rng.random_range(1..4))
                .map(|i| PolicyTarget {
                    kind: *pick(
                        rng,
                        &[
                            TargetKind::Gateway,
                            TargetKind::Service,
                            TargetKind::HttpRoute,
                        ],
                    ),
                    name: format!("t{i}"),
                })
                .collect(),
            action: *pick(
                rng,
                &[
                    HttpPolicyAction::Allow,
                    HttpPolicyAction::Deny,
                    HttpPolicyAction::Audit,
                ],
            ),
            rules: (0..rng.random_range(0..3))
                .map(|_| HttpRule {
                    from: (0..rng.random_range(0..2))
                        .map(|_| SourceMatch {
                            principals: strings(rng, &["a/sa/b", "*", "*/sa/x", "cluster.local/*"]),
                            not_principals: strings(rng, &["c"]),
                            namespaces: strings(rng, &["ns", "test*"]),
                            not_namespaces: strings(rng, &["bad"]),
                            ip_blocks: blocks(rng),
                            not_ip_blocks: blocks(rng),
                        })
                        .collect(),
                    to: (0..rng.random_range(0..2))
                        .map(|_| Operation {
                            methods: strings(rng, &["GET", "POST"]),
                            not_methods: strings(rng, &["DELETE"]),
                            paths: strings(rng, &["/a", "/b/*"]),
                            not_paths: strings(rng, &["/admin"]),
                            ports: (0..rng.random_range(0..2))
                                .map(|_| rng.random_range(1..=u16::MAX))
                                .collect(),
                            not_ports: vec![],
                            hosts: strings(rng, &["*.example"]),
                            not_hosts: strings(rng, &["x.example"]),
                        })
                        .collect(),
                    when: (0..rng.random_range(0..2))
                        .map(|_| Condition {
                            key: pick(rng, &["source.ip", "request.headers[x]", "request.method"])
                                .to_string(),
                            values: vec!["v".into()],
                            not_values: strings(rng, &["w"]),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn random_traffic(rng: &mut StdRng) -> TrafficPolicy {
        TrafficPolicy {
            name: "t".into(),
            namespace: "ns".into(),
            target: PolicyTarget {
                kind: *pick(rng, &[TargetKind::Service, TargetKind::HttpRoute]),
                name: "x".into(),
            },
            connection_pool: some!(
                rng,
                ConnectionPool {
                    max_requests: some!(rng, rng.random()),
                    max_pending_requests: some!(rng, rng.random()),
                    max_connections: some!(rng, rng.random()),
                },
            ),
            outlier_detection: some!(
                rng,
                OutlierDetection {
                    consecutive_5xx: rng.random_range(1..=u32::MAX),
                    base_ejection_time: ms(rng, 1_000_000),
                    max_ejection_percent: some!(rng, rng.random_range(0..=100)),
                },
            ),
            rate_limit: some!(
                rng,
                LocalRateLimit {
                    max_tokens: rng.random_range(1..=u32::MAX),
                    tokens_per_fill: rng.random_range(1..=u32::MAX),
                    fill_interval: ms(rng, 3_600_000),
                },
            ),
        }
    }

    #[test]
    fn random_valid_objects_survive_the_wire() {
        let mut rng = StdRng::seed_from_u64(0x4a6d_6269_7400);
        for _ in 0..300 {
            let r = random_route(&mut rng);
            let config = holding(L7Config {
                http_routes: vec![r.clone()],
                ..L7Config::default()
            });
            validate(&config).expect("the generator makes valid routes");
            same(&r, &decode_http_route(&encode_http_route(&r)).unwrap());

            let p = random_policy(&mut rng);
            same(&p, &decode_http_policy(&encode_http_policy(&p)).unwrap());

            let t = random_traffic(&mut rng);
            same(
                &t,
                &decode_traffic_policy(&encode_traffic_policy(&t)).unwrap(),
            );
        }
    }

    fn decode_any(a: &Any) {
        let _ = decode_http_route(a);
        let _ = decode_http_policy(a);
        let _ = decode_traffic_policy(a);
    }

    #[test]
    fn mangled_bytes_are_errors_not_panics() {
        let route: HttpRoute = serde_yaml::from_str(RICH_ROUTE).unwrap();
        let policy: HttpPolicy = serde_yaml::from_str(RICH_POLICY).unwrap();
        let traffic: TrafficPolicy = serde_yaml::from_str(RICH_TRAFFIC).unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        for good in [
            encode_http_route(&route),
            encode_http_policy(&policy),
            encode_traffic_policy(&traffic),
        ] {
            for len in 0..good.value.len() {
                decode_any(&Any {
                    type_url: good.type_url.clone(),
                    value: good.value[..len].to_vec(),
                });
            }
            for _ in 0..2000 {
                let mut value = good.value.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..value.len());
                    value[i] = rng.random();
                }
                decode_any(&Any {
                    type_url: good.type_url.clone(),
                    value,
                });
            }
        }
        for type_url in [
            HTTP_ROUTE_TYPE,
            HTTP_AUTHORIZATION_TYPE,
            TRAFFIC_POLICY_TYPE,
        ] {
            for _ in 0..2000 {
                let len = rng.random_range(0..64);
                decode_any(&Any {
                    type_url: type_url.into(),
                    value: (0..len).map(|_| rng.random()).collect(),
                });
            }
        }
    }

    fn route_pb() -> pb::HttpRoute {
        pb::HttpRoute {
            name: "r".into(),
            namespace: "ns".into(),
            parents: vec![pb::ParentRef {
                kind: pb::parent_ref::Kind::Service as i32,
                namespace: "ns".into(),
                name: "svc".into(),
                port: None,
            }],
            rules: vec![pb::RouteRule::default()],
            ..Default::default()
        }
    }

    fn route_err(m: impl FnOnce(&mut pb::HttpRoute)) -> String {
        let mut r = route_pb();
        m(&mut r);
        decode_http_route(&any(HTTP_ROUTE_TYPE, &r)).unwrap_err()
    }

    #[test]
    fn shapes_the_model_cannot_hold_are_refused() {
        assert!(decode_http_route(&any(HTTP_ROUTE_TYPE, &route_pb())).is_ok());
        let wrong_type = any(HTTP_AUTHORIZATION_TYPE, &route_pb());
        assert!(decode_http_route(&wrong_type)
            .unwrap_err()
            .contains("is not"));

        let dur = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        for (why, err) in [
            ("no name", route_err(|r| r.name.clear())),
            ("no parents", route_err(|r| r.parents.clear())),
            ("unspecified parent", route_err(|r| r.parents[0].kind = 0)),
            ("unknown parent", route_err(|r| r.parents[0].kind = 77)),
            (
                "parent port",
                route_err(|r| r.parents[0].port = Some(70_000)),
            ),
            (
                "sub-millisecond",
                route_err(|r| {
                    r.rules[0].timeouts = Some(pb::RouteTimeouts {
                        request: dur(1, 5),
                        backend_request: None,
                    })
                }),
            ),
            (
                "negative",
                route_err(|r| {
                    r.rules[0].retry = Some(pb::RetryPolicy {
                        backoff: dur(-1, 0),
                        ..Default::default()
                    })
                }),
            ),
            (
                "huge",
                route_err(|r| {
                    r.rules[0].retry = Some(pb::RetryPolicy {
                        backoff: dur(i64::MAX, 0),
                        ..Default::default()
                    })
                }),
            ),
            (
                "retry code",
                route_err(|r| {
                    r.rules[0].retry = Some(pb::RetryPolicy {
                        codes: vec![65_536 + 503],
                        ..Default::default()
                    })
                }),
            ),
            (
                "mirror without backend",
                route_err(|r| {
                    r.rules[0].filters = vec![pb::RouteFilter {
                        r#type: pb::route_filter::Type::RequestMirror as i32,
                        request_mirror: Some(pb::RequestMirror::default()),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "filter type without its field",
                route_err(|r| {
                    r.rules[0].filters = vec![pb::RouteFilter {
                        r#type: pb::route_filter::Type::UrlRewrite as i32,
                        ..Default::default()
                    }]
                }),
            ),
            (
                "unspecified filter",
                route_err(|r| r.rules[0].filters = vec![pb::RouteFilter::default()]),
            ),
            (
                "unspecified path match",
                route_err(|r| {
                    r.rules[0].matches = vec![pb::RouteMatch {
                        path: Some(pb::PathMatch {
                            r#type: 0,
                            value: "/".into(),
                        }),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "bad regex (validator)",
                route_err(|r| {
                    r.rules[0].matches = vec![pb::RouteMatch {
                        path: Some(pb::PathMatch {
                            r#type: pb::path_match::Type::RegularExpression as i32,
                            value: "(".into(),
                        }),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "backend port",
                route_err(|r| {
                    r.rules[0].backend_refs = vec![pb::BackendRef {
                        name: "b".into(),
                        port: 1 << 20,
                        ..Default::default()
                    }]
                }),
            ),
        ] {
            assert!(!err.is_empty(), "{why}");
        }

        let policy = |m: &dyn Fn(&mut pb::HttpAuthorization)| {
            let mut p = pb::HttpAuthorization {
                name: "p".into(),
                namespace: "ns".into(),
                targets: vec![pb::PolicyTarget {
                    kind: pb::policy_target::Kind::Gateway as i32,
                    name: "wp".into(),
                }],
                action: pb::http_authorization::Action::Allow as i32,
                rules: vec![pb::HttpRule::default()],
            };
            m(&mut p);
            decode_http_policy(&any(HTTP_AUTHORIZATION_TYPE, &p))
        };
        assert!(policy(&|_| {}).is_ok());
        assert!(policy(&|p| p.action = 0).is_err());
        assert!(policy(&|p| p.targets.clear()).is_err());
        assert!(policy(&|p| p.targets[0].kind = 9).is_err());
        assert!(policy(&|p| p.rules[0].from = vec![pb::SourceMatch {
            ip_blocks: vec![pb::IpBlock {
                address: vec![10, 0, 0],
                length: 8
            }],
            ..Default::default()
        }])
        .is_err());
        assert!(policy(&|p| p.rules[0].from = vec![pb::SourceMatch {
            not_ip_blocks: vec![pb::IpBlock {
                address: vec![10, 0, 0, 0],
                length: 33
            }],
            ..Default::default()
        }])
        .is_err());
        assert!(policy(&|p| p.rules[0].to = vec![pb::Operation {
            ports: vec![65_536],
            ..Default::default()
        }])
        .is_err());
        assert!(policy(&|p| p.rules[0].when = vec![pb::Condition {
            key: "request.auth.claims[iss]".into(),
            values: vec!["x".into()],
            ..Default::default()
        }])
        .unwrap_err()
        .contains("not supported"));

        let traffic = |m: &dyn Fn(&mut pb::TrafficPolicy)| {
            let mut p = pb::TrafficPolicy {
                name: "t".into(),
                namespace: "ns".into(),
                target: Some(pb::PolicyTarget {
                    kind: pb::policy_target::Kind::Service as i32,
                    name: "svc".into(),
                }),
                ..Default::default()
            };
            m(&mut p);
            decode_traffic_policy(&any(TRAFFIC_POLICY_TYPE, &p))
        };
        assert!(traffic(&|_| {}).is_ok());
        assert!(traffic(&|p| p.target = None).is_err());
        assert!(traffic(&|p| {
            if let Some(t) = p.target.as_mut() {
                t.kind = pb::policy_target::Kind::Gateway as i32;
            }
        })
        .is_err());
        assert!(
            traffic(&|p| p.outlier_detection = Some(pb::OutlierDetection {
                consecutive_5xx: 3,
                base_ejection_time: None,
                max_ejection_percent: None,
            }))
            .is_err()
        );
        assert!(traffic(&|p| p.rate_limit = Some(pb::LocalRateLimit {
            max_tokens: 1,
            tokens_per_fill: 1,
            fill_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0
            }),
        }))
        .is_err());
    }
}
