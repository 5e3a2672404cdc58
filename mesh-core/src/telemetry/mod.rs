//! OpenTelemetry spans over OTLP/gRPC, and the proxies' log subscriber.
//!
//! Spans are ordinary `tracing` spans; `tracing-opentelemetry` turns them into
//! OpenTelemetry spans and a batch processor hands them to the OTLP exporter on
//! its own thread, so the data path only ever does an atomic increment and a
//! `try_send`. The waypoint traces requests, ztunnel tunnelled connections; the
//! spans themselves are built in those crates, and [`context`] carries W3C
//! trace context between hops.
//!
//! What an unreachable collector costs a request: nothing. Finished spans wait
//! in a bounded queue ([`ExportOptions::max_queue_size`]); when it is full, new
//! spans are dropped and counted ([`ExportStats::dropped`]) instead of waiting.
//! Each export attempt (retries included) gives up after
//! [`ExportOptions::export_timeout`], and dropping the [`TelemetryGuard`] waits
//! at most [`ExportOptions::flush_timeout`].
//!
//! Sampling is parent-based: an upstream decision (the sampled flag of an
//! incoming `traceparent`) is kept, and only new traces are sampled with the
//! configured ratio.

pub mod context;
mod log_format;

pub use log_format::{Escaped, ACCESS_TARGET};

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The `tracing` target of the waypoint's request spans.
pub const REQUEST_TARGET: &str = "ambit::request";
/// The `tracing` target of ztunnel's tunnelled-connection spans.
pub const CONNECTION_TARGET: &str = "ambit::connection";
/// Targets whose spans are exported but never logged (see [`init`]).
const SPAN_TARGETS: &[&str] = &[REQUEST_TARGET, CONNECTION_TARGET];

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
    logs: Option<crate::log_writer::LogFlusher>,
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
/// [`TracingConfig::log_filter`], changeable at run time through the returned
/// [`LogLevel`]) and, when an endpoint is set, the OpenTelemetry layer (INFO
/// spans and up, whatever the log filter says: the two filters are separate).
pub fn init(config: &TracingConfig) -> anyhow::Result<(TelemetryGuard, LogLevel)> {
    let spec = match config.log_filter.as_str() {
        "" => std::env::var("RUST_LOG")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "info".into()),
        s => s.to_owned(),
    };
    let (filter, handle) = reload::Layer::new(log_filter(&spec)?);
    let spec = std::sync::Mutex::new(spec);
    let (otel, mut guard) = layer(config, &ExportOptions::default())?;
    // Batched: one write per 50 ms instead of one per access line.
    let (writer, flusher) = crate::log_writer::BatchedStderr::start();
    guard.logs = Some(flusher);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .event_format(log_format::LineFormat::default())
                .with_filter(filter),
        )
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok((guard, LogLevel { handle, spec }))
}

/// The log filter for `spec`, with the span-only targets turned off: their
/// spans are for the exporter (the access line carries what a log needs), and a
/// span the log layer wants would be built, its fields formatted, for every
/// request or connection even with tracing off.
fn log_filter(spec: &str) -> anyhow::Result<EnvFilter> {
    let mut filter = EnvFilter::try_new(spec).with_context(|| format!("log filter {spec:?}"))?;
    for target in SPAN_TARGETS {
        filter = filter.add_directive(format!("{target}=off").parse()?);
    }
    Ok(filter)
}

/// Changes the log filter of the subscriber [`init`] installed.
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    /// The filter as the operator gave it (without the span-only targets
    /// [`log_filter`] adds, which are not theirs to see or set).
    spec: std::sync::Mutex<String>,
}

impl LogLevel {
    /// Sets the filter to `spec` (EnvFilter syntax) when given; returns the
    /// filter now in force, or why `spec` was refused (the old one stays).
    pub fn set(&self, spec: Option<&str>) -> Result<String, String> {
        let mut current = self.spec.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(spec) = spec {
            let filter = log_filter(spec).map_err(|e| format!("{e:#}"))?;
            self.handle.reload(filter).map_err(|e| e.to_string())?;
            *current = spec.to_owned();
        }
        Ok(current.clone())
    }
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
/// A subscriber with only the OpenTelemetry layer, exporting to `exporter`
/// (e.g. an in-memory one in tests) with the same sampling and queueing as the
/// OTLP pipeline.
pub fn dispatch_to<E>(
    exporter: E,
    service_name: &str,
    ratio: f64,
    options: &ExportOptions,
) -> anyhow::Result<(tracing::Dispatch, TelemetryGuard)>
where
    E: SpanExporter + 'static,
{
    let p = pipeline(exporter, service_name, check_ratio(ratio)?, options);
    let dispatch = tracing_subscriber::registry()
        .with(otel_layer(&p.provider))
        .into();
    Ok((
        dispatch,
        TelemetryGuard {
            pipeline: Some(p),
            logs: None,
        },
    ))
}

/// An exporter that keeps spans in memory, for tests.
#[derive(Clone, Debug, Default)]
pub struct MemoryExporter(Arc<std::sync::Mutex<Vec<SpanData>>>);

impl MemoryExporter {
    /// The spans exported so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl SpanExporter for MemoryExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(batch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traced(ratio: f64) -> (MemoryExporter, tracing::Dispatch, TelemetryGuard) {
        let capture = MemoryExporter::default();
        let (dispatch, guard) = dispatch_to(
            capture.clone(),
            "test.svc",
            ratio,
            &ExportOptions::default(),
        )
        .expect("pipeline");
        (capture, dispatch, guard)
    }

    #[test]
    fn zero_ratio_samples_no_new_trace() {
        let (capture, dispatch, guard) = traced(0.0);
        tracing::dispatcher::with_default(&dispatch, || {
            for _ in 0..10 {
                let _span = tracing::info_span!("request");
            }
        });
        guard.flush().expect("flush");
        assert!(capture.spans().is_empty());
        assert_eq!(guard.stats().queued, 0);
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
        tracing::dispatcher::with_default(&dispatch, || {
            for _ in 0..100 {
                let _span = tracing::info_span!("request");
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

    #[test]
    fn span_targets_are_never_logged() {
        let filter = log_filter("trace").expect("filter").to_string();
        assert!(filter.contains("ambit::request=off"), "{filter}");
        assert!(filter.contains("ambit::connection=off"), "{filter}");
        assert!(log_filter("not[a filter").is_err());
    }
}
