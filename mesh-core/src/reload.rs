//! Static config sources of a proxy: the mesh config file and the
//! certificate directory, polled for changes. A bad file is rejected and the
//! last good state stays in force; the proxy decides what to do with a good
//! one and how to count either.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{parse_mesh_config, MeshConfig};
use crate::tls::{dir, CertificateStore};

/// What one poll found changed.
pub enum Reloaded {
    /// The config file changed: its new contents, validated, or why not.
    Config(Result<MeshConfig, String>),
    /// The certificate directory changed and was applied to the store (how
    /// many certificates), or rejected (why; the store is untouched).
    Certificates(Result<usize, String>),
}

/// Reads and validates a mesh config file.
pub fn load_config(path: &Path) -> Result<MeshConfig, String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_mesh_config(&src).map_err(|e| format!("{}: {e}", path.display()))
}

/// Polls `config` and `certs_dir` (whichever are given) every `interval`
/// and reports each change to `on_change`; returns at once when neither is
/// given.
pub async fn watch(
    config: Option<PathBuf>,
    certs_dir: Option<PathBuf>,
    store: CertificateStore,
    interval: Duration,
    on_change: impl Fn(Reloaded),
) {
    if config.is_none() && certs_dir.is_none() {
        return;
    }
    let mut config_stamp = config.as_deref().and_then(crate::sys::file_stamp);
    let mut config_bytes = config.as_deref().and_then(|p| std::fs::read(p).ok());
    let mut cert_stamp = certs_dir.as_deref().map(dir::stamp);
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Some(path) = &config {
            let stamp = crate::sys::file_stamp(path);
            if stamp != config_stamp {
                config_stamp = stamp;
                let bytes = std::fs::read(path).ok();
                // An editor touching the file without changing it is no reload.
                if bytes != config_bytes {
                    config_bytes = bytes;
                    // A parser bug must cost one rejected reload, not the
                    // thread that serves metrics, readiness and later reloads.
                    let loaded =
                        std::panic::catch_unwind(|| load_config(path)).unwrap_or_else(|_| {
                            Err("internal error while parsing (bug); file ignored".into())
                        });
                    on_change(Reloaded::Config(loaded));
                }
            }
        }
        if let Some(d) = &certs_dir {
            let stamp = Some(dir::stamp(d));
            if stamp != cert_stamp {
                cert_stamp = stamp;
                let applied = dir::load_dir(d).map(|loaded| {
                    let n = loaded.certs.len();
                    dir::apply(&store, loaded);
                    n
                });
                on_change(Reloaded::Certificates(
                    applied.map_err(|e| format!("{e:#}")),
                ));
            }
        }
    }
}
