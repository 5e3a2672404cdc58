//! xDS counters, registered into istiod-lite's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub type_url: String,
}

#[derive(Clone, Default)]
pub struct XdsMetrics {
    pub clients: Gauge,
    pushes: Family<TypeLabels, Counter>,
    pushed_resources: Family<TypeLabels, Counter>,
    acks: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    unknown_types: Counter,
    rejected_streams: Counter,
}

fn labels(type_url: &str) -> TypeLabels {
    TypeLabels {
        type_url: type_url.to_string(),
    }
}

impl XdsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = XdsMetrics::default();
        registry.register("xds_clients", "Connected xDS streams", m.clients.clone());
        registry.register("xds_pushes", "Delta responses sent", m.pushes.clone());
        registry.register(
            "xds_pushed_resources",
            "Resources sent or removed in delta responses",
            m.pushed_resources.clone(),
        );
        registry.register("xds_acks", "Responses ACKed", m.acks.clone());
        registry.register(
            "xds_nacks",
            "Responses rejected by a client (NACK)",
            m.nacks.clone(),
        );
        registry.register(
            "xds_unknown_type_requests",
            "Requests for a resource type not served",
            m.unknown_types.clone(),
        );
        registry.register(
            "xds_rejected_streams",
            "Streams refused for failed authentication",
            m.rejected_streams.clone(),
        );
        m
    }

    pub fn count_push(&self, type_url: &str, resources: usize) {
        self.pushes.get_or_create(&labels(type_url)).inc();
        self.pushed_resources
            .get_or_create(&labels(type_url))
            .inc_by(resources as u64);
    }

    pub fn count_ack(&self, type_url: &str) {
        self.acks.get_or_create(&labels(type_url)).inc();
    }

    pub fn count_nack(&self, type_url: &str) {
        self.nacks.get_or_create(&labels(type_url)).inc();
    }

    pub fn count_unknown_type(&self) {
        self.unknown_types.inc();
    }

    pub fn count_rejected_stream(&self) {
        self.rejected_streams.inc();
    }
}
