//! Who is calling: authentication of proxies to the control plane.
//!
//! A caller is either a node proxy (ztunnel), acting for the workloads of its
//! node, or a waypoint pod, acting as itself only ([`Caller`]).
//!
//! In manifests (local) mode every node has a bootstrap token, listed in a YAML
//! map `node-name: token`; a ztunnel presents its node's token as
//! `authorization: Bearer <token>` and is thereby that node. Waypoint pods get
//! tokens istiod-lite issues itself ([`crate::waypoint_tokens`]). The
//! Kubernetes variant (TokenReview of the projected service-account token,
//! [`crate::kube_auth`]) implements the same [`Authenticator`] trait, so the CA
//! and xDS servers do not care which one is in use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use mesh_core::config::{MeshConfig, Workload};
use std::time::{Duration, Instant, SystemTime};

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::sources::gateway_api::{GATEWAY_NAME_LABEL, WAYPOINT_CLASS};
use crate::waypoint_tokens::WaypointTokens;

/// Who a call comes from, as its credential proves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node proxy: may act for the workloads of this node, waypoints
    /// excepted.
    Node(String),
    /// A waypoint pod: may act as itself only.
    Waypoint(WaypointCaller),
}

/// A waypoint pod, as its credential names it. Whether it really is a
/// waypoint pod (labelled for a Gateway of class `istio-waypoint`) is checked
/// against the current mesh model at each use ([`Caller::waypoint_in`]), so a
/// Gateway deleted or reclassed stops granting anything at once, whatever
/// was cached about the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointCaller {
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// Kubernetes: the service account the token belongs to, which the pod
    /// must run as. Bootstrap tokens name the pod only.
    pub service_account: Option<String>,
}

impl WaypointCaller {
    /// `namespace/pod`, the key of its workload in the mesh model.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

impl Caller {
    /// The waypoint workload in `mesh` this caller is, with the reason if it
    /// is not one (or is a node).
    pub fn waypoint_in<'m>(&self, mesh: &'m MeshConfig) -> Result<&'m Workload, String> {
        let Caller::Waypoint(w) = self else {
            return Err(format!("{self} is not a waypoint"));
        };
        let found = mesh
            .workloads
            .iter()
            .find(|x| x.namespace == w.namespace && x.name == w.pod);
        check_waypoint(
            w,
            found.map(|x| (x.native_tunnel, x.service_account.as_str())),
        )?;
        found.ok_or_else(|| format!("pod {} is not in the mesh", w.key()))
    }
}

/// Whether a workload found as (native_tunnel, service account) is the
/// waypoint pod `w` claims to be; shared by the CA (mesh model) and xDS
/// (its visibility index) so both refuse alike.
pub fn check_waypoint(w: &WaypointCaller, found: Option<(bool, &str)>) -> Result<(), String> {
    let key = w.key();
    match found {
        None => Err(format!(
            "pod {key} is not a waypoint pod of the mesh (yet): none of that name with an \
             address, labelled {GATEWAY_NAME_LABEL}=<name> of a Gateway of class {WAYPOINT_CLASS}"
        )),
        Some((false, _)) => Err(format!(
            "pod {key} is not a waypoint pod: it must be labelled \
             {GATEWAY_NAME_LABEL}=<name> of a Gateway of class {WAYPOINT_CLASS} in {}",
            w.namespace
        )),
        Some((true, sa)) => match &w.service_account {
            Some(want) if want != sa => Err(format!(
                "waypoint pod {key} runs as service account {sa} in the mesh, not {want}"
            )),
            _ => Ok(()),
        },
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "node {node}"),
            Caller::Waypoint(w) => write!(f, "waypoint pod {}", w.key()),
        }
    }
}

/// Maps a call's credentials to who it comes from.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The caller, or UNAUTHENTICATED / PERMISSION_DENIED with the reason.
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status>;
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading node token file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("node token file {0} is not a YAML map of node name to token: {1}")]
    Yaml(PathBuf, serde_yaml::Error),
    #[error("node token file {0}: entry {1:?} must map a node name (string) to a token (string)")]
    NotString(PathBuf, String),
    #[error("node token file {0}: node {1:?} has an empty token")]
    EmptyToken(PathBuf, String),
    #[error("node token file {0}: nodes {1:?} and {2:?} share a token, so a caller could not be told apart")]
    DuplicateToken(PathBuf, String, String),
}

