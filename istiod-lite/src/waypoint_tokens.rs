//! Bootstrap tokens of waypoint pods in manifests (local) mode, issued by
//! istiod-lite itself.
//!
//! A waypoint must not hold its node's token: with it the CA would sign every
//! identity on the node. So every waypoint pod of the model (a pod labelled
//! with the name of a Gateway of class `istio-waypoint`) gets a random token
//! of its own, written to `<dir>/<namespace>/<pod>` (directories 0700, files
//! 0600) for whoever starts that waypoint, as a node's token is handed to its
//! ztunnel. The token authenticates the pod; what it may obtain (its own
//! identity and its Gateways' resources) is decided against the model at each
//! call. A token lives as long as its pod is a waypoint pod of the model:
//! when the pod leaves, the file is removed and the token refused; tokens on
//! disk are taken up again after a restart.

use std::collections::BTreeSet;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mesh_core::config::MeshConfig;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::node_auth::WaypointCaller;

/// The tokens issued so far. Cheap to clone; clones share the table.
#[derive(Clone)]
pub struct WaypointTokens {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// ((namespace, pod), token); a list so a lookup compares against every
    /// entry in constant time instead of hashing the secret.
    table: RwLock<Vec<((String, String), String)>>,
    random: SystemRandom,
}

/// Where the token of waypoint pod `namespace/pod` is written under `dir`.
pub fn token_path(dir: &Path, namespace: &str, pod: &str) -> PathBuf {
    dir.join(namespace).join(pod)
}

/// A Kubernetes object name: also what keeps a name from leaving `dir`
/// (no `/`, no leading `.`).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
}

