//! The waypoint's OpenTelemetry spans, received by an in-process OTLP/gRPC
//! collector: one span per request, parented on the caller's `traceparent`,
//! with route, service and status; the trace context goes on to the backend.
//! And a collector that never answers costs requests nothing.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use e2e::l7::{request, L7Mesh};
use e2e::otlp::{OtlpReceiver, SpanStatus};

const ROUTES: &str = r#"httpRoutes:
- name: reviews
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
"#;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_join_the_callers_trace_and_carry_route_service_and_status() -> anyhow::Result<()> {
    let collector = OtlpReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let endpoint = collector.endpoint();
    let mesh = L7Mesh::start_with(
        ROUTES,
        &["--otlp-endpoint", &endpoint, "--trace-sampling", "1.0"],
    )
    .await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let ok = client
        .get(t, "/ok", &[("traceparent", &traceparent)])
        .await?;
    assert_eq!(ok.status, 200);
    // The backend got the waypoint's span as its parent, same trace.
    let forwarded = ok.echo()["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        forwarded.starts_with(&format!("00-{TRACE_ID}-")),
        "{forwarded}"
    );
    assert!(!forwarded.contains(CALLER_SPAN), "{forwarded}");
    let failing = client
        .get(
            t,
            "/fail",
            &[("traceparent", &traceparent), ("x-echo-status", "503")],
        )
        .await?;
    assert_eq!(failing.status, 503);
    client.get(t, "/fresh", &[]).await?;

    let spans = collector
        .wait_for(|s| s.len() >= 3, Duration::from_secs(15))
        .await?;
    assert_eq!(spans.len(), 3, "one span per request: {spans:#?}");
    let by_path = |p: &str| {
        spans
            .iter()
            .find(|s| s.attr("url.path") == Some(p))
            .unwrap_or_else(|| panic!("no span for {p}: {spans:#?}"))
    };
    let s = by_path("/ok");
    assert_eq!(s.trace_id, TRACE_ID);
    assert_eq!(s.parent_span_id.as_deref(), Some(CALLER_SPAN));
    assert_eq!(forwarded, format!("00-{TRACE_ID}-{}-01", s.span_id));
    assert_eq!(s.name, "GET demo/reviews");
    assert_eq!(s.attr("http.route"), Some("demo/reviews"));
    assert_eq!(
        s.attr("destination_service"),
        Some("reviews.demo.svc.cluster.local")
    );
    assert_eq!(
        s.attr("source_principal"),
        Some("spiffe://cluster.local/ns/demo/sa/client")
    );
    assert_eq!(
        s.attr("destination_principal"),
        Some("spiffe://cluster.local/ns/demo/sa/reviews")
    );
    assert_eq!(s.attr("http.response.status_code"), Some("200"));
    assert_ne!(s.status_code, SpanStatus::Error);
    assert!(s.service_name.starts_with("waypoint"), "{}", s.service_name);

    let f = by_path("/fail");
    assert_eq!(f.trace_id, TRACE_ID);
    assert_eq!(f.status_code, SpanStatus::Error);
    assert_eq!(f.attr("http.response.status_code"), Some("503"));

    let fresh = by_path("/fresh");
    assert_ne!(fresh.trace_id, TRACE_ID, "no traceparent: a new trace");
    assert_eq!(fresh.parent_span_id, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_slows_or_fails_requests() -> anyhow::Result<()> {
    // Bound but never accepting: connections hang in the backlog, exports
    // time out. The worst kind of collector outage for a client.
    let blackhole = TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", blackhole.local_addr()?);
    let traced = L7Mesh::start_with(ROUTES, &["--otlp-endpoint", &endpoint]).await?;
    let plain = L7Mesh::start(ROUTES).await?;

    async fn p99(mesh: &L7Mesh) -> anyhow::Result<Duration> {
        let client = mesh.client("demo", "client").await?;
        let t = mesh.addrs.reviews();
        let mut h1 = client.http1(t).await?;
        let mut times = Vec::new();
        for i in 0..400 {
            let tp = format!("00-{TRACE_ID}-{:016x}-01", i + 1);
            let start = Instant::now();
            let r = h1
                .send(request("GET", t, "/", &[("traceparent", &tp)]))
                .await?;
            anyhow::ensure!(r.status == 200, "{r:?}");
            times.push(start.elapsed());
        }
        times.sort();
        Ok(times[times.len() * 99 / 100])
    }
    let (with_blackhole, without) = (p99(&traced).await?, p99(&plain).await?);
    eprintln!("p99 with a blackholed collector {with_blackhole:?}, without tracing {without:?}");
    // Generous for a shared 2-core machine; an exporter on the request path
    // would cost its 3 s export timeout here.
    assert!(
        with_blackhole < without * 3 + Duration::from_millis(20),
        "p99 {with_blackhole:?} with a dead collector vs {without:?} without"
    );
    drop(blackhole);
    Ok(())
}
