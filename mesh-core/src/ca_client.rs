//! Keeps a certificate in the store for every workload identity on this node,
//! obtained from the mesh CA (istiod-lite, or any Istio-compatible CA).
//!
//! For each local identity ztunnel generates a key, sends a CSR with the
//! identity as `ImpersonatedIdentity` (it asks on the workload's behalf) and
//! checks the answer before trusting it: the leaf must name that identity,
//! match the key and chain to the trust roots ztunnel was configured with.
//! Certificates are renewed half-way through their lifetime; failures are
//! retried with jittered exponential backoff, and a certificate is never
//! dropped just because the CA is unreachable, only when its identity has no
//! workload on this node any more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::ca::{generate_csr, CaError};
use crate::config::{MeshState, WorkloadInfo};
use crate::grpc::{BearerToken, ControlPlane, GrpcError};
use crate::proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::ca::IstioCertificateRequest;
use crate::tls::{
    identity_from_cert, CertError, CertificateStore, ExpectedIdentityVerifier, WorkloadCertificate,
};
use crate::Identity;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Metadata field naming the identity requested on a workload's behalf (Istio's).
use crate::proto::IMPERSONATED_IDENTITY;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// One CreateCertificate call, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Concurrent CSRs: a node with many identities should not flood the CA at start.
const MAX_IN_FLIGHT: usize = 16;
/// Even a very short-lived certificate is not renewed more often than this,
/// so a CA handing out near-expired certificates cannot make us spin.
const MIN_REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("generating key and CSR: {0}")]
    Csr(#[from] CaError),
    #[error("CA refused: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("CA returned an empty certificate chain")]
    EmptyChain,
    #[error("CA returned an unusable certificate: {0}")]
    BadCertificate(#[from] CertError),
    #[error("CA returned a certificate for {got}, not the requested {expected}")]
    WrongIdentity { expected: String, got: String },
    #[error("no trust roots configured to check the CA's certificates against")]
    NoRoots,
    #[error("CA returned a certificate that does not verify against our trust roots: {0}")]
    Untrusted(rustls::Error),
}

impl FetchError {
    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Csr(_) => "csr_error",
            FetchError::Rpc(s) if is_unreachable(s.code()) => "unreachable",
            FetchError::Rpc(_) => "refused",
            FetchError::Timeout(_) => "unreachable",
            FetchError::NoRoots => "no_roots",
            FetchError::EmptyChain
            | FetchError::BadCertificate(_)
            | FetchError::WrongIdentity { .. }
            | FetchError::Untrusted(_) => "bad_response",
        }
    }
}

fn is_unreachable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

type Client = IstioCertificateServiceClient<InterceptedService<Channel, BearerToken>>;

/// Called after every fetch with the identity and its outcome (for metrics).
pub type Observer = Arc<dyn Fn(&Identity, Result<(), &FetchError>) + Send + Sync>;

/// Which of the node's workloads a proxy holds certificates for.
pub type Scope = Arc<dyn Fn(&WorkloadInfo) -> bool + Send + Sync>;

/// Fetches and renews the certificates of this node's workload identities
/// (those in its [`Scope`]).
#[derive(Clone)]
pub struct CaClient {
    client: Client,
    node: String,
    store: CertificateStore,
    ttl: Duration,
    observer: Option<Observer>,
    scope: Scope,
}

/// ztunnel's scope: every workload on the node except waypoints, which
/// terminate their own tunnels and hold their own certificates.
pub fn node_workloads() -> Scope {
    Arc::new(|w: &WorkloadInfo| !w.workload.native_tunnel)
}

/// Runs a [`CaClient`] until the mesh sender is dropped.
pub async fn run(
    cp: ControlPlane,
    node: String,
    store: CertificateStore,
    mesh: watch::Receiver<Arc<MeshState>>,
    ttl: Duration,
) -> Result<(), GrpcError> {
    CaClient::new(&cp, node, store, ttl)?.run(mesh).await;
    Ok(())
}

impl CaClient {
    /// `ttl` is the lifetime asked for; the CA may grant less.
    pub fn new(
        cp: &ControlPlane,
        node: String,
        store: CertificateStore,
        ttl: Duration,
    ) -> Result<Self, GrpcError> {
        Ok(CaClient {
            client: IstioCertificateServiceClient::with_interceptor(cp.channel()?, cp.auth()),
            node,
            store,
            ttl,
            observer: None,
            scope: node_workloads(),
        })
    }

