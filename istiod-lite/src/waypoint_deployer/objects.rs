//! What the deployer keeps in a waypoint Gateway's namespace, as plain JSON
//! for server-side apply: the objects are built whole from the Gateway and
//! the deployer's settings, so applying them again is a no-op unless
//! something drifted.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::sources::gateway_api::{GATEWAY_NAME_LABEL, GROUP, WAYPOINT_CLASS};

/// Istio's older label naming a gateway's pods; set too, so tooling that
/// still selects on it finds the waypoint.
pub const ISTIO_GATEWAY_NAME_LABEL: &str = "istio.io/gateway-name";
/// Marks every object the deployer writes; its watches select on it, so they
/// see only what the deployer manages, never every Deployment in the cluster.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "istiod-lite";
/// The selector of the deployer's watches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=istiod-lite";

pub const HBONE_PORT: i32 = 15008;
pub const METRICS_PORT: i32 = 15020;
pub const READINESS_PORT: i32 = 15021;

/// Where the pod finds its credentials for the CA and the control plane.
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const TOKEN_FILE: &str = "istio-token";
const ROOT_DIR: &str = "/var/run/secrets/ambit/ca";
const ROOT_FILE: &str = "root-cert.pem";
/// Istio's proxy UID: a non-root user the image need not define.
const PROXY_UID: i64 = 1337;
/// Istio's waypoint requests; the waypoint is small, and an operator who
/// needs more will say so (not configurable yet).
const CPU_REQUEST: &str = "100m";
const MEMORY_REQUEST: &str = "128Mi";
/// Projected token lifetime; the kubelet renews it at 80 %, and the
/// waypoint re-reads the file for every call.
const TOKEN_TTL_SECS: i64 = 43200;

/// Everything about the deployed objects that does not come from the Gateway.
#[derive(Debug, Clone)]
pub struct WaypointTemplate {
    /// The waypoint image; its entrypoint need not be the waypoint, the
    /// container's command is.
    pub image: String,
    /// istiod-lite's delta ADS and CA, as the waypoint dials it.
    pub xds_address: String,
    /// The DNS name on istiod-lite's serving certificate the waypoint checks.
    pub control_plane_name: String,
    pub trust_domain: String,
    /// istiod-lite's root namespace, which the waypoint must know to read
    /// mesh-wide policies as istiod-lite meant them.
    pub root_namespace: String,
    /// The collector the waypoint exports spans to; `None`: no tracing.
    pub otlp_endpoint: Option<String>,
    /// Audience of the projected token the CA's TokenReview asks for.
    pub token_audience: String,
    /// The mesh root, published next to the waypoint for `--ca-root-cert`.
    pub root_cert_pem: String,
}

/// The Gateway a waypoint is deployed for: what the objects need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointGateway {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.infrastructure.labels` and `.annotations`: Gateway API asks
    /// that they be put on every object made for the Gateway (ours win on
    /// a clash, so the selectors keep working).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Why a Gateway gets no waypoint (its `Accepted` condition's reason and
/// message, and the metric's label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

