//! The mesh CA over gRPC: Istio's `istio.v1.auth.IstioCertificateService`.
//!
//! A caller authenticates as a node (see [`crate::node_auth`]) and asks, on
//! behalf of a workload, for a certificate naming that workload's identity,
//! which it states in the request metadata field `ImpersonatedIdentity` as
//! Istio's ztunnel does. The identity is granted only if a workload with it is
//! scheduled on the caller's node in the current mesh config: a compromised
//! node can then impersonate no more than the pods it already runs.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::ca::{CaError, CertificateAuthority};
use mesh_core::config::MeshConfig;
use mesh_core::proto::istio::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_core::proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_core::Identity;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::metrics::{CaResult, Metrics};
use crate::node_auth::Authenticator;

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
        let node = self
            .auth
            .authenticate(request.metadata())
            .await
            .map_err(|s| Refusal::new(CaResult::unauthenticated, s, None, None))?;
        let req = request.into_inner();
        let refuse = |result, status: Status, identity: Option<&str>| {
            Refusal::new(
                result,
                status,
                Some(node.clone()),
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

        if !has_workload_on(&self.mesh.borrow(), &identity, &node) {
            return Err(refuse(
                CaResult::denied,
                Status::permission_denied(format!(
                    "identity {identity} has no workload on node {node}"
                )),
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
        tracing::info!(%node, %identity, ttl_secs = ttl.as_secs(), "certificate issued");
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
                    node = r.node.as_deref().unwrap_or("-"),
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
    node: Option<String>,
    identity: Option<String>,
}

impl Refusal {
    fn new(
        result: CaResult,
        status: Status,
        node: Option<String>,
        identity: Option<String>,
    ) -> Self {
        Refusal {
            result,
            status,
            node,
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

fn has_workload_on(mesh: &MeshConfig, identity: &Identity, node: &str) -> bool {
    identity.trust_domain() == mesh.trust_domain
        && mesh.workloads.iter().any(|w| {
            w.node == node
                && w.namespace == identity.namespace()
                && w.service_account == identity.service_account()
        })
}
