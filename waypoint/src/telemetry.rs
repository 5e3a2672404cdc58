//! OpenTelemetry spans over OTLP/gRPC and W3C trace context for proxied requests.
//!
//! Spans are ordinary `tracing` spans; `tracing-opentelemetry` turns them into
//! OpenTelemetry spans and a batch processor hands them to the OTLP exporter on
//! its own thread, so the request path only ever does an atomic increment and a
//! `try_send`. Nothing here is specific to the waypoint (ztunnel may reuse it):
//! request attributes come in as plain strings.
//!
//! What an unreachable collector costs a request: nothing. Finished spans wait
//! in a bounded queue ([`ExportOptions::max_queue_size`]); when it is full, new
//! spans are dropped and counted ([`ExportStats::dropped`]) instead of waiting.
//! Each export attempt (retries included) gives up after
//! [`ExportOptions::export_timeout`], and dropping the [`TelemetryGuard`] waits
//! at most [`ExportOptions::flush_timeout`].
//!
//! Trace context (<https://www.w3.org/TR/trace-context/>): an incoming
//! `traceparent` that parses strictly becomes the remote parent of the request
//! span, with its `tracestate`; a malformed one, or more than one, is ignored and
//! the request starts a new trace. Sampling is parent-based: an upstream
//! decision (the sampled flag) is kept, and only new traces are sampled with the
//! configured ratio. See [`inject`] for what goes upstream.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The `tracing` target of request spans, for filters (`RUST_LOG=ambit::request=off`
/// silences them in the logs; they are still exported).
pub const REQUEST_TARGET: &str = "ambit::request";

/// The instrumentation scope reported with every span.
const SCOPE: &str = "ambit";

/// What to trace and where to send it.
#[derive(Clone, Debug)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC endpoint, `http://host:4317`. `None`: logs only,
    /// no spans are exported (trace context is still passed on, see [`inject`]).
    pub otlp_endpoint: Option<String>,
    /// The fraction of new traces that are sampled, 0.0..=1.0. Requests that
    /// arrive with a `traceparent` follow its sampled flag instead.
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans, e.g. `waypoint.demo`.
    pub service_name: String,
    /// Which log lines [`init`] prints (`tracing` EnvFilter syntax); empty:
    /// `RUST_LOG`, else `info`. Spans are exported whatever it says.
    pub log_filter: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "ambit".into(),
            log_filter: String::new(),
        }
    }
}

/// Bounds of the export pipeline. The defaults suit a proxy; tests shrink them.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Finished spans waiting for export; beyond this, spans are dropped.
    pub max_queue_size: usize,
    /// Spans per OTLP request; a full batch is exported without waiting for the delay.
    pub max_batch_size: usize,
    /// How long a partial batch waits before it is exported.
    pub batch_delay: Duration,
    /// The most one export (all its retries) may take before its spans are given up.
    pub export_timeout: Duration,
    /// The most dropping the [`TelemetryGuard`] waits for the last export.
    pub flush_timeout: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            // The OTel SDK defaults, except a shorter delay (spans show up in a
            // second, which the demo wants; still one request a second when idle)
            // and a shorter export timeout (10 s would hold the queue full for long).
            max_queue_size: 2048,
            max_batch_size: 512,
            batch_delay: Duration::from_secs(1),
            export_timeout: Duration::from_secs(3),
            flush_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of the export pipeline since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Sampled spans that finished and entered the queue.
    pub queued: u64,
    /// Sampled spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans whose export failed (collector unreachable, timed out or refused).
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    /// Spans in the queue or in the batch being assembled: the gate for `dropped`.
    pending: AtomicUsize,
    queued: AtomicU64,
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

/// Keeps the export pipeline alive; dropping it flushes what is queued and stops
/// the exporter, blocking the dropping thread for at most
/// [`ExportOptions::flush_timeout`] (drop it after the proxy's runtime is done,
/// or accept that one worker waits that long). Spans ended after the drop are
/// discarded.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    pipeline: Option<Pipeline>,
    /// Flushes batched log lines when dropped (after the spans).
    logs: Option<mesh_core::log_writer::LogFlusher>,
}