/// A Gateway of class [`WAYPOINT_CLASS`], or `None` for any other class
/// (not ours to touch); `Err` for a waypoint Gateway the deployer cannot
/// serve.
pub fn waypoint_gateway(obj: &Value) -> Option<Result<WaypointGateway, Invalid>> {
    if obj["spec"]["gatewayClassName"].as_str() != Some(WAYPOINT_CLASS) {
        return None;
    }
    let meta = &obj["metadata"];
    let invalid = |reason, message: String| Some(Err(Invalid { reason, message }));
    let (Some(namespace), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
        return invalid("Invalid", "the Gateway has no name or namespace".into());
    };
    let Some(uid) = meta["uid"].as_str().filter(|u| !u.is_empty()) else {
        return invalid(
            "Invalid",
            "the Gateway has no uid, so nothing can be owned by it".into(),
        );
    };
    // Gateway names are DNS subdomains; the Service named after it must be
    // a DNS label (no dots, a letter first, at most 63 characters).
    if let Err(why) = dns_label(name) {
        return invalid(
            "Invalid",
            format!("a waypoint's Service is named after its Gateway, and {name:?} {why}"),
        );
    }
    // The waypoint's address is its Service's cluster IP, chosen by the
    // cluster: an address asked for cannot be honoured.
    if obj["spec"]["addresses"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        return invalid(
            "UnsupportedAddress",
            "spec.addresses is not supported for waypoints: the address is the Service's cluster IP"
                .into(),
        );
    }
    let mut infrastructure = [BTreeMap::new(), BTreeMap::new()];
    for (field, map) in ["labels", "annotations"]
        .into_iter()
        .zip(&mut infrastructure)
    {
        let value = &obj["spec"]["infrastructure"][field];
        if value.is_null() {
            continue;
        }
        let Some(entries) = value.as_object() else {
            return invalid(
                "Invalid",
                format!("spec.infrastructure.{field} is not a map"),
            );
        };
        for (k, v) in entries {
            let Some(v) = v.as_str() else {
                return invalid(
                    "Invalid",
                    format!("spec.infrastructure.{field}.{k} is not a string"),
                );
            };
            map.insert(k.clone(), v.to_string());
        }
    }
    let [labels, annotations] = infrastructure;
    Some(Ok(WaypointGateway {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        labels,
        annotations,
    }))
}

/// `extra` with `ours` on top, as a JSON map.
fn merged(extra: &BTreeMap<String, String>, ours: Value) -> Value {
    let mut map: Map<String, Value> = extra
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if let Value::Object(ours) = ours {
        map.extend(ours);
    }
    Value::Object(map)
}

/// RFC 1035 label as Kubernetes checks Service names.
fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("is not 1 to 63 characters long");
    }
    let b = s.as_bytes();
    if !b[0].is_ascii_lowercase() {
        return Err("does not start with a lowercase letter");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("has characters other than lowercase letters, digits and '-'");
    }
    if b[b.len() - 1] == b'-' {
        return Err("ends with '-'");
    }
    Ok(())
}

impl WaypointGateway {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The ConfigMap holding the mesh root for this waypoint.
    pub fn root_config_map(&self) -> String {
        format!("{}-ca-root-cert", self.name)
    }

    /// Labels on every object: the Gateway's name (Istio's key, which
    /// translation also reads) and the deployer's mark.
    fn labels(&self) -> Value {
        merged(
            &self.labels,
            json!({
                GATEWAY_NAME_LABEL: self.name,
                ISTIO_GATEWAY_NAME_LABEL: self.name,
                MANAGED_BY_LABEL: MANAGED_BY,
            }),
        )
    }

    /// The Gateway as controlling owner: the garbage collector deletes the
    /// object when the Gateway goes, and (blockOwnerDeletion) a foreground
    /// deletion of the Gateway waits for it.
    fn metadata(&self, name: &str) -> Value {
        json!({
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(),
            "annotations": merged(&self.annotations, json!({})),
            "ownerReferences": [{
                "apiVersion": format!("{GROUP}/v1"),
                "kind": "Gateway",
                "name": self.name,
                "uid": self.uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        })
    }

    pub fn service_account(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": self.metadata(&self.name),
        })
    }

