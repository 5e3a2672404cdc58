//! An in-process OTLP/gRPC trace receiver: what a collector would be to the
//! proxies under test and in the demo. It accepts
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export`, keeps every
//! span in memory and lets tests wait for the ones they expect.
//!
//! It runs on its own thread and runtime, so it works from sync and async code
//! alike and keeps answering while a test blocks its own runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use tokio::sync::{oneshot, watch};

/// One span as the receiver got it, ids in lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or `unspecified`.
    pub kind: &'static str,
    /// The resource's `service.name` (empty if it had none).
    pub service_name: String,
    /// Attribute values rendered as text (arrays as `[a, b]`).
    pub attributes: BTreeMap<String, String>,
    pub status_code: SpanStatus,
    pub status_message: String,
    pub start: SystemTime,
    pub end: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Ok,
    Error,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    pub fn duration(&self) -> Duration {
        self.end.duration_since(self.start).unwrap_or_default()
    }
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: Mutex<u64>,
}

/// Bumped on every export, so waiters wake without polling.
type Changes = watch::Sender<u64>;

struct Receiver {
    store: Arc<Store>,
    changes: Arc<Changes>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = convert(request.into_inner());
        {
            let mut store = self
                .store
                .spans
                .lock()
                .map_err(|_| tonic::Status::internal("receiver poisoned"))?;
            store.extend(spans);
        }
        if let Ok(mut n) = self.store.requests.lock() {
            *n += 1;
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; dropping it stops the server.
pub struct OtlpReceiver {
    addr: SocketAddr,
    store: Arc<Store>,
    changes: Arc<Changes>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds `addr` (port 0 picks one) in the calling thread's network namespace.
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the OTLP receiver on {addr}"))?;
        Self::from_listener(listener)
    }

    /// Serves on a listener bound elsewhere, e.g. inside a test netns
    /// (`Netns::run(|| TcpListener::bind(..))`): the socket stays in its namespace.
    pub fn from_listener(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let store = Arc::new(Store::default());
        let changes = Arc::new(watch::channel(0).0);
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(Receiver {
            store: store.clone(),
            changes: changes.clone(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    let server = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming);
                    // Not a graceful shutdown: an exporter holding its connection
                    // open would keep the test waiting for nothing.
                    tokio::select! {
                        r = server => if let Err(e) = r {
                            eprintln!("otlp receiver on {addr}: {e}");
                        },
                        _ = stopped => {}
                    }
                });
            })?;
        ready_rx
            .recv()
            .context("OTLP receiver thread died while starting")??;
        Ok(OtlpReceiver {
            addr,
            store,
            changes,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint to configure an exporter with, `http://addr`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// How many export requests arrived.
    pub fn requests(&self) -> u64 {
        self.store.requests.lock().map(|n| *n).unwrap_or_default()
    }

    /// Waits until `predicate` holds for the spans received so far and returns
    /// them; fails after `timeout` with what did arrive.
    pub async fn wait_for(
        &self,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.changes.subscribe();
        loop {
            let spans = self.spans();
            if predicate(&spans) {
                return Ok(spans);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => bail!(self.timeout_report(timeout)),
            }
        }
    }

    /// [`Self::wait_for`] for code without a runtime.
    pub fn wait_for_blocking(
        &self,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if predicate(&spans) {
                return Ok(spans);
            }
            if Instant::now() >= deadline {
                bail!(self.timeout_report(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn timeout_report(&self, timeout: Duration) -> String {
        let spans = self.spans();
        format!(
            "OTLP receiver on {}: expected spans not there after {timeout:?}; {} export requests, {} spans:\n{}",
            self.addr,
            self.requests(),
            spans.len(),
            render_tree(&spans)
        )
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn convert(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service_name = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .map(render_value)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let (status_code, status_message) = match &s.status {
                    Some(st) => (
                        match StatusCode::try_from(st.code) {
                            Ok(StatusCode::Ok) => SpanStatus::Ok,
                            Ok(StatusCode::Error) => SpanStatus::Error,
                            _ => SpanStatus::Unset,
                        },
                        st.message.clone(),
                    ),
                    None => (SpanStatus::Unset, String::new()),
                };
                let parent = hex(&s.parent_span_id);
                out.push(ReceivedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: (!parent.is_empty() && parent.bytes().any(|b| b != b'0'))
                        .then_some(parent),
                    name: s.name,
                    kind: match SpanKind::try_from(s.kind) {
                        Ok(SpanKind::Server) => "server",
                        Ok(SpanKind::Client) => "client",
                        Ok(SpanKind::Internal) => "internal",
                        Ok(SpanKind::Producer) => "producer",
                        Ok(SpanKind::Consumer) => "consumer",
                        _ => "unspecified",
                    },
                    service_name: service_name.clone(),
                    attributes: attributes(&s.attributes),
                    status_code,
                    status_message,
                    start: UNIX_EPOCH + Duration::from_nanos(s.start_time_unix_nano),
                    end: UNIX_EPOCH + Duration::from_nanos(s.end_time_unix_nano),
                });
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = kv.value.as_ref().map(render_value).unwrap_or_default();
            (kv.key.clone(), v)
        })
        .collect()
}

fn render_value(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(render_value).collect();
            format!("[{}]", items.join(", "))
        }
        Some(any_value::Value::KvlistValue(l)) => {
            let items: Vec<String> = l
                .values
                .iter()
                .map(|kv| {
                    let v = kv.value.as_ref().map(render_value).unwrap_or_default();
                    format!("{}={v}", kv.key)
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        // Newer OTLP versions may add kinds; show that something was there.
        _ => "?".into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The spans as indented trees, one per trace (traces and siblings in start
/// order), for reports:
///
/// ```text
/// trace 4bf92f3577b34da6a3ce929d0e0e4736
///   GET default/reviews  [waypoint.demo, server, 3.1 ms, 503, Error]  parent 00f067aa0ba902b7
///     GET /reviews/1  [reviews, server, 1.2 ms, 503, Error]
/// ```
///
/// A span whose parent is not among `spans` (a remote parent, or one not
/// exported) is shown at the top of its trace, noting the parent's id.
pub fn render_tree(spans: &[ReceivedSpan]) -> String {
    let mut traces: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();
    let mut by_start: Vec<&ReceivedSpan> = spans.iter().collect();
    by_start.sort_by(|a, b| a.start.cmp(&b.start).then(a.span_id.cmp(&b.span_id)));
    for s in &by_start {
        if seen.insert(s.trace_id.as_str()) {
            traces.push(&s.trace_id);
        }
    }
    let ids: HashSet<(&str, &str)> = spans
        .iter()
        .map(|s| (s.trace_id.as_str(), s.span_id.as_str()))
        .collect();
    let mut children: HashMap<(&str, &str), Vec<&ReceivedSpan>> = HashMap::new();
    let mut roots: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    for s in &by_start {
        match &s.parent_span_id {
            Some(p) if ids.contains(&(s.trace_id.as_str(), p.as_str())) => children
                .entry((s.trace_id.as_str(), p.as_str()))
                .or_default()
                .push(s),
            _ => roots.entry(s.trace_id.as_str()).or_default().push(s),
        }
    }
    let mut out = String::new();
    for trace in traces {
        let _ = writeln!(out, "trace {trace}");
        // Every trace has a root: a cycle of parents is impossible with unique
        // span ids, and a span with a missing parent is a root.
        let mut stack: Vec<(&ReceivedSpan, usize)> = roots
            .get(trace)
            .map(|r| r.iter().rev().map(|s| (*s, 1)).collect())
            .unwrap_or_default();
        let mut printed = HashSet::new();
        while let Some((s, depth)) = stack.pop() {
            // Duplicate span ids (a misbehaving client) must not loop forever.
            if !printed.insert((s.span_id.as_str(), s.start)) {
                continue;
            }
            let _ = writeln!(out, "{}{}", "  ".repeat(depth), line(s, depth == 1));
            if let Some(kids) = children.get(&(trace, s.span_id.as_str())) {
                stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
            }
        }
    }
    out
}

/// `root`: shown at the top of its trace, so a parent id is one not in the tree.
fn line(s: &ReceivedSpan, root: bool) -> String {
    let mut facts = vec![
        if s.service_name.is_empty() {
            "?".to_string()
        } else {
            s.service_name.clone()
        },
        s.kind.to_string(),
        format!("{:.1} ms", s.duration().as_secs_f64() * 1000.0),
    ];
    if let Some(code) = s.attr("http.response.status_code") {
        facts.push(code.to_string());
    }
    if s.status_code != SpanStatus::Unset {
        facts.push(format!("{:?}", s.status_code));
    }
    let mut l = format!("{}  [{}]", s.name, facts.join(", "));
    // Who talked to whom, SPIFFE IDs without the scheme and trust domain.
    if let (Some(src), Some(dst)) = (s.attr("source_principal"), s.attr("destination_principal")) {
        let short = |id: &str| id.find("/ns/").map_or(id, |i| &id[i + 1..]).to_string();
        let _ = write!(l, "  {} -> {}", short(src), short(dst));
    }
    if let (true, Some(p)) = (root, &s.parent_span_id) {
        let _ = write!(l, "  parent {p}");
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::telemetry::{dispatch, ExportOptions, TracingConfig};
    use std::net::{Ipv4Addr, TcpListener};
    use waypoint::telemetry::{self, SpanAttributes, TRACEPARENT};

    const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_SPAN: &str = "00f067aa0ba902b7";

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    fn config(endpoint: String) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: Some(endpoint),
            sampling_ratio: 1.0,
            service_name: "waypoint.test".into(),
            log_filter: String::new(),
        }
    }

    fn request(traceparent: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method("POST")
            .uri("/reviews/1")
            .header("host", "reviews.default.svc.cluster.local");
        if let Some(tp) = traceparent {
            b = b.header("traceparent", tp).header("tracestate", "app=1");
        }
        match b.body(()) {
            Ok(r) => r.into_parts().0,
            Err(e) => panic!("test request: {e}"),
        }
    }

    /// The real exporter, over gRPC, into the receiver: parent, ids, attributes,
    /// status and the injected header all line up.
    #[test]
    fn exported_spans_join_the_incoming_trace() -> anyhow::Result<()> {
        let receiver = OtlpReceiver::start(loopback())?;
        let options = ExportOptions {
            batch_delay: Duration::from_millis(50),
            ..ExportOptions::default()
        };
        let (dispatch, guard) = dispatch(&config(receiver.endpoint()), &options)?;
        let attrs = SpanAttributes {
            route: Some("default/reviews".into()),
            service: Some("reviews.default.svc.cluster.local".into()),
            source_principal: Some("spiffe://cluster.local/ns/default/sa/productpage".into()),
            destination_principal: Some("spiffe://cluster.local/ns/default/sa/reviews".into()),
        };
        let continued = request(Some(&format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")));
        let fresh = request(Some("00-not-a-valid-traceparent-01"));
        let mut upstream = continued.headers.clone();
        let mut fresh_upstream = fresh.headers.clone();
        tracing::dispatcher::with_default(&dispatch, || {
            let span = telemetry::request_span(&continued, &attrs, None);
            telemetry::inject(&span, &mut upstream);
            telemetry::record_response(&span, http::StatusCode::BAD_GATEWAY);
            let span = telemetry::request_span(&fresh, &SpanAttributes::default(), None);
            telemetry::inject(&span, &mut fresh_upstream);
            telemetry::record_response(&span, http::StatusCode::OK);
        });
        let spans = receiver.wait_for_blocking(|s| s.len() >= 2, Duration::from_secs(10))?;
        assert_eq!(spans.len(), 2, "{}", render_tree(&spans));

        let s = spans
            .iter()
            .find(|s| s.trace_id == PARENT_TRACE)
            .expect("the continued trace");
        assert_eq!(s.parent_span_id.as_deref(), Some(PARENT_SPAN));
        assert_eq!(s.name, "POST default/reviews");
        assert_eq!(s.kind, "server");
        assert_eq!(s.service_name, "waypoint.test");
        assert_eq!(s.status_code, SpanStatus::Error);
        assert_eq!(s.attr("http.request.method"), Some("POST"));
        assert_eq!(s.attr("url.path"), Some("/reviews/1"));
        assert_eq!(
            s.attr("server.address"),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(s.attr("http.route"), Some("default/reviews"));
        assert_eq!(s.attr("http.response.status_code"), Some("502"));
        assert_eq!(
            s.attr("destination_service"),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(
            s.attr("destination_principal"),
            Some("spiffe://cluster.local/ns/default/sa/reviews")
        );
        let tp = upstream
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert_eq!(tp, format!("00-{PARENT_TRACE}-{}-01", s.span_id));
        assert_eq!(
            upstream.get("tracestate").and_then(|v| v.to_str().ok()),
            Some("app=1")
        );

        let f = spans
            .iter()
            .find(|s| s.trace_id != PARENT_TRACE)
            .expect("the new trace");
        assert_eq!(f.parent_span_id, None);
        assert_eq!(f.name, "POST");
        assert_eq!(f.status_code, SpanStatus::Unset);
        let tp = fresh_upstream
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert_eq!(tp, format!("00-{}-{}-01", f.trace_id, f.span_id));

        let tree = render_tree(&spans);
        assert!(
            tree.contains(&format!(
                "trace {PARENT_TRACE}\n  POST default/reviews  [waypoint.test, server, "
            )),
            "{tree}"
        );
        drop(guard);
        Ok(())
    }

    /// A collector that accepts TCP connections but never answers (the kernel
    /// completes the handshake on a listener nobody accepts on) must cost the
    /// request path nothing: spans are queued or dropped, never waited for.
    #[test]
    fn blackholed_collector_never_slows_requests() -> anyhow::Result<()> {
        let blackhole = TcpListener::bind(loopback())?;
        let options = ExportOptions {
            max_queue_size: 256,
            max_batch_size: 64,
            batch_delay: Duration::from_millis(20),
            export_timeout: Duration::from_millis(300),
            flush_timeout: Duration::from_secs(2),
        };
        let endpoint = format!("http://{}", blackhole.local_addr()?);
        let (dispatch, guard) = dispatch(&config(endpoint), &options)?;
        let parts = request(Some(&format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")));
        let mut each = Vec::with_capacity(1000);
        let total = Instant::now();
        tracing::dispatcher::with_default(&dispatch, || {
            for _ in 0..1000 {
                let t = Instant::now();
                let span = telemetry::request_span(&parts, &SpanAttributes::default(), None);
                let mut headers = parts.headers.clone();
                telemetry::inject(&span, &mut headers);
                telemetry::record_response(&span, http::StatusCode::OK);
                drop(span);
                each.push(t.elapsed());
            }
        });
        let total = total.elapsed();
        each.sort();
        let p99 = each[989];
        let stats = guard.stats();
        eprintln!(
            "1000 spans: total {total:?}, p99 {p99:?}, max {:?}; {stats:?}",
            each[999]
        );
        assert!(p99 < Duration::from_millis(5), "p99 {p99:?}");
        assert!(total < Duration::from_secs(2), "total {total:?}");
        // Not vacuous: every span went to the export pipeline, which could not
        // keep up (the queue overflowed), and the exporter really dialled the
        // blackhole (a connection waits in its backlog).
        assert_eq!(stats.queued + stats.dropped, 1000, "{stats:?}");
        assert!(stats.dropped > 0, "{stats:?}");
        assert_eq!(stats.exported, 0, "{stats:?}");
        blackhole.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match blackhole.accept() {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the exporter never connected");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // The stuck exports time out and count as failures.
        let deadline = Instant::now() + Duration::from_secs(5);
        while guard.stats().failed == 0 {
            assert!(Instant::now() < deadline, "{:?}", guard.stats());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Shutdown is bounded too.
        let shutdown = Instant::now();
        drop(guard);
        let shutdown = shutdown.elapsed();
        assert!(
            shutdown < options.flush_timeout + Duration::from_secs(1),
            "{shutdown:?}"
        );
        Ok(())
    }

    /// A closed port fails fast; nothing waits on it either.
    #[test]
    fn closed_port_never_slows_requests() -> anyhow::Result<()> {
        let port = TcpListener::bind(loopback())?.local_addr()?;
        let options = ExportOptions {
            batch_delay: Duration::from_millis(20),
            export_timeout: Duration::from_millis(300),
            flush_timeout: Duration::from_secs(2),
            ..ExportOptions::default()
        };
        let (dispatch, guard) = dispatch(&config(format!("http://{port}")), &options)?;
        let parts = request(None);
        let t = Instant::now();
        tracing::dispatcher::with_default(&dispatch, || {
            for _ in 0..1000 {
                let span = telemetry::request_span(&parts, &SpanAttributes::default(), None);
                telemetry::record_response(&span, http::StatusCode::OK);
            }
        });
        let elapsed = t.elapsed();
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while guard.stats().failed == 0 {
            assert!(Instant::now() < deadline, "{:?}", guard.stats());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(guard.stats().exported, 0);
        Ok(())
    }

    #[test]
    fn render_tree_nests_children_under_parents() {
        let span = |id: &str, parent: Option<&str>, name: &str, start: u64| ReceivedSpan {
            trace_id: "t1".into(),
            span_id: id.into(),
            parent_span_id: parent.map(str::to_owned),
            name: name.into(),
            kind: "server",
            service_name: "svc".into(),
            attributes: BTreeMap::new(),
            status_code: SpanStatus::Unset,
            status_message: String::new(),
            start: UNIX_EPOCH + Duration::from_millis(start),
            end: UNIX_EPOCH + Duration::from_millis(start + 2),
        };
        let spans = vec![
            span("c", Some("b"), "leaf", 3),
            span("b", Some("a"), "mid", 2),
            span("a", Some("remote"), "top", 1),
            span("d", Some("a"), "second", 4),
        ];
        let tree = render_tree(&spans);
        assert_eq!(
            tree,
            "trace t1\n  top  [svc, server, 2.0 ms]  parent remote\n    mid  [svc, server, 2.0 ms]\n      leaf  [svc, server, 2.0 ms]\n    second  [svc, server, 2.0 ms]\n"
        );
    }
}
