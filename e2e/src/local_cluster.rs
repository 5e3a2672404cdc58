//! The description of a running namespace cluster that `ambitctl --local`
//! reads (`ambit-local.json`): where istiod-lite's monitoring port, each
//! node's ztunnel admin port and each waypoint's admin port are, in which
//! network namespace, and the manifests directory istiod-lite follows.
//!
//! The layout is the harness's own: istiod-lite in the fabric namespace,
//! ztunnel admin on `<node ip>:15000` (as [`crate::process::Proxy::spawn_in_netns`]
//! binds it), a waypoint in its pod's namespace with admin on `<pod ip>:15000`
//! (as [`crate::process::Proxy::spawn_waypoint_in_netns`] binds it). Waypoint
//! pods are the manifests' pods labelled with their Gateway's name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ambitctl::inventory::{self, Inventory, GATEWAY_NAME};
use ambitctl::local::{LocalCluster, LocalControlPlane, LocalNode, LocalPod, LocalWaypoint};

use crate::cluster::Cluster;

/// The file name the harness writes in its work directory.
pub const FILE_NAME: &str = "ambit-local.json";

/// Describes `cluster`, with istiod-lite's monitoring address `monitoring`
/// (in the fabric namespace) following `manifests`.
pub fn describe(
    cluster: &Cluster,
    monitoring: SocketAddr,
    manifests: &Path,
) -> anyhow::Result<LocalCluster> {
    let objects = Inventory::from_manifests(manifests)?;
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    let mut waypoints = Vec::new();
    for node in &cluster.nodes {
        let name = format!("node{}", node.index);
        nodes.push(LocalNode {
            name: name.clone(),
            netns: Some(node.ns.name().to_string()),
            ztunnel_admin: SocketAddr::new(node.ip.into(), 15000),
            ztunnel_metrics: Some(SocketAddr::new(node.ip.into(), 15020)),
        });
        for pod in &node.pods {
            pods.push(LocalPod {
                name: pod.name.clone(),
                node: name.clone(),
                netns: Some(pod.ns.name().to_string()),
                ip: pod.ip.into(),
            });
            let Some((ns, pod_name)) = pod.name.split_once('/') else {
                continue;
            };
            let Some(gateway) = objects
                .pod(ns, pod_name)
                .and_then(|p| inventory::label(p, GATEWAY_NAME))
            else {
                continue;
            };
            waypoints.push(LocalWaypoint {
                name: gateway.to_string(),
                namespace: ns.to_string(),
                pod: Some(pod.name.clone()),
                node: Some(name.clone()),
                netns: Some(pod.ns.name().to_string()),
                admin: SocketAddr::new(pod.ip.into(), 15000),
            });
        }
    }
    Ok(LocalCluster {
        control_plane: LocalControlPlane {
            netns: Some(cluster.fabric_name().to_string()),
            monitoring,
        },
        manifests: manifests
            .canonicalize()
            .unwrap_or_else(|_| manifests.to_path_buf()),
        nodes,
        waypoints,
        pods,
    })
}

/// Writes `dir/ambit-local.json` for `cluster`; returns its path.
pub fn write(
    dir: &Path,
    cluster: &Cluster,
    monitoring: SocketAddr,
    manifests: &Path,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(FILE_NAME);
    describe(cluster, monitoring, manifests)?.save(&path)?;
    Ok(path)
}
