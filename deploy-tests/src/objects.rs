//! Rendered documents as k8s-openapi objects. Parsing alone would accept too
//! much — k8s-openapi's deserializers skip fields they do not know, so a
//! misspelt or misplaced field would vanish unnoticed — so every object is
//! serialized back and must come out as it went in.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::chart::Document;

#[derive(Debug, Clone)]
pub enum Object {
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
    Service(Box<Service>),
    ServiceAccount(Box<ServiceAccount>),
    ConfigMap(Box<ConfigMap>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Deployment(_) => "Deployment",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Service(_) => "Service",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ConfigMap(_) => "ConfigMap",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::CustomResourceDefinition(_) => "CustomResourceDefinition",
        }
    }
}

/// Parses one document into its type; unknown kinds, YAML that does not
/// parse, missing required fields and unknown fields are errors.
pub fn parse(doc: &Document) -> Result<Object, String> {
    let at = |e: String| format!("{}: {e}\n{}", doc.source, doc.yaml);
    let v: Value = serde_yaml::from_str(&doc.yaml).map_err(|e| at(e.to_string()))?;
    let api_version = v["apiVersion"].as_str().unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or_default();
    let object = match (api_version, kind) {
        ("apps/v1", "Deployment") => Object::Deployment(strict(&v).map_err(at)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(strict(&v).map_err(at)?),
        ("v1", "Service") => Object::Service(strict(&v).map_err(at)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(&v).map_err(at)?),
        ("v1", "ConfigMap") => Object::ConfigMap(strict(&v).map_err(at)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            Object::ClusterRole(strict(&v).map_err(at)?)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(strict(&v).map_err(at)?)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(strict(&v).map_err(at)?),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            Object::RoleBinding(strict(&v).map_err(at)?)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            Object::CustomResourceDefinition(strict(&v).map_err(at)?)
        }
        _ => return Err(at(format!("unknown kind {api_version}/{kind}"))),
    };
    Ok(object)
}

fn strict<T: DeserializeOwned + Serialize>(v: &Value) -> Result<Box<T>, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    differences(&normalize(v), &normalize(&back), "", &mut diffs);
    if diffs.is_empty() {
        Ok(Box::new(typed))
    } else {
        Err(format!(
            "not what the type reads (unknown or misplaced fields?): {}",
            diffs.join("; ")
        ))
    }
}

/// Nulls dropped (absent and null mean the same to the API server) and
/// numbers as f64 (`0` and `0.0` are one value to a schema).
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Number(n) => serde_json::json!(n.as_f64()),
        other => other.clone(),
    }
}

fn differences(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => differences(v, w, &format!("{at}.{k}"), out),
                    None => out.push(format!("{at}.{k} is dropped")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{at}.{k} appears"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{at}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{at}: {a} became {b}")),
    }
}
