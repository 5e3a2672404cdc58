//! Gateway API `HTTPRoute` for the waypoint: which rule a request takes,
//! what its filters do to the request and response, which backend gets it.
//!
//! Pure logic, no IO. [`Router::new`] compiles the routes once per config
//! change (regexes, header names and values, one precedence-sorted list of
//! matches per scope), so [`Router::select`] is a linear scan that neither
//! allocates nor compiles anything.
//!
//! Rules that slipped past config validation broken (a regex that does not
//! compile, a filter without its field) are skipped with a warning; the
//! rest of the route still applies.

mod filters;
mod matching;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use http::request::Parts;
use mesh_core::config::{HttpRoute, ParentKind, RetryPolicy, RouteRule, RouteTimeouts};
use rand::Rng;

use filters::{Filter, Mirror};
use matching::{host_score, is_exact, request_host, CompiledMatch, HostPattern, MatchRank};

/// Routes compiled for one waypoint.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    /// Routes whose parent is this waypoint's Gateway.
    gateway: Scope,
    /// GAMMA routes by their parent Service, `ns/name`.
    services: HashMap<String, ServiceScopes>,
}

#[derive(Debug)]
struct CompiledRoute {
    key: String,
    hostnames: Vec<HostPattern>,
    rules: Vec<CompiledRule>,
}

/// The matches attached to one destination, best first.
#[derive(Debug, Default)]
struct Scope {
    entries: Vec<Entry>,
    /// Whether any route here names hostnames (never for Service parents:
    /// GAMMA says not to infer anything from them).
    by_host: bool,
}

#[derive(Debug, Default)]
struct ServiceScopes {
    /// Routes whose parent names no port.
    any_port: Scope,
    /// Per port named by a parent, with the `any_port` entries merged in.
    by_port: HashMap<u16, Scope>,
}

impl ServiceScopes {
    fn for_port(&self, port: u16) -> &Scope {
        self.by_port.get(&port).unwrap_or(&self.any_port)
    }
}

/// One match of one rule, placed by precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    rank: MatchRank,
    /// Position of the route among all by (age, `ns/name`).
    route_order: u32,
    rule: u32,
    matcher: u32,
    route: u32,
}

/// What [`Router::select`] decided.
#[derive(Debug)]
pub enum Selection<'a> {
    /// No route attaches: forward to the original destination.
    NoRoutes,
    /// Routes attach but none matches: answer 404.
    NoMatch,
    Matched(Matched<'a>),
}

#[derive(Debug)]
pub struct Matched<'a> {
    /// `ns/name` of the route.
    pub route: &'a str,
    /// The rule's position in the route's `rules`, as configured.
    pub rule_index: usize,
    pub rule: &'a CompiledRule,
    /// The path prefix that matched, for ReplacePrefixMatch (an Exact path
    /// counts as its own prefix; None for a regular expression).
    pub matched_prefix: Option<&'a str>,
    /// The destination port the request was addressed to: the "listener
    /// port" a redirect keeps when it changes neither scheme nor port.
    pub port: u16,
}

/// What to do with a request after [`CompiledRule::apply_request`].
#[derive(Debug)]
pub enum RequestAction {
    Forward,
    /// Answer with this (a redirect, complete with the rule's response
    /// header modifiers); do not forward.
    Respond(http::Response<()>),
}

/// A rule ready to serve requests.
#[derive(Debug)]
pub struct CompiledRule {
    index: usize,
    name: Option<String>,
    matches: Vec<CompiledMatch>,
    filters: Vec<Filter>,
    backends: Vec<CompiledBackend>,
    total_weight: u64,
    timeouts: RouteTimeouts,
    retry: Option<RetryPolicy>,
}

/// One `backendRef` of a rule.
#[derive(Debug)]
pub struct CompiledBackend {
    service: String,
    port: u16,
    weight: u32,
    filters: Vec<Filter>,
}