/// Per-node bootstrap tokens from a file, re-read when the file changes, and
/// optionally the waypoint tokens istiod-lite issued.
///
/// Cheap to clone; clones share the token table.
#[derive(Clone)]
pub struct NodeAuthenticator {
    inner: Arc<Inner>,
    waypoints: Option<WaypointTokens>,
}

struct Inner {
    path: PathBuf,
    tokens: RwLock<Tokens>,
    last_check: Mutex<Instant>,
}

#[derive(Default)]
struct Tokens {
    /// (node, token); a list, not a map keyed by token, so lookups can compare
    /// against every entry in constant time instead of hashing the secret.
    entries: Vec<(String, String)>,
    stamp: Option<(SystemTime, u64)>,
}

/// How often, at most, the file's metadata is checked for a change.
const RECHECK: Duration = Duration::from_secs(1);

impl NodeAuthenticator {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenFileError> {
        let path = path.as_ref().to_path_buf();
        let tokens = load(&path)?;
        Ok(NodeAuthenticator {
            inner: Arc::new(Inner {
                path,
                tokens: RwLock::new(tokens),
                last_check: Mutex::new(Instant::now()),
            }),
            waypoints: None,
        })
    }

    /// Also accepts the waypoint pods' tokens in `waypoints`.
    pub fn with_waypoint_tokens(mut self, waypoints: WaypointTokens) -> Self {
        self.waypoints = Some(waypoints);
        self
    }

    /// The node whose token is `token`.
    pub fn node_for_token(&self, token: &str) -> Option<String> {
        self.reload_if_changed();
        let tokens = self.read();
        let mut found = None;
        // No early exit: the time taken must not depend on which entry matches.
        for (node, candidate) in &tokens.entries {
            if bool::from(candidate.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(node);
            }
        }
        found.cloned()
    }

