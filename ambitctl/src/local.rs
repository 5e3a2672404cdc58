//! The local backend: a network-namespace cluster (the e2e harness, the
//! demo) described by a JSON file the harness writes (`ambit-local.json`).
//! Objects come from the manifests directory istiod-lite follows; endpoints
//! are reached from inside the namespace they listen in.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::backend::{
    waypoint_gateway, ApplyOutcome, Backend, Component, ComponentKind, Endpoint, WaypointApply,
};
use crate::http::Reply;
use crate::inventory::Inventory;

/// The environment variable naming the cluster file (as `--local`).
pub const ENV: &str = "AMBIT_LOCAL";

/// A local cluster, as written by the harness. Every `netns` is a name under
/// `/run/netns` (or a path); none means ambitctl's own namespace (a loopback
/// cluster).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalCluster {
    pub control_plane: LocalControlPlane,
    /// The directory istiod-lite follows (`--manifests`).
    pub manifests: PathBuf,
    #[serde(default)]
    pub nodes: Vec<LocalNode>,
    #[serde(default)]
    pub waypoints: Vec<LocalWaypoint>,
    #[serde(default)]
    pub pods: Vec<LocalPod>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalControlPlane {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Its monitoring port (15014).
    pub monitoring: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalNode {
    /// As pods name it in `spec.nodeName`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub ztunnel_admin: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ztunnel_metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalWaypoint {
    /// The Gateway's name and namespace.
    pub name: String,
    pub namespace: String,
    /// The pod it runs as, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub admin: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalPod {
    /// `namespace/name`.
    pub name: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub ip: IpAddr,
}

impl LocalCluster {
    pub fn load(path: &Path) -> anyhow::Result<LocalCluster> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading local cluster file {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("local cluster file {}", path.display()))
    }

    /// Writes the file whole (temporary file, then rename), so a reader
    /// never sees half of it.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

pub struct LocalBackend {
    path: PathBuf,
    cluster: LocalCluster,
    timeout: Duration,
}

impl LocalBackend {
    pub fn open(path: &Path, timeout: Duration) -> anyhow::Result<LocalBackend> {
        Ok(LocalBackend {
            path: path.to_path_buf(),
            cluster: LocalCluster::load(path)?,
            timeout,
        })
    }

    pub fn cluster(&self) -> &LocalCluster {
        &self.cluster
    }
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        format!("local cluster {}", self.path.display())
    }

    async fn inventory(&self) -> anyhow::Result<Inventory> {
        Inventory::from_manifests(&self.cluster.manifests)
    }

    async fn components(&self) -> anyhow::Result<Vec<Component>> {
        let c = &self.cluster;
        let mut out = vec![Component {
            kind: ComponentKind::ControlPlane,
            name: "istiod-lite".into(),
            node: None,
            pod: None,
            endpoint: Endpoint::Tcp {
                netns: c.control_plane.netns.clone(),
                addr: c.control_plane.monitoring,
            },
        }];
        for n in &c.nodes {
            out.push(Component {
                kind: ComponentKind::Ztunnel,
                name: n.name.clone(),
                node: Some(n.name.clone()),
                pod: None,
                endpoint: Endpoint::Tcp {
                    netns: n.netns.clone(),
                    addr: n.ztunnel_admin,
                },
            });
        }
        for w in &c.waypoints {
            out.push(Component {
                kind: ComponentKind::Waypoint,
                name: format!("{}/{}", w.namespace, w.name),
                node: w.node.clone(),
                pod: w.pod.clone(),
                endpoint: Endpoint::Tcp {
                    netns: w.netns.clone(),
                    addr: w.admin,
                },
            });
        }
        Ok(out)
    }

    async fn get(&self, component: &Component, path: &str) -> anyhow::Result<Reply> {
        let Endpoint::Tcp { netns, addr } = &component.endpoint else {
            bail!("{} is not reachable from a local cluster", component.name);
        };
        let stream = crate::netns::connect(netns.as_deref(), *addr, self.timeout).await?;
        crate::http::get(stream, &addr.to_string(), path, self.timeout).await
    }

    async fn apply_waypoint(&self, req: &WaypointApply) -> anyhow::Result<ApplyOutcome> {
        if req.enroll_namespace {
            bail!(
                "--enroll-namespace is for Kubernetes: in a local cluster, add the label \
                 istio.io/use-waypoint: {} to namespace {} in its manifest under {}",
                req.name,
                req.namespace,
                self.cluster.manifests.display()
            );
        }
        let gateway = waypoint_gateway(&req.namespace, &req.name);
        let existing = self.inventory().await?;
        if let Some(gw) = existing.gateways.iter().find(|g| {
            crate::inventory::namespace(g) == req.namespace && crate::inventory::name(g) == req.name
        }) {
            let class = gw["spec"]["gatewayClassName"].as_str().unwrap_or("");
            // Written by an earlier apply: fall through and compare the file.
            let ours = gw == &gateway;
            if !ours {
                if class != crate::inventory::WAYPOINT_CLASS {
                    bail!(
                        "Gateway {}/{} exists in {} with class {class:?}, not {}",
                        req.namespace,
                        req.name,
                        self.cluster.manifests.display(),
                        crate::inventory::WAYPOINT_CLASS
                    );
                }
                return Ok(ApplyOutcome {
                    gateway: "unchanged".into(),
                    location: format!("{} (already declared)", self.cluster.manifests.display()),
                    namespace_labelled: false,
                    object: gw.clone(),
                });
            }
        }
        let file = self
            .cluster
            .manifests
            .join(format!("waypoint-{}-{}.yaml", req.namespace, req.name));
        let yaml = serde_yaml::to_string(&gateway)?;
        let text = format!(
            "# Written by `ambitctl waypoint apply -n {} --name {}`.\n{yaml}",
            req.namespace, req.name
        );
        let unchanged = std::fs::read_to_string(&file).is_ok_and(|old| old == text);
        if !unchanged {
            // Whole, then renamed in: istiod-lite must never read half a file,
            // and only *.yaml files are read, so the temporary one is ignored.
            let tmp = file.with_extension("yaml.tmp");
            std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
        }
        Ok(ApplyOutcome {
            gateway: if unchanged { "unchanged" } else { "written" }.into(),
            location: file.display().to_string(),
            namespace_labelled: false,
            object: gateway,
        })
    }
}
