//! L7 authorization: Istio's `AuthorizationPolicy` evaluated on HTTP requests.
//!
//! Evaluation order (Istio): a matching DENY policy denies; otherwise, if any
//! ALLOW policy applies, one of them must match; with none, the request is
//! allowed. AUDIT policies never change the decision, they are only reported.
//! A policy with no rules matches nothing; one empty rule matches everything.
//!
//! Which policies apply is [`applicable`]'s business; [`authorize`] only
//! evaluates the ones it is given.
//!
//! # Paths
//!
//! Policies match the normalized path ([`normalize_path`]): percent-escapes
//! of unreserved characters decoded, other escapes upper-cased, `.` and `..`
//! segments resolved and repeated slashes merged (Istio's `MERGE_SLASHES`
//! normalization, a step above its `BASE` default, since `//admin` getting
//! past a DENY on `/admin*` is a known bypass). Paths that cannot be
//! normalized without guessing what the backend will make of them (an escaped
//! `/` or `\`, a raw `\`, a control character, a bad escape, not starting
//! with `/`) are refused: with an ALLOW or DENY policy applicable such a
//! request is denied with [`PATH_REJECTED`]. The request path should call
//! `normalize_path` itself, answer 400 on an error and forward the
//! normalized path, so that the backend serves exactly what was authorized
//! (Envoy's `normalize_path` rewrites the forwarded path the same way).

use std::borrow::Cow;
use std::net::IpAddr;

use http::{HeaderMap, Method};
use mesh_core::authz::{negative, pattern_matches, positive, source_matches, ConnectionAttributes};
use mesh_core::config::{
    Cidr, Condition, HttpPolicy, HttpPolicyAction, HttpRule, Operation, TargetKind,
    HEADER_CONDITION_PREFIX, WAYPOINT_GATEWAY_CLASS,
};
use mesh_core::Identity;

#[cfg(test)]
mod tests;

/// The `policy` of a denial for a path [`normalize_path`] refuses. Not a
/// policy key: Kubernetes names cannot hold parentheses.
pub const PATH_REJECTED: &str = "(path not normalizable)";

/// What a policy can see of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttributes<'a> {
    /// The authenticated peer; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
    pub method: &'a Method,
    /// Without the query string; normalized here if it is not already.
    pub path: &'a str,
    /// `Host` or `:authority`, with or without a port.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7Decision {
    Allow {
        /// Keys of the AUDIT policies that matched.
        audited: Vec<String>,
    },
    Deny {
        /// Key of the DENY policy that matched; `""` when ALLOW policies
        /// apply and none matched; [`PATH_REJECTED`] for a path that cannot
        /// be normalized.
        policy: String,
        audited: Vec<String>,
    },
}

impl L7Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, L7Decision::Allow { .. })
    }

    pub fn audited(&self) -> &[String] {
        match self {
            L7Decision::Allow { audited } | L7Decision::Deny { audited, .. } => audited,
        }
    }
}

/// The policies that apply to a request served by the waypoint `(namespace,
/// name)` for `service` (`ns/name`, `None` for a workload addressed
/// directly), matched by the HTTPRoute `route` (`ns/name`), in their given
/// order. A policy applies when one of its targets, which name objects in the
/// policy's own namespace (Istio), is:
/// * `Gateway` naming this waypoint;
/// * `GatewayClass` `istio-waypoint` on a policy in the root namespace:
///   every waypoint;
/// * `Service` naming `service`;
/// * `HTTPRoute` naming `route`.
///
/// Nothing else in the root namespace is special: Istio ignores `selector`
/// policies on waypoints, and targets never reach across namespaces.
pub fn applicable<'a>(
    policies: &'a [HttpPolicy],
    root_namespace: &str,
    waypoint: (&str, &str),
    service: Option<&str>,
    route: Option<&str>,
) -> Vec<&'a HttpPolicy> {
    let names = |key: Option<&str>, namespace: &str, name: &str| {
        key.and_then(|k| k.split_once('/'))
            .is_some_and(|(ns, n)| ns == namespace && n == name)
    };
    policies
        .iter()
        .filter(|p| {
            p.targets.iter().any(|t| match t.kind {
                TargetKind::Gateway => p.namespace == waypoint.0 && t.name == waypoint.1,
                TargetKind::GatewayClass => {
                    p.namespace == root_namespace && t.name == WAYPOINT_GATEWAY_CLASS
                }
                TargetKind::Service => names(service, &p.namespace, &t.name),
                TargetKind::HttpRoute => names(route, &p.namespace, &t.name),
            })
        })
        .collect()
}

