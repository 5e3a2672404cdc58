//! The compiled form of `HTTPRouteMatch` and of route hostnames, evaluated
//! against a request without allocating (except where noted).

use std::borrow::Cow;
use std::cmp::Reverse;

use http::header::COOKIE;
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method};
use mesh_core::config::{PathMatchType, RouteMatch, ValueMatch, ValueMatchType};
use regex::bytes::Regex;

/// Same bound as config validation: a hostile pattern cannot blow up memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles `pattern` to match whole inputs only. The Gateway API leaves the
/// dialect to the implementation; Envoy (and so Istio) full-matches, and so
/// do we, so manifests behave the same on both.
pub(crate) fn full_match_regex(pattern: &str) -> Result<Regex, String> {
    let build = |p: &str| {
        regex::bytes::RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("regular expression {pattern:?}: {e}"))
    };
    // The pattern must stand on its own first: wrapped unchecked, `a)|(b`
    // would compile into a different, valid, expression.
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

#[derive(Debug)]
pub(crate) enum PathMatcher {
    Exact(String),
    Prefix {
        /// As configured, handed to ReplacePrefixMatch.
        value: String,
        /// Without trailing '/', so `/` is empty: what element-wise
        /// matching compares and what precedence counts.
        trimmed: String,
    },
    Regex {
        re: Regex,
        pattern_len: usize,
    },
}

impl PathMatcher {
    fn root() -> PathMatcher {
        PathMatcher::Prefix {
            value: "/".into(),
            trimmed: String::new(),
        }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(v) => path == v,
            PathMatcher::Prefix { trimmed, .. } => prefix_matches(trimmed, path),
            PathMatcher::Regex { re, .. } => re.is_match(path.as_bytes()),
        }
    }

    /// What ReplacePrefixMatch replaces. An Exact path is its own prefix;
    /// a regular expression has none (the rewrite is then skipped).
    pub(crate) fn prefix(&self) -> Option<&str> {
        match self {
            PathMatcher::Exact(v) => Some(v),
            PathMatcher::Prefix { value, .. } => Some(value),
            PathMatcher::Regex { .. } => None,
        }
    }

    /// Exact, then PathPrefix (longest first), then RegularExpression
    /// (longest pattern first). The spec leaves regex precedence to the
    /// implementation; this is Istio's order, so existing manifests route
    /// the same here.
    fn rank(&self) -> (u8, Reverse<usize>) {
        match self {
            PathMatcher::Exact(v) => (0, Reverse(v.len())),
            PathMatcher::Prefix { trimmed, .. } => (1, Reverse(trimmed.len())),
            PathMatcher::Regex { pattern_len, .. } => (2, Reverse(*pattern_len)),
        }
    }
}

/// Element-wise: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, never
/// `/foobar`. `trimmed` has no trailing '/'.
pub(crate) fn prefix_matches(trimmed: &str, path: &str) -> bool {
    match path.as_bytes().strip_prefix(trimmed.as_bytes()) {
        Some(rest) => rest.is_empty() || rest[0] == b'/',
        None => false,
    }
}

#[derive(Debug)]
pub(crate) enum ValueMatcher {
    Exact(Box<[u8]>),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(v: &ValueMatch) -> Result<ValueMatcher, String> {
        Ok(match v.kind {
            ValueMatchType::Exact => ValueMatcher::Exact(v.value.as_bytes().into()),
            ValueMatchType::RegularExpression => ValueMatcher::Regex(full_match_regex(&v.value)?),
        })
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(v) => **v == *value,
            ValueMatcher::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    value: ValueMatcher,
}

impl HeaderMatcher {
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut all = headers.get_all(&self.name).iter();
        let Some(first) = all.next() else {
            return false;
        };
        if all.next().is_none() {
            return self.value.matches(first.as_bytes());
        }
        // A repeated header is matched as its combined value (RFC 9110
        // §5.3), as the Gateway API suggests; HTTP/2 may split `cookie`,
        // whose separator is "; " (RFC 9113 §8.2.3). Rare, so the join may
        // allocate.
        let sep: &[u8] = if self.name == COOKIE { b"; " } else { b"," };
        let values = headers.get_all(&self.name);
        match &self.value {
            ValueMatcher::Exact(want) => joined_eq(values.iter().map(|v| v.as_bytes()), sep, want),
            ValueMatcher::Regex(re) => {
                let mut joined = Vec::new();
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        joined.extend_from_slice(sep);
                    }
                    joined.extend_from_slice(v.as_bytes());
                }
                re.is_match(&joined)
            }
        }
    }
}