struct Pipeline {
    provider: SdkTracerProvider,
    counters: Arc<Counters>,
    flush_timeout: Duration,
    /// Drives the gRPC channel. Our own so that export works whatever runtime
    /// (or none) the caller has, and a blocking flush can never starve it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl TelemetryGuard {
    /// Whether spans are being exported at all.
    pub fn exporting(&self) -> bool {
        self.pipeline.is_some()
    }

    pub fn stats(&self) -> ExportStats {
        match &self.pipeline {
            Some(p) => ExportStats {
                queued: p.counters.queued.load(Ordering::Relaxed),
                dropped: p.counters.dropped.load(Ordering::Relaxed),
                exported: p.counters.exported.load(Ordering::Relaxed),
                failed: p.counters.failed.load(Ordering::Relaxed),
            },
            None => ExportStats::default(),
        }
    }

    /// Exports what is queued now. Blocks the calling thread (up to 5 s, the
    /// SDK's bound): from async code, call it through `spawn_blocking`.
    pub fn flush(&self) -> anyhow::Result<()> {
        if let Some(p) = &self.pipeline {
            p.provider.force_flush().context("flushing spans")?;
        }
        Ok(())
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(mut p) = self.pipeline.take() else {
            return;
        };
        if let Err(e) = p.provider.shutdown_with_timeout(p.flush_timeout) {
            eprintln!("telemetry: flushing spans at shutdown: {e}");
        }
        if let Some(rt) = p.runtime.take() {
            // Never blocks, so the guard may be dropped inside async code too.
            rt.shutdown_background();
        }
    }
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.exporting())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Installs the global subscriber: log lines on stderr (filtered by
/// [`TracingConfig::log_filter`]) and, when an endpoint is set, the
/// OpenTelemetry layer (INFO spans and up, whatever the log filter says: the
/// two filters are separate).
pub fn init(config: &TracingConfig) -> anyhow::Result<TelemetryGuard> {
    let spec = match config.log_filter.as_str() {
        "" => std::env::var("RUST_LOG")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "info".into()),
        s => s.to_owned(),
    };
    // Request spans are for the trace exporter only: the access line carries
    // what a log needs, and a span the log layer wants would be built (and
    // its fields formatted) for every request even with tracing off.
    let filter = EnvFilter::try_new(&spec)
        .with_context(|| format!("log filter {spec:?}"))?
        .add_directive(format!("{REQUEST_TARGET}=off").parse()?);
    let (otel, mut guard) = layer(config, &ExportOptions::default())?;
    // Batched: one write per 50 ms instead of one per access line.
    let (writer, flusher) = mesh_core::log_writer::BatchedStderr::start();
    guard.logs = Some(flusher);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_filter(filter),
        )
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(guard)
}

