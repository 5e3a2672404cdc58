//! The mesh CA over gRPC: Istio's `istio.v1.auth.IstioCertificateService`.
//!
//! A caller authenticates (see [`crate::node_auth`]) and asks for a
//! certificate naming an identity, which it states in the request metadata
//! field `ImpersonatedIdentity` as Istio's ztunnel does. Against the current
//! mesh config:
//! * a **node** obtains the identity of a workload scheduled on it, waypoints
//!   excepted: a compromised node can then impersonate no more than the pods
//!   it already runs, and never the waypoint whose L7 policy guards them;
//! * a **waypoint pod** obtains its own identity only.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::ca::{CaError, CertificateAuthority};
use mesh_core::config::{MeshConfig, Workload};
use mesh_core::proto::istio::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_core::proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_core::Identity;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::metrics::{CaResult, Metrics};
use crate::node_auth::{Authenticator, Caller};

/// Metadata field naming the identity a node proxy requests for a workload.
pub use mesh_core::proto::IMPERSONATED_IDENTITY;

#[derive(Clone)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    mesh: watch::Receiver<Arc<MeshConfig>>,
    default_ttl: Duration,
    max_ttl: Duration,
    metrics: Arc<Metrics>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        mesh: watch::Receiver<Arc<MeshConfig>>,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Self {
        CaService {
            ca,
            auth,
            mesh,
            default_ttl: default_ttl.min(max_ttl),
            max_ttl,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Counts requests in `metrics` (the process-wide registry) instead of a
    /// private one.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let caller = self
            .auth
            .authenticate(request.metadata())
            .await
            .map_err(|s| {
                // A caller the authenticator knows but refuses is a denial,
                // not a missing credential.
                let result = if s.code() == tonic::Code::PermissionDenied {
                    CaResult::denied
                } else {
                    CaResult::unauthenticated
                };
                Refusal::new(result, s, None, None)
            })?;
        let req = request.into_inner();
        let refuse = |result, status: Status, identity: Option<&str>| {
            Refusal::new(
                result,
                status,
                Some(caller.to_string()),
                identity.map(str::to_string),
            )
        };

        let requested =
            impersonated_identity(&req).map_err(|s| refuse(CaResult::invalid, s, None))?;
        let identity: Identity = requested.parse().map_err(|e| {
            refuse(
                CaResult::invalid,
                Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")),
                Some(requested),
            )
        })?;

        if let Err(why) = may_obtain(&self.mesh.borrow(), &caller, &identity) {
            return Err(refuse(
                CaResult::denied,
                Status::permission_denied(why),
                Some(requested),
            ));
        }

        let ttl = match u64::try_from(req.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(self.max_ttl),
            _ => self.default_ttl,
        };
        let leaf = self
            .ca
            .sign_csr_leaf(&req.csr, &identity, ttl)
            .map_err(|e| match e {
                CaError::Csr(_) | CaError::CsrIdentity { .. } => refuse(
                    CaResult::invalid,
                    Status::invalid_argument(e.to_string()),
                    Some(requested),
                ),
                other => refuse(
                    CaResult::error,
                    Status::internal(format!("signing failed: {other}")),
                    Some(requested),
                ),
            })?;
        tracing::info!(%caller, %identity, ttl_secs = ttl.as_secs(), "certificate issued");
        self.metrics.ca_request(CaResult::issued);
        Ok(IstioCertificateResponse {
            cert_chain: vec![leaf, self.ca.root_pem().to_string()],
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        match self.handle(request).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(r) => {
                tracing::warn!(
                    caller = r.caller.as_deref().unwrap_or("-"),
                    identity = r.identity.as_deref().unwrap_or("-"),
                    reason = r.status.message(),
                    "certificate refused"
                );
                self.metrics.ca_request(r.result);
                Err(r.status)
            }
        }
    }
}

/// A refused request, with what is known about it for the log line.
struct Refusal {
    result: CaResult,
    status: Status,
    caller: Option<String>,
    identity: Option<String>,
}

impl Refusal {
    fn new(
        result: CaResult,
        status: Status,
        caller: Option<String>,
        identity: Option<String>,
    ) -> Self {
        Refusal {
            result,
            status,
            caller,
            identity,
        }
    }
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<&str, Status> {
    use prost_types::value::Kind;
    let field = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY));
    match field.and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => Ok(s),
        Some(_) => Err(Status::invalid_argument(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string"
        ))),
        None => Err(Status::invalid_argument(format!(
            "no {IMPERSONATED_IDENTITY} in the request metadata: a node token carries no \
             identity of its own, so name the workload identity to certify"
        ))),
    }
}

/// Whether `caller` may obtain `identity` now, or why not.
fn may_obtain(mesh: &MeshConfig, caller: &Caller, identity: &Identity) -> Result<(), String> {
    if identity.trust_domain() != mesh.trust_domain {
        return Err(format!(
            "identity {identity} is not in trust domain {}",
            mesh.trust_domain
        ));
    }
    let has = |w: &Workload| {
        w.namespace == identity.namespace() && w.service_account == identity.service_account()
    };
    match caller {
        Caller::Node(node) => {
            let on_node: Vec<&Workload> = mesh
                .workloads
                .iter()
                .filter(|w| w.node == *node && has(w))
                .collect();
            // Waypoints hold their own credential; a node never gets their
            // identity, or taking the node would bypass their L7 policy. (An
            // ordinary pod of the same account still gives it: identities
            // are per account.)
            if on_node.iter().any(|w| !w.native_tunnel) {
                Ok(())
            } else if on_node.is_empty() {
                Err(format!(
                    "identity {identity} has no workload on node {node}"
                ))
            } else {
                Err(format!(
                    "identity {identity} is a waypoint's on node {node}: a waypoint obtains \
                     its identity with its own token, a node's token cannot"
                ))
            }
        }
        Caller::Waypoint(_) => {
            let pod = caller.waypoint_in(mesh)?;
            if has(pod) {
                Ok(())
            } else {
                Err(format!(
                    "{caller} may obtain only its own identity spiffe://{}/ns/{}/sa/{}, not \
                     {identity}",
                    mesh.trust_domain, pod.namespace, pod.service_account
                ))
            }
        }
    }
}
