//! Ambit's own resources (`ambit.dev/v1alpha1`), as istiod-lite reads them.
//! The CRD is `crds/trafficpolicies.ambit.dev.yaml`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::config::{ConnectionPool, LocalRateLimit, OutlierDetection};
use schemars::JsonSchema;
use serde::Deserialize;

pub const GROUP: &str = "ambit.dev";

/// `TrafficPolicy`: the waypoint's resilience settings for a Service or an
/// HTTPRoute.
#[derive(Debug, Clone, Deserialize)]
pub struct TrafficPolicy {
    pub metadata: ObjectMeta,
    pub spec: TrafficPolicySpec,
}

/// The model's `TrafficPolicy` minus name and namespace. Unknown fields are
/// an error: a setting silently ignored would look applied.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub target_ref: TrafficTargetRef,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub rate_limit: Option<LocalRateLimit>,
}

/// A Service or an HTTPRoute in the policy's namespace.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficTargetRef {
    /// `""` for a Service, `gateway.networking.k8s.io` for an HTTPRoute;
    /// absent means whichever fits `kind`.
    #[serde(default)]
    pub group: Option<String>,
    #[schemars(extend("enum" = ["Service", "HTTPRoute"]))]
    pub kind: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}
