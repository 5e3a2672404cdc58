//! Caller authentication in Kubernetes mode, as Istio's CA does it: a proxy
//! presents its projected service-account token, the API server vouches for it
//! (TokenReview), and the token's pod binding says where it runs.
//!
//! A caller is a **node proxy** when
//! * the API server authenticates the token for one of our audiences
//!   (`istio-ca` by default) and says so in `status.audiences`: an API server
//!   that ignores audiences would accept a token minted for anyone else;
//! * the user is a service account on the allow list (`istio-system/ztunnel`):
//!   any pod has a token, only node proxies may act for their node;
//! * the token is bound to a pod, which gives the node: directly, from the
//!   `authentication.kubernetes.io/node-name` extra (Kubernetes 1.30+,
//!   ServiceAccountTokenPodNodeInfo), else from that pod's `spec.nodeName`,
//!   provided its UID is the token's: a token outliving its pod must not
//!   transfer to a new pod of the same name.
//!
//! A caller of any other service account is a **waypoint pod** when the token
//! is reviewed as above, is bound to a pod (`pod-name`/`pod-uid` extras) that
//! still exists with that UID, runs as that account and carries
//! `gateway.networking.k8s.io/gateway-name`. It may then act as itself only;
//! that the label names a Gateway of class `istio-waypoint` is checked against
//! the mesh model at each use ([`Caller::waypoint_in`]). No node is derived:
//! a waypoint's scope is its own identity, wherever it runs.
//!
//! Answers are cached briefly by the token's SHA-256 (the token itself is not
//! kept), so xDS reconnects and certificate renewals do not each cost a
//! TokenReview. A failure to reach the API server is UNAVAILABLE (the caller
//! retries) and never cached.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::node_auth::{Authenticator, Caller, WaypointCaller};
use crate::sources::gateway_api::GATEWAY_NAME_LABEL;

/// Istio's CA audience: ztunnel's projected token is requested for it.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The service account Istio's ztunnel runs as.
pub const DEFAULT_NODE_PROXY_ACCOUNT: &str = "istio-system/ztunnel";

const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";
const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";

/// A service account, written `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ServiceAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccount {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("service account {s:?} is not `<namespace>/<name>`")),
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub struct KubernetesAuthConfig {
    /// Sent as `spec.audiences`; the review must confirm one of them. Empty:
    /// the API server's own audiences (not what a CA should accept).
    pub audiences: Vec<String>,
    /// Service accounts allowed to act for the node their pod runs on.
    pub node_proxy_accounts: Vec<ServiceAccount>,
    /// Longest wait for each API call (TokenReview, reading the pod).
    pub timeout: Duration,
    /// How long an answer is reused for the same token.
    pub cache_ttl: Duration,
    /// Most tokens remembered; beyond, the oldest answer is dropped.
    pub cache_capacity: usize,
}

impl Default for KubernetesAuthConfig {
    fn default() -> Self {
        KubernetesAuthConfig {
            audiences: vec![DEFAULT_AUDIENCE.to_string()],
            node_proxy_accounts: vec![ServiceAccount {
                namespace: "istio-system".to_string(),
                name: "ztunnel".to_string(),
            }],
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 4096,
        }
    }
}

/// How a token's authentication was decided.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReviewResult {
    /// Answered from the cache.
    cached,
    /// The API server was asked; the caller is a node proxy or a waypoint pod.
    accepted,
    /// The API server was asked; the caller is neither.
    refused,
    /// The API server could not be asked, or answered nonsense.
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabels {
    result: ReviewResult,
}

#[derive(Clone, Default)]
pub struct KubeAuthMetrics {
    reviews: Family<ReviewLabels, Counter>,
}

impl KubeAuthMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = KubeAuthMetrics::default();
        registry.register(
            // The name predates waypoint tokens; kept so dashboards still work.
            "node_token_reviews",
            "Token authentications (node proxies and waypoints) in Kubernetes mode, by how they were decided",
            m.reviews.clone(),
        );
        m
    }

    fn count(&self, result: ReviewResult) {
        self.reviews.get_or_create(&ReviewLabels { result }).inc();
    }
}

/// A decided authentication: the caller, or the refusal to repeat.
type Outcome = Result<Caller, (Code, String)>;

struct Cache {
    entries: HashMap<[u8; 32], (Instant, Outcome)>,
}

/// Authenticates node proxies and waypoint pods by TokenReview. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesAuthenticator {
    client: kube::Client,
    config: Arc<KubernetesAuthConfig>,
    cache: Arc<Mutex<Cache>>,
    metrics: KubeAuthMetrics,
}

impl KubernetesAuthenticator {
    pub fn new(client: kube::Client, config: KubernetesAuthConfig) -> Self {
        KubernetesAuthenticator {
            client,
            config: Arc::new(config),
            cache: Arc::new(Mutex::new(Cache {
                entries: HashMap::new(),
            })),
            metrics: KubeAuthMetrics::default(),
        }
    }

