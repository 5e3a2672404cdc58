//! The L7 half of the mesh model, consumed by waypoints: Gateway API
//! `HTTPRoute`s, Istio `AuthorizationPolicy`s that target a waypoint or a
//! Service, and Ambit's own `TrafficPolicy` (circuit breaking, outlier
//! ejection, local rate limits).
//!
//! Route rules keep the Gateway API's YAML shape field for field (`matches`,
//! `filters`, `backendRefs`, `timeouts`, `retry`), so a route's `spec.rules`
//! reads straight into [`RouteRule`]; what the control plane adds is resolved
//! parents and backends (namespaces filled in, only Services).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SourceMatch;

/// A Gateway API duration (`1h`, `10s`, `250ms`, `1m30s`; GEP-2257): one to
/// four `<number><unit>` parts, units `h`, `m`, `s`, `ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpDuration(pub Duration);

impl FromStr for HttpDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a Gateway API duration (like 10s, 500ms, 1m30s)");
        let mut rest = s;
        let mut total = Duration::ZERO;
        let mut parts = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 5 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (Duration::from_millis(1), 2)
            } else if rest.starts_with('h') {
                (Duration::from_secs(3600), 1)
            } else if rest.starts_with('m') {
                (Duration::from_secs(60), 1)
            } else if rest.starts_with('s') {
                (Duration::from_secs(1), 1)
            } else {
                return Err(bad());
            };
            rest = &rest[len..];
            total += unit * n as u32;
            parts += 1;
        }
        if parts == 0 || parts > 4 {
            return Err(bad());
        }
        Ok(HttpDuration(total))
    }
}

impl fmt::Display for HttpDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl Serialize for HttpDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HttpDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What an `HTTPRoute` attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    pub kind: ParentKind,
    pub namespace: String,
    pub name: String,
    /// For a Service parent: only this service port (GAMMA); absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum ParentKind {
    /// GAMMA: the route applies to traffic addressed to this Service.
    Service,
    /// The waypoint Gateway: the route applies to all traffic it serves
    /// (matched by `hostnames`).
    Gateway,
}

/// A Gateway API `HTTPRoute`, resolved.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// RFC 3339; the older route wins a precedence tie (Gateway API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    pub parents: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

