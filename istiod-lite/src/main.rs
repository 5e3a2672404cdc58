//! istiod-lite: Ambit's control plane.
//!
//! Today: the mesh CA offline (`ca init` creates or loads the persisted root,
//! `ca issue` signs a workload certificate into the layout ztunnel reads) and
//! the manifests source with its translation (`render` turns a directory of
//! Kubernetes/Istio manifests into the mesh config ztunnel reads). The gRPC
//! CA, the Kubernetes source and the xDS server build on these.

mod ca_store;
mod exclusions;
mod istio_types;
mod sources;
mod translate;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_core::Identity;

#[derive(Parser)]
#[command(name = "istiod-lite", version, about = "Ambit control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Certificate authority operations.
    Ca {
        #[command(subcommand)]
        op: CaOp,
    },
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
        Command::Render {
            manifests,
            trust_domain,
            root_namespace,
        } => {
            let (state, mut rejected) = sources::manifests::load_dir(&manifests)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", manifests.display()))?;
            let t = translate::translate(&state, &trust_domain, &root_namespace);
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

#[cfg(test)]
mod tests_translate;
