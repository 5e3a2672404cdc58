//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) on HTTP headers:
//! reading a request's `traceparent`/`tracestate` strictly, and writing a
//! span's context for the next hop (an upstream request, or an HBONE CONNECT).

use std::str::FromStr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Makes `remote` (if any) the parent of `span`; without one, `span` is the
/// root of a new trace, never a child of whatever span is current.
pub fn set_remote_parent(span: &Span, remote: Option<SpanContext>) {
    let parent = match remote {
        Some(remote) => Context::new().with_remote_span_context(remote),
        None => Context::new(),
    };
    // Fails only when no OpenTelemetry layer sees this span: nothing to parent then.
    let _ = span.set_parent(parent);
}

/// The `traceparent` (and non-empty `tracestate`) naming `span` as the parent,
/// for a hop that starts here; nothing when the span is not traced.
pub fn context_headers(span: &Span) -> Vec<(HeaderName, HeaderValue)> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    let mut out = Vec::new();
    if let Some(tp) = traceparent_value(&sc) {
        out.push((TRACEPARENT, tp));
        if let Ok(v) = HeaderValue::from_str(&sc.trace_state().header()) {
            if !v.is_empty() {
                out.push((TRACESTATE, v));
            }
        }
    }
    out
}

fn traceparent_value(sc: &SpanContext) -> Option<HeaderValue> {
    if !sc.is_valid() {
        return None;
    }
    let flags = sc.trace_flags() & TraceFlags::SAMPLED;
    let tp = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        flags.to_u8()
    );
    // Lowercase hex and dashes only: always a valid header value.
    HeaderValue::from_str(&tp).ok()
}

/// Writes the span's context into the upstream request headers, which are
/// expected to start as a copy of the incoming ones.
///
/// * The span is traced (even if not sampled): `traceparent` names it as the
///   parent, replacing the incoming one; `tracestate` is passed on (or removed
///   when empty). The sampled flag is the span's own decision.
/// * No OpenTelemetry layer saw the span (no endpoint configured): the proxy is
///   not a tracing participant, and W3C asks it to pass a valid `traceparent`
///   and its `tracestate` on unchanged, so they are left as they are. An invalid
///   `traceparent` is removed, with its `tracestate`, since the spec treats such
///   a request as having no trace context.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if let Some(tp) = traceparent_value(&sc) {
        headers.insert(TRACEPARENT, tp);
        match HeaderValue::from_str(&sc.trace_state().header()) {
            Ok(v) if !v.is_empty() => {
                headers.insert(TRACESTATE, v);
            }
            _ => {
                headers.remove(TRACESTATE);
            }
        }
    } else if headers.contains_key(TRACEPARENT) && extract(headers).is_none() {
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
    }
}

/// The remote span context of a request's `traceparent` (and `tracestate`), if
/// it is exactly one header that parses strictly per W3C Trace Context.
pub fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (trace_id, span_id, flags) = parse_traceparent(value.as_bytes())?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        tracestate(headers),
    ))
}

/// `version-traceid-parentid-flags`, lowercase hex, ids not all zero, version
/// `ff` invalid; a later version may append `-...` fields, which are ignored.
pub fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = value.trim_ascii();
    if value.len() < 55 {
        return None;
    }
    let version = lower_hex(&value[0..2])? as u8;
    let well_formed = version != 0xff
        && value[2] == b'-'
        && value[35] == b'-'
        && value[52] == b'-'
        && if version == 0 {
            value.len() == 55
        } else {
            value.len() == 55 || value[55] == b'-'
        };
    if !well_formed {
        return None;
    }
    let trace_id = lower_hex(&value[3..35])?;
    let span_id = lower_hex(&value[36..52])?;
    let flags = lower_hex(&value[53..55])? as u8;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    // Only the sampled bit has a meaning we act on; others are not passed on.
    let flags = TraceFlags::new(flags) & TraceFlags::SAMPLED;
    Some((TraceId::from(trace_id), SpanId::from(span_id as u64), flags))
}

/// Lowercase hex digits (at most 32) as a number; `None` for anything else.
fn lower_hex(digits: &[u8]) -> Option<u128> {
    if digits.len() > 32 {
        return None;
    }
    digits.iter().try_fold(0u128, |acc, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(d))
    })
}

/// All `tracestate` headers joined (the spec allows splitting it); an invalid
/// list is dropped whole, as the spec asks.
fn tracestate(headers: &HeaderMap) -> TraceState {
    let mut joined = String::new();
    for value in headers.get_all(TRACESTATE) {
        let Ok(s) = value.to_str() else {
            return TraceState::default();
        };
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(s);
    }
    TraceState::from_str(&joined).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method("GET").uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("test request").into_parts().0
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_only_strict_traceparents() {
        let ok = parse_traceparent(PARENT.as_bytes()).expect("valid");
        assert_eq!(ok.0.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ok.1.to_string(), "00f067aa0ba902b7");
        assert!(ok.2.is_sampled());
        // A later version may carry more fields.
        assert!(parse_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
        )
        .is_some());
        for bad in [
            "",
            "00",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-é4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn tracestate_is_joined_and_invalid_lists_dropped() {
        let parts = request(&[
            ("traceparent", PARENT),
            ("tracestate", "a=1,b=2"),
            ("tracestate", "c=3"),
        ]);
        let sc = extract(&parts.headers).expect("valid");
        assert_eq!(sc.trace_state().header(), "a=1,b=2,c=3");
        let parts = request(&[("traceparent", PARENT), ("tracestate", "A=1,b=2")]);
        let sc = extract(&parts.headers).expect("valid");
        assert_eq!(sc.trace_state().header(), "");
        // Two traceparents: no trace context at all.
        let parts = request(&[("traceparent", PARENT), ("traceparent", PARENT)]);
        assert!(extract(&parts.headers).is_none());
    }

    #[test]
    fn without_the_layer_inject_passes_valid_context_through() {
        let parts = request(&[("traceparent", PARENT), ("tracestate", "vendor=x")]);
        // No subscriber at all: the span is disabled.
        let span = tracing::info_span!("request");
        let mut upstream = parts.headers.clone();
        inject(&span, &mut upstream);
        assert_eq!(
            upstream.get(TRACEPARENT).map(|v| v.as_bytes()),
            Some(PARENT.as_bytes())
        );
        assert!(upstream.get(TRACESTATE).is_some());

        let parts = request(&[("traceparent", "bogus"), ("tracestate", "vendor=x")]);
        let mut upstream = parts.headers.clone();
        inject(&span, &mut upstream);
        assert!(upstream.get(TRACEPARENT).is_none());
        assert!(upstream.get(TRACESTATE).is_none());
    }

    #[test]
    fn untraced_span_gives_no_headers() {
        assert!(context_headers(&tracing::info_span!("connection")).is_empty());
    }
}
