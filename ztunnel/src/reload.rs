//! Picks up changes to the mesh config file and the certificate directory
//! (polled by `mesh_core::reload`) and counts them.
//! A bad file is rejected (log + metric) and the last good state stays in force.

use std::sync::Arc;

use mesh_core::config::MeshState;
pub use mesh_core::reload::load_config;
use mesh_core::reload::Reloaded;

use crate::metrics::ResultLabels;
use crate::state::ProxyState;

/// Polls the static sources that are configured (config file, certificate
/// directory); returns at once when neither is.
pub async fn watch(state: Arc<ProxyState>) {
    let settings = &state.settings;
    mesh_core::reload::watch(
        settings.config.clone(),
        settings.control_plane.certs.clone(),
        state.certs.clone(),
        settings.reload_interval,
        |change| match change {
            Reloaded::Config(Ok(config)) => {
                let (w, s, p) = (
                    config.workloads.len(),
                    config.services.len(),
                    config.policies.len(),
                );
                state.set_mesh(MeshState::new(config));
                count(&state, "config", true);
                tracing::info!(workloads = w, services = s, policies = p, "config reloaded");
            }
            Reloaded::Config(Err(e)) => {
                count(&state, "config", false);
                tracing::error!("config rejected, keeping the last good config: {e}");
            }
            Reloaded::Certificates(Ok(n)) => {
                count(&state, "certificates", true);
                tracing::info!(certificates = n, "certificates reloaded");
            }
            Reloaded::Certificates(Err(e)) => {
                count(&state, "certificates", false);
                tracing::error!("certificates rejected, keeping the current ones: {e}");
            }
        },
    )
    .await
}

pub(crate) fn count(state: &ProxyState, what: &str, ok: bool) {
    let result = format!("{what}_{}", if ok { "ok" } else { "rejected" });
    state
        .metrics
        .config_reloads
        .get_or_create(&ResultLabels { result })
        .inc();
}
