//! `istiod-lite serve`: the running control plane. One process serves
//! delta ADS and the CA over TLS (15012, bearer token required), delta ADS in
//! plaintext for tests (15010, off by default), and monitoring (15014).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::ca_service::CaService;
use crate::ca_store::CaStore;
use crate::kube_auth::{
    KubeAuthMetrics, KubernetesAuthConfig, KubernetesAuthenticator, ServiceAccount,
};
use crate::metrics::Metrics;
use crate::node_auth::{Authenticator, NodeAuthenticator};
use crate::pipeline::{self, MeshOptions, Outputs, PipelineMetrics};
use crate::sources::kubernetes::{follow_kubernetes, KubernetesConfig, KubernetesMetrics};
use crate::waypoint_deployer::{DeployerConfig, DeployerMetrics, DeployerSettings};
use crate::waypoint_tokens::WaypointTokens;
use crate::xds::{XdsMetrics, XdsServer};

/// Where the cluster objects come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceKind {
    /// A directory of YAML manifests ([`ServeOptions::manifests`]).
    #[default]
    Manifests,
    /// The Kubernetes API: kubeconfig, or the in-cluster service account.
    Kubernetes,
}

pub struct ServeOptions {
    pub source: SourceKind,
    /// Required with [`SourceKind::Manifests`], ignored otherwise.
    pub manifests: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub mesh: MeshOptions,
    pub grpc_addr: SocketAddr,
    pub xds_plaintext_addr: Option<SocketAddr>,
    pub monitoring_addr: SocketAddr,
    /// Node bootstrap tokens: required with [`SourceKind::Manifests`]; with
    /// Kubernetes, nodes are authenticated by TokenReview instead. Waypoint
    /// pods' tokens are issued into `<data_dir>/waypoint-tokens`.
    pub bootstrap_tokens: Option<PathBuf>,
    /// Kubernetes mode: audiences a node proxy's token must be valid for.
    pub token_audiences: Vec<String>,
    /// Kubernetes mode: service accounts allowed to act for their node.
    pub node_proxy_accounts: Vec<ServiceAccount>,
    pub cert_ttl: Duration,
    pub max_cert_ttl: Duration,
    pub serving_dns: Vec<String>,
    pub serving_ips: Vec<IpAddr>,
    pub poll_interval: Duration,
    /// Kubernetes mode: the image of the waypoints deployed for
    /// `istio-waypoint` Gateways; none deployed without it.
    pub waypoint_image: Option<String>,
    /// Kubernetes mode: the control plane address deployed waypoints dial
    /// (default `https://istiod-lite.<our namespace>.svc:15012`).
    pub waypoint_xds_address: Option<String>,
    /// `--waypoint-otlp-endpoint`: passed to deployed waypoints.
    pub waypoint_otlp_endpoint: Option<String>,
}

/// Manifests mode: where, under `--data-dir`, waypoint pods' tokens are
/// written ([`crate::waypoint_tokens`]).
pub const WAYPOINT_TOKEN_DIR: &str = "waypoint-tokens";

/// How long the serving certificate lives; it is re-issued at every start.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// HTTP/2 and TCP keepalives: a proxy that vanished without closing its
/// connection is noticed and its stream (and any push slot) released.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
}

pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("istiod")
        .enable_all()
        .build()
        .context("building runtime")?;
    rt.block_on(serve(opts))
}

