//! The Kubernetes-shaped objects ambitctl reasons about, from either backend:
//! the API server's lists, or the manifests directory istiod-lite follows.
//! Kept as JSON values: both sources give the same shape, and the few fields
//! read here are reached through the helpers below.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

/// Istio's enrollment label (namespace or pod).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Istio's waypoint selection label (namespace, service or pod).
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The label waypoint pods carry: the name of their Gateway.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// The Gateway class that declares a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub namespaces: Vec<Value>,
    pub pods: Vec<Value>,
    pub services: Vec<Value>,
    pub gateways: Vec<Value>,
    pub authorization_policies: Vec<Value>,
    pub peer_authentications: Vec<Value>,
    /// What could not be read (an uninstalled CRD, a broken manifest file).
    pub notes: Vec<String>,
}

impl Inventory {
    /// Files an object under its kind; other kinds are ignored.
    pub fn add(&mut self, obj: Value) {
        let list = match obj["kind"].as_str().unwrap_or("") {
            "Namespace" => &mut self.namespaces,
            "Pod" => &mut self.pods,
            "Service" => &mut self.services,
            "Gateway" => &mut self.gateways,
            "AuthorizationPolicy" => &mut self.authorization_policies,
            "PeerAuthentication" => &mut self.peer_authentications,
            _ => return,
        };
        list.push(obj);
    }

    /// Reads every `*.yaml`/`*.yml` file directly in `dir`, as istiod-lite's
    /// manifests source does. A file that does not parse is noted, not fatal.
    pub fn from_manifests(dir: &Path) -> anyhow::Result<Inventory> {
        let mut inv = Inventory::default();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading manifests directory {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for f in files {
            let text = match std::fs::read_to_string(&f) {
                Ok(t) => t,
                Err(e) => {
                    inv.notes.push(format!("{}: {e}", f.display()));
                    continue;
                }
            };
            for doc in serde_yaml::Deserializer::from_str(&text) {
                match Value::deserialize(doc) {
                    Ok(Value::Null) => {}
                    Ok(mut v) => {
                        if v["metadata"]["namespace"].is_null() && v["kind"] != "Namespace" {
                            v["metadata"]["namespace"] = Value::from("default");
                        }
                        inv.add(v);
                    }
                    Err(e) => {
                        // As istiod-lite: a syntax error ends the file.
                        inv.notes.push(format!("{}: {e}", f.display()));
                        break;
                    }
                }
            }
        }
        Ok(inv)
    }

    pub fn namespace(&self, name: &str) -> Option<&Value> {
        self.namespaces.iter().find(|n| self::name(n) == name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Value> {
        self.pods
            .iter()
            .find(|p| self::namespace(p) == namespace && self::name(p) == name)
    }
}

pub fn name(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

pub fn namespace(obj: &Value) -> &str {
    obj["metadata"]["namespace"].as_str().unwrap_or("default")
}

pub fn key(obj: &Value) -> String {
    format!("{}/{}", namespace(obj), name(obj))
}

pub fn label<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj["metadata"]["labels"][key].as_str()
}

pub fn pod_node(pod: &Value) -> Option<&str> {
    pod["spec"]["nodeName"].as_str()
}

pub fn pod_ip(pod: &Value) -> Option<&str> {
    pod["status"]["podIP"].as_str()
}

pub fn service_account(pod: &Value) -> &str {
    pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
}

/// The `containerPort` of the pod's port named `name`, in any container.
pub fn named_port(pod: &Value, names: &[&str]) -> Option<u16> {
    let containers = pod["spec"]["containers"].as_array()?;
    containers
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"].as_str().is_some_and(|n| names.contains(&n)))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

/// Why a pod is in the mesh or not, by Istio's labels (pod beats namespace),
/// as istiod-lite decides it.
pub fn enrollment(inv: &Inventory, pod: &Value) -> (bool, String) {
    let ns = namespace(pod);
    if let Some(gw) = label(pod, GATEWAY_NAME) {
        return (
            true,
            format!("waypoint pod of Gateway {ns}/{gw} (speaks HBONE itself)"),
        );
    }
    match label(pod, DATAPLANE_MODE) {
        Some("none") => return (false, format!("pod label {DATAPLANE_MODE}=none")),
        Some("ambient") => return (true, format!("pod label {DATAPLANE_MODE}=ambient")),
        _ => {}
    }
    match inv.namespace(ns).and_then(|n| label(n, DATAPLANE_MODE)) {
        Some("ambient") => (true, format!("namespace {ns} has {DATAPLANE_MODE}=ambient")),
        Some(other) => (
            false,
            format!("namespace {ns} has {DATAPLANE_MODE}={other}"),
        ),
        None => (
            false,
            format!("neither namespace {ns} nor the pod has {DATAPLANE_MODE}=ambient"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enrollment_follows_pod_then_namespace() {
        let mut inv = Inventory::default();
        inv.add(json!({"kind": "Namespace", "metadata": {"name": "a", "labels": {DATAPLANE_MODE: "ambient"}}}));
        inv.add(json!({"kind": "Namespace", "metadata": {"name": "b"}}));
        let pod = |ns: &str, labels: Value| json!({"kind": "Pod", "metadata": {"name": "p", "namespace": ns, "labels": labels}});
        assert!(enrollment(&inv, &pod("a", json!({}))).0);
        assert!(!enrollment(&inv, &pod("a", json!({DATAPLANE_MODE: "none"}))).0);
        assert!(!enrollment(&inv, &pod("b", json!({}))).0);
        assert!(enrollment(&inv, &pod("b", json!({DATAPLANE_MODE: "ambient"}))).0);
        assert!(
            enrollment(
                &inv,
                &pod("b", json!({GATEWAY_NAME: "w", DATAPLANE_MODE: "none"}))
            )
            .0
        );
    }

    #[test]
    fn named_port_looks_through_containers() {
        let pod = json!({"spec": {"containers": [
            {"name": "a", "ports": [{"name": "http", "containerPort": 80}]},
            {"name": "b", "ports": [{"name": "admin", "containerPort": 15000}]}
        ]}});
        assert_eq!(named_port(&pod, &["admin"]), Some(15000));
        assert_eq!(named_port(&pod, &["metrics"]), None);
    }
}