/// The OpenTelemetry layer alone (`None` when no endpoint is configured), for a
/// caller that builds its own subscriber. The layer carries its own INFO filter:
/// put any log filter on the log layer, not on the whole subscriber, or request
/// spans disabled by the log level would never be traced.
#[allow(clippy::type_complexity)]
pub fn layer<S>(
    config: &TracingConfig,
    options: &ExportOptions,
) -> anyhow::Result<(Option<Box<dyn Layer<S> + Send + Sync>>, TelemetryGuard)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok((
            None,
            TelemetryGuard {
                pipeline: None,
                logs: None,
            },
        ));
    };
    let ratio = check_ratio(config.sampling_ratio)?;
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("OTLP endpoint {endpoint:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // tonic is built without a TLS stack here; say so instead of failing every export.
        Some("https") => {
            bail!("OTLP endpoint {endpoint:?}: TLS to the collector is not supported, use http://")
        }
        _ => bail!("OTLP endpoint {endpoint:?}: expected http://host:port"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .context("starting the OTLP export runtime")?;
    let exporter = {
        // The channel spawns its connection task on the runtime current at build time.
        let _rt = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(options.export_timeout)
            .build()
            .with_context(|| format!("OTLP exporter for {endpoint}"))?
    };
    let mut p = pipeline(exporter, &config.service_name, ratio, options);
    p.runtime = Some(runtime);
    let layer = otel_layer(&p.provider);
    Ok((
        Some(layer),
        TelemetryGuard {
            pipeline: Some(p),
            logs: None,
        },
    ))
}

/// A subscriber with only the OpenTelemetry layer (no log output), for scoped use
/// with `tracing::dispatcher::with_default`: tests, or a second pipeline beside
/// the global one. Without an endpoint it traces nothing.
pub fn dispatch(
    config: &TracingConfig,
    options: &ExportOptions,
) -> anyhow::Result<(tracing::Dispatch, TelemetryGuard)> {
    let (otel, guard) = layer(config, options)?;
    Ok((tracing_subscriber::registry().with(otel).into(), guard))
}

fn check_ratio(ratio: f64) -> anyhow::Result<f64> {
    if !(0.0..=1.0).contains(&ratio) {
        bail!("sampling ratio {ratio} is not within 0.0..=1.0");
    }
    Ok(ratio)
}

fn pipeline<E>(exporter: E, service_name: &str, ratio: f64, options: &ExportOptions) -> Pipeline
where
    E: SpanExporter + 'static,
{
    let counters = Arc::new(Counters::default());
    let max_queue_size = options.max_queue_size.max(1);
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(max_queue_size)
        .with_max_export_batch_size(options.max_batch_size.clamp(1, max_queue_size))
        .with_scheduled_delay(options.batch_delay)
        .build();
    let exporter = CountingExporter {
        inner: exporter,
        counters: counters.clone(),
        failing: std::sync::atomic::AtomicBool::new(false),
    };
    let processor = BoundedProcessor {
        inner: BatchSpanProcessor::new(exporter, batch),
        counters: counters.clone(),
        max_queue_size,
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    Pipeline {
        provider,
        counters,
        flush_timeout: options.flush_timeout,
        runtime: None,
    }
}

fn otel_layer<S>(provider: &SdkTracerProvider) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SCOPE))
        // Source location, thread and target are noise on request spans, and the
        // busy/idle timings cost two clock reads per poll of the request future.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(LevelFilter::INFO)
        .boxed()
}