impl CompiledBackend {
    /// `ns/name` of the Service.
    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether this backend has filters of its own (applied by
    /// [`CompiledRule::apply_request`] / [`CompiledRule::apply_response`]).
    pub fn has_filters(&self) -> bool {
        !self.filters.is_empty()
    }
}

impl Router {
    /// `waypoint` is the (namespace, name) of the Gateway this proxy serves.
    /// Routes whose parent is that Gateway apply to every destination,
    /// selected by `hostnames` against the request's host; routes whose
    /// parent is a Service apply to requests addressed to it (on `port`
    /// when the parent names one) and, when any attaches, the Gateway's
    /// routes are not considered for that destination.
    pub fn new(routes: &[HttpRoute], waypoint: (&str, &str)) -> Router {
        struct Attached<'r> {
            route: &'r HttpRoute,
            on_gateway: bool,
            services: Vec<(String, Option<u16>)>,
        }
        let attached: Vec<Attached<'_>> = routes
            .iter()
            .filter_map(|route| {
                let on_gateway = route.parents.iter().any(|p| {
                    p.kind == ParentKind::Gateway
                        && p.namespace == waypoint.0
                        && p.name == waypoint.1
                });
                let services: Vec<_> = route
                    .parents
                    .iter()
                    .filter(|p| p.kind == ParentKind::Service)
                    .map(|p| (format!("{}/{}", p.namespace, p.name), p.port))
                    .collect();
                (on_gateway || !services.is_empty()).then_some(Attached {
                    route,
                    on_gateway,
                    services,
                })
            })
            .collect();

        // Ties across routes go to the oldest, then to `ns/name` order; a
        // route without a (readable) timestamp counts as the newest.
        let mut order: Vec<(Option<Timestamp>, String, usize)> = attached
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let key = a.route.key();
                let age = a.route.creation_timestamp.as_deref().and_then(|t| {
                    let parsed = parse_timestamp(t);
                    if parsed.is_none() {
                        tracing::warn!(route = %key, timestamp = t, "unreadable creationTimestamp: route ranks as newest");
                    }
                    parsed
                });
                (age, key, i)
            })
            .collect();
        order.sort_by(|a, b| {
            let age = |x: &Option<Timestamp>| (x.is_none(), *x);
            age(&a.0).cmp(&age(&b.0)).then_with(|| a.1.cmp(&b.1))
        });
        let mut route_order = vec![0u32; attached.len()];
        for (pos, (_, _, i)) in order.iter().enumerate() {
            route_order[*i] = pos as u32;
        }

        let mut router = Router::default();
        for (i, a) in attached.iter().enumerate() {
            let route = CompiledRoute::compile(a.route);
            let idx = router.routes.len() as u32;
            let order = route_order[i];
            let entries: Vec<Entry> = route
                .rules
                .iter()
                .enumerate()
                .flat_map(|(r, rule)| {
                    rule.matches
                        .iter()
                        .enumerate()
                        .map(move |(m, matcher)| Entry {
                            rank: matcher.rank(),
                            route_order: order,
                            rule: r as u32,
                            matcher: m as u32,
                            route: idx,
                        })
                })
                .collect();
            if a.on_gateway {
                router.gateway.entries.extend_from_slice(&entries);
                router.gateway.by_host |= !route.hostnames.is_empty();
            }
            for (service, port) in &a.services {
                let scopes = router.services.entry(service.clone()).or_default();
                let scope = match port {
                    None => &mut scopes.any_port,
                    Some(p) => scopes.by_port.entry(*p).or_default(),
                };
                scope.entries.extend_from_slice(&entries);
            }
            router.routes.push(route);
        }
        router.gateway.entries.sort_unstable();
        for scopes in router.services.values_mut() {
            let any = &scopes.any_port.entries;
            for scope in scopes.by_port.values_mut() {
                scope.entries.extend_from_slice(any);
                scope.entries.sort_unstable();
                // A route naming the service twice (no port and this port).
                scope.entries.dedup();
            }
            scopes.any_port.entries.sort_unstable();
            scopes.any_port.entries.dedup();
        }
        router
    }

    /// Whether any route may apply to `service` (`ns/name`) on `port`;
    /// when not, the proxy can forward to the original destination without
    /// looking at requests. Gateway routes count for every destination,
    /// whatever their hostnames, so [`Router::select`] may still answer
    /// [`Selection::NoRoutes`].
    pub fn has_routes(&self, service: &str, port: u16) -> bool {
        !self.gateway.entries.is_empty()
            || self
                .services
                .get(service)
                .is_some_and(|s| !s.for_port(port).entries.is_empty())
    }

    /// The rule for a request addressed to `service` (`ns/name`; None for
    /// a bare workload) on `port`.
    ///
    /// Gateway routes whose hostnames do not cover the request's host do
    /// not attach to it: with none left the answer is
    /// [`Selection::NoRoutes`] rather than a 404, so a route for one host
    /// cannot black-hole the rest of the waypoint's traffic.
    pub fn select(&self, service: Option<&str>, port: u16, req: &Parts) -> Selection<'_> {
        let scope = service
            .and_then(|s| self.services.get(s))
            .map(|s| s.for_port(port))
            .filter(|s| !s.entries.is_empty())
            .unwrap_or(&self.gateway);
        if scope.entries.is_empty() {
            return Selection::NoRoutes;
        }
        let host = if scope.by_host {
            request_host(req)
        } else {
            None
        };
        let mut attached = false;
        let mut best: Option<(matching::HostScore, &Entry)> = None;
        for entry in &scope.entries {
            let route = &self.routes[entry.route as usize];
            // The spec ranks hostname specificity above every match
            // criterion, so with hostnames in play the scan goes on past a
            // first hit, for a route naming the host more precisely.
            let score = if scope.by_host {
                match host_score(&route.hostnames, host) {
                    Some(s) => s,
                    None => continue,
                }
            } else {
                matching::HostScore::default()
            };
            attached = true;
            if best.is_some_and(|(b, _)| score <= b) {
                continue;
            }
            let matcher = &route.rules[entry.rule as usize].matches[entry.matcher as usize];
            if matcher.matches(req) {
                best = Some((score, entry));
                if !scope.by_host || is_exact(score) {
                    break;
                }
            }
        }
        match best {
            Some((_, entry)) => {
                let route = &self.routes[entry.route as usize];
                let rule = &route.rules[entry.rule as usize];
                Selection::Matched(Matched {
                    route: &route.key,
                    rule_index: rule.index,
                    rule,
                    matched_prefix: rule.matches[entry.matcher as usize].path.prefix(),
                    port,
                })
            }
            None if attached => Selection::NoMatch,
            None => Selection::NoRoutes,
        }
    }
}

