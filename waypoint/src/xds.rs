//! The waypoint's view from the control plane: the same delta ADS client and
//! assembly as ztunnel's, subscribed to the L7 types as well.

use std::sync::Arc;

use mesh_core::config::MeshConfig;
use mesh_core::xds::client::Client;
use mesh_core::xds::{MeshHandler, MeshSink, WAYPOINT_TYPES};

use crate::metrics::ResultLabels;
use crate::state::WaypointState;

struct Apply {
    state: Arc<WaypointState>,
}

impl MeshSink for Apply {
    fn apply(&mut self, config: MeshConfig) -> Result<(), String> {
        tracing::info!(
            workloads = config.workloads.len(),
            services = config.services.len(),
            routes = config.http_routes.len(),
            policies = config.http_policies.len(),
            traffic_policies = config.traffic_policies.len(),
            "mesh config updated from xDS"
        );
        self.state.apply(config);
        count(&self.state, "xds_ok");
        Ok(())
    }

    fn rejected(&mut self, _error: &str) {
        count(&self.state, "xds_rejected");
    }
}

fn count(state: &WaypointState, result: &'static str) {
    state
        .metrics
        .config_updates
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Follows the control plane forever; the status handle goes into the state
/// for the config dump and readiness.
pub async fn run(state: Arc<WaypointState>, address: String) -> anyhow::Result<()> {
    let cp = state.settings.control_plane.control_plane(&address)?;
    let node = state.settings.node.clone();
    let client = Client::new(cp, format!("waypoint~{node}"), &node, &WAYPOINT_TYPES);
    state.set_xds_status(client.status());
    tracing::info!(%address, "following the control plane over delta ADS");
    // No local node: a waypoint enforces no workload's L4 policy, so none
    // needs the missing-policy guard ztunnel applies to its own workloads.
    let handler = MeshHandler::new(
        &state.settings.control_plane.trust_domain,
        None,
        Apply {
            state: state.clone(),
        },
    )
    .with_root_namespace(&state.settings.control_plane.root_namespace);
    client.run(handler).await;
    Ok(())
}