/// The batch processor behind a gate that counts what it would drop: the SDK's
/// own processor drops silently (one log line) and exposes no count.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    counters: Arc<Counters>,
    max_queue_size: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        // `pending` is released only when a batch reaches the exporter, after the
        // processor has taken it off its channel, so while the gate admits a span
        // the channel (of the same size) has room for it: the inner processor
        // never drops on its own and `dropped` is exact.
        let admitted = self
            .counters
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue_size).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.counters.queued.fetch_add(1, Ordering::Relaxed);
            self.inner.on_end(span);
        } else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    counters: Arc<Counters>,
    /// Logs only the transitions, so a dead collector costs one warning, not one a second.
    failing: std::sync::atomic::AtomicBool,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.counters.pending.fetch_sub(n, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.counters
                    .exported
                    .fetch_add(n as u64, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("span export recovered");
                }
            }
            Err(e) => {
                self.counters.failed.fetch_add(n as u64, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("span export failed, spans are lost until it recovers: {e}");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// What the proxy knows about a request beyond its headers. All optional: an
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
/// `traceparent` when it is valid; otherwise the root of a new trace (never a
/// child of whatever span is current: each request is its own trace).
///
/// Attributes follow the OTel HTTP server conventions (`http.request.method`,
/// `url.path`, `server.address`, `network.protocol.version`, `http.route`), plus
/// the mesh's labels under Istio's metric label names (`destination_service`,
/// `source_principal`, `destination_principal`) so spans and
/// `istio_requests_total` can be joined. Complete it with [`record_response`].
pub fn request_span(parts: &http::request::Parts, attrs: &SpanAttributes) -> Span {
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
    let parent = match extract(&parts.headers) {
        Some(remote) => Context::new().with_remote_span_context(remote),
        None => Context::new(),
    };
    // Fails only when no OpenTelemetry layer sees this span: nothing to parent then.
    let _ = span.set_parent(parent);
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
    if sc.is_valid() {
        let flags = sc.trace_flags() & TraceFlags::SAMPLED;
        let tp = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            flags.to_u8()
        );
        // Lowercase hex and dashes only: always a valid header value.
        if let Ok(v) = HeaderValue::from_str(&tp) {
            headers.insert(TRACEPARENT, v);
        }
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
fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
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
    use std::sync::Mutex;

    /// Keeps exported spans in memory.
    #[derive(Clone, Debug, Default)]
    struct Capture(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Capture {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(mut spans) = self.0.lock() {
                spans.extend(batch);
            }
            Ok(())
        }
    }

    impl Capture {
        fn spans(&self) -> Vec<SpanData> {
            self.0.lock().map(|s| s.clone()).unwrap_or_default()
        }
    }

    fn traced(ratio: f64) -> (Capture, tracing::Dispatch, TelemetryGuard) {
        let capture = Capture::default();
        let p = pipeline(
            capture.clone(),
            "test.svc",
            ratio,
            &ExportOptions::default(),
        );
        let dispatch = tracing_subscriber::registry()
            .with(otel_layer(&p.provider))
            .into();
        (
            capture,
            dispatch,
            TelemetryGuard {
                pipeline: Some(p),
                logs: None,
            },
        )
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
                let span = request_span(&parts, &SpanAttributes::default());
                let mut headers = parts.headers.clone();
                inject(&span, &mut headers);
            }
        }
        // Non-UTF-8 bytes in the headers.
        let mut parts = request(&[]);
        let bytes = HeaderValue::from_bytes(b"00-\xff\xfe").expect("opaque header");
        parts.headers.insert(TRACEPARENT, bytes.clone());
        parts.headers.insert(TRACESTATE, bytes);
        assert!(extract(&parts.headers).is_none());
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
            let span = request_span(&parts, &attrs);
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
            let span = request_span(&parts, &SpanAttributes::default());
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
            let span = request_span(&parts, &SpanAttributes::default());
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

    #[test]
    fn zero_ratio_samples_no_new_trace() {
        let (capture, dispatch, guard) = traced(0.0);
        let parts = request(&[]);
        tracing::dispatcher::with_default(&dispatch, || {
            for _ in 0..10 {
                let _span = request_span(&parts, &SpanAttributes::default());
            }
        });
        guard.flush().expect("flush");
        assert!(capture.spans().is_empty());
        assert_eq!(guard.stats().queued, 0);
    }

    #[test]
    fn without_the_layer_inject_passes_valid_context_through() {
        // No subscriber at all: the span is disabled.
        let parts = request(&[("traceparent", PARENT), ("tracestate", "vendor=x")]);
        let span = request_span(&parts, &SpanAttributes::default());
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
    fn full_queue_drops_and_counts() {
        // An exporter that never finishes holds the first batch; the queue fills.
        #[derive(Debug)]
        struct Stuck;
        impl SpanExporter for Stuck {
            async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            }
        }
        let options = ExportOptions {
            max_queue_size: 8,
            max_batch_size: 4,
            batch_delay: Duration::from_millis(10),
            flush_timeout: Duration::from_secs(2),
            ..ExportOptions::default()
        };
        let p = pipeline(Stuck, "test.svc", 1.0, &options);
        let dispatch: tracing::Dispatch = tracing_subscriber::registry()
            .with(otel_layer(&p.provider))
            .into();
        let guard = TelemetryGuard {
            pipeline: Some(p),
            logs: None,
        };
        let parts = request(&[]);
        tracing::dispatcher::with_default(&dispatch, || {
            for _ in 0..100 {
                let _span = request_span(&parts, &SpanAttributes::default());
            }
        });
        let stats = guard.stats();
        assert_eq!(stats.queued + stats.dropped, 100, "{stats:?}");
        assert!(stats.dropped >= 100 - 2 * 8, "{stats:?}");
    }

    #[test]
    fn config_is_checked() {
        let config = |endpoint: &str, ratio| TracingConfig {
            otlp_endpoint: Some(endpoint.into()),
            sampling_ratio: ratio,
            service_name: "t".into(),
            log_filter: String::new(),
        };
        let opts = ExportOptions::default();
        assert!(dispatch(&config("http://127.0.0.1:4317", 1.5), &opts).is_err());
        assert!(dispatch(&config("http://127.0.0.1:4317", f64::NAN), &opts).is_err());
        assert!(dispatch(&config("https://127.0.0.1:4317", 1.0), &opts).is_err());
        assert!(dispatch(&config("not a uri", 1.0), &opts).is_err());
        let (_, guard) = dispatch(&TracingConfig::default(), &opts).expect("no endpoint");
        assert!(!guard.exporting());
    }
}
