//! The manifests-directory source: multi-document YAML files holding the same
//! objects a cluster would (Namespace, Pod, Service, ServiceAccount,
//! AuthorizationPolicy, PeerAuthentication, Gateway API Gateway and
//! HTTPRoute, Ambit's TrafficPolicy). Pods carry their IP and node explicitly.

use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde::Deserialize;

use super::gateway_api::{Gateway, HttpRoute};
use super::{ClusterState, Rejected};
use crate::ambit_types::{self, TrafficPolicy};
use crate::istio_types::{AuthorizationPolicy, PeerAuthentication};

/// Kinds that are valid in a manifests directory but not used yet.
const ACCEPTED_UNUSED: &[&str] = &["ServiceAccount", "EndpointSlice", "Deployment"];

/// Reads every `*.yaml` / `*.yml` file under `dir` (sorted, not recursive).
pub fn load_dir(dir: &Path) -> std::io::Result<(ClusterState, Vec<Rejected>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut state = ClusterState::default();
    let mut rejected = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let name = file.file_name().map_or_else(
            || file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        load_str(&name, &text, &mut state, &mut rejected);
    }
    Ok((state, rejected))
}

/// Adds the documents of one file to `state`; bad documents go to `rejected`.
pub fn load_str(origin: &str, text: &str, state: &mut ClusterState, rejected: &mut Vec<Rejected>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = format!("{origin}, document {}", i + 1);
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                rejected.push(Rejected {
                    origin: at,
                    object: "?".into(),
                    reason: format!("not YAML: {e}"),
                });
                // The stream cannot be resynchronised after a syntax error.
                return;
            }
        };
        if let Err(r) = add(&at, value, state) {
            rejected.push(r);
        }
    }
}

fn add(at: &str, value: serde_yaml::Value, state: &mut ClusterState) -> Result<(), Rejected> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_string();
    let object = format!("{kind} {ns}/{name}");
    let reject = |reason: String| Rejected {
        origin: at.to_string(),
        object: object.clone(),
        reason,
    };
    if name.is_empty() {
        return Err(reject("metadata.name is missing".into()));
    }
    let key = format!("{ns}/{name}");
    let parse_err = |e: serde_yaml::Error| reject(e.to_string());
    match kind.as_str() {
        "Namespace" => {
            let n: Namespace = serde_yaml::from_value(value).map_err(parse_err)?;
            state.namespaces.insert(name, n);
        }
        "Pod" => {
            let mut p: Pod = serde_yaml::from_value(value).map_err(parse_err)?;
            p.metadata.namespace = Some(ns);
            state.pods.insert(key, p);
        }
        "Service" => {
            let mut s: Service = serde_yaml::from_value(value).map_err(parse_err)?;
            s.metadata.namespace = Some(ns);
            state.services.insert(key, s);
        }
        // Security objects that do not parse are kept, marked broken: dropping
        // them would widen access, so translation enforces them fail-closed.
        "AuthorizationPolicy" => {
            check_api(&value, "security.istio.io/").map_err(reject)?;
            let mut p = AuthorizationPolicy::parse_or_broken(&value);
            p.metadata.name = Some(name);
            p.metadata.namespace = Some(ns);
            state.authorization_policies.insert(key, p);
        }
        "PeerAuthentication" => {
            check_api(&value, "security.istio.io/").map_err(reject)?;
            let mut p = PeerAuthentication::parse_or_broken(&value);
            p.metadata.name = Some(name);
            p.metadata.namespace = Some(ns);
            state.peer_authentications.insert(key, p);
        }
        // A Gateway that does not parse is left out: what uses it then finds
        // its waypoint missing, and that fails closed in translation.
        "Gateway" => {
            check_api(&value, "gateway.networking.k8s.io/").map_err(reject)?;
            let mut g: Gateway = serde_yaml::from_value(value).map_err(parse_err)?;
            g.metadata.namespace = Some(ns);
            state.gateways.insert(key, g);
        }
        "HTTPRoute" => {
            check_api(&value, "gateway.networking.k8s.io/").map_err(reject)?;
            let mut r: HttpRoute = serde_yaml::from_value(value).map_err(parse_err)?;
            r.metadata.namespace = Some(ns);
            state.http_routes.insert(key, r);
        }
        // Not a security object: one that does not parse is left out.
        "TrafficPolicy" => {
            check_api(&value, &format!("{}/", ambit_types::GROUP)).map_err(reject)?;
            let mut p: TrafficPolicy = serde_yaml::from_value(value).map_err(parse_err)?;
            p.metadata.namespace = Some(ns);
            state.traffic_policies.insert(key, p);
        }
        k if ACCEPTED_UNUSED.contains(&k) => {}
        "" => return Err(reject("no kind".into())),
        other => return Err(reject(format!("kind {other} is not supported"))),
    }
    Ok(())
}

fn check_api(value: &serde_yaml::Value, group: &str) -> Result<(), String> {
    let api = value
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or("");
    if api.starts_with(group) {
        Ok(())
    } else {
        Err(format!("apiVersion {api:?} is not {group}*"))
    }
}