pub fn authorize(policies: &[&HttpPolicy], attrs: &RequestAttributes<'_>) -> L7Decision {
    let req = Request::new(attrs);
    let enforcing = policies.iter().any(|p| p.action != HttpPolicyAction::Audit);
    let mut audited = Vec::new();
    let mut denied_by = None;
    let mut allow_applies = false;
    let mut allowed = false;
    for p in policies {
        let matched = p.rules.iter().any(|r| req.rule_matches(r, p.action));
        match p.action {
            HttpPolicyAction::Deny => {
                if matched && denied_by.is_none() {
                    denied_by = Some(p.key());
                }
            }
            HttpPolicyAction::Allow => {
                allow_applies = true;
                allowed |= matched;
            }
            HttpPolicyAction::Audit => {
                if matched {
                    audited.push(p.key());
                }
            }
        }
    }
    if enforcing && req.path.is_none() {
        return L7Decision::Deny {
            policy: PATH_REJECTED.to_string(),
            audited,
        };
    }
    match denied_by {
        Some(policy) => L7Decision::Deny { policy, audited },
        None if allow_applies && !allowed => L7Decision::Deny {
            policy: String::new(),
            audited,
        },
        None => L7Decision::Allow { audited },
    }
}

/// Why [`normalize_path`] refused a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has a '%' not followed by two hex digits")]
    BadEscape,
    #[error("the path has an escaped '/' or '\\' (%2F, %5C)")]
    EscapedSeparator,
    #[error("the path has a '\\', '#' or control character")]
    ForbiddenCharacter,
}

/// The path policies are matched against (see the module docs): borrowed
/// when already normalized, which is the common case.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path
        .bytes()
        .any(|b| b.is_ascii_control() || b == b'\\' || b == b'#')
    {
        return Err(PathError::ForbiddenCharacter);
    }
    let has_dot_segment = path.split('/').skip(1).any(|s| s == "." || s == "..");
    if !path.contains('%') && !path.contains("//") && !has_dot_segment {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    // Empty segments (repeated slashes) and `.` vanish; `..` drops the
    // previous segment and stops at the root (RFC 3986, 5.2.4).
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split('/').skip(1) {
        trailing_slash = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if segments.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy the run up to the next escape as a str slice, which keeps
            // multi-byte characters whole.
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
            return Err(PathError::BadEscape);
        };
        let c = (hi * 16 + lo) as u8;
        if c == b'/' || c == b'\\' {
            return Err(PathError::EscapedSeparator);
        }
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push('%');
            out.push_str(&format!("{c:02X}"));
        }
        i += 3;
    }
    Ok(out)
}

/// A request's attributes in the forms matching needs, computed once.
struct Request<'a> {
    attrs: &'a RequestAttributes<'a>,
    conn: ConnectionAttributes<'a>,
    principal: Option<String>,
    /// `None`: the path cannot be normalized.
    path: Option<Cow<'a, str>>,
    host: &'a str,
}

impl<'a> Request<'a> {
    fn new(attrs: &'a RequestAttributes<'a>) -> Self {
        Request {
            attrs,
            conn: ConnectionAttributes {
                source: attrs.source,
                source_ip: attrs.source_ip,
                destination_port: attrs.destination_port,
            },
            principal: attrs.source.map(Identity::principal),
            path: normalize_path(attrs.path).ok(),
            host: strip_port(attrs.host),
        }
    }