impl WaypointTokens {
    /// Opens (creating it if needed) the token directory and takes up the
    /// tokens already in it.
    pub fn open(dir: impl AsRef<Path>) -> std::io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let mut table = Vec::new();
        for ns in std::fs::read_dir(&dir)? {
            let ns = ns?;
            let Some(namespace) = ns.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !valid_name(&namespace) || !ns.file_type()?.is_dir() {
                continue;
            }
            for pod in std::fs::read_dir(ns.path())? {
                let pod = pod?;
                let Some(name) = pod.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !valid_name(&name) || !pod.file_type()?.is_file() {
                    continue;
                }
                let token = std::fs::read_to_string(pod.path())?.trim().to_string();
                if !token.is_empty() {
                    table.push(((namespace.clone(), name), token));
                }
            }
        }
        Ok(WaypointTokens {
            inner: Arc::new(Inner {
                dir,
                table: RwLock::new(table),
                random: SystemRandom::new(),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The waypoint pod whose token is `token`.
    pub fn pod_for_token(&self, token: &str) -> Option<WaypointCaller> {
        let table = self.read();
        let mut found = None;
        // No early exit: the time taken must not depend on which entry matches.
        for (pod, candidate) in table.iter() {
            if bool::from(candidate.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(pod);
            }
        }
        found.map(|(namespace, pod)| WaypointCaller {
            namespace: namespace.clone(),
            pod: pod.clone(),
            service_account: None,
        })
    }

    /// Issues a token to every waypoint pod of `mesh` that has none, and
    /// revokes those of pods that are no longer waypoint pods. A failure to
    /// write is logged and retried at the next change.
    pub fn sync(&self, mesh: &MeshConfig) {
        let mut wanted = BTreeSet::new();
        for w in mesh.workloads.iter().filter(|w| w.native_tunnel) {
            if valid_name(&w.namespace) && valid_name(&w.name) {
                wanted.insert((w.namespace.clone(), w.name.clone()));
            } else {
                tracing::warn!(
                    pod = %format!("{}/{}", w.namespace, w.name),
                    "waypoint pod name is not a Kubernetes name: no token issued"
                );
            }
        }
        let mut table = self.inner.table.write().unwrap_or_else(|p| p.into_inner());
        table.retain(|(pod, _)| {
            if wanted.contains(pod) {
                return true;
            }
            let path = token_path(&self.inner.dir, &pod.0, &pod.1);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), "removing a revoked waypoint token: {e}"),
            }
            tracing::info!(pod = %format!("{}/{}", pod.0, pod.1), "waypoint token revoked: no longer a waypoint pod");
            false
        });
        for pod in wanted {
            if table.iter().any(|(p, _)| *p == pod) {
                continue;
            }
            match self.issue(&pod.0, &pod.1) {
                Ok(token) => {
                    tracing::info!(pod = %format!("{}/{}", pod.0, pod.1), "waypoint token issued");
                    table.push((pod, token));
                }
                Err(e) => tracing::warn!(
                    pod = %format!("{}/{}", pod.0, pod.1),
                    "could not issue a waypoint token (retried at the next change): {e}"
                ),
            }
        }
    }

    fn issue(&self, namespace: &str, pod: &str) -> std::io::Result<String> {
        let mut bytes = [0u8; 32];
        self.inner
            .random
            .fill(&mut bytes)
            .map_err(|_| std::io::Error::other("no randomness from the system"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let ns_dir = self.inner.dir.join(namespace);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&ns_dir)?;
        let path = token_path(&self.inner.dir, namespace, pod);
        // Written aside and renamed, so a reader never sees half a token.
        let tmp = ns_dir.join(format!(".{pod}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(token)
    }

    /// Keeps the tokens in step with the model until the sender goes away.
    pub async fn follow(self, mut mesh: watch::Receiver<Arc<MeshConfig>>) {
        loop {
            let current = mesh.borrow_and_update().clone();
            self.sync(&current);
            if mesh.changed().await.is_err() {
                return;
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<((String, String), String)>> {
        // Writers leave the table consistent, so a poisoned lock is usable.
        self.inner.table.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::parse_mesh_config;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambit-waypoint-tokens-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    const MESH: &str = r#"
workloads:
- {name: wp-0, namespace: demo, serviceAccount: wp, node: n1, addresses: [198.19.1.9], nativeTunnel: true}
- {name: web-0, namespace: demo, serviceAccount: web, node: n1, addresses: [198.19.1.2]}
"#;

    #[test]
    fn waypoint_pods_get_private_tokens_that_leave_with_them() {
        let dir = temp_dir("lifecycle");
        let tokens = WaypointTokens::open(dir.join("tokens")).unwrap();
        tokens.sync(&parse_mesh_config(MESH).unwrap());
        let path = token_path(tokens.dir(), "demo", "wp-0");
        let token = std::fs::read_to_string(&path).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(tokens.dir())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        // Only waypoint pods get one.
        assert!(!token_path(tokens.dir(), "demo", "web-0").exists());
        let caller = tokens.pod_for_token(&token).unwrap();
        assert_eq!(caller.key(), "demo/wp-0");
        assert_eq!(caller.service_account, None);
        assert!(tokens.pod_for_token(&token[..63]).is_none());
        assert!(tokens.pod_for_token("").is_none());

        // A restart takes the same token up again; a second sync keeps it.
        let again = WaypointTokens::open(dir.join("tokens")).unwrap();
        again.sync(&parse_mesh_config(MESH).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
        assert_eq!(again.pod_for_token(&token).unwrap().key(), "demo/wp-0");

        // The pod leaves the model: the token is revoked and its file gone.
        let without = MESH.replace("nativeTunnel: true", "nativeTunnel: false");
        again.sync(&parse_mesh_config(&without).unwrap());
        assert!(again.pod_for_token(&token).is_none());
        assert!(!path.exists());
        // Coming back, it gets a new one.
        again.sync(&parse_mesh_config(MESH).unwrap());
        let renewed = std::fs::read_to_string(&path).unwrap();
        assert_ne!(renewed, token);
        assert!(again.pod_for_token(&renewed).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_that_could_leave_the_directory_get_no_token() {
        for bad in ["..", ".hidden", "a/b", "", "UPPER"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_name("waypoint-0.x"));
    }
}
