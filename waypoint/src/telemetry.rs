//! The waypoint's request spans: one OpenTelemetry server span per proxied
//! request, with the OTel HTTP attributes and the mesh's labels. The export
//! pipeline and W3C trace context are [`mesh_core::telemetry`]'s.
//!
//! Trace context: an incoming `traceparent` that parses strictly becomes the
//! remote parent of the request span, with its `tracestate`; a malformed one,
//! or more than one, is ignored. A request without one continues the trace of
//! the tunnel it came in (the caller's ztunnel names its connection span on the
//! HBONE CONNECT), so a plain client's request still shows up under its
//! connection. See [`inject`] for what goes upstream.

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use mesh_core::telemetry::context::{extract, inject, TRACEPARENT, TRACESTATE};
pub use mesh_core::telemetry::REQUEST_TARGET;

/// absent value leaves its attribute out.
#[derive(Clone, Debug, Default)]
pub struct SpanAttributes {
    /// The matched route, `namespace/name`: `http.route`, and the span name's suffix.
    pub route: Option<String>,
    /// The destination service's hostname: `destination_service`.
    pub service: Option<String>,
    /// SPIFFE ID of the client (from the tunnel's mTLS): `source_principal`.
    pub source_principal: Option<String>,
    /// SPIFFE ID of the upstream: `destination_principal`.
    pub destination_principal: Option<String>,
}

/// A server span for one proxied request, parented on the request's
/// `traceparent` when it is valid, else on `tunnel` (the trace context of the
/// HBONE CONNECT the request came in), else the root of a new trace (never a
/// child of whatever span is current: each request is its own trace).
///
/// Attributes follow the OTel HTTP server conventions (`http.request.method`,
/// `url.path`, `server.address`, `network.protocol.version`, `http.route`), plus
/// the mesh's labels under Istio's metric label names (`destination_service`,
/// `source_principal`, `destination_principal`) so spans and
/// `istio_requests_total` can be joined. Complete it with [`record_response`].
pub fn request_span(
    parts: &http::request::Parts,
    attrs: &SpanAttributes,
    tunnel: Option<&SpanContext>,
) -> Span {
    let (method, original) = semconv_method(&parts.method);
    // Span names must stay low-cardinality: method and route, never the path.
    let name = match &attrs.route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    let span = tracing::info_span!(
        target: REQUEST_TARGET,
        "request",
        otel.name = name.as_str(),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.request.method_original = original,
        url.path = parts.uri.path(),
        server.address = server_address(parts),
        network.protocol.version = protocol_version(parts.version),
        http.route = attrs.route.as_deref(),
        destination_service = attrs.service.as_deref(),
        source_principal = attrs.source_principal.as_deref(),
        destination_principal = attrs.destination_principal.as_deref(),
        http.response.status_code = Empty,
        error.type = Empty,
    );
    let parent = extract(&parts.headers).or_else(|| tunnel.cloned());
    mesh_core::telemetry::context::set_remote_parent(&span, parent);
    span
}

/// Names the route that matched, once routing has decided: `http.route`, and
/// the span name becomes `METHOD ns/name`.
pub fn record_route(span: &Span, method: &http::Method, route: &str) {
    let (method, _) = semconv_method(method);
    span.record("http.route", route);
    // Once the span has started, tracing-opentelemetry ignores `otel.name`
    // records: rename the OpenTelemetry span itself (a no-op when untraced).
    span.context()
        .span()
        .update_name(format!("{method} {route}"));
}

/// Names the upstream that served the request (`destination_principal`).
pub fn record_destination(span: &Span, principal: &str) {
    span.record("destination_principal", principal);
}

/// Records the response status on a span from [`request_span`]: 5xx marks it as
/// an error (4xx does not: for a server span it is the client's error).
pub fn record_response(span: &Span, status: http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
        span.record("error.type", status.as_str());
    }
}

/// Marks a span from [`request_span`] as failed without a response from upstream
/// (`kind` is a short low-cardinality class, e.g. `timeout`, `connect`).
pub fn record_error(span: &Span, kind: &str) {
    span.record("otel.status_code", "error");
    span.record("error.type", kind);
}

