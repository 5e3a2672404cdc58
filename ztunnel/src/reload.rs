//! Picks up changes to the mesh config file and the certificate directory.
//! A bad file is rejected (log + metric) and the last good state stays in force.

use std::path::Path;
use std::sync::Arc;

use mesh_core::config::{parse_mesh_config, MeshConfig, MeshState};

use mesh_core::tls::dir;
use crate::metrics::ResultLabels;
use crate::state::ProxyState;

/// Reads and validates the config file.
pub fn load_config(path: &Path) -> Result<MeshConfig, String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_mesh_config(&src).map_err(|e| format!("{}: {e}", path.display()))
}

/// Polls the static sources that are configured (config file, certificate
/// directory); returns at once when neither is.
pub async fn watch(state: Arc<ProxyState>) {
    let settings = &state.settings;
    let (config, certs_dir) = (settings.config.clone(), settings.certs.clone());
    if config.is_none() && certs_dir.is_none() {
        return;
    }
    let mut config_stamp = config.as_deref().and_then(mesh_core::sys::file_stamp);
    let mut config_bytes = config.as_deref().and_then(|p| std::fs::read(p).ok());
    let mut cert_stamp = certs_dir.as_deref().map(dir::stamp);
    let mut tick = tokio::time::interval(settings.reload_interval);
    loop {
        tick.tick().await;
        if let Some(path) = &config {
            let stamp = mesh_core::sys::file_stamp(path);
            if stamp != config_stamp {
                config_stamp = stamp;
                let bytes = std::fs::read(path).ok();
                if bytes != config_bytes {
                    config_bytes = bytes;
                    reload_config(&state, path);
                }
            }
        }
        if let Some(dir) = &certs_dir {
            let stamp = Some(dir::stamp(dir));
            if stamp != cert_stamp {
                cert_stamp = stamp;
                reload_certs(&state, dir);
            }
        }
    }
}

pub(crate) fn count(state: &ProxyState, what: &str, ok: bool) {
    let result = format!("{what}_{}", if ok { "ok" } else { "rejected" });
    state
        .metrics
        .config_reloads
        .get_or_create(&ResultLabels { result })
        .inc();
}

fn reload_config(state: &ProxyState, path: &Path) {
    // Belt and braces: a parser bug must cost one rejected reload, not the
    // admin thread (and with it metrics, readiness and every later reload).
    let loaded = std::panic::catch_unwind(move || load_config(path))
        .unwrap_or_else(|_| Err("internal error while parsing (bug); file ignored".into()));
    match loaded {
        Ok(config) => {
            let (w, s, p) = (
                config.workloads.len(),
                config.services.len(),
                config.policies.len(),
            );
            state.set_mesh(MeshState::new(config));
            count(state, "config", true);
            tracing::info!(workloads = w, services = s, policies = p, "config reloaded");
        }
        Err(e) => {
            count(state, "config", false);
            tracing::error!("config rejected, keeping the last good config: {e}");
        }
    }
}

fn reload_certs(state: &ProxyState, dir: &Path) {
    match dir::load_dir(dir) {
        Ok(loaded) => {
            let n = loaded.certs.len();
            dir::apply(&state.certs, loaded);
            count(state, "certificates", true);
            tracing::info!(certificates = n, "certificates reloaded");
        }
        Err(e) => {
            count(state, "certificates", false);
            tracing::error!("certificates rejected, keeping the current ones: {e:#}");
        }
    }
}
