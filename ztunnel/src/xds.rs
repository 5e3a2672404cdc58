//! The mesh view from the control plane: a delta ADS client whose accepted
//! resources are assembled into the same validated model a static config
//! gives, and swapped in whole.

use std::sync::Arc;

use mesh_core::config::MeshState;
use mesh_core::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use mesh_core::xds::client::{Client, Handler, ResourceSet};
use mesh_core::xds::{assemble, decode_address, decode_authorization};
use prost_types::Any;

use crate::reload::count;
use crate::state::ProxyState;

/// Where istiod-lite keeps mesh-wide policies; only used for display, as
/// resources carry their scope.
const ROOT_NAMESPACE: &str = "istio-system";

struct MeshHandler {
    state: Arc<ProxyState>,
}

impl Handler for MeshHandler {
    fn check(&mut self, type_url: &str, _name: &str, resource: &Any) -> Result<(), String> {
        match type_url {
            ADDRESS_TYPE => decode_address(resource, &self.state.settings.trust_domain).map(|_| ()),
            AUTHORIZATION_TYPE => decode_authorization(resource).map(|_| ()),
            other => Err(format!("unexpected type {other}")),
        }
    }

    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        let (td, node) = (&self.state.settings.trust_domain, &self.state.settings.node);
        let outcome =
            std::panic::catch_unwind(|| build(resources, td, node)).unwrap_or_else(|_| {
                Err("internal error while assembling (bug); update ignored".into())
            });
        match outcome {
            Ok(mesh) => {
                let config = mesh.config();
                tracing::info!(
                    workloads = config.workloads.len(),
                    services = config.services.len(),
                    policies = config.policies.len(),
                    "mesh config updated from xDS"
                );
                self.state.set_mesh(mesh);
                count(&self.state, "xds", true);
                Ok(())
            }
            Err(e) => {
                count(&self.state, "xds", false);
                Err(e)
            }
        }
    }
}

fn build(resources: &ResourceSet, trust_domain: &str, node: &str) -> Result<MeshState, String> {
    let mut addresses = Vec::new();
    for stored in resources
        .get(ADDRESS_TYPE)
        .into_iter()
        .flat_map(|m| m.values())
    {
        addresses.push(decode_address(&stored.resource, trust_domain)?);
    }
    let mut policies = Vec::new();
    for (name, stored) in resources
        .get(AUTHORIZATION_TYPE)
        .into_iter()
        .flat_map(|m| m.iter())
    {
        let (policy, notes) = decode_authorization(&stored.resource)?;
        for n in notes {
            tracing::warn!(policy = %name, "narrowed to fail closed: {n}");
        }
        policies.push(policy);
    }
    let config = assemble(
        trust_domain,
        ROOT_NAMESPACE,
        Some(node),
        addresses,
        policies,
    )?;
    Ok(MeshState::new(config))
}

/// Follows the control plane forever. The status handle is kept in the
/// state for config dumps and readiness.
pub async fn run(state: Arc<ProxyState>, address: String) -> anyhow::Result<()> {
    let cp = state.settings.control_plane(&address)?;
    let node = state.settings.node.clone();
    let client = Client::new(
        cp,
        format!("ztunnel~{node}"),
        &node,
        &[AUTHORIZATION_TYPE, ADDRESS_TYPE],
    );
    state.set_xds_status(client.status());
    tracing::info!(%address, "following the control plane over delta ADS");
    client.run(MeshHandler { state }).await;
    Ok(())
}