/// OTel semconv: known methods as they are, anything else as `_OTHER` (with the
/// original in `http.request.method_original`), so span names stay bounded.
fn semconv_method(method: &http::Method) -> (&'static str, Option<&str>) {
    // Matched on the string because the request's `&str` is not `'static`.
    let known = match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "PATCH" => "PATCH",
        other => return ("_OTHER", Some(other)),
    };
    (known, None)
}

/// The host the client addressed: the URI's authority (HTTP/2, absolute-form),
/// else the `Host` header, without the port.
fn server_address(parts: &http::request::Parts) -> Option<&str> {
    if let Some(host) = parts.uri.host() {
        return Some(host);
    }
    let host = parts.headers.get(http::header::HOST)?.to_str().ok()?;
    // An IPv6 literal keeps its brackets' content; otherwise strip `:port`.
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next();
    }
    host.split(':').next().filter(|h| !h.is_empty())
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::telemetry::context::parse_traceparent;
    use mesh_core::telemetry::{ExportOptions, MemoryExporter, TelemetryGuard};
    use opentelemetry::trace::SpanId;

    fn traced(ratio: f64) -> (MemoryExporter, tracing::Dispatch, TelemetryGuard) {
        let capture = MemoryExporter::default();
        let (dispatch, guard) = mesh_core::telemetry::dispatch_to(
            capture.clone(),
            "test.svc",
            ratio,
            &ExportOptions::default(),
        )
        .expect("pipeline");
        (capture, dispatch, guard)
    }

    fn request(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method("GET")
            .uri("/api/v1/items?id=7")
            .header("host", "reviews.default.svc.cluster.local:9080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("test request").into_parts().0
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn hostile_headers_never_panic() {
        let long = "a".repeat(64 * 1024);
        let weird = [
            long.as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "------------------------------------------------------------",
            "\t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
        ];
        for tp in weird {
            for ts in ["", "=", ",,,,", "a=b,c", long.as_str(), "k=v=w"] {
                let parts = request(&[("traceparent", tp), ("tracestate", ts)]);
                let _ = extract(&parts.headers);
                let _ = request_span(
                    &parts,
                    &SpanAttributes::default(),
                    extract(&parts.headers).as_ref(),
                );
                let span = request_span(&parts, &SpanAttributes::default(), None);
                let mut headers = parts.headers.clone();
                inject(&span, &mut headers);
            }
        }
        // Non-UTF-8 bytes in the headers.
        let mut parts = request(&[]);
        let bytes = http::HeaderValue::from_bytes(b"00-\xff\xfe").expect("opaque header");
        parts.headers.insert(TRACEPARENT, bytes.clone());
        parts.headers.insert(TRACESTATE, bytes);
        assert!(extract(&parts.headers).is_none());
    }

    #[test]
    fn span_continues_incoming_trace_and_inject_replaces_parent() {
        let (capture, dispatch, guard) = traced(1.0);
        let parts = request(&[("traceparent", PARENT), ("tracestate", "vendor=x")]);
        let attrs = SpanAttributes {
            route: Some("default/reviews".into()),
            service: Some("reviews.default.svc.cluster.local".into()),
            source_principal: Some("spiffe://cluster.local/ns/default/sa/productpage".into()),
            destination_principal: Some("spiffe://cluster.local/ns/default/sa/reviews".into()),
        };
        let mut upstream = parts.headers.clone();
        tracing::dispatcher::with_default(&dispatch, || {
            let span = request_span(&parts, &attrs, None);
            inject(&span, &mut upstream);
            record_response(&span, http::StatusCode::SERVICE_UNAVAILABLE);
        });
        guard.flush().expect("flush");
        let spans = capture.spans();
        assert_eq!(spans.len(), 1, "{spans:?}");
        let s = &spans[0];
        assert_eq!(s.name, "GET default/reviews");
        assert_eq!(s.span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(
            s.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(s.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(matches!(
            s.status,
            opentelemetry::trace::Status::Error { .. }
        ));
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(attr("url.path").as_deref(), Some("/api/v1/items"));
        assert_eq!(
            attr("server.address").as_deref(),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(attr("http.route").as_deref(), Some("default/reviews"));
        assert_eq!(attr("http.response.status_code").as_deref(), Some("503"));
        assert_eq!(attr("error.type").as_deref(), Some("503"));
        assert_eq!(
            attr("source_principal").as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/productpage")
        );
        assert_eq!(attr("http.request.method_original"), None);

        let tp = upstream
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .expect("traceparent injected");
        let (trace, span, flags) = parse_traceparent(tp.as_bytes()).expect("valid traceparent");
        assert_eq!(trace, s.span_context.trace_id());
        assert_eq!(span, s.span_context.span_id());
        assert!(flags.is_sampled());
        assert_eq!(
            upstream.get(TRACESTATE).and_then(|v| v.to_str().ok()),
            Some("vendor=x")
        );
        assert_eq!(guard.stats().exported, 1);
    }

    #[test]
    fn malformed_traceparent_starts_a_new_trace() {
        let (capture, dispatch, guard) = traced(1.0);
        let parts = request(&[
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-zzzz-01"),
            ("tracestate", "vendor=x"),
        ]);
        let mut upstream = parts.headers.clone();
        tracing::dispatcher::with_default(&dispatch, || {
            let span = request_span(&parts, &SpanAttributes::default(), None);
            inject(&span, &mut upstream);
            record_response(&span, http::StatusCode::NOT_FOUND);
        });
        guard.flush().expect("flush");
        let spans = capture.spans();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.name, "GET");
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert_ne!(
            s.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // 4xx is the client's error, not the server span's.
        assert_eq!(s.status, opentelemetry::trace::Status::Unset);
        let tp = upstream.get(TRACEPARENT).expect("new traceparent");
        let (trace, _, _) = parse_traceparent(tp.as_bytes()).expect("valid");
        assert_eq!(trace, s.span_context.trace_id());
        assert!(upstream.get(TRACESTATE).is_none());
    }

    #[test]
    fn unsampled_parent_is_respected_and_still_propagated() {
        let (capture, dispatch, guard) = traced(1.0);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let parts = request(&[("traceparent", unsampled)]);
        let mut upstream = parts.headers.clone();
        tracing::dispatcher::with_default(&dispatch, || {
            let span = request_span(&parts, &SpanAttributes::default(), None);
            inject(&span, &mut upstream);
        });
        guard.flush().expect("flush");
        assert!(capture.spans().is_empty());
        let tp = upstream.get(TRACEPARENT).expect("traceparent");
        let (trace, span, flags) = parse_traceparent(tp.as_bytes()).expect("valid");
        assert_eq!(trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        // Our own (non-recording) span is the upstream's parent.
        assert_ne!(span.to_string(), "00f067aa0ba902b7");
        assert!(!flags.is_sampled());
    }

    const TUNNEL: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn request_without_traceparent_continues_the_tunnel_trace() {
        let (capture, dispatch, guard) = traced(1.0);
        let tunnel = parse_traceparent(TUNNEL.as_bytes())
            .map(|(t, s, f)| SpanContext::new(t, s, f, true, Default::default()));
        let plain = request(&[]);
        let own = request(&[("traceparent", PARENT)]);
        tracing::dispatcher::with_default(&dispatch, || {
            let _a = request_span(&plain, &SpanAttributes::default(), tunnel.as_ref());
            let _b = request_span(&own, &SpanAttributes::default(), tunnel.as_ref());
        });
        guard.flush().expect("flush");
        let spans = capture.spans();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let in_trace = |trace: &str| {
            spans
                .iter()
                .find(|s| s.span_context.trace_id().to_string() == trace)
                .unwrap_or_else(|| panic!("no span in trace {trace}: {spans:?}"))
        };
        // The plain request hangs under the tunnel's span...
        let plain = in_trace("0af7651916cd43dd8448eb211c80319c");
        assert_eq!(plain.parent_span_id.to_string(), "b7ad6b7169203331");
        // ...but the application's own context wins.
        let own = in_trace("4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(own.parent_span_id.to_string(), "00f067aa0ba902b7");
    }
}