async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    if opts.source == SourceKind::Manifests && opts.manifests.is_none() {
        anyhow::bail!("--manifests is required with --source manifests");
    }
    match (opts.source, &opts.bootstrap_tokens) {
        (SourceKind::Manifests, None) => {
            anyhow::bail!("--bootstrap-tokens is required with --source manifests")
        }
        _ if opts.source == SourceKind::Manifests
            && (opts.waypoint_image.is_some()
                || opts.waypoint_xds_address.is_some()
                || opts.waypoint_otlp_endpoint.is_some()) =>
        {
            anyhow::bail!(
                "--waypoint-image, --waypoint-xds-address and --waypoint-otlp-endpoint apply to --source kubernetes only: \
                 from a manifests directory waypoints are run by hand"
            )
        }
        (SourceKind::Kubernetes, Some(_)) => anyhow::bail!(
            "--bootstrap-tokens applies to --source manifests only: in Kubernetes, node \
             proxies are authenticated by TokenReview of their service-account token"
        ),
        _ => {}
    }
    let (ca, created) = CaStore::new(&opts.data_dir).load_or_create(&opts.mesh.trust_domain)?;
    tracing::info!(
        dir = %opts.data_dir.display(),
        "{} root CA",
        if created { "created" } else { "loaded" }
    );
    let ca = Arc::new(ca);

    let mut metrics = Metrics::new();
    let xds_metrics = XdsMetrics::register(&mut metrics.registry);
    let pipeline_metrics = PipelineMetrics::register(&mut metrics.registry);
    let kubernetes_metrics = KubernetesMetrics::register(&mut metrics.registry);
    let kube_auth_metrics = KubeAuthMetrics::register(&mut metrics.registry);
    let deployer_metrics = DeployerMetrics::register(&mut metrics.registry);
    let metrics = Arc::new(metrics);

    let outputs = Arc::new(Outputs::default());
    // The first build must succeed (or, from Kubernetes, every kind be listed)
    // before anything is served: an empty mesh would look like every workload
    // had left.
    let auth: Arc<dyn Authenticator> = match opts.source {
        SourceKind::Manifests => {
            let tokens = opts
                .bootstrap_tokens
                .as_ref()
                .context("--bootstrap-tokens is required with --source manifests")?;
            let auth = NodeAuthenticator::from_file(tokens)
                .with_context(|| format!("bootstrap tokens {}", tokens.display()))?;
            let dir = opts
                .manifests
                .clone()
                .context("--manifests is required with --source manifests")?;
            pipeline::rebuild(&dir, &opts.mesh, &outputs, &pipeline_metrics)
                .map_err(anyhow::Error::msg)?;
            // Issued before serving, so the waypoint pods of the first model
            // have their tokens by the time we are ready.
            let token_dir = opts.data_dir.join(WAYPOINT_TOKEN_DIR);
            let waypoint_tokens = WaypointTokens::open(&token_dir)
                .with_context(|| format!("waypoint tokens {}", token_dir.display()))?;
            waypoint_tokens.sync(&outputs.mesh.borrow());
            tokio::spawn(waypoint_tokens.clone().follow(outputs.mesh.subscribe()));
            let auth = auth.with_waypoint_tokens(waypoint_tokens);
            tokio::spawn(pipeline::follow_manifests(
                dir,
                opts.mesh.clone(),
                outputs.clone(),
                pipeline_metrics,
                opts.poll_interval,
            ));
            Arc::new(auth)
        }
        SourceKind::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client (kubeconfig or in-cluster config)")?;
            let (synced, is_synced) = tokio::sync::oneshot::channel();
            let auth = KubernetesAuthenticator::new(
                client.clone(),
                KubernetesAuthConfig {
                    audiences: opts.token_audiences.clone(),
                    node_proxy_accounts: opts.node_proxy_accounts.clone(),
                    ..Default::default()
                },
            )
            .with_metrics(kube_auth_metrics);
            let deployer = crate::waypoint_deployer::template(
                &client,
                DeployerSettings {
                    image: opts.waypoint_image.clone(),
                    xds_address: opts.waypoint_xds_address.clone(),
                    // The name the waypoint checks on our serving certificate.
                    control_plane_name: opts
                        .serving_dns
                        .first()
                        .cloned()
                        .unwrap_or_else(|| mesh_core::grpc::CONTROL_PLANE_NAME.to_string()),
                    trust_domain: opts.mesh.trust_domain.clone(),
                    root_namespace: opts.mesh.root_namespace.clone(),
                    otlp_endpoint: opts
                        .waypoint_otlp_endpoint
                        .clone()
                        .filter(|e| !e.trim().is_empty()),
                    token_audience: opts
                        .token_audiences
                        .first()
                        .cloned()
                        .unwrap_or_else(|| crate::kube_auth::DEFAULT_AUDIENCE.to_string()),
                    root_cert_pem: ca.root_pem().to_string(),
                },
            );
            if let Some(template) = deployer {
                tokio::spawn(crate::waypoint_deployer::run(
                    client.clone(),
                    DeployerConfig::new(template, deployer_metrics),
                ));
            }
            tokio::spawn(follow_kubernetes(
                client,
                opts.mesh.clone(),
                outputs.clone(),
                pipeline_metrics,
                KubernetesConfig {
                    metrics: kubernetes_metrics,
                    synced: Some(synced),
                    ..Default::default()
                },
            ));
            tracing::info!("waiting for the first list of every watched kind");
            is_synced
                .await
                .context("the Kubernetes source stopped before its first sync")?;
            Arc::new(auth)
        }
    };

    let serving = ca
        .issue_server(&opts.serving_dns, &opts.serving_ips, SERVING_CERT_TTL)
        .context("issuing the serving certificate")?;
    let tls = crate::tls_serve::server_config(&serving.chain_pem, &serving.key_pem)?;

    let grpc = tokio::net::TcpListener::bind(opts.grpc_addr)
        .await
        .with_context(|| format!("binding {}", opts.grpc_addr))?;
    let xds = XdsServer::new(
        outputs.snapshots.subscribe(),
        Some(auth.clone()),
        xds_metrics.clone(),
    );
    let ca_service = CaService::new(
        ca.clone(),
        auth,
        outputs.mesh.subscribe(),
        opts.cert_ttl,
        opts.max_cert_ttl,
    )
    .with_metrics(metrics.clone());
    let secure = server_builder()
        .add_service(AggregatedDiscoveryServiceServer::new(xds))
        .add_service(ca_service.into_server())
        .serve_with_incoming(crate::tls_serve::tls_incoming(grpc, tls));
    tracing::info!(addr = %opts.grpc_addr, "xDS and CA over TLS");
    let secure = tokio::spawn(secure);

    let plaintext = match opts.xds_plaintext_addr {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tracing::warn!(%addr, "plaintext, unauthenticated xDS (for tests only)");
            let xds = XdsServer::new(outputs.snapshots.subscribe(), None, xds_metrics);
            Some(tokio::spawn(
                server_builder()
                    .add_service(AggregatedDiscoveryServiceServer::new(xds))
                    .serve_with_incoming(TcpListenerStream::new(l)),
            ))
        }
        None => None,
    };

    let monitoring = tokio::net::TcpListener::bind(opts.monitoring_addr)
        .await
        .with_context(|| format!("binding {}", opts.monitoring_addr))?;
    tokio::spawn(crate::monitoring::serve(
        monitoring,
        metrics,
        outputs.clone(),
    ));
    tracing::info!(addr = %opts.monitoring_addr, "istiod-lite ready");

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = secure => anyhow::bail!("TLS gRPC server stopped: {r:?}"),
        r = async { match plaintext { Some(p) => p.await, None => std::future::pending().await } } => {
            anyhow::bail!("plaintext xDS server stopped: {r:?}")
        }
    }
    tracing::info!("shutting down");
    Ok(())
}