    /// Narrows which of the node's workloads get certificates (a waypoint
    /// holds only its own identity, never its neighbours').
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    pub fn with_observer(
        mut self,
        observer: impl Fn(&Identity, Result<(), &FetchError>) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Obtains and checks a certificate for `identity` (does not store it).
    pub async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, FetchError> {
        let (csr, key) = generate_csr(identity)?;
        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                    },
                )]),
            }),
        };
        let mut client = self.client.clone();
        let response = tokio::time::timeout(CALL_TIMEOUT, client.create_certificate(request))
            .await
            .map_err(|_| FetchError::Timeout(CALL_TIMEOUT))??
            .into_inner();
        self.check(identity, &response.cert_chain.concat(), &key)
    }

    /// Accepts a chain only if it names `identity`, fits our key and chains to
    /// our roots: a misbehaving or impostor CA must not make us present a
    /// certificate peers would reject, or one for somebody else.
    fn check(
        &self,
        identity: &Identity,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<WorkloadCertificate, FetchError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem(e.to_string()))?;
        let leaf = chain.first().ok_or(FetchError::EmptyChain)?;
        let got = identity_from_cert(leaf)?;
        if &got != identity {
            return Err(FetchError::WrongIdentity {
                expected: identity.to_string(),
                got: got.to_string(),
            });
        }
        let roots = self.store.roots().ok_or(FetchError::NoRoots)?;
        let verifier = ExpectedIdentityVerifier::new(roots.store(), vec![identity.clone()]);
        // The verifier ignores the server name: the URI SAN is the name.
        let name = ServerName::IpAddress(std::net::IpAddr::from([0, 0, 0, 0]).into());
        verifier
            .verify_server_cert(leaf, &chain[1..], &name, &[], UnixTime::now())
            .map_err(FetchError::Untrusted)?;
        Ok(WorkloadCertificate::from_pem(
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
        )?)
    }

    /// Follows the mesh until its sender is dropped.
    pub async fn run(self, mut mesh: watch::Receiver<Arc<MeshState>>) {
        let mut schedule: HashMap<Identity, Due> = HashMap::new();
        let mut in_flight: HashSet<Identity> = HashSet::new();
        let mut tasks: JoinSet<(Identity, Result<WorkloadCertificate, FetchError>)> =
            JoinSet::new();
        let mut wanted = self.local_identities(&mesh.borrow_and_update());
        self.reconcile(&wanted, &mut schedule);
        loop {
            let now = Instant::now();
            let mut due: Vec<_> = schedule
                .iter()
                .filter(|(id, d)| d.at <= now && !in_flight.contains(*id))
                .map(|(id, _)| id.clone())
                .collect();
            due.sort();
            for identity in due
                .into_iter()
                .take(MAX_IN_FLIGHT.saturating_sub(in_flight.len()))
            {
                in_flight.insert(identity.clone());
                let this = self.clone();
                tasks.spawn(async move {
                    let result = this.fetch(&identity).await;
                    (identity, result)
                });
            }
            let next = schedule
                .iter()
                .filter(|(id, _)| !in_flight.contains(*id))
                .map(|(_, d)| d.at)
                .min();
            tokio::select! {
                changed = mesh.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    wanted = self.local_identities(&mesh.borrow_and_update());
                    self.reconcile(&wanted, &mut schedule);
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let Ok((identity, result)) = joined else {
                        // A fetch task panicked; its identity stays in flight
                        // forever otherwise, so start over for all of them.
                        tracing::error!("certificate fetch task failed");
                        in_flight.clear();
                        continue;
                    };
                    in_flight.remove(&identity);
                    self.settle(identity, result, &wanted, &mut schedule);
                }
                _ = crate::backoff::sleep_until(next.map(Into::into)) => {}
            }
        }
    }

    fn local_identities(&self, mesh: &MeshState) -> HashSet<Identity> {
        mesh.local_workloads(&self.node)
            .filter(|w| (self.scope)(w))
            .map(|w| w.identity.clone())
            .collect()
    }

    /// Schedules new identities and forgets (and unstores) departed ones.
    fn reconcile(&self, wanted: &HashSet<Identity>, schedule: &mut HashMap<Identity, Due>) {
        for cert in self.store.all() {
            if !wanted.contains(cert.identity()) {
                tracing::info!(identity = %cert.identity(), "no local workload any more; dropping its certificate");
                self.store.remove(cert.identity());
            }
        }
        schedule.retain(|id, _| wanted.contains(id));
        for identity in wanted {
            schedule.entry(identity.clone()).or_insert_with(|| {
                let at = match self.store.get(identity) {
                    // Already have one (handed over by whoever filled the store).
                    Some(cert) => instant_at(cert.refresh_at()),
                    None => Instant::now(),
                };
                Due {
                    at,
                    backoff: BACKOFF_MIN,
                }
            });
        }
    }

    fn settle(
        &self,
        identity: Identity,
        result: Result<WorkloadCertificate, FetchError>,
        wanted: &HashSet<Identity>,
        schedule: &mut HashMap<Identity, Due>,
    ) {
        if let Some(observer) = &self.observer {
            observer(&identity, result.as_ref().map(|_| ()));
        }
        if !wanted.contains(&identity) {
            return;
        }
        let Some(due) = schedule.get_mut(&identity) else {
            return;
        };
        match result {
            Ok(cert) => {
                let received = SystemTime::now();
                // Half of what is left from now, not half of not_before..not_after:
                // CAs backdate not_before for clock skew, which for short
                // lifetimes would put the renewal in the past.
                let left = cert
                    .not_after()
                    .duration_since(received)
                    .unwrap_or_default();
                let refresh = (left / 2).max(MIN_REFRESH);
                tracing::info!(
                    %identity,
                    valid_for = ?left,
                    renew_in = ?refresh,
                    "workload certificate obtained"
                );
                self.store.insert(cert);
                *due = Due {
                    at: Instant::now() + refresh,
                    backoff: BACKOFF_MIN,
                };
            }
            Err(error) => {
                let retry_in = crate::backoff::jitter(due.backoff);
                let current = self.store.get(&identity);
                let valid_for = current
                    .as_ref()
                    .and_then(|c| c.not_after().duration_since(SystemTime::now()).ok());
                tracing::warn!(
                    %identity,
                    %error,
                    ?retry_in,
                    current_valid_for = ?valid_for,
                    "workload certificate not obtained; keeping the current one if any"
                );
                due.at = Instant::now() + retry_in;
                due.backoff = (due.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

struct Due {
    at: Instant,
    backoff: Duration,
}

fn instant_at(t: SystemTime) -> Instant {
    Instant::now() + t.duration_since(SystemTime::now()).unwrap_or_default()
}
