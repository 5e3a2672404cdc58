//! ztunnel's spans: one per HBONE tunnel, on both ends.
//!
//! The source ztunnel opens a client span when it tunnels a connection and
//! names it in the CONNECT's `traceparent`; the ztunnel (or waypoint) that
//! takes the tunnel continues that trace. A connection through a waypoint thus
//! reads, in one trace: the source's `outbound` span, the waypoint's request
//! span, and the destination's `inbound` span. ztunnel never parses what the
//! tunnel carries, so an application's own trace context is not seen here; the
//! waypoint, which does see it, prefers it.
//!
//! Spans exist only when an OTLP endpoint is set: otherwise the span is
//! disabled at creation, which costs one filter check per connection.

use std::fmt::Display;

use mesh_core::telemetry::context::set_remote_parent;
use mesh_core::telemetry::CONNECTION_TARGET;
use opentelemetry::trace::SpanContext;
use tracing::field::Empty;
use tracing::Span;

use crate::proxy::record::{flags, ConnectionRecord};

/// The span of a tunnel this ztunnel opens for a local workload.
pub fn outbound_span() -> Span {
    let span = connection_span("outbound", "client");
    // A new trace per connection, never a child of what is current.
    set_remote_parent(&span, None);
    span
}

/// The span of a tunnel this ztunnel takes, under `parent` (the CONNECT's
/// trace context) when the peer sent one.
pub fn inbound_span(parent: Option<SpanContext>) -> Span {
    let span = connection_span("inbound", "server");
    set_remote_parent(&span, parent);
    span
}

fn connection_span(name: &'static str, kind: &'static str) -> Span {
    tracing::info_span!(
        target: CONNECTION_TARGET,
        "connection",
        otel.name = name,
        otel.kind = kind,
        otel.status_code = Empty,
        source_principal = Empty,
        destination_principal = Empty,
        destination_service = Empty,
        source_workload = Empty,
        destination_workload = Empty,
        source.address = Empty,
        destination.address = Empty,
        network.peer.address = Empty,
        connection_security_policy = Empty,
        response_flags = Empty,
        bytes_sent = Empty,
        bytes_received = Empty,
        error.type = Empty,
    )
}

/// Completes `record`'s span with who talked to whom and how it ended. The
/// labels are the access log's and `istio_tcp_*`'s, so the three can be joined.
pub fn finish(
    record: &ConnectionRecord,
    to_dst: u64,
    to_src: u64,
    response_flags: &str,
    error: Option<&dyn Display>,
) {
    let span = &record.span;
    if span.is_disabled() {
        return;
    }
    if let Some(id) = &record.src_identity {
        span.record("source_principal", tracing::field::display(id));
    }
    if let Some(id) = &record.dst_identity {
        span.record("destination_principal", tracing::field::display(id));
    }
    if let Some(s) = &record.dst_service {
        span.record("destination_service", s.hostname.as_str());
    }
    if let Some(w) = &record.src_workload {
        span.record("source_workload", w.workload.name.as_str());
    }
    if let Some(w) = &record.dst_workload {
        span.record("destination_workload", w.workload.name.as_str());
    }
    span.record(
        "source.address",
        tracing::field::display(record.src_addr.ip()),
    );
    span.record(
        "destination.address",
        tracing::field::display(record.dst_addr),
    );
    if let Some(via) = &record.via {
        span.record("network.peer.address", tracing::field::display(via));
    }
    span.record(
        "connection_security_policy",
        tracing::field::debug(record.security),
    );
    span.record("response_flags", response_flags);
    span.record("bytes_sent", to_dst);
    span.record("bytes_received", to_src);
    if response_flags != flags::NONE || error.is_some() {
        span.record("otel.status_code", "error");
        span.record("error.type", response_flags);
    }
}