/// Whether the parts joined by `sep` equal `want`, without joining them.
fn joined_eq<'a>(parts: impl Iterator<Item = &'a [u8]>, sep: &[u8], want: &[u8]) -> bool {
    let mut rest = want;
    for (i, part) in parts.enumerate() {
        if i > 0 {
            match rest.strip_prefix(sep) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        match rest.strip_prefix(part) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

#[derive(Debug)]
struct QueryMatcher {
    name: String,
    value: ValueMatcher,
}

impl QueryMatcher {
    fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else {
            return false;
        };
        // The spec recommends the first occurrence of a repeated parameter.
        let Some(raw) = query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(name, _)| decoded_eq(name, self.name.as_bytes()))
            .map(|(_, value)| value)
        else {
            return false;
        };
        match &self.value {
            ValueMatcher::Exact(want) => decoded_eq(raw, want),
            ValueMatcher::Regex(re) => re.is_match(&percent_decode(raw)),
        }
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The bytes of `s` with `%XX` escapes decoded (a malformed escape stays
/// literal), so `a%20b` matches the configured value `a b`.
fn decoded(s: &str) -> impl Iterator<Item = u8> + '_ {
    let b = s.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let c = *b.get(i)?;
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                i += 3;
                return Some(h << 4 | l);
            }
        }
        i += 1;
        Some(c)
    })
}

fn decoded_eq(s: &str, want: &[u8]) -> bool {
    if !s.contains('%') {
        return s.as_bytes() == want;
    }
    decoded(s).eq(want.iter().copied())
}

fn percent_decode(s: &str) -> Cow<'_, [u8]> {
    if s.contains('%') {
        Cow::Owned(decoded(s).collect())
    } else {
        Cow::Borrowed(s.as_bytes())
    }
}

/// One `HTTPRouteMatch`: every condition must hold.
#[derive(Debug)]
pub(crate) struct CompiledMatch {
    pub(crate) path: PathMatcher,
    method: Option<Method>,
    headers: Vec<HeaderMatcher>,
    query: Vec<QueryMatcher>,
}

/// Precedence among matches, smaller first: path kind and length, a
/// method, more headers, more query parameters.
pub(crate) type MatchRank = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>);

impl CompiledMatch {
    /// What a rule without `matches` gets: PathPrefix `/`.
    pub(crate) fn any() -> CompiledMatch {
        CompiledMatch {
            path: PathMatcher::root(),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    pub(crate) fn compile(m: &RouteMatch) -> Result<CompiledMatch, String> {
        let path = match &m.path {
            None => PathMatcher::root(),
            Some(p) => match p.kind {
                PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
                PathMatchType::PathPrefix => {
                    if !p.value.starts_with('/') {
                        return Err(format!("path {:?} must start with '/'", p.value));
                    }
                    PathMatcher::Prefix {
                        value: p.value.clone(),
                        trimmed: p.value.trim_end_matches('/').to_owned(),
                    }
                }
                PathMatchType::RegularExpression => PathMatcher::Regex {
                    re: full_match_regex(&p.value)?,
                    pattern_len: p.value.len(),
                },
            },
        };
        let method = match &m.method {
            None => None,
            Some(s) => Some(
                Method::from_bytes(s.as_bytes())
                    .map_err(|_| format!("method {s:?} is not valid"))?,
            ),
        };
        let mut headers: Vec<HeaderMatcher> = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("header name {:?} is not valid", h.name))?;
            // Only the first entry for a name counts (spec); names compare
            // case-insensitively, which HeaderName's lowercasing gives.
            if headers.iter().any(|x| x.name == name) {
                continue;
            }
            headers.push(HeaderMatcher {
                name,
                value: ValueMatcher::compile(h)?,
            });
        }
        let mut query: Vec<QueryMatcher> = Vec::with_capacity(m.query_params.len());
        for q in &m.query_params {
            if q.name.is_empty() {
                return Err("a query parameter match without a name".into());
            }
            if query.iter().any(|x| x.name == q.name) {
                continue;
            }
            query.push(QueryMatcher {
                name: q.name.clone(),
                value: ValueMatcher::compile(q)?,
            });
        }
        Ok(CompiledMatch {
            path,
            method,
            headers,
            query,
        })
    }