impl CompiledRoute {
    fn compile(route: &HttpRoute) -> CompiledRoute {
        let key = route.key();
        let rules = route
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| match CompiledRule::compile(i, rule, &route.namespace) {
                Ok(rule) => Some(rule),
                Err(e) => {
                    tracing::warn!(route = %key, rule = i, error = %e, "skipping a broken route rule");
                    None
                }
            })
            .collect();
        CompiledRoute {
            hostnames: route
                .hostnames
                .iter()
                .map(|h| HostPattern::parse(h))
                .collect(),
            key,
            rules,
        }
    }
}

impl CompiledRule {
    fn compile(index: usize, rule: &RouteRule, ns: &str) -> Result<CompiledRule, String> {
        let matches = if rule.matches.is_empty() {
            vec![CompiledMatch::any()]
        } else {
            rule.matches
                .iter()
                .map(CompiledMatch::compile)
                .collect::<Result<_, _>>()?
        };
        let filters = rule
            .filters
            .iter()
            .map(|f| Filter::compile(f, ns))
            .collect::<Result<_, _>>()?;
        let backends: Vec<CompiledBackend> = rule
            .backend_refs
            .iter()
            .map(|b| {
                Ok(CompiledBackend {
                    service: b.target().service_key(ns),
                    port: b.port,
                    weight: b.weight,
                    filters: b
                        .filters
                        .iter()
                        .map(|f| Filter::compile(f, ns))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(CompiledRule {
            index,
            name: rule.name.clone(),
            matches,
            filters,
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            timeouts: rule.timeouts.unwrap_or_default(),
            retry: rule.retry.clone(),
        })
    }

    /// The rule's `name`, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn backends(&self) -> &[CompiledBackend] {
        &self.backends
    }

    pub fn timeouts(&self) -> RouteTimeouts {
        self.timeouts
    }

    pub fn retry(&self) -> Option<&RetryPolicy> {
        self.retry.as_ref()
    }

    /// A backend drawn by weight; weight 0 is never drawn. None when no
    /// backend has weight (the caller answers 500, unless
    /// [`CompiledRule::apply_request`] redirects).
    pub fn pick_backend(&self) -> Option<&CompiledBackend> {
        match self.total_weight {
            0 => None,
            _ if self.backends.len() == 1 => self.backends.first(),
            total => self.backend_at(rand::rng().random_range(0..total)),
        }
    }

    /// The backend owning `roll` in `0..total_weight`.
    fn backend_at(&self, mut roll: u64) -> Option<&CompiledBackend> {
        for b in &self.backends {
            let w = u64::from(b.weight);
            if roll < w {
                return Some(b);
            }
            roll -= w;
        }
        None
    }

    fn all_filters<'s>(
        &'s self,
        backend: Option<&'s CompiledBackend>,
    ) -> impl Iterator<Item = &'s Filter> {
        self.filters
            .iter()
            .chain(backend.into_iter().flat_map(|b| b.filters.iter()))
    }

    /// Applies the rule's filters, then `backend`'s, in order: header
    /// modifiers and URL rewrites change `parts`; the first redirect ends it
    /// with [`RequestAction::Respond`]. Call it before giving up on a rule
    /// without backends: a redirect rule needs none.
    pub fn apply_request(
        &self,
        m: &Matched<'_>,
        backend: Option<&CompiledBackend>,
        parts: &mut Parts,
    ) -> RequestAction {
        for filter in self.all_filters(backend) {
            match filter {
                Filter::RequestHeaders(ops) => ops.apply(&mut parts.headers),
                Filter::Rewrite(rw) => rw.apply(m.matched_prefix, parts),
                Filter::Redirect(r) => {
                    let mut resp = r.respond(parts, m.matched_prefix, m.port);
                    // Envoy applies a route's response headers to its
                    // redirects too; so do we.
                    let (mut head, body) = resp.into_parts();
                    self.apply_response(backend, &mut head);
                    resp = http::Response::from_parts(head, body);
                    return RequestAction::Respond(resp);
                }
                Filter::ResponseHeaders(_) | Filter::Mirror(_) => {}
            }
        }
        RequestAction::Forward
    }

    /// Applies the rule's response header modifiers, then `backend`'s.
    pub fn apply_response(
        &self,
        backend: Option<&CompiledBackend>,
        parts: &mut http::response::Parts,
    ) {
        for filter in self.all_filters(backend) {
            if let Filter::ResponseHeaders(ops) = filter {
                ops.apply(&mut parts.headers);
            }
        }
    }

    /// Where to mirror this request (`ns/name`, port), each mirror sampled
    /// at its percent. Empty (and unallocated) for rules without mirrors.
    pub fn mirrors(&self) -> Vec<(String, u16)> {
        let mut out = Vec::new();
        for filter in &self.filters {
            if let Filter::Mirror(Mirror {
                service,
                port,
                percent,
            }) = filter
            {
                if *percent >= 100 || (*percent > 0 && rand::rng().random_range(0..100) < *percent)
                {
                    out.push((service.clone(), *port));
                }
            }
        }
        out
    }
}

/// Seconds since the epoch, nanoseconds.
type Timestamp = (i64, u32);

/// An RFC 3339 timestamp as an instant, so routes order by age whatever
/// offset or precision their stamps carry.
fn parse_timestamp(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        b.get(from..from + len)?.iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let sep = |at: usize, set: &[u8]| b.get(at).is_some_and(|c| set.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, min, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac.bytes().take(digits.min(9)).enumerate() {
            nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let at = s.len() - 5;
            let minutes = num(at, 2)? * 60 + num(at + 3, 2)?;
            if *sign == b'-' {
                -minutes * 60
            } else {
                minutes * 60
            }
        }
        _ => return None,
    };
    // Days from 1970-01-01 to the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + min * 60 + sec - offset, nanos))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn timestamps_order_by_instant() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_timestamp("2024-03-01T12:00:00Z"),
            Some((1_709_294_400, 0))
        );
        assert_eq!(
            parse_timestamp("2024-03-01T13:00:00.5+01:00"),
            Some((1_709_294_400, 500_000_000))
        );
        assert_eq!(parse_timestamp("2024-03-01"), None);
        assert_eq!(parse_timestamp("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_timestamp("2024-03-01T00:00:00"), None);
    }
}
