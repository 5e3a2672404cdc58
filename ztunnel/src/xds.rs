//! The mesh view from the control plane: a delta ADS client whose accepted
//! resources are assembled (by mesh-core's shared [`MeshHandler`]) into the
//! same validated model a static config gives, and swapped in whole.

use std::sync::Arc;

use mesh_core::config::{MeshConfig, MeshState};
use mesh_core::xds::client::Client;
use mesh_core::xds::{MeshHandler, MeshSink, ZTUNNEL_TYPES};

use crate::reload::count;
use crate::state::ProxyState;

/// Puts each assembled config into the proxy state, and counts outcomes.
struct Apply {
    state: Arc<ProxyState>,
}

impl MeshSink for Apply {
    fn apply(&mut self, config: MeshConfig) -> Result<(), String> {
        let mesh = MeshState::new(config);
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

    fn rejected(&mut self, _error: &str) {
        count(&self.state, "xds", false);
    }
}

/// Follows the control plane forever. The status handle is kept in the
/// state for config dumps and readiness.
pub async fn run(state: Arc<ProxyState>, address: String) -> anyhow::Result<()> {
    let cp = state.settings.control_plane.control_plane(&address)?;
    let node = state.settings.node.clone();
    let client = Client::new(cp, format!("ztunnel~{node}"), &node, &ZTUNNEL_TYPES);
    state.set_xds_status(client.status());
    tracing::info!(%address, "following the control plane over delta ADS");
    let handler = MeshHandler::new(
        &state.settings.control_plane.trust_domain,
        Some(&node),
        Apply {
            state: state.clone(),
        },
    )
    .with_root_namespace(&state.settings.control_plane.root_namespace);
    client.run(handler).await;
    Ok(())
}
