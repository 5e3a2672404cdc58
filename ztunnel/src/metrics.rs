//! Prometheus metrics with Istio's standard L4 names and labels.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    none,
    unknown,
}

/// Istio's L4 label set. Unknown values are "unknown", as Istio reports them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub active_connections: Gauge,
    pub capture_packets: Family<ResultLabels, Counter>,
    pub capture_interfaces: Gauge,
    pub certificate_fetches: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            failures: Family::default(),
            config_reloads: Family::default(),
            active_connections: Gauge::default(),
            capture_packets: Family::default(),
            capture_interfaces: Gauge::default(),
            certificate_fetches: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from destination to source",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes sent from source to destination",
            m.received_bytes.clone(),
        );
        registry.register(
            "ambit_connection_failures",
            "Connections refused or failed before any byte was proxied, by reason",
            m.failures.clone(),
        );
        registry.register(
            "ambit_config_reloads",
            "Mesh config reload attempts by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "ambit_active_connections",
            "Connections currently proxied",
            m.active_connections.clone(),
        );
        registry.register(
            "ambit_capture_packets",
            "Packets seen by the capture program, by what it did with them",
            m.capture_packets.clone(),
        );
        registry.register(
            "ambit_capture_interfaces",
            "Pod interfaces the capture program is attached to",
            m.capture_interfaces.clone(),
        );
        registry.register(
            "ambit_certificate_fetches",
            "Workload certificate requests to the CA, by result",
            m.certificate_fetches.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn failure(&self, direction: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                direction: direction.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