    pub fn with_metrics(mut self, metrics: KubeAuthMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Who `token` is: a node proxy and its node, or a waypoint pod.
    pub async fn caller_for_token(&self, token: &str) -> Result<Caller, Status> {
        let key = digest(token);
        if let Some(outcome) = self.cached(&key) {
            self.metrics.count(ReviewResult::cached);
            return outcome.map_err(|(code, msg)| Status::new(code, msg));
        }
        match self.review(token).await {
            Ok(outcome) => {
                self.metrics.count(if outcome.is_ok() {
                    ReviewResult::accepted
                } else {
                    ReviewResult::refused
                });
                if let Err((code, msg)) = &outcome {
                    tracing::info!(code = ?code, "token refused: {msg}");
                }
                self.remember(key, outcome.clone());
                outcome.map_err(|(code, msg)| Status::new(code, msg))
            }
            Err(transient) => {
                self.metrics.count(ReviewResult::failed);
                tracing::warn!("token authentication failed: {}", transient.message());
                Err(transient)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Every update leaves the map consistent, so a poisoned lock is usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Outcome> {
        let cache = self.lock();
        let (at, outcome) = cache.entries.get(key)?;
        (at.elapsed() < self.config.cache_ttl).then(|| outcome.clone())
    }

    fn remember(&self, key: [u8; 32], outcome: Outcome) {
        let capacity = self.config.cache_capacity;
        if capacity == 0 {
            return;
        }
        let ttl = self.config.cache_ttl;
        let mut cache = self.lock();
        if cache.entries.len() >= capacity && !cache.entries.contains_key(&key) {
            cache.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.entries.len() >= capacity {
                let oldest = cache
                    .entries
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    cache.entries.remove(&oldest);
                }
            }
        }
        cache.entries.insert(key, (Instant::now(), outcome));
    }

    /// Asks the API server. `Ok` is a decision worth caching; `Err` a failure
    /// to decide.
    async fn review(&self, token: &str) -> Result<Outcome, Status> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: (!self.config.audiences.is_empty())
                    .then(|| self.config.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = tokio::time::timeout(
            self.config.timeout,
            api.create(&PostParams::default(), &request),
        )
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "TokenReview: no answer from the Kubernetes API server within {:?}",
                self.config.timeout
            ))
        })?
        .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let Some(status) = answer.status else {
            return Err(Status::unavailable(
                "TokenReview: the API server's answer has no status",
            ));
        };
        let caller = match self.reviewed(&status) {
            Ok(caller) => caller,
            Err(refusal) => return Ok(Err(refusal)),
        };
        if caller.node_proxy {
            self.node_of(&caller).await
        } else {
            self.waypoint_of(&caller).await
        }
    }

    /// Checks the review's verdict, audience and user: the account, and
    /// what the token says about its pod.
    fn reviewed(&self, status: &TokenReviewStatus) -> Result<Reviewed, (Code, String)> {
        if status.authenticated != Some(true) {
            let why = status.error.as_deref().unwrap_or("no reason given");
            return Err((
                Code::Unauthenticated,
                format!("token not accepted by the Kubernetes API server (TokenReview): {why}"),
            ));
        }
        let confirmed = status.audiences.as_deref().unwrap_or_default();
        if !self.config.audiences.is_empty()
            && !confirmed.iter().any(|a| self.config.audiences.contains(a))
        {
            return Err((
                Code::Unauthenticated,
                format!(
                    "TokenReview did not confirm audience {:?} (answered {confirmed:?})",
                    self.config.audiences
                ),
            ));
        }
        let user = status.user.as_ref().ok_or_else(|| {
            (
                Code::Unauthenticated,
                "TokenReview authenticated the token but named no user".to_string(),
            )
        })?;
        let username = user.username.as_deref().unwrap_or_default();
        let in_sa_group = user
            .groups
            .iter()
            .flatten()
            .any(|g| g == SERVICE_ACCOUNTS_GROUP);
        let account = username
            .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
            .filter(|_| in_sa_group)
            .map(|(ns, name)| ServiceAccount {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
            .ok_or_else(|| {
                (
                    Code::PermissionDenied,
                    format!("caller {username:?} is not a service account"),
                )
            })?;
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let pod = match (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) {
            (Some(name), Some(uid)) => Some((name, uid)),
            _ => None,
        };
        Ok(Reviewed {
            node_proxy: self.config.node_proxy_accounts.contains(&account),
            account,
            node: extra(EXTRA_NODE_NAME),
            pod,
        })
    }

    /// A node proxy's node: the token's `node-name` extra, else its pod's.
    async fn node_of(&self, caller: &Reviewed) -> Result<Outcome, Status> {
        if let Some(node) = &caller.node {
            return Ok(Ok(Caller::Node(node.clone())));
        }
        let pod = match self.bound_pod(caller).await? {
            Ok(pod) => pod,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let ns = &caller.account.namespace;
        match pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) {
            Some(node) => Ok(Ok(Caller::Node(node))),
            // Not cached: scheduling will give it one.
            None => Err(Status::permission_denied(format!(
                "pod {ns}/{} is not scheduled on a node",
                pod.metadata.name.as_deref().unwrap_or_default()
            ))),
        }
    }

    /// Any other account: a waypoint pod, if the token's pod carries a
    /// waypoint's Gateway label. That the Gateway is of class
    /// `istio-waypoint` is the mesh model's call at each use
    /// ([`Caller::waypoint_in`]), so it is not frozen into the cache.
    async fn waypoint_of(&self, caller: &Reviewed) -> Result<Outcome, Status> {
        let refuse = |code, why: String| {
            Ok(Err((
                code,
                format!(
                    "service account {} may not act for a node (allowed: {}), nor as a \
                     waypoint: {why}",
                    caller.account,
                    self.allowed()
                ),
            )))
        };
        let pod = match self.bound_pod(caller).await? {
            Ok(pod) => pod,
            Err((code, why)) => return refuse(code, why),
        };
        let ns = &caller.account.namespace;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labelled = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            .is_some_and(|g| !g.is_empty());
        if !labelled {
            return refuse(
                Code::PermissionDenied,
                format!(
                    "its pod {ns}/{name} is not a waypoint pod (no label {GATEWAY_NAME_LABEL})"
                ),
            );
        }
        Ok(Ok(Caller::Waypoint(WaypointCaller {
            namespace: ns.clone(),
            pod: name,
            service_account: Some(caller.account.name.clone()),
        })))
    }

    fn allowed(&self) -> String {
        let allowed: Vec<String> = self
            .config
            .node_proxy_accounts
            .iter()
            .map(ToString::to_string)
            .collect();
        allowed.join(", ")
    }

    /// The token's pod, if it is still the one the token was issued to and
    /// runs as the token's account.
    async fn bound_pod(&self, caller: &Reviewed) -> Result<Result<Pod, (Code, String)>, Status> {
        let account = &caller.account;
        let Some((name, uid)) = &caller.pod else {
            let role = if caller.node_proxy {
                "act for a node"
            } else {
                "act as a waypoint"
            };
            return Ok(Err((
                Code::PermissionDenied,
                format!(
                    "token of {account} is not bound to a pod (no {EXTRA_NODE_NAME} or \
                     {EXTRA_POD_NAME}/{EXTRA_POD_UID}): use a projected service-account token \
                     to {role}"
                ),
            )));
        };
        let ns = &account.namespace;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = tokio::time::timeout(self.config.timeout, api.get_opt(name))
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "reading pod {ns}/{name}: no answer from the Kubernetes API server within {:?}",
                    self.config.timeout
                ))
            })?
            .map_err(|e| Status::unavailable(format!("reading pod {ns}/{name}: {e}")))?;
        let denied = |msg: String| Ok(Err((Code::PermissionDenied, msg)));
        let Some(pod) = pod else {
            return denied(format!("the token's pod {ns}/{name} no longer exists"));
        };
        if pod.metadata.uid.as_deref() != Some(uid.as_str()) {
            return denied(format!(
                "the token was issued to pod {ns}/{name} with UID {uid}, which no longer exists \
                 (a pod of that name now has UID {})",
                pod.metadata.uid.as_deref().unwrap_or("none")
            ));
        }
        // Defaulted by the API server, so a pod always names its account.
        let pod_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        if pod_account != account.name {
            return denied(format!(
                "pod {ns}/{name} runs as service account {pod_account}, not {}",
                account.name
            ));
        }
        Ok(Ok(pod))
    }
}

/// A service account the API server vouched for, and what its token says
/// about where it runs.
struct Reviewed {
    account: ServiceAccount,
    /// On the node-proxy allow list.
    node_proxy: bool,
    node: Option<String>,
    /// (name, uid), in the account's namespace.
    pod: Option<(String, String)>,
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

#[tonic::async_trait]
impl Authenticator for KubernetesAuthenticator {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        if metadata.get("authorization").is_none() {
            return Err(Status::unauthenticated(
                "missing token: send `authorization: Bearer <service-account token>`",
            ));
        }
        let Some(token) = mesh_core::grpc::bearer_token(metadata) else {
            return Err(Status::unauthenticated(
                "authorization header is not `Bearer <service-account token>`",
            ));
        };
        if token.is_empty() {
            return Err(Status::unauthenticated("empty bearer token"));
        }
        self.caller_for_token(token).await
    }
}

#[cfg(test)]
#[path = "kube_auth_tests.rs"]
mod tests;