    pub(crate) fn rank(&self) -> MatchRank {
        let (kind, len) = self.path.rank();
        (
            kind,
            len,
            self.method.is_none(),
            Reverse(self.headers.len()),
            Reverse(self.query.len()),
        )
    }

    /// Cheapest and most selective conditions first.
    pub(crate) fn matches(&self, req: &Parts) -> bool {
        self.path.matches(req.uri.path())
            && self.method.as_ref().is_none_or(|m| *m == req.method)
            && self.headers.iter().all(|h| h.matches(&req.headers))
            && self.query.iter().all(|q| q.matches(req.uri.query()))
    }
}

/// A route hostname: `foo.example.com` or `*.example.com` (any non-empty
/// label sequence before `.example.com`). Stored lowercase.
#[derive(Debug)]
pub(crate) enum HostPattern {
    Exact(String),
    /// The suffix with its leading dot: `.example.com`; empty for `*`.
    Wildcard(String),
}

/// How specifically a route's hostnames match a request (spec: characters
/// in a matching non-wildcard hostname, then in a matching hostname); a
/// route without hostnames scores lowest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HostScore {
    exact: usize,
    any: usize,
}

impl HostPattern {
    pub(crate) fn parse(h: &str) -> HostPattern {
        let h = h.to_ascii_lowercase();
        match h.strip_prefix('*') {
            Some(suffix) if suffix.is_empty() || suffix.starts_with('.') => {
                HostPattern::Wildcard(suffix.to_owned())
            }
            _ => HostPattern::Exact(h),
        }
    }

    fn score(&self, host: &str) -> Option<HostScore> {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host).then_some(HostScore {
                exact: h.len(),
                any: h.len(),
            }),
            HostPattern::Wildcard(suffix) => {
                let (hb, sb) = (host.as_bytes(), suffix.as_bytes());
                (hb.len() > sb.len() && hb[hb.len() - sb.len()..].eq_ignore_ascii_case(sb))
                    .then_some(HostScore {
                        exact: 0,
                        // As written, `*.` included.
                        any: sb.len() + 1,
                    })
            }
        }
    }
}

/// The best score among `patterns` for `host`; None when none match (an
/// empty list matches every host, at the lowest score).
pub(crate) fn host_score(patterns: &[HostPattern], host: Option<&str>) -> Option<HostScore> {
    if patterns.is_empty() {
        return Some(HostScore::default());
    }
    let host = host?;
    patterns.iter().filter_map(|p| p.score(host)).max()
}

/// Whether no other hostname can score higher for this host.
pub(crate) fn is_exact(score: HostScore) -> bool {
    score.exact > 0
}

/// The request's host without port or trailing dot: `:authority` (HTTP/2,
/// absolute-form HTTP/1) wins over `Host`, as RFC 9112 §3.2.2 asks.
pub(crate) fn request_host(req: &Parts) -> Option<&str> {
    let raw = match req.uri.authority() {
        Some(a) => a.as_str(),
        None => req.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if raw.starts_with('[') {
        // An IPv6 literal keeps its brackets, loses its port.
        &raw[..raw.find(']').map_or(raw.len(), |i| i + 1)]
    } else {
        raw.split_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}
