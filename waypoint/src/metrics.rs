//! Prometheus metrics: Istio's standard request metrics (reporter
//! `waypoint`), its TCP metrics for pass-through tunnels, and Ambit's own
//! counters for what the waypoint refused and why.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Istio's request label set (plus `route`, the HTTPRoute that served the
/// request, which Ambit adds). Unknown values are "unknown", as in Istio.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    pub route: String,
}

/// Istio's L4 label set, for tunnels the waypoint passes through at L4.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_principal: String,
    pub response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Istio's default request-duration buckets, in milliseconds.
const DURATION_BUCKETS_MS: [f64; 20] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300000.0,
    600000.0,
    1800000.0,
    3600000.0,
    f64::INFINITY,
];

fn duration_histogram() -> Histogram {
    // The last bucket is +Inf, which the histogram adds itself.
    Histogram::new(
        DURATION_BUCKETS_MS[..DURATION_BUCKETS_MS.len() - 1]
            .iter()
            .copied(),
    )
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    /// Tunnels or requests refused before reaching a backend, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Requests an L7 AuthorizationPolicy denied (DENY, or no ALLOW matched)
    /// or audited.
    pub authz: Family<PolicyLabels, Counter>,
    pub config_updates: Family<ResultLabels, Counter>,
    pub certificate_fetches: Family<ResultLabels, Counter>,
    pub active_tunnels: Gauge,
    pub active_requests: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received_bytes: Family::default(),
            tcp_sent_bytes: Family::default(),
            refusals: Family::default(),
            authz: Family::default(),
            config_updates: Family::default(),
            certificate_fetches: Family::default(),
            active_tunnels: Gauge::default(),
            active_requests: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "istio_requests",
            "Requests served by the waypoint",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from request arrival to the end of the response headers, in milliseconds",
            m.request_duration.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "Tunnels passed through at L4 (not HTTP), opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Tunnels passed through at L4 (not HTTP), closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes from source to destination on L4 tunnels",
            m.tcp_received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes from destination to source on L4 tunnels",
            m.tcp_sent_bytes.clone(),
        );
        registry.register(
            "ambit_waypoint_refusals",
            "Tunnels or requests refused before reaching a backend, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "ambit_authorization_decisions",
            "Requests denied (action DENY, or no ALLOW policy matched: policy \"\") or audited, by policy",
            m.authz.clone(),
        );
        registry.register(
            "ambit_config_updates",
            "Mesh config updates by result",
            m.config_updates.clone(),
        );
        registry.register(
            "ambit_certificate_fetches",
            "Certificate requests to the CA, by result",
            m.certificate_fetches.clone(),
        );
        registry.register(
            "ambit_active_tunnels",
            "HBONE tunnels currently open into the waypoint",
            m.active_tunnels.clone(),
        );
        registry.register(
            "ambit_active_requests",
            "Requests currently in flight",
            m.active_requests.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