    pub fn root_cert(&self, t: &WaypointTemplate) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.metadata(&self.root_config_map()),
            "data": {ROOT_FILE: t.root_cert_pem},
        })
    }

    /// Istio's waypoint Service: named after the Gateway, selecting its pods,
    /// HBONE plus the status and metrics ports.
    pub fn service(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(&self.name),
            "spec": {
                "type": "ClusterIP",
                "selector": {GATEWAY_NAME_LABEL: self.name},
                "ports": [
                    {"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT,
                     "protocol": "TCP", "appProtocol": "all"},
                    {"name": "status-port", "port": READINESS_PORT, "targetPort": READINESS_PORT,
                     "protocol": "TCP", "appProtocol": "tcp"},
                    {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT,
                     "protocol": "TCP", "appProtocol": "http"},
                ],
            },
        })
    }

    /// The waypoint's command line: everything from flags, nothing from a
    /// config file, so the Deployment alone says how it runs.
    pub fn args(&self, t: &WaypointTemplate) -> Vec<String> {
        let mut args = vec![
            "--gateway".into(),
            self.key(),
            // The kubelet expands $(POD_IP) from the env below. IPv4 only:
            // an IPv6 pod address would need brackets.
            "--hbone-addr".into(),
            format!("$(POD_IP):{HBONE_PORT}"),
            "--node".into(),
            "$(NODE_NAME)".into(),
            "--xds-address".into(),
            t.xds_address.clone(),
            "--control-plane-name".into(),
            t.control_plane_name.clone(),
            "--trust-domain".into(),
            t.trust_domain.clone(),
            "--ca-root-cert".into(),
            format!("{ROOT_DIR}/{ROOT_FILE}"),
            "--token-file".into(),
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
            "--metrics-addr".into(),
            format!("0.0.0.0:{METRICS_PORT}"),
            "--readiness-addr".into(),
            format!("0.0.0.0:{READINESS_PORT}"),
            "--root-namespace".into(),
            t.root_namespace.clone(),
        ];
        if let Some(otlp) = &t.otlp_endpoint {
            args.extend(["--otlp-endpoint".into(), otlp.clone()]);
        }
        args
    }

    pub fn deployment(&self, t: &WaypointTemplate) -> Value {
        let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.metadata(&self.name),
            "spec": {
                "selector": {"matchLabels": {GATEWAY_NAME_LABEL: self.name}},
                "template": {
                    "metadata": {
                        "labels": merged(&self.labels, json!({
                            GATEWAY_NAME_LABEL: self.name,
                            ISTIO_GATEWAY_NAME_LABEL: self.name,
                            // Istio's waypoint pods opt out of capture: they
                            // speak HBONE themselves (translation keeps them
                            // in the mesh as native-tunnel workloads).
                            "istio.io/dataplane-mode": "none",
                        })),
                        "annotations": merged(&self.annotations, json!({
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": METRICS_PORT.to_string(),
                            "prometheus.io/path": "/metrics",
                        })),
                    },
                    "spec": {
                        "serviceAccountName": self.name,
                        // The waypoint never calls the API server; its only
                        // credential is the audience-bound token below.
                        "automountServiceAccountToken": false,
                        "securityContext": {
                            "runAsNonRoot": true,
                            "runAsUser": PROXY_UID,
                            "runAsGroup": PROXY_UID,
                            "fsGroup": PROXY_UID,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [{
                            "name": "waypoint",
                            "image": t.image,
                            "command": ["waypoint"],
                            "args": self.args(t),
                            "env": [
                                {"name": "POD_IP", "valueFrom": field("status.podIP")},
                                {"name": "NODE_NAME", "valueFrom": field("spec.nodeName")},
                            ],
                            "ports": [
                                {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
                                {"name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz/ready", "port": READINESS_PORT},
                                "periodSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "resources": {
                                "requests": {"cpu": CPU_REQUEST, "memory": MEMORY_REQUEST},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "privileged": false,
                                "runAsNonRoot": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true},
                                {"name": "ca-root", "mountPath": ROOT_DIR, "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "istio-token", "projected": {"sources": [{
                                "serviceAccountToken": {
                                    "audience": t.token_audience,
                                    "expirationSeconds": TOKEN_TTL_SECS,
                                    "path": TOKEN_FILE,
                                },
                            }]}},
                            {"name": "ca-root", "configMap": {"name": self.root_config_map()}},
                        ],
                    },
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> WaypointTemplate {
        WaypointTemplate {
            image: "ghcr.io/ambit/waypoint:1.0".into(),
            xds_address: "https://istiod-lite.istio-system.svc:15012".into(),
            control_plane_name: "istiod.istio-system.svc".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "mesh-root".into(),
            otlp_endpoint: Some("http://otel-collector.observability:4317".into()),
            token_audience: "istio-ca".into(),
            root_cert_pem: "-----BEGIN CERTIFICATE-----\nroot\n".into(),
        }
    }

    fn gateway(name: &str) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": "demo", "uid": "u-1"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        })
    }

    fn parsed(name: &str) -> WaypointGateway {
        waypoint_gateway(&gateway(name)).unwrap().unwrap()
    }

    #[test]
    fn only_the_waypoint_class_is_ours() {
        let mut g = gateway("wp");
        g["spec"]["gatewayClassName"] = json!("istio");
        assert_eq!(waypoint_gateway(&g), None);
        g["spec"]["gatewayClassName"] = json!(null);
        assert_eq!(waypoint_gateway(&g), None);
        assert_eq!(
            parsed("wp"),
            WaypointGateway {
                namespace: "demo".into(),
                name: "wp".into(),
                uid: "u-1".into(),
                labels: Default::default(),
                annotations: Default::default(),
            }
        );
    }

    #[test]
    fn gateways_that_cannot_have_a_waypoint_say_why() {
        let long = "w".repeat(64);
        for bad in ["wp.v1", "1wp", "wp-", &long, "Wp"] {
            let e = waypoint_gateway(&gateway(bad)).unwrap().unwrap_err();
            assert_eq!(e.reason, "Invalid", "{bad}");
            assert!(e.message.contains(bad), "{bad}: {}", e.message);
        }
        assert!(waypoint_gateway(&gateway(&"w".repeat(63))).unwrap().is_ok());

        let mut g = gateway("wp");
        g["metadata"]["uid"] = json!(null);
        assert_eq!(waypoint_gateway(&g).unwrap().unwrap_err().reason, "Invalid");
        let mut g = gateway("wp");
        g["metadata"]["namespace"] = json!(null);
        assert_eq!(waypoint_gateway(&g).unwrap().unwrap_err().reason, "Invalid");
        let mut g = gateway("wp");
        g["spec"]["addresses"] = json!([{"type": "IPAddress", "value": "10.0.0.1"}]);
        assert_eq!(
            waypoint_gateway(&g).unwrap().unwrap_err().reason,
            "UnsupportedAddress"
        );
        let mut g = gateway("wp");
        g["spec"]["infrastructure"] = json!({"labels": {"team": 7}});
        assert!(waypoint_gateway(&g)
            .unwrap()
            .unwrap_err()
            .message
            .contains("labels.team"));
        let mut g = gateway("wp");
        g["spec"]["infrastructure"] = json!({"annotations": ["a"]});
        assert_eq!(waypoint_gateway(&g).unwrap().unwrap_err().reason, "Invalid");
        // Not a map at all: still no panic, and not ours.
        assert_eq!(waypoint_gateway(&json!("nonsense")), None);
    }

    #[test]
    fn infrastructure_labels_and_annotations_reach_every_object_but_never_ours() {
        let mut g = gateway("wp");
        g["spec"]["infrastructure"] = json!({
            "labels": {"team": "a", "gateway.networking.k8s.io/gateway-name": "hijack"},
            "annotations": {"note": "x"},
        });
        let g = waypoint_gateway(&g).unwrap().unwrap();
        let t = template();
        let d = g.deployment(&t);
        for obj in [&g.service_account(), &g.service(), &g.root_cert(&t), &d] {
            assert_eq!(obj["metadata"]["labels"]["team"], "a");
            assert_eq!(
                obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
                "wp"
            );
            assert_eq!(obj["metadata"]["annotations"]["note"], "x");
        }
        let pod = &d["spec"]["template"]["metadata"];
        assert_eq!(pod["labels"]["team"], "a");
        assert_eq!(
            pod["labels"]["gateway.networking.k8s.io/gateway-name"],
            "wp"
        );
        assert_eq!(pod["annotations"]["note"], "x");
        assert_eq!(pod["annotations"]["prometheus.io/port"], "15020");
    }

    fn assert_owned(obj: &Value, name: &str) {
        assert_eq!(obj["metadata"]["name"], name);
        assert_eq!(obj["metadata"]["namespace"], "demo");
        assert_eq!(
            obj["metadata"]["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "wp", "uid": "u-1", "controller": true, "blockOwnerDeletion": true}])
        );
        assert_eq!(
            obj["metadata"]["labels"],
            json!({"gateway.networking.k8s.io/gateway-name": "wp",
                   "istio.io/gateway-name": "wp",
                   "app.kubernetes.io/managed-by": "istiod-lite"})
        );
    }

    #[test]
    fn every_object_is_owned_by_the_gateway_and_labelled() {
        let g = parsed("wp");
        let t = template();
        assert_owned(&g.service_account(), "wp");
        assert_owned(&g.service(), "wp");
        assert_owned(&g.deployment(&t), "wp");
        assert_owned(&g.root_cert(&t), "wp-ca-root-cert");
        assert_eq!(g.root_cert(&t)["data"]["root-cert.pem"], t.root_cert_pem);
        // The watches' selector matches what is written.
        let (k, v) = MANAGED_SELECTOR.split_once('=').unwrap();
        assert_eq!(g.service()["metadata"]["labels"][k], v);
    }

    #[test]
    fn the_service_selects_the_pods_and_exposes_istios_ports() {
        let g = parsed("wp");
        let svc = g.service();
        let pod_labels = &g.deployment(&template())["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "pods carry the selector's {k}");
        }
        let ports: Vec<(String, i64)> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert_eq!(p["port"], p["targetPort"]);
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["port"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("mesh".to_string(), 15008),
                ("status-port".to_string(), 15021),
                ("metrics".to_string(), 15020)
            ]
        );
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert!(
            svc["spec"].get("clusterIP").is_none(),
            "the cluster picks it"
        );
    }

    #[test]
    fn the_pod_runs_the_waypoint_as_its_gateway_non_root() {
        let g = parsed("wp");
        let t = template();
        let d = g.deployment(&t);
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert_eq!(c["image"], "ghcr.io/ambit/waypoint:1.0");
        assert_eq!(c["command"], json!(["waypoint"]));
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let flag = |f: &str| {
            let i = args
                .iter()
                .position(|a| *a == f)
                .unwrap_or_else(|| panic!("{f}"));
            args[i + 1]
        };
        assert_eq!(flag("--gateway"), "demo/wp");
        assert_eq!(flag("--hbone-addr"), "$(POD_IP):15008");
        assert_eq!(flag("--node"), "$(NODE_NAME)");
        assert_eq!(flag("--xds-address"), t.xds_address);
        assert_eq!(flag("--control-plane-name"), "istiod.istio-system.svc");
        assert_eq!(flag("--trust-domain"), "cluster.local");
        assert_eq!(flag("--readiness-addr"), "0.0.0.0:15021");
        assert_eq!(flag("--metrics-addr"), "0.0.0.0:15020");
        assert_eq!(flag("--root-namespace"), "mesh-root");
        assert_eq!(
            flag("--otlp-endpoint"),
            "http://otel-collector.observability:4317"
        );
        let untraced = WaypointTemplate {
            otlp_endpoint: None,
            ..t.clone()
        };
        assert!(!g.args(&untraced).iter().any(|a| a == "--otlp-endpoint"));
        // The files the flags name are where the volumes are mounted.
        let mounts = c["volumeMounts"].as_array().unwrap();
        for (f, volume) in [
            ("--ca-root-cert", "ca-root"),
            ("--token-file", "istio-token"),
        ] {
            let m = mounts.iter().find(|m| m["name"] == volume).unwrap();
            let dir = m["mountPath"].as_str().unwrap();
            assert!(flag(f).starts_with(&format!("{dir}/")), "{f} under {dir}");
        }
        let env: Vec<(&str, &str)> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            env,
            [("POD_IP", "status.podIP"), ("NODE_NAME", "spec.nodeName")]
        );

        assert_eq!(spec["serviceAccountName"], "wp");
        assert_eq!(spec["automountServiceAccountToken"], false);
        let token = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "istio-ca");
        assert_eq!(token["path"], "istio-token");
        assert_eq!(spec["volumes"][1]["configMap"]["name"], "wp-ca-root-cert");

        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_ne!(spec["securityContext"]["runAsUser"], 0);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(c["resources"]["requests"]["cpu"], "100m");
        assert_eq!(c["resources"]["requests"]["memory"], "128Mi");
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            json!({"path": "/healthz/ready", "port": 15021})
        );
        let annotations = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "15020");
        // The pods are the Deployment's and the Service's.
        assert_eq!(
            d["spec"]["selector"]["matchLabels"],
            json!({"gateway.networking.k8s.io/gateway-name": "wp"})
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"],
            "none"
        );
    }
}
