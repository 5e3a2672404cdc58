//! istiod-lite: Ambit's control plane.
//!
//! * `serve`: the control plane proper: follows a manifests directory (or,
//!   with `--source kubernetes`, the Kubernetes API) and
//!   serves delta ADS and the CA (see [`serve`]).
//! * `render`: the same translation, once, as the static YAML ztunnel can read.
//! * `ca init|issue`: offline CA operations.
//! * `crds`: the CustomResourceDefinitions of Ambit's own resources.

mod crds;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use istiod_lite::kube_auth::ServiceAccount;
use istiod_lite::{ca_store, pipeline, serve, sources, translate};
use mesh_core::Identity;

#[derive(Parser)]
#[command(name = "istiod-lite", version, about = "Ambit control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup, so the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the control plane: follow a manifests directory or the Kubernetes
    /// API, serve xDS and the CA.
    Serve {
        /// Where cluster objects come from: a manifests directory, or the
        /// Kubernetes API (kubeconfig, or the in-cluster service account).
        #[arg(long, value_enum, default_value_t = Source::Manifests)]
        source: Source,
        /// Directory of multi-document YAML manifests (re-read when it
        /// changes); required with `--source manifests`.
        #[arg(long, env = "AMBIT_MANIFESTS")]
        manifests: Option<PathBuf>,
        /// Where the CA root lives (generated on first start).
        #[arg(long, default_value = "/var/lib/ambit/ca")]
        data_dir: PathBuf,
        #[arg(long, default_value = mesh_core::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
        /// xDS and CA over TLS, bearer token required.
        #[arg(long, default_value = "[::]:15012")]
        grpc_addr: SocketAddr,
        /// Plaintext, unauthenticated xDS: for tests only; off unless given.
        #[arg(long)]
        xds_plaintext_addr: Option<SocketAddr>,
        /// Metrics and debug views.
        #[arg(long, default_value = "127.0.0.1:15014")]
        monitoring_addr: SocketAddr,
        /// YAML map of node name to bootstrap token; a ztunnel presents its
        /// node's token as `authorization: Bearer <token>`. Required with
        /// `--source manifests`, refused with `kubernetes` (TokenReview there).
        /// Waypoint pods get their own tokens, issued into
        /// `<data-dir>/waypoint-tokens/<namespace>/<pod>`.
        #[arg(long)]
        bootstrap_tokens: Option<PathBuf>,
        /// Kubernetes mode: audience a node proxy's or waypoint's
        /// service-account token must be valid for (repeatable).
        #[arg(long = "token-audience", value_name = "AUDIENCE", default_value = istiod_lite::kube_auth::DEFAULT_AUDIENCE)]
        token_audiences: Vec<String>,
        /// Kubernetes mode: `namespace/name` of a service account allowed to
        /// act for the node its pod runs on (repeatable). Tokens of other
        /// accounts are accepted only from waypoint pods, for their own identity.
        #[arg(long = "node-proxy-service-account", value_name = "NAMESPACE/NAME", default_value = istiod_lite::kube_auth::DEFAULT_NODE_PROXY_ACCOUNT)]
        node_proxy_accounts: Vec<ServiceAccount>,
        /// Default workload certificate lifetime in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        cert_ttl_secs: u64,
        /// Longest lifetime a client may ask for, in seconds.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        max_cert_ttl_secs: u64,
        /// DNS names on the serving certificate (clients verify one of them).
        #[arg(long, default_values_t = vec![mesh_core::grpc::CONTROL_PLANE_NAME.to_string(), "istiod".to_string(), "localhost".to_string()])]
        serving_dns: Vec<String>,
        /// IP addresses on the serving certificate.
        #[arg(long, default_values_t = vec![IpAddr::from([127, 0, 0, 1])])]
        serving_ip: Vec<IpAddr>,
        /// How often the manifests directory is checked for changes, in milliseconds.
        #[arg(long, default_value_t = 250)]
        poll_ms: u64,
        /// Log filter (tracing's EnvFilter syntax).
        #[arg(long, env = "AMBIT_LOG", default_value = "info")]
        log_level: String,
        /// Accept pods on loopback addresses (single-host test meshes only).
        #[arg(long, hide = true)]
        allow_loopback_pods: bool,
        /// Kubernetes mode: deploy a waypoint (Deployment, Service,
        /// ServiceAccount) with this image for every `istio-waypoint`
        /// Gateway. Without it, waypoints are deployed by hand.
        #[arg(long, env = "AMBIT_WAYPOINT_IMAGE")]
        waypoint_image: Option<String>,
        /// Kubernetes mode: the xDS/CA address deployed waypoints dial
        /// [default: https://istiod-lite.<istiod-lite's namespace>.svc:15012].
        #[arg(long, env = "AMBIT_WAYPOINT_XDS_ADDRESS")]
        waypoint_xds_address: Option<String>,
        /// Kubernetes mode: the OTLP/gRPC collector deployed waypoints export
        /// their spans to (their `--otlp-endpoint`) [default: no tracing].
        #[arg(long, env = "AMBIT_WAYPOINT_OTLP_ENDPOINT")]
        waypoint_otlp_endpoint: Option<String>,
    },
    /// Translate a manifests directory into ztunnel's mesh config (YAML on stdout).
    Render {
        /// Directory of multi-document YAML manifests.
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value = mesh_core::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Policies here apply mesh-wide (Istio's root namespace).
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Generate the CRDs of Ambit's own resources from the Rust types: YAML
    /// on stdout, or one file per CRD into each --out directory.
    Crds {
        /// Directory to (over)write; repeatable.
        #[arg(long)]
        out: Vec<PathBuf>,
    },
    /// Certificate authority operations.
    Ca {
        #[command(subcommand)]
        op: CaOp,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Source {
    Manifests,
    Kubernetes,
}

#[derive(Subcommand)]
enum CaOp {
    /// Create the root in DATA_DIR if absent; print its location.
    Init {
        #[arg(long, default_value = "/var/lib/ambit/ca")]
        data_dir: PathBuf,
        #[arg(long, default_value = mesh_core::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Sign a certificate for IDENTITY into OUT/<ns>/<sa>/ (ztunnel's --certs layout).
    Issue {
        #[arg(long, default_value = "/var/lib/ambit/ca")]
        data_dir: PathBuf,
        /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>
        #[arg(long)]
        identity: Identity,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("istiod-lite: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            source,
            manifests,
            data_dir,
            trust_domain,
            root_namespace,
            grpc_addr,
            xds_plaintext_addr,
            monitoring_addr,
            bootstrap_tokens,
            token_audiences,
            node_proxy_accounts,
            cert_ttl_secs,
            max_cert_ttl_secs,
            serving_dns,
            serving_ip,
            poll_ms,
            log_level,
            allow_loopback_pods,
            waypoint_image,
            waypoint_xds_address,
            waypoint_otlp_endpoint,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_new(&log_level)
                .map_err(|e| anyhow::anyhow!("bad log level {log_level:?}: {e}"))?;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            serve::run(serve::ServeOptions {
                source: match source {
                    Source::Manifests => serve::SourceKind::Manifests,
                    Source::Kubernetes => serve::SourceKind::Kubernetes,
                },
                manifests,
                data_dir,
                mesh: pipeline::MeshOptions {
                    trust_domain,
                    root_namespace,
                    allow_loopback_pods,
                },
                grpc_addr,
                xds_plaintext_addr,
                monitoring_addr,
                bootstrap_tokens,
                token_audiences,
                node_proxy_accounts,
                cert_ttl: Duration::from_secs(cert_ttl_secs),
                max_cert_ttl: Duration::from_secs(max_cert_ttl_secs),
                serving_dns,
                serving_ips: serving_ip,
                poll_interval: Duration::from_millis(poll_ms.max(10)),
                waypoint_image,
                waypoint_xds_address,
                waypoint_otlp_endpoint,
            })?;
        }
        Command::Render {
            manifests,
            trust_domain,
            root_namespace,
        } => {
            let (state, mut rejected) = sources::manifests::load_dir(&manifests)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", manifests.display()))?;
            let t = translate::translate(
                &state,
                &translate::MeshOptions::new(&trust_domain, &root_namespace),
            );
            rejected.extend(t.rejected);
            for r in &rejected {
                eprintln!("rejected: {r}");
            }
            for n in &t.notes {
                eprintln!("note: {n}");
            }
            let yaml = serde_yaml::to_string(&t.config)?;
            // What ztunnel would refuse must not be rendered as if it were fine.
            mesh_core::config::parse_mesh_config(&yaml)
                .map_err(|e| anyhow::anyhow!("rendered config does not validate: {e}"))?;
            print!("{yaml}");
        }
        Command::Crds { out } => {
            let files = crds::all()?;
            if out.is_empty() {
                for f in &files {
                    print!("---\n{}", f.yaml);
                }
            }
            for dir in &out {
                crds::write_into(dir, &files)?;
            }
        }
        Command::Ca {
            op: CaOp::Init {
                data_dir,
                trust_domain,
            },
        } => {
            let (_, created) = ca_store::CaStore::new(&data_dir).load_or_create(&trust_domain)?;
            let verb = if created {
                "created"
            } else {
                "loaded existing"
            };
            println!("{verb} root CA in {}", data_dir.display());
        }
        Command::Ca {
            op:
                CaOp::Issue {
                    data_dir,
                    identity,
                    out,
                    ttl_hours,
                },
        } => {
            let (ca, _) =
                ca_store::CaStore::new(&data_dir).load_or_create(identity.trust_domain())?;
            let ttl = Duration::from_secs(ttl_hours.saturating_mul(3600));
            let dir = ca_store::issue_into(&ca, &identity, ttl, &out)?;
            println!("issued {identity} into {}", dir.display());
        }
    }
    Ok(())
}
