//! istiod-lite's Prometheus metrics (served on the monitoring port, 15014).
//!
//! One registry for the whole control plane: each subsystem adds its families
//! as fields here and registers them in [`Metrics::new`], so a single scrape
//! shows everything.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// How a CreateCertificate call ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CaResult {
    /// A certificate was signed.
    issued,
    /// No, or an unknown, bearer token.
    unauthenticated,
    /// The caller may not have the requested identity.
    denied,
    /// Malformed request: bad CSR, SAN mismatch, missing or bad identity.
    invalid,
    /// A failure on our side.
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    pub result: CaResult,
}

pub struct Metrics {
    pub registry: Registry,
    pub ca_requests: Family<CaLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("istiod");
        let ca_requests = Family::<CaLabels, Counter>::default();
        registry.register(
            "ca_requests",
            "CreateCertificate calls by result",
            ca_requests.clone(),
        );
        Metrics {
            registry,
            ca_requests,
        }
    }

    pub fn ca_request(&self, result: CaResult) {
        self.ca_requests.get_or_create(&CaLabels { result }).inc();
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error could only come from a
        // broken Encode impl, and an empty scrape is the right answer then.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_requests_are_exposed_with_istio_style_name() {
        let m = Metrics::new();
        m.ca_request(CaResult::issued);
        m.ca_request(CaResult::issued);
        m.ca_request(CaResult::denied);
        let text = m.encode();
        assert!(
            text.contains("istiod_ca_requests_total{result=\"issued\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("istiod_ca_requests_total{result=\"denied\"} 1"),
            "{text}"
        );
    }
}
