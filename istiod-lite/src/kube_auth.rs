//! Node authentication in Kubernetes mode, as Istio's CA does it: a ztunnel
//! presents its projected service-account token, the API server vouches for it
//! (TokenReview), and the token's pod binding names the node.
//!
//! A caller is a node when
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

use crate::node_auth::Authenticator;

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
    /// The API server was asked; the caller is a node.
    accepted,
    /// The API server was asked; the caller is not a node.
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
            "node_token_reviews",
            "Node authentications in Kubernetes mode, by how they were decided",
            m.reviews.clone(),
        );
        m
    }

    fn count(&self, result: ReviewResult) {
        self.reviews.get_or_create(&ReviewLabels { result }).inc();
    }
}

/// A decided authentication: the node, or the refusal to repeat.
type Outcome = Result<String, (Code, String)>;

struct Cache {
    entries: HashMap<[u8; 32], (Instant, Outcome)>,
}

/// Authenticates node proxies by TokenReview. Cheap to clone.
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

    /// The node `token` may act for.
    pub async fn node_for_token(&self, token: &str) -> Result<String, Status> {
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
                    tracing::info!(code = ?code, "node token refused: {msg}");
                }
                self.remember(key, outcome.clone());
                outcome.map_err(|(code, msg)| Status::new(code, msg))
            }
            Err(transient) => {
                self.metrics.count(ReviewResult::failed);
                tracing::warn!("node authentication failed: {}", transient.message());
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
        let caller = match self.node_proxy(&status) {
            Ok(caller) => caller,
            Err(refusal) => return Ok(Err(refusal)),
        };
        match caller.node {
            Some(node) => Ok(Ok(node)),
            None => self.node_of_pod(&caller).await,
        }
    }

    /// Checks the review's verdict, audience and user.
    fn node_proxy(&self, status: &TokenReviewStatus) -> Result<Caller, (Code, String)> {
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
        if !self.config.node_proxy_accounts.contains(&account) {
            let allowed: Vec<String> = self
                .config
                .node_proxy_accounts
                .iter()
                .map(ToString::to_string)
                .collect();
            return Err((
                Code::PermissionDenied,
                format!(
                    "service account {account} may not act for a node (allowed: {})",
                    allowed.join(", ")
                ),
            ));
        }
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        if let Some(node) = extra(EXTRA_NODE_NAME) {
            return Ok(Caller {
                account,
                node: Some(node),
                pod: None,
            });
        }
        match (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) {
            (Some(name), Some(uid)) => Ok(Caller {
                account,
                node: None,
                pod: Some((name, uid)),
            }),
            _ => Err((
                Code::PermissionDenied,
                format!(
                    "token of {account} is not bound to a pod (no {EXTRA_NODE_NAME} or \
                     {EXTRA_POD_NAME}/{EXTRA_POD_UID}): use a projected service-account token"
                ),
            )),
        }
    }

    /// The node of the token's pod, if that pod is still the one the token
    /// was issued to.
    async fn node_of_pod(&self, caller: &Caller) -> Result<Outcome, Status> {
        let Some((name, uid)) = &caller.pod else {
            return Err(Status::internal("no pod to look up"));
        };
        let ns = &caller.account.namespace;
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
        let spec = pod.spec.unwrap_or_default();
        // Defaulted by the API server, so a pod always names its account.
        let pod_account = spec.service_account_name.as_deref().unwrap_or("default");
        if pod_account != caller.account.name {
            return denied(format!(
                "pod {ns}/{name} runs as service account {pod_account}, not {}",
                caller.account.name
            ));
        }
        match spec.node_name.filter(|n| !n.is_empty()) {
            Some(node) => Ok(Ok(node)),
            // Not cached: scheduling will give it one.
            None => Err(Status::permission_denied(format!(
                "pod {ns}/{name} is not scheduled on a node"
            ))),
        }
    }
}

/// An allowed node proxy, and what its token says about where it runs.
struct Caller {
    account: ServiceAccount,
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
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
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
        self.node_for_token(token).await
    }
}

#[cfg(test)]
#[path = "kube_auth_tests.rs"]
mod tests;