    /// Istio: at least one source, at least one operation and every
    /// condition. `action` decides which way a clause that cannot be
    /// evaluated falls: towards matching for DENY and AUDIT, towards not
    /// matching for ALLOW, so that neither widens access.
    fn rule_matches(&self, rule: &HttpRule, action: HttpPolicyAction) -> bool {
        let fail_closed = action != HttpPolicyAction::Allow;
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, &self.conn)))
            && (rule.to.is_empty() || rule.to.iter().any(|op| self.operation_matches(op)))
            && rule
                .when
                .iter()
                .all(|c| self.condition_matches(c, fail_closed))
    }

    fn operation_matches(&self, op: &Operation) -> bool {
        let method = Some(self.attrs.method.as_str());
        let port = self.attrs.destination_port;
        positive(&op.methods, method)
            && negative(&op.not_methods, method)
            && (op.ports.is_empty() || op.ports.contains(&port))
            && !op.not_ports.contains(&port)
            && self.paths_match(&op.paths, &op.not_paths)
            && (op.hosts.is_empty() || op.hosts.iter().any(|h| self.host_matches(h)))
            && !op.not_hosts.iter().any(|h| self.host_matches(h))
    }

    fn paths_match(&self, paths: &[String], not_paths: &[String]) -> bool {
        if paths.is_empty() && not_paths.is_empty() {
            return true;
        }
        // A path that cannot be normalized matches neither list: the
        // request is denied before this matters whenever ALLOW or DENY
        // policies apply.
        let Some(path) = self.path.as_deref() else {
            return false;
        };
        (paths.is_empty() || paths.iter().any(|p| path_matches(p, path)))
            && !not_paths.iter().any(|p| path_matches(p, path))
    }

    /// Case-insensitive (Istio). A pattern is tried on the host without its
    /// port and on the authority as sent, so `example.com:8080` can still be
    /// named.
    fn host_matches(&self, pattern: &str) -> bool {
        wildcard_matches_ignore_case(pattern, self.host)
            || (self.host.len() != self.attrs.host.len()
                && wildcard_matches_ignore_case(pattern, self.attrs.host))
    }

    fn condition_matches(&self, c: &Condition, fail_closed: bool) -> bool {
        let key = c.key.as_str();
        condition_holds(c, fail_closed, |value| match key {
            "request.method" => Some(pattern_matches(value, self.attrs.method.as_str())),
            _ => match key
                .strip_prefix(HEADER_CONDITION_PREFIX)
                .and_then(|k| k.strip_suffix(']'))
            {
                Some(name) => Some(
                    header_value(self.attrs.headers, name)
                        .is_some_and(|h| pattern_matches(value, &h)),
                ),
                None => l4_condition(key, value, &self.conn, self.principal.as_deref()),
            },
        })
    }
}

/// `values`: one must match; `notValues`: none may. An entry that cannot be
/// evaluated (`eval` gives `None`: a key or value validation should have
/// refused) counts as `fail_closed`.
fn condition_holds(c: &Condition, fail_closed: bool, eval: impl Fn(&str) -> Option<bool>) -> bool {
    let values = c.values.is_empty() || {
        let results: Vec<Option<bool>> = c.values.iter().map(|v| eval(v)).collect();
        results.contains(&Some(true)) || (fail_closed && results.contains(&None))
    };
    let not_values = c.not_values.is_empty() || {
        let results: Vec<Option<bool>> = c.not_values.iter().map(|v| eval(v)).collect();
        !results.contains(&Some(true)) && (fail_closed || !results.contains(&None))
    };
    values && not_values
}

/// A connection-level condition; `None` for anything else.
fn l4_condition(
    key: &str,
    value: &str,
    conn: &ConnectionAttributes<'_>,
    principal: Option<&str>,
) -> Option<bool> {
    match key {
        "source.principal" => Some(principal.is_some_and(|p| pattern_matches(value, p))),
        "source.namespace" => Some(
            conn.source
                .is_some_and(|id| pattern_matches(value, id.namespace())),
        ),
        "source.ip" => value
            .parse::<Cidr>()
            .ok()
            .map(|c| c.contains(conn.source_ip)),
        "destination.port" => value
            .parse::<u16>()
            .ok()
            .map(|p| p == conn.destination_port),
        _ => None,
    }
}

fn is_http_condition(key: &str) -> bool {
    key == "request.method" || key.starts_with(HEADER_CONDITION_PREFIX)
}