impl HttpRoute {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Empty means one match of `PathPrefix /`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
    /// Empty (and no redirect filter): requests get 500, as the spec says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

fn root_path() -> String {
    "/".to_string()
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    #[serde(default = "root_path")]
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query-parameter match.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

/// Gateway API's `HTTPRouteFilter`: `type` names which one of the other
/// fields is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 or 302 (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    pub backend_ref: BackendTarget,
    /// Share of requests mirrored, 0–100; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

/// A Service and port requests are sent to.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTarget {
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub port: u16,
}

impl BackendTarget {
    /// `namespace/name` of the Service, the route's namespace filling a gap.
    pub fn service_key(&self, route_namespace: &str) -> String {
        format!(
            "{}/{}",
            self.namespace.as_deref().unwrap_or(route_namespace),
            self.name
        )
    }
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub port: u16,
    /// Relative share of requests; 0 takes none.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Filters applied only to requests sent to this backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
}

impl BackendRef {
    pub fn target(&self) -> BackendTarget {
        BackendTarget {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    /// From the request's arrival to the response's start, retries included;
    /// 504 when exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HttpDuration>,
    /// For each attempt at a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<HttpDuration>,
}

/// Gateway API's `HTTPRouteRetry` (GEP-1731).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Response codes that are retried (connection failures and resets
    /// always are, while attempts remain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Retries after the first try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Wait before each retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<HttpDuration>,
}

/// An Istio `AuthorizationPolicy` evaluated by waypoints (`targetRefs` to
/// the waypoint Gateway or to a Service).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPolicy {
    pub name: String,
    pub namespace: String,
    /// In `namespace`. A Gateway target applies to all traffic the waypoint
    /// serves; a Service target to traffic addressed to that Service; the
    /// GatewayClass [`WAYPOINT_GATEWAY_CLASS`] (from the root namespace) to
    /// every waypoint.
    pub targets: Vec<PolicyTarget>,
    pub action: HttpPolicyAction,
    #[serde(default)]
    pub rules: Vec<HttpRule>,
}

impl HttpPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTarget {
    pub kind: TargetKind,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum TargetKind {
    Gateway,
    /// Every waypoint: only `istio-waypoint`, from the root namespace (Istio).
    GatewayClass,
    Service,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum HttpPolicyAction {
    Allow,
    Deny,
    /// Matches are logged and counted, never enforced.
    Audit,
}

/// The Gateway class of waypoints; as a policy target (from the root
/// namespace) it means every waypoint of the mesh.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

/// Istio's rule: every non-empty list must have a matching entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// Istio's `Operation`. Paths and hosts match exactly, or with one `*` as a
/// prefix, suffix or presence wildcard.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

/// Istio's `Condition`: `key` is one of `request.headers[<name>]`,
/// `source.principal`, `source.namespace`, `source.ip`,
/// `destination.port`, `request.method`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The `when` keys a waypoint evaluates; any other key is refused when the
/// config is validated, so a policy never silently ignores a condition.
pub const CONDITION_KEYS: &[&str] = &[
    "source.principal",
    "source.namespace",
    "source.ip",
    "destination.port",
    "request.method",
];
pub const HEADER_CONDITION_PREFIX: &str = "request.headers[";

/// Ambit's `TrafficPolicy` (CRD `trafficpolicies.ambit.dev`): resilience
/// settings a waypoint applies to requests for its target.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    pub name: String,
    pub namespace: String,
    /// A Service (limits and ejection for its endpoints; rate limit per
    /// route serving it) or an HTTPRoute (rate limit for it), in `namespace`.
    pub target: PolicyTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<LocalRateLimit>,
}

impl TrafficPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Circuit breaking: beyond these, requests fail fast with 503 (flag `UO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Requests in flight to the service at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests waiting for an upstream connection or a request slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Upstream connections (tunnels) open to the service at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// Consecutive-5xx ejection of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub consecutive_5xx: u32,
    /// First ejection; the n-th lasts n times as long.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))
    )]
    pub base_ejection_time: HttpDuration,
    /// At most this share of a service's endpoints is ejected at once (default 50).
    #[cfg_attr(feature = "schema", schemars(range(max = 100)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// A token bucket: `maxTokens` deep, `tokensPerFill` added every
/// `fillInterval`; an empty bucket answers 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRateLimit {
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_tokens: u32,
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub tokens_per_fill: u32,
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))
    )]
    pub fill_interval: HttpDuration,
}

/// Checks what serde cannot: filters carry the field their type names,
/// regexes compile, weights and percentages are in range, `when` keys are
/// ones a waypoint evaluates. Whether referenced Services exist is not
/// checked here: a backend that does not resolve answers 500 at request
/// time, as Gateway API asks.
pub(super) fn check_route(r: &HttpRoute) -> Result<(), String> {
    if r.parents.is_empty() {
        return Err("no parents".into());
    }
    if let Some(p) = r
        .parents
        .iter()
        .find(|p| p.kind == ParentKind::Service && p.namespace != r.namespace)
    {
        // GAMMA consumer routes bind only their own namespace's clients,
        // which a waypoint cannot tell apart yet; applied to everyone they
        // would let any namespace reroute another's Service.
        return Err(format!(
            "parent Service {}/{} is in another namespace: consumer routes are not supported",
            p.namespace, p.name
        ));
    }
    for (i, rule) in r.rules.iter().enumerate() {
        let at = |e: String| format!("rules[{i}]: {e}");
        for m in &rule.matches {
            if let Some(p) = &m.path {
                match p.kind {
                    PathMatchType::RegularExpression => check_regex(&p.value).map_err(at)?,
                    _ if !p.value.starts_with('/') => {
                        return Err(at(format!("path {:?} must start with '/'", p.value)))
                    }
                    _ => {}
                }
            }
            for v in m.headers.iter().chain(&m.query_params) {
                if v.name.is_empty() {
                    return Err(at("a header or query match without a name".into()));
                }
                if v.kind == ValueMatchType::RegularExpression {
                    check_regex(&v.value).map_err(at)?;
                }
            }
            if let Some(method) = &m.method {
                http::Method::from_bytes(method.as_bytes())
                    .map_err(|_| at(format!("method {method:?} is not valid")))?;
            }
        }
        for f in &rule.filters {
            check_filter(f).map_err(at)?;
        }
        let redirects = rule
            .filters
            .iter()
            .any(|f| f.kind == FilterType::RequestRedirect);
        if redirects
            && rule
                .filters
                .iter()
                .any(|f| f.kind == FilterType::UrlRewrite)
        {
            return Err(at(
                "RequestRedirect and URLRewrite cannot be combined".into()
            ));
        }
        for b in &rule.backend_refs {
            if b.name.is_empty() || b.port == 0 {
                return Err(at("a backendRef needs a name and a port".into()));
            }
            if b.weight > 1_000_000 {
                return Err(at(format!("weight {} is above 1000000", b.weight)));
            }
            for f in &b.filters {
                check_filter(f).map_err(at)?;
            }
        }
        if let Some(retry) = &rule.retry {
            if retry.attempts.unwrap_or(0) > 10 {
                return Err(at("retry.attempts above 10".into()));
            }
            for c in &retry.codes {
                if !(400..=599).contains(c) {
                    return Err(at(format!("retry code {c} is not a 4xx or 5xx")));
                }
            }
        }
        if let Some(t) = rule.timeouts {
            if let (Some(req), Some(backend)) = (t.request, t.backend_request) {
                if backend > req {
                    return Err(at("timeouts.backendRequest exceeds timeouts.request".into()));
                }
            }
        }
    }
    Ok(())
}

fn check_filter(f: &RouteFilter) -> Result<(), String> {
    let set = [
        (
            FilterType::RequestHeaderModifier,
            f.request_header_modifier.is_some(),
        ),
        (
            FilterType::ResponseHeaderModifier,
            f.response_header_modifier.is_some(),
        ),
        (FilterType::RequestRedirect, f.request_redirect.is_some()),
        (FilterType::UrlRewrite, f.url_rewrite.is_some()),
        (FilterType::RequestMirror, f.request_mirror.is_some()),
    ];
    for (kind, present) in set {
        if (kind == f.kind) != present {
            return Err(format!(
                "filter of type {:?} must set exactly its own field",
                f.kind
            ));
        }
    }
    for m in [&f.request_header_modifier, &f.response_header_modifier]
        .into_iter()
        .flatten()
    {
        for name in m.set.iter().chain(&m.add).map(|h| &h.name).chain(&m.remove) {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header name {name:?} is not valid"))?;
        }
        for h in m.set.iter().chain(&m.add) {
            http::HeaderValue::from_str(&h.value)
                .map_err(|_| format!("header value {:?} is not valid", h.value))?;
        }
    }
    if let Some(r) = &f.request_redirect {
        if let Some(code) = r.status_code {
            if code != 301 && code != 302 {
                return Err(format!("redirect statusCode {code} is not 301 or 302"));
            }
        }
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                return Err(format!("redirect scheme {s:?} is not http or https"));
            }
        }
        if let Some(p) = &r.path {
            check_path_modifier(p)?;
        }
    }
    if let Some(p) = f.url_rewrite.as_ref().and_then(|r| r.path.as_ref()) {
        check_path_modifier(p)?;
    }
    if let Some(m) = &f.request_mirror {
        if m.percent.is_some_and(|p| p > 100) {
            return Err("mirror percent above 100".into());
        }
    }
    Ok(())
}

fn check_path_modifier(p: &PathModifier) -> Result<(), String> {
    let value = match p.kind {
        PathModifierType::ReplaceFullPath => p.replace_full_path.as_ref(),
        PathModifierType::ReplacePrefixMatch => p.replace_prefix_match.as_ref(),
    };
    match value {
        Some(v) if v.starts_with('/') => Ok(()),
        Some(v) => Err(format!("path {v:?} must start with '/'")),
        None => Err(format!("path modifier {:?} without its value", p.kind)),
    }
}

fn check_regex(re: &str) -> Result<(), String> {
    // Bounded compiled size: a hostile pattern cannot blow up memory.
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .build()
        .map(drop)
        .map_err(|e| format!("regular expression {re:?}: {e}"))
}

pub(super) fn check_policy(p: &HttpPolicy, root_namespace: &str) -> Result<(), String> {
    if p.targets.is_empty() {
        return Err("no targets".into());
    }
    for t in &p.targets {
        let mesh_wide = p.namespace == root_namespace && t.name == WAYPOINT_GATEWAY_CLASS;
        if t.kind == TargetKind::GatewayClass && !mesh_wide {
            return Err(format!(
                "a GatewayClass target must be {WAYPOINT_GATEWAY_CLASS:?} on a policy in the root namespace {root_namespace:?}"
            ));
        }
    }
    for rule in &p.rules {
        for op in &rule.to {
            for m in op.methods.iter().chain(&op.not_methods) {
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("method {m:?} is not valid"))?;
            }
        }
        for c in &rule.when {
            let known = CONDITION_KEYS.contains(&c.key.as_str())
                || (c.key.starts_with(HEADER_CONDITION_PREFIX) && c.key.ends_with(']'));
            if !known {
                return Err(format!("condition key {:?} is not supported", c.key));
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                return Err(format!("condition {:?} has no values", c.key));
            }
        }
    }
    Ok(())
}

pub(super) fn check_traffic_policy(p: &TrafficPolicy) -> Result<(), String> {
    if matches!(
        p.target.kind,
        TargetKind::Gateway | TargetKind::GatewayClass
    ) {
        return Err("target must be a Service or an HTTPRoute".into());
    }
    if let Some(o) = &p.outlier_detection {
        if o.consecutive_5xx == 0 {
            return Err("outlierDetection.consecutive5xx must be at least 1".into());
        }
        if o.max_ejection_percent.is_some_and(|m| m > 100) {
            return Err("outlierDetection.maxEjectionPercent above 100".into());
        }
    }
    if let Some(r) = &p.rate_limit {
        if r.max_tokens == 0 || r.tokens_per_fill == 0 || r.fill_interval.0.is_zero() {
            return Err("rateLimit needs maxTokens, tokensPerFill and fillInterval above 0".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_gep_2257() {
        for (s, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
        ] {
            let d: HttpDuration = s.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms, "{s}");
        }
        for bad in ["", "10", "1.5s", "s", "1d", "123456s", "1h1h1h1h1h", "-1s"] {
            assert!(
                bad.parse::<HttpDuration>().is_err(),
                "{bad} must be refused"
            );
        }
        assert_eq!(
            HttpDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(HttpDuration(Duration::from_secs(3)).to_string(), "3s");
    }

    #[test]
    fn route_rules_read_in_gateway_api_shape() {
        let yaml = r#"
matches:
- path: {type: Exact, value: /a}
  headers: [{name: version, value: v2}]
  queryParams: [{type: RegularExpression, name: q, value: "^x"}]
  method: GET
filters:
- type: RequestHeaderModifier
  requestHeaderModifier: {set: [{name: x, value: "1"}], remove: [y]}
- type: URLRewrite
  urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
backendRefs:
- {name: reviews-v1, port: 9080, weight: 90}
- {name: reviews-v2, port: 9080}
timeouts: {request: 2s, backendRequest: 500ms}
retry: {codes: [503], attempts: 2, backoff: 10ms}
"#;
        let rule: RouteRule = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(
            rule.matches[0].path.as_ref().unwrap().kind,
            PathMatchType::Exact
        );
        assert_eq!(rule.matches[0].headers[0].kind, ValueMatchType::Exact);
        assert_eq!(rule.filters[1].kind, FilterType::UrlRewrite);
        assert_eq!(rule.backend_refs[1].weight, 1);
        assert_eq!(
            rule.timeouts.unwrap().backend_request.unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(rule.retry.as_ref().unwrap().attempts, Some(2));
        let back: RouteRule = serde_yaml::from_str(&serde_yaml::to_string(&rule).unwrap()).unwrap();
        assert_eq!(back.matches, rule.matches);
        assert_eq!(back.filters, rule.filters);
    }
}
