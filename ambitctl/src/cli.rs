//! Command line and dispatch.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::backend::{Backend, ComponentKind, WaypointApply};
use crate::kubernetes::{KubeBackend, KubeOptions};
use crate::local::LocalBackend;
use crate::report;

#[derive(Parser, Debug)]
#[command(
    name = "ambitctl",
    version,
    about = "Inspect and operate an Ambit ambient mesh",
    long_about = "Inspect and operate an Ambit ambient mesh: a local network-namespace \
                  cluster (--local FILE or AMBIT_LOCAL, as written by the e2e harness and \
                  the demo) or a Kubernetes cluster (kubeconfig)."
)]
pub struct Cli {
    /// A local cluster's description file (ambit-local.json); run as root.
    #[arg(long, env = crate::local::ENV, global = true, value_name = "FILE")]
    pub local: Option<PathBuf>,

    /// The kubeconfig (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "local")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true, conflicts_with = "local")]
    pub context: Option<String>,

    /// Namespace of ztunnel and istiod-lite pods (Kubernetes).
    #[arg(long, global = true, default_value = "istio-system")]
    pub istio_namespace: String,

    /// The `app` / `app.kubernetes.io/name` label of ztunnel pods (Kubernetes).
    #[arg(long, global = true, default_value = "ztunnel")]
    pub ztunnel_app: String,

    /// The `app` / `app.kubernetes.io/name` label of istiod-lite pods (Kubernetes).
    #[arg(long, global = true, default_value = "istiod-lite")]
    pub istiod_app: String,

    /// Output: aligned tables for people, or JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// How long to wait for each endpoint, in seconds.
    #[arg(long, global = true, default_value_t = 5)]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Control plane, ztunnels and waypoints: readiness, versions, certificate expiry.
    Status,
    /// Every pod: node, identity, whether its traffic is captured, its waypoint.
    Workloads {
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// A proxy's configuration: `ztunnel [NODE]` or `waypoint [NAMESPACE/NAME]`.
    ConfigDump {
        #[arg(value_enum)]
        proxy: ProxyKind,
        /// The ztunnel's node, or the waypoint's Gateway (`namespace/name`);
        /// may be left out when there is only one.
        name: Option<String>,
    },
    /// Is a pod's traffic captured and mTLS? Which policies apply to it?
    Check {
        /// `namespace/name`, or a name with -n.
        pod: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Waypoints.
    #[command(subcommand)]
    Waypoint(WaypointCommand),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyKind {
    Ztunnel,
    Waypoint,
}

#[derive(Subcommand, Debug)]
pub enum WaypointCommand {
    /// Declares a namespace's waypoint: a Gateway of class istio-waypoint
    /// with listener `mesh` on 15008 (HBONE), as istioctl does.
    Apply {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Also label the namespace istio.io/use-waypoint=<name> (Kubernetes).
        #[arg(long)]
        enroll_namespace: bool,
    },
}

/// What a command prints, and the process's exit status.
pub struct Outcome {
    pub stdout: String,
    pub code: i32,
}

fn json<T: Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let timeout = Duration::from_secs(cli.timeout.max(1));
    match &cli.local {
        Some(path) => {
            let backend = LocalBackend::open(path, timeout)?;
            dispatch(&cli, &backend).await
        }
        None => {
            let backend = KubeBackend::connect(KubeOptions {
                kubeconfig: cli.kubeconfig.clone(),
                context: cli.context.clone(),
                system_namespace: cli.istio_namespace.clone(),
                ztunnel_app: cli.ztunnel_app.clone(),
                istiod_app: cli.istiod_app.clone(),
                timeout,
            })
            .await?;
            dispatch(&cli, &backend).await
        }
    }
}

/// Runs the command against either backend.
pub async fn dispatch<B: Backend>(cli: &Cli, backend: &B) -> anyhow::Result<Outcome> {
    let now = report::now_unix();
    let as_json = cli.output == Output::Json;
    let ok = |stdout: String| Outcome { stdout, code: 0 };
    match &cli.command {
        Command::Status => {
            let g = report::gather(backend).await?;
            let probe = match &g.control_plane {
                Some(cp) => Some(report::probe_control_plane(backend, cp).await),
                None => None,
            };
            let r = report::status(&g, probe.as_ref(), now);
            let stdout = if as_json {
                json(&r)?
            } else {
                report::render_status(&r, now)
            };
            // Scripts can test the exit status: 2 is "answered, not healthy".
            Ok(Outcome {
                stdout,
                code: if r.healthy() { 0 } else { 2 },
            })
        }
        Command::Workloads { namespace } => {
            let g = report::gather(backend).await?;
            let mut rows = report::workloads(&g);
            if let Some(ns) = namespace {
                rows.retain(|r| &r.namespace == ns);
            }
            Ok(ok(if as_json {
                json(&rows)?
            } else {
                let mut s = report::render_workloads(&rows);
                if let Err(e) = &g.mesh {
                    s.push_str(&format!("\nnote: {e}\n"));
                }
                s
            }))
        }
        Command::Check { pod, namespace } => {
            let (ns, name) = match (pod.split_once('/'), namespace) {
                (Some((ns, name)), None) => (ns.to_string(), name.to_string()),
                (Some(_), Some(_)) => {
                    bail!("give the pod as NAMESPACE/NAME or NAME -n NAMESPACE, not both")
                }
                (None, Some(ns)) => (ns.clone(), pod.clone()),
                (None, None) => ("default".to_string(), pod.clone()),
            };
            let g = report::gather(backend).await?;
            let r = report::check(&g, &ns, &name, now)?;
            Ok(ok(if as_json {
                json(&r)?
            } else {
                report::render_check(&r)
            }))
        }
        Command::ConfigDump { proxy, name } => {
            let kind = match proxy {
                ProxyKind::Ztunnel => ComponentKind::Ztunnel,
                ProxyKind::Waypoint => ComponentKind::Waypoint,
            };
            let all: Vec<_> = backend
                .components()
                .await?
                .into_iter()
                .filter(|c| c.kind == kind)
                .collect();
            let names = || {
                all.iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let c = match name {
                Some(n) => all
                    .iter()
                    .find(|c| &c.name == n || c.pod.as_deref() == Some(n.as_str()))
                    .with_context(|| {
                        format!("no {} named {n} (there are: {})", kind.label(), names())
                    })?,
                None => match all.as_slice() {
                    [one] => one,
                    [] => bail!("no {} found ({})", kind.label(), backend.describe()),
                    _ => bail!("which {}? one of: {}", kind.label(), names()),
                },
            };
            let f = report::fetch_dump(backend, c).await;
            let dump = f.dump.map_err(|e| anyhow::anyhow!(e))?;
            Ok(ok(if as_json {
                json(&dump)?
            } else {
                report::render_dump(c, &dump, now)
            }))
        }
        Command::Waypoint(WaypointCommand::Apply {
            namespace,
            name,
            enroll_namespace,
        }) => {
            let outcome = backend
                .apply_waypoint(&WaypointApply {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    enroll_namespace: *enroll_namespace,
                })
                .await?;
            Ok(ok(if as_json {
                json(&outcome)?
            } else {
                let mut s = format!(
                    "waypoint {namespace}/{name} {} ({})\n",
                    outcome.gateway, outcome.location
                );
                if outcome.namespace_labelled {
                    s.push_str(&format!(
                        "namespace {namespace} labelled istio.io/use-waypoint={name}\n"
                    ));
                }
                s
            }))
        }
    }
}