fn has_http_fields(op: &Operation) -> bool {
    [
        &op.methods,
        &op.not_methods,
        &op.paths,
        &op.not_paths,
        &op.hosts,
        &op.not_hosts,
    ]
    .iter()
    .any(|l| !l.is_empty())
}

/// The same policies applied to traffic that is not HTTP (passed through
/// as a byte stream), as Istio applies them to TCP: a rule using an
/// HTTP-only field (methods, paths, hosts, `request.*` conditions) matches
/// nothing in an ALLOW policy, and in a DENY policy applies on its other
/// fields alone; either way no access is gained by speaking something
/// other than HTTP. `true` when the connection is allowed.
pub fn authorize_tcp(
    policies: &[&HttpPolicy],
    source: Option<&Identity>,
    source_ip: IpAddr,
    destination_port: u16,
) -> bool {
    let conn = ConnectionAttributes {
        source,
        source_ip,
        destination_port,
    };
    let principal = source.map(Identity::principal);
    let mut allow_applies = false;
    let mut allowed = false;
    for p in policies {
        let fail_closed = p.action != HttpPolicyAction::Allow;
        let matched = p.rules.iter().any(|rule| {
            let http = rule.to.iter().any(has_http_fields)
                || rule.when.iter().any(|c| is_http_condition(&c.key));
            if http && !fail_closed {
                return false;
            }
            (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, &conn)))
                && (rule.to.is_empty()
                    || rule.to.iter().any(|op| {
                        (op.ports.is_empty() || op.ports.contains(&destination_port))
                            && !op.not_ports.contains(&destination_port)
                    }))
                && rule.when.iter().all(|c| {
                    is_http_condition(&c.key)
                        || condition_holds(c, fail_closed, |v| {
                            l4_condition(&c.key, v, &conn, principal.as_deref())
                        })
                })
        });
        match p.action {
            HttpPolicyAction::Deny if matched => return false,
            HttpPolicyAction::Allow => {
                allow_applies = true;
                allowed |= matched;
            }
            _ => {}
        }
    }
    !allow_applies || allowed
}

/// All values of a header joined with `,`, as Envoy presents a repeated
/// header to its matchers; `None` when absent.
fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes());
    for v in values {
        let s = joined.to_mut();
        s.push(',');
        s.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(joined)
}

/// `host[:port]` or `[v6][:port]` → the host part.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Istio's exact / `prefix*` / `*suffix` / `*`, ignoring ASCII case.
fn wildcard_matches_ignore_case(pattern: &str, value: &str) -> bool {
    let (p, v) = (pattern.as_bytes(), value.as_bytes());
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = p.strip_suffix(b"*") {
        return v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix);
    }
    if let Some(suffix) = p.strip_prefix(b"*") {
        return v.len() >= suffix.len() && v[v.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
    }
    p.eq_ignore_ascii_case(v)
}

/// Istio path matching: exact, `prefix*`, `*suffix`, `*`, or a path
/// template whose segments may be `{*}` (exactly one non-empty segment) or,
/// last, `{**}` (whatever remains, zero or more segments). A pattern using
/// braces any other way is matched as a plain string.
fn path_matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains("{*}") && !pattern.contains("{**}") {
        return pattern_matches(pattern, path);
    }
    let segments: Vec<&str> = pattern.split('/').collect();
    let template = segments.iter().enumerate().all(|(i, s)| {
        !s.contains(['{', '}']) || *s == "{*}" || (*s == "{**}" && i + 1 == segments.len())
    });
    if !template {
        return pattern_matches(pattern, path);
    }
    let mut rest = path;
    for (i, seg) in segments.iter().enumerate() {
        if i > 0 {
            match rest.strip_prefix('/') {
                Some(r) => rest = r,
                // `/a/{**}` also covers `/a`.
                None if *seg == "{**}" && rest.is_empty() => return true,
                None => return false,
            }
        }
        let end = rest.find('/').unwrap_or(rest.len());
        match *seg {
            "{**}" => return true,
            "{*}" if end == 0 => return false,
            "{*}" => {}
            literal if &rest[..end] != literal => return false,
            _ => {}
        }
        rest = &rest[end..];
    }
    rest.is_empty()
}