    /// Re-reads the file if its size or modification time changed. A file that
    /// no longer parses is reported and ignored: the last good tokens stay.
    fn reload_if_changed(&self) {
        {
            let mut last = self
                .inner
                .last_check
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < RECHECK {
                return;
            }
            *last = Instant::now();
        }
        let stamp = mesh_core::sys::file_stamp(&self.inner.path);
        if stamp.is_none() || stamp == self.read().stamp {
            return;
        }
        match load(&self.inner.path) {
            Ok(tokens) => {
                tracing::info!(
                    path = %self.inner.path.display(),
                    nodes = tokens.entries.len(),
                    "node tokens reloaded"
                );
                *self.inner.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens;
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the previous node tokens");
                // Do not retry the same broken content on every call.
                self.inner
                    .tokens
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .stamp = stamp;
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tokens> {
        // Writers replace `Tokens` whole, so a poisoned lock still holds a
        // consistent table.
        self.inner.tokens.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Authenticator for NodeAuthenticator {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        if metadata.get("authorization").is_none() {
            return Err(Status::unauthenticated(
                "missing node token: send `authorization: Bearer <node bootstrap token>`",
            ));
        }
        let Some(token) = mesh_core::grpc::bearer_token(metadata) else {
            return Err(Status::unauthenticated(
                "authorization header is not `Bearer <node bootstrap token>`",
            ));
        };
        if token.is_empty() {
            return Err(Status::unauthenticated("empty bearer token"));
        }
        if let Some(node) = self.node_for_token(token) {
            return Ok(Caller::Node(node));
        }
        if let Some(w) = self.waypoints.as_ref().and_then(|w| w.pod_for_token(token)) {
            return Ok(Caller::Waypoint(w));
        }
        Err(Status::unauthenticated(
            "unknown node or waypoint bootstrap token",
        ))
    }
}

fn load(path: &Path) -> Result<Tokens, TokenFileError> {
    // Stamp before reading: a write racing with the read then shows up as a
    // change on the next check instead of being missed.
    let stamp = mesh_core::sys::file_stamp(path);
    let text =
        std::fs::read_to_string(path).map_err(|e| TokenFileError::Read(path.to_path_buf(), e))?;
    let entries = parse(path, &text)?;
    Ok(Tokens { entries, stamp })
}

fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, TokenFileError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    // `Mapping` refuses duplicate keys, so a node listed twice is an error too.
    let map: serde_yaml::Mapping =
        serde_yaml::from_str(text).map_err(|e| TokenFileError::Yaml(path.to_path_buf(), e))?;
    let mut entries: Vec<(String, String)> = Vec::with_capacity(map.len());
    for (k, v) in map {
        let (Some(node), Some(token)) = (k.as_str(), v.as_str()) else {
            let shown = k
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{k:?}"));
            return Err(TokenFileError::NotString(path.to_path_buf(), shown));
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenFileError::EmptyToken(
                path.to_path_buf(),
                node.to_string(),
            ));
        }
        if let Some((other, _)) = entries.iter().find(|(_, t)| t == token) {
            return Err(TokenFileError::DuplicateToken(
                path.to_path_buf(),
                other.clone(),
                node.to_string(),
            ));
        }
        entries.push((node.to_string(), token.to_string()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    /// A tokens file in a directory of its own, removed with it.
    struct TempFile(PathBuf);

    impl AsRef<Path> for TempFile {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn temp_file(name: &str, content: &str) -> TempFile {
        let dir =
            std::env::temp_dir().join(format!("ambit-node-auth-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.yaml");
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        let v: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        m.insert("authorization", v);
        m
    }

    #[tokio::test]
    async fn known_token_is_its_node_and_others_are_refused() {
        let path = temp_file("known", "node-a: secret-a\nnode-b: secret-b\n");
        let auth = NodeAuthenticator::from_file(&path).unwrap();
        assert_eq!(auth.node_for_token("secret-a").as_deref(), Some("node-a"));
        assert_eq!(
            auth.authenticate(&bearer("secret-b")).await.unwrap(),
            Caller::Node("node-b".into())
        );

        let err = auth.authenticate(&bearer("secret-c")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("unknown node or waypoint"), "{err}");
        // A prefix of a real token is not that token.
        let err = auth.authenticate(&bearer("secret-")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        let err = auth.authenticate(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("missing node token"), "{err}");

        let mut basic = MetadataMap::new();
        basic.insert("authorization", "Basic c2VjcmV0LWE=".parse().unwrap());
        let err = auth.authenticate(&basic).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("not `Bearer"), "{err}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            (
                "empty-token",
                "node-a: ''\n",
                "node \"node-a\" has an empty token",
            ),
            (
                "dup-token",
                "node-a: same\nnode-b: same\n",
                "nodes \"node-a\" and \"node-b\" share a token",
            ),
            ("dup-node", "node-a: x\nnode-a: y\n", "duplicate entry"),
            ("not-map", "- a\n- b\n", "not a YAML map"),
            ("number", "node-a: 42\n", "must map a node name"),
        ];
        for (name, content, want) in cases {
            let path = temp_file(name, content);
            let err = NodeAuthenticator::from_file(&path)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        let missing = std::env::temp_dir().join("ambit-node-auth-does-not-exist.yaml");
        assert!(NodeAuthenticator::from_file(missing).is_err());
    }

    #[tokio::test]
    async fn file_changes_are_picked_up_and_broken_edits_ignored() {
        let path = temp_file("reload", "node-a: old\n");
        let auth = NodeAuthenticator::from_file(&path).unwrap();
        let clone = auth.clone();
        assert!(auth.authenticate(&bearer("old")).await.is_ok());

        std::fs::write(&path, "node-a: new-token\n").unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        assert_eq!(
            clone.authenticate(&bearer("new-token")).await.unwrap(),
            Caller::Node("node-a".into())
        );
        assert!(auth.authenticate(&bearer("old")).await.is_err());

        std::fs::write(&path, "node-a: ''\n").unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        assert_eq!(
            auth.authenticate(&bearer("new-token")).await.unwrap(),
            Caller::Node("node-a".into())
        );
    }
}
