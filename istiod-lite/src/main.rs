//! istiod-lite: Ambit's control plane.
//!
//! Today it runs the mesh CA offline: `ca init` creates (or loads) the persisted
//! root, `ca issue` signs a workload certificate into the directory layout
//! ztunnel reads. The gRPC CA, the Kubernetes and manifest sources and the xDS
//! server build on this (see the control-plane issue).

mod ca_store;

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
