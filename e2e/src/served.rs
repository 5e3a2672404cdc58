//! A namespace cluster served by istiod-lite from a manifests directory,
//! with a capturing ztunnel per node following it over xDS: the setup the
//! cluster tests share.

use std::path::Path;
use std::time::Duration;

use crate::cluster::{Cluster, PodSpec, CONTROL_PLANE_IP};
use crate::istiod::Istiod;
use crate::netns::PinDir;
use crate::process::Ztunnel;

pub struct ServedCluster {
    pub cluster: Cluster,
    pub istiod: Istiod,
    pub pins: PinDir,
    pub ztunnels: Vec<Ztunnel>,
}

impl ServedCluster {
    /// Builds `nodes` nodes with `pods`, starts istiod-lite on `manifests` in
    /// the fabric namespace and a capturing ztunnel per node with its
    /// certificates issued. Destructure it in field order,
    /// `let ServedCluster { cluster, istiod, pins, ztunnels } = ...`, so the
    /// parts drop in reverse: processes, pins, control plane, namespaces.
    pub fn start(
        dir: &Path,
        manifests: &Path,
        nodes: u8,
        pods: &[PodSpec],
    ) -> anyhow::Result<Self> {
        let cluster = Cluster::build_with(nodes, pods)?;
        let names: Vec<String> = (1..=nodes).map(|n| format!("node{n}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let istiod = Istiod::spawn_in(
            Some(cluster.fabric_name()),
            dir,
            manifests,
            CONTROL_PLANE_IP.into(),
            &names,
        )?;
        let pins = PinDir::new()?;
        let mut ztunnels = Vec::new();
        for n in 1..=nodes {
            let source = istiod.source_for(&format!("node{n}"))?;
            let z = Ztunnel::spawn_capturing_from(cluster.node(n), dir, &source, pins.path())?;
            z.wait_certificates(Duration::from_secs(15))?;
            ztunnels.push(z);
        }
        Ok(ServedCluster {
            cluster,
            istiod,
            pins,
            ztunnels,
        })
    }
}
