//! The compiled form of `HTTPRouteFilter`s: header modifiers, URL rewrite,
//! redirect, mirror.

use std::borrow::Cow;
use std::str::FromStr;

use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use mesh_core::config::{
    FilterType, HeaderModifier, PathModifier, PathModifierType, RequestRedirect, RouteFilter,
    UrlRewrite,
};

use super::matching::{prefix_matches, request_host};

#[derive(Debug)]
pub(crate) enum Filter {
    RequestHeaders(HeaderOps),
    ResponseHeaders(HeaderOps),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

impl Filter {
    /// `route_ns` fills a mirror target's missing namespace.
    pub(crate) fn compile(f: &RouteFilter, route_ns: &str) -> Result<Filter, String> {
        let missing = || format!("filter {:?} without its field", f.kind);
        Ok(match f.kind {
            FilterType::RequestHeaderModifier => Filter::RequestHeaders(HeaderOps::compile(
                f.request_header_modifier.as_ref().ok_or_else(missing)?,
            )?),
            FilterType::ResponseHeaderModifier => Filter::ResponseHeaders(HeaderOps::compile(
                f.response_header_modifier.as_ref().ok_or_else(missing)?,
            )?),
            FilterType::RequestRedirect => Filter::Redirect(Redirect::compile(
                f.request_redirect.as_ref().ok_or_else(missing)?,
            )?),
            FilterType::UrlRewrite => Filter::Rewrite(Rewrite::compile(
                f.url_rewrite.as_ref().ok_or_else(missing)?,
            )?),
            FilterType::RequestMirror => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                Filter::Mirror(Mirror {
                    service: m.backend_ref.service_key(route_ns),
                    port: m.backend_ref.port,
                    percent: m.percent.unwrap_or(100).min(100),
                })
            }
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    Ok((
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not valid"))?,
        HeaderValue::from_str(value).map_err(|_| format!("header value {value:?} is not valid"))?,
    ))
}

impl HeaderOps {
    fn compile(m: &HeaderModifier) -> Result<HeaderOps, String> {
        Ok(HeaderOps {
            set: m
                .set
                .iter()
                .map(|h| header(&h.name, &h.value))
                .collect::<Result<_, _>>()?,
            add: m
                .add
                .iter()
                .map(|h| header(&h.name, &h.value))
                .collect::<Result<_, _>>()?,
            remove: m
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| format!("header name {n:?} is not valid"))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Removal first, as Envoy does, so a (spec-invalid) remove+add of one
    /// name still ends with the added value. HeaderName and HeaderValue
    /// clones share their bytes.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[derive(Debug)]
pub(crate) enum PathRewrite {
    Full(String),
    Prefix(String),
}

impl PathRewrite {
    fn compile(p: &PathModifier) -> Result<PathRewrite, String> {
        let (value, rewrite): (_, fn(String) -> PathRewrite) = match p.kind {
            PathModifierType::ReplaceFullPath => (&p.replace_full_path, PathRewrite::Full),
            PathModifierType::ReplacePrefixMatch => (&p.replace_prefix_match, PathRewrite::Prefix),
        };
        let value = value
            .as_ref()
            .ok_or_else(|| format!("path modifier {:?} without its value", p.kind))?;
        // Checked now so a rewrite can never produce an invalid URI later.
        if !value.is_empty() && (!value.starts_with('/') || PathAndQuery::from_str(value).is_err())
        {
            return Err(format!("path {value:?} is not a valid absolute path"));
        }
        if value.contains(['?', '#']) {
            return Err(format!("path {value:?} must not carry a query or fragment"));
        }
        Ok(rewrite(value.clone()))
    }

    /// The new path, or None when a prefix replacement has no prefix to
    /// replace (the rule matched by regular expression).
    pub(crate) fn apply<'p>(&'p self, path: &'p str, prefix: Option<&str>) -> Option<Cow<'p, str>> {
        match self {
            PathRewrite::Full(p) => Some(Cow::Borrowed(p)),
            PathRewrite::Prefix(with) => replace_prefix(path, prefix?, with).map(Cow::Owned),
        }
    }
}

/// ReplacePrefixMatch on path elements, trailing '/' of the prefix and of
/// the replacement ignored (the table in the Gateway API's
/// `HTTPPathModifier` docs): `/foo/bar` with `/foo` → `/xyz` gives
/// `/xyz/bar`, with `/foo` → `/` gives `/bar`, never `//bar`.
pub(crate) fn replace_prefix(path: &str, prefix: &str, with: &str) -> Option<String> {
    let prefix = prefix.trim_end_matches('/');
    if !prefix_matches(prefix, path) {
        return None;
    }
    let mut rest = &path[prefix.len()..];
    if prefix.is_empty() && rest == "/" {
        // The root has no elements: `/` under prefix `/` → `/xyz` is `/xyz`.
        rest = "";
    }
    let with = with.trim_end_matches('/');
    let mut out = String::with_capacity(with.len() + rest.len() + 1);
    out.push_str(with);
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

#[derive(Debug)]
pub(crate) struct Rewrite {
    hostname: Option<(HeaderValue, Authority)>,
    path: Option<PathRewrite>,
}

impl Rewrite {
    fn compile(r: &UrlRewrite) -> Result<Rewrite, String> {
        let hostname = match &r.hostname {
            None => None,
            Some(h) => Some((
                HeaderValue::from_str(h).map_err(|_| format!("hostname {h:?} is not valid"))?,
                Authority::from_str(h).map_err(|_| format!("hostname {h:?} is not valid"))?,
            )),
        };
        Ok(Rewrite {
            hostname,
            path: r.path.as_ref().map(PathRewrite::compile).transpose()?,
        })
    }

    pub(crate) fn apply(&self, prefix: Option<&str>, req: &mut http::request::Parts) {
        let new_path = self.path.as_ref().and_then(|p| {
            let new = p.apply(req.uri.path(), prefix);
            if new.is_none() {
                tracing::debug!(
                    path = req.uri.path(),
                    "ReplacePrefixMatch without a matched prefix: path kept"
                );
            }
            new.map(Cow::into_owned)
        });
        let authority = self.hostname.as_ref().map(|(value, authority)| {
            // HTTP/1 carries the host in Host; HTTP/2 in :authority, where
            // a Host header is only a duplicate worth keeping in step.
            if req.uri.authority().is_none() || req.headers.contains_key(http::header::HOST) {
                req.headers.insert(http::header::HOST, value.clone());
            }
            authority
        });
        let authority = authority.filter(|_| req.uri.authority().is_some());
        if new_path.is_none() && authority.is_none() {
            return;
        }
        let mut parts = req.uri.clone().into_parts();
        if let Some(a) = authority {
            parts.authority = Some(a.clone());
        }
        if let Some(path) = new_path {
            let pq = match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            match PathAndQuery::try_from(pq) {
                Ok(pq) => parts.path_and_query = Some(pq),
                Err(e) => {
                    tracing::warn!(error = %e, "rewritten path is not valid: path kept");
                }
            }
        }
        match Uri::from_parts(parts) {
            Ok(uri) => req.uri = uri,
            Err(e) => tracing::warn!(error = %e, "rewritten URI is not valid: URI kept"),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Redirect {
    scheme: Option<&'static str>,
    hostname: Option<String>,
    path: Option<PathRewrite>,
    port: Option<u16>,
    status: StatusCode,
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl Redirect {
    fn compile(r: &RequestRedirect) -> Result<Redirect, String> {
        let scheme = match r.scheme.as_deref() {
            None => None,
            Some(s) if s.eq_ignore_ascii_case("http") => Some("http"),
            Some(s) if s.eq_ignore_ascii_case("https") => Some("https"),
            Some(s) => return Err(format!("redirect scheme {s:?} is not http or https")),
        };
        let status = match r.status_code {
            None => StatusCode::FOUND,
            Some(c @ (301 | 302 | 303 | 307 | 308)) => {
                StatusCode::from_u16(c).map_err(|e| e.to_string())?
            }
            Some(c) => return Err(format!("redirect statusCode {c} is not a redirect")),
        };
        if let Some(h) = &r.hostname {
            if Authority::from_str(h).is_err() || h.contains([':', '@']) {
                return Err(format!("redirect hostname {h:?} is not valid"));
            }
        }
        Ok(Redirect {
            scheme,
            hostname: r.hostname.clone(),
            path: r.path.as_ref().map(PathRewrite::compile).transpose()?,
            port: r.port,
            status,
        })
    }

    /// The redirect response for `req`, which arrived on destination port
    /// `listener_port` (what the spec calls the listener port).
    pub(crate) fn respond(
        &self,
        req: &http::request::Parts,
        prefix: Option<&str>,
        listener_port: u16,
    ) -> http::Response<()> {
        let scheme = self
            .scheme
            .or_else(|| req.uri.scheme_str())
            .unwrap_or("http");
        // Unset port: the scheme's well-known one when the scheme is set,
        // else the port the request came in on.
        let port = self.port.unwrap_or_else(|| {
            self.scheme
                .and_then(well_known_port)
                .unwrap_or(listener_port)
        });
        let host = self.hostname.as_deref().or_else(|| request_host(req));
        let path = match &self.path {
            None => Cow::Borrowed(req.uri.path()),
            Some(p) => p.apply(req.uri.path(), prefix).unwrap_or_else(|| {
                tracing::debug!(
                    path = req.uri.path(),
                    "ReplacePrefixMatch without a matched prefix: path kept"
                );
                Cow::Borrowed(req.uri.path())
            }),
        };
        let mut location = String::with_capacity(64 + path.len());
        if let Some(host) = host {
            location.push_str(scheme);
            location.push_str("://");
            location.push_str(host);
            if well_known_port(scheme) != Some(port) {
                location.push(':');
                location.push_str(&port.to_string());
            }
        }
        // Without any host a relative reference is still a valid Location
        // (RFC 9110 §10.2.2).
        location.push_str(&path);
        if let Some(q) = req.uri.query() {
            location.push('?');
            location.push_str(q);
        }
        match HeaderValue::try_from(location) {
            Ok(location) => {
                let mut resp = http::Response::new(());
                *resp.status_mut() = self.status;
                resp.headers_mut().insert(http::header::LOCATION, location);
                resp
            }
            Err(e) => {
                tracing::warn!(error = %e, "redirect Location is not a valid header value");
                let mut resp = http::Response::new(());
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                resp
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Mirror {
    pub(crate) service: String,
    pub(crate) port: u16,
    /// 0–100.
    pub(crate) percent: u32,
}
