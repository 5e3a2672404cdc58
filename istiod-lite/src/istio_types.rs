//! The parts of Istio's `security.istio.io/v1` resources istiod-lite reads.
//! Field names follow the published CRDs; unknown fields are tolerated, as the
//! API server would keep them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Set when the object did not parse: it is then enforced fail-closed
    /// (with the selector and action we could still read).
    #[serde(skip)]
    pub broken: Option<String>,
}

/// Unknown fields are an error here (and the policy then fails closed): a
/// field we do not read could be the one that narrows who is allowed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated singular form, still accepted by Istio.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub provider: Option<serde_yaml::Value>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Option<Vec<AuthzRule>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    /// Istio allows only the policy's own namespace here.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A `when` entry. Read strictly: an unknown field could be the one that
/// narrows the condition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// `namespace/name` service accounts (Istio 1.24+).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// What can still be read of a security object that does not parse: enough
/// to enforce it fail-closed in the right place.
pub fn salvage(
    value: &serde_yaml::Value,
) -> (ObjectMeta, Option<WorkloadSelector>, Option<String>) {
    let meta: ObjectMeta = value
        .get("metadata")
        .and_then(|m| serde_yaml::from_value(m.clone()).ok())
        .unwrap_or_default();
    let spec = value.get("spec");
    let selector = spec
        .and_then(|s| s.get("selector"))
        .and_then(|s| serde_yaml::from_value(s.clone()).ok());
    let action = spec
        .and_then(|s| s.get("action"))
        .and_then(|a| a.as_str())
        .map(str::to_string);
    (meta, selector, action)
}

impl AuthorizationPolicy {
    /// Parses one object. Security objects that do not parse are kept, marked
    /// broken: dropping them would widen access, so translation enforces them
    /// fail-closed. Every source goes through here so they agree.
    pub fn parse_or_broken(value: &serde_yaml::Value) -> Self {
        match serde_yaml::from_value::<AuthorizationPolicy>(value.clone()) {
            Ok(p) => p,
            Err(e) => {
                let (metadata, selector, action) = salvage(value);
                // Where a waypoint policy applied is still known when only
                // its rules are unreadable: its fail-closed stand-in then
                // lands on the same waypoint or Service, not on the namespace.
                let spec = value.get("spec");
                let target = |k: &str| spec.and_then(|s| s.get(k)).cloned();
                AuthorizationPolicy {
                    metadata,
                    spec: AuthorizationPolicySpec {
                        selector,
                        action,
                        target_ref: read(target("targetRef")),
                        target_refs: read::<Vec<TargetRef>>(target("targetRefs"))
                            .unwrap_or_default(),
                        ..Default::default()
                    },
                    broken: Some(e.to_string()),
                }
            }
        }
    }
}

fn read<T: serde::de::DeserializeOwned>(v: Option<serde_yaml::Value>) -> Option<T> {
    v.and_then(|v| serde_yaml::from_value(v).ok())
}

impl PeerAuthentication {
    /// As [`AuthorizationPolicy::parse_or_broken`]; a broken one is STRICT.
    pub fn parse_or_broken(value: &serde_yaml::Value) -> Self {
        match serde_yaml::from_value::<PeerAuthentication>(value.clone()) {
            Ok(p) => p,
            Err(e) => {
                let (metadata, selector, _) = salvage(value);
                PeerAuthentication {
                    metadata,
                    spec: PeerAuthenticationSpec {
                        selector,
                        ..Default::default()
                    },
                    broken: Some(e.to_string()),
                }
            }
        }
    }
}

impl AuthzRule {
    /// Whether the rule reads anything only a waypoint can see.
    pub fn has_l7(&self) -> bool {
        !self.when.is_empty()
            || self.from.iter().any(|f| f.source.has_l7())
            || self.to.iter().any(|t| t.operation.has_l7())
    }
}

impl Source {
    /// Attributes ztunnel cannot see at L4 (they need a waypoint).
    pub fn has_l7(&self) -> bool {
        !(self.request_principals.is_empty() && self.not_request_principals.is_empty())
    }
}

impl Operation {
    pub fn has_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    /// Set when the object did not parse: it is then enforced as STRICT.
    #[serde(skip)]
    pub broken: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Mtls {
    #[serde(default)]
    pub mode: Option<String>,
}
