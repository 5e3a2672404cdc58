//! The Helm chart `deploy/helm/ambit`, rendered in-process (Helm cannot be
//! installed here) with its values and with overrides, every document parsed
//! into its k8s-openapi type; then what each object must say.

use std::collections::BTreeSet;

use deploy_tests::chart::{Chart, Document};
use deploy_tests::gotmpl::Templates;
use deploy_tests::objects::{parse, Object};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::{json, Value};

const NS: &str = "ambit-system";

fn chart() -> Chart {
    Chart::load(&deploy_tests::workspace().join("deploy/helm/ambit")).unwrap()
}

fn render(over: Value) -> Vec<Object> {
    let docs: Vec<Document> = chart()
        .render("mesh", NS, &over)
        .unwrap_or_else(|e| panic!("{e}"));
    docs.iter()
        .map(|d| parse(d).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn deployment(objs: &[Object]) -> &Deployment {
    let mut it = objs.iter().filter_map(|o| match o {
        Object::Deployment(d) => Some(d.as_ref()),
        _ => None,
    });
    let d = it.next().expect("a Deployment");
    assert!(it.next().is_none(), "one Deployment");
    d
}

fn daemonset(objs: &[Object]) -> &DaemonSet {
    let mut it = objs.iter().filter_map(|o| match o {
        Object::DaemonSet(d) => Some(d.as_ref()),
        _ => None,
    });
    let d = it.next().expect("a DaemonSet");
    assert!(it.next().is_none(), "one DaemonSet");
    d
}

fn service(objs: &[Object]) -> &Service {
    objs.iter()
        .find_map(|o| match o {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        })
        .expect("a Service")
}

fn cluster_role(objs: &[Object]) -> &ClusterRole {
    objs.iter()
        .find_map(|o| match o {
            Object::ClusterRole(r) => Some(r.as_ref()),
            _ => None,
        })
        .expect("a ClusterRole")
}

fn binding(objs: &[Object]) -> &ClusterRoleBinding {
    objs.iter()
        .find_map(|o| match o {
            Object::ClusterRoleBinding(b) => Some(b.as_ref()),
            _ => None,
        })
        .expect("a ClusterRoleBinding")
}

fn deployment_pod(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn only_container(p: &PodSpec) -> &Container {
    assert_eq!(p.containers.len(), 1);
    &p.containers[0]
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

/// The value of `--flag=value` in `args`, if present once.
fn flag(args: &[String], name: &str) -> Option<String> {
    let found: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix(&format!("{name}=")).map(str::to_string))
        .collect();
    assert!(found.len() <= 1, "{name} given twice: {args:?}");
    found.into_iter().next()
}

fn capabilities(c: &Container) -> (Vec<String>, Vec<String>) {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    (caps.add.unwrap_or_default(), caps.drop.unwrap_or_default())
}

#[test]
fn default_values_render_to_valid_kubernetes_objects() {
    let objs = render(json!({}));
    let kinds: Vec<&str> = objs.iter().map(Object::kind).collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "DaemonSet",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
        ]
    );
    for o in &objs {
        let meta = match o {
            Object::Deployment(x) => &x.metadata,
            Object::DaemonSet(x) => &x.metadata,
            Object::Service(x) => &x.metadata,
            Object::ServiceAccount(x) => &x.metadata,
            _ => continue,
        };
        assert_eq!(meta.namespace.as_deref(), Some(NS), "{meta:?}");
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("app.kubernetes.io/part-of").map(String::as_str),
            Some("ambit")
        );
        assert_eq!(
            labels.get("app.kubernetes.io/version").map(String::as_str),
            Some("0.1.0")
        );
    }
    // The chart installs the same CRD the repository ships.
    let crd = objs
        .iter()
        .find_map(|o| match o {
            Object::CustomResourceDefinition(c) => Some(c),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("trafficpolicies.ambit.dev")
    );
}

/// (apiGroup, resource, verbs) triples, order-free; a resource in two
/// rules gets the union of their verbs, as the authorizer grants it.
fn rule_set(role: &ClusterRole) -> BTreeSet<(String, String, BTreeSet<String>)> {
    let mut merged: std::collections::BTreeMap<(String, String), BTreeSet<String>> =
        Default::default();
    for r in role.rules.iter().flatten() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                merged
                    .entry((g.clone(), res.clone()))
                    .or_default()
                    .extend(r.verbs.iter().cloned());
            }
        }
    }
    merged.into_iter().map(|((g, r), v)| (g, r, v)).collect()
}

fn rules(list: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, BTreeSet<String>)> {
    list.iter()
        .map(|(g, r, v)| {
            (
                g.to_string(),
                r.to_string(),
                v.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect()
}

/// What istiod-lite's code calls, by file: sources/kubernetes.rs (watches,
/// route status), kube_auth.rs (TokenReview, pod lookup), and the waypoint
/// deployer (waypoint_deployer/: server-side apply, label-selected watches,
/// deletes, Gateway status).
const CONTROL_PLANE_RULES: &[(&str, &str, &[&str])] = &[
    ("", "namespaces", &["list", "watch"]),
    ("", "pods", &["get", "list", "watch"]),
    (
        "security.istio.io",
        "authorizationpolicies",
        &["list", "watch"],
    ),
    (
        "security.istio.io",
        "peerauthentications",
        &["list", "watch"],
    ),
    ("gateway.networking.k8s.io", "gateways", &["list", "watch"]),
    (
        "gateway.networking.k8s.io",
        "httproutes",
        &["list", "watch"],
    ),
    ("gateway.networking.k8s.io", "httproutes/status", &["patch"]),
    ("ambit.dev", "trafficpolicies", &["list", "watch"]),
    ("authentication.k8s.io", "tokenreviews", &["create"]),
];
const DEPLOYER: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

#[test]
fn istiod_lite_rbac_is_exactly_what_it_watches_and_writes() {
    let objs = render(json!({}));
    let mut want = rules(CONTROL_PLANE_RULES);
    want.extend(rules(&[
        ("apps", "deployments", DEPLOYER),
        ("", "services", DEPLOYER),
        ("", "serviceaccounts", DEPLOYER),
        ("", "configmaps", DEPLOYER),
        ("gateway.networking.k8s.io", "gateways/status", &["patch"]),
    ]));
    assert_eq!(rule_set(cluster_role(&objs)), want);

    // Without the deployer, its rules go, and services are only watched.
    let objs = render(json!({"waypoint": {"deploy": false}}));
    let mut want = rules(CONTROL_PLANE_RULES);
    want.extend(rules(&[("", "services", &["list", "watch"])]));
    assert_eq!(rule_set(cluster_role(&objs)), want);

    let role = cluster_role(&objs);
    let b = binding(&objs);
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.clone().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            subjects[0].name.as_str(),
            subjects[0].namespace.as_deref()
        ),
        ("ServiceAccount", "istiod-lite", Some(NS))
    );
    let pod = deployment_pod(deployment(&objs));
    assert_eq!(pod.service_account_name.as_deref(), Some("istiod-lite"));
}

fn istiod_lite_source(file: &str) -> String {
    let path = deploy_tests::workspace().join("istiod-lite/src").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `"…"` string literal argument list of calls to `function(` in `src`.
fn string_args_of(src: &str, function: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in src.match_indices(&format!("{function}(")) {
        let rest = &src[i + function.len() + 1..];
        let args = &rest[..rest.find(')').unwrap()];
        let strings: Vec<String> = args
            .split(',')
            .map(|a| a.trim().trim_matches('"').to_string())
            .collect();
        if args.trim_start().starts_with('"') {
            out.push(strings);
        }
    }
    out
}

/// The ClusterRole grants (at least) every call the code makes: read from
/// the source, so a kind watched or written without a rule fails here
/// rather than as a 403 in a cluster.
#[test]
fn istiod_lite_rbac_covers_every_call_in_its_source() {
    let role = rule_set(cluster_role(&render(json!({}))));
    let grants = |group: &str, resource: &str, verbs: &[&str]| {
        let have = role
            .iter()
            .find(|(g, r, _)| g == group && r == resource)
            .map(|(_, _, v)| v.clone())
            .unwrap_or_default();
        for v in verbs {
            assert!(
                have.contains(*v),
                "istiod-lite needs {v} on {group}/{resource}: add it to templates/istiod-rbac.yaml (and docs/install.md)"
            );
        }
    };
    let k8s = istiod_lite_source("sources/kubernetes.rs");
    let mut watched = 0;
    for (function, group) in [
        ("istio_resource", "security.istio.io"),
        ("gateway_resource", "gateway.networking.k8s.io"),
        ("ambit_resource", "ambit.dev"),
    ] {
        for args in string_args_of(&k8s, function) {
            grants(group, &args[1], &["list", "watch"]);
            watched += 1;
        }
    }
    assert!(
        watched >= 5,
        "the source scan found {watched} dynamic watches"
    );
    // Typed watchers: `watch(Api::all(..), <writer>, &wc, Kind::<Kind>)`.
    for line in k8s.lines().filter(|l| l.contains("watch(Api::all(")) {
        let kind = line
            .split("Kind::")
            .nth(1)
            .unwrap()
            .trim_end_matches([')', ',']);
        let plural = match kind {
            "Namespace" => "namespaces",
            "Pod" => "pods",
            "Service" => "services",
            other => panic!("typed watch of {other}: add its rule and extend this table"),
        };
        grants("", plural, &["list", "watch"]);
    }
    assert!(k8s.contains(".patch_status("));
    grants("gateway.networking.k8s.io", "httproutes/status", &["patch"]);

    let auth = istiod_lite_source("kube_auth.rs");
    assert!(auth.contains("Api<TokenReview>") && auth.contains(".create("));
    grants("authentication.k8s.io", "tokenreviews", &["create"]);
    assert!(auth.contains("Api<Pod>") && auth.contains(".get("));
    grants("", "pods", &["get"]);

    // The waypoint deployer: applies (patch), watches and deletes each
    // managed kind; patches Gateway status.
    let deployer = istiod_lite_source("waypoint_deployer/mod.rs");
    let mut managed = 0;
    for (i, _) in deployer.match_indices("ApiResource::erase::<") {
        let ty = deployer[i + "ApiResource::erase::<".len()..]
            .split('>')
            .next()
            .unwrap();
        let (group, plural) = match ty {
            "ServiceAccount" => ("", "serviceaccounts"),
            "ConfigMap" => ("", "configmaps"),
            "Service" => ("", "services"),
            "Deployment" => ("apps", "deployments"),
            other => panic!("the deployer manages {other}: add its rule and extend this table"),
        };
        grants(group, plural, &["list", "watch", "patch", "delete"]);
        managed += 1;
    }
    assert_eq!(managed, 4, "the deployer's managed kinds");
    assert!(deployer.contains("Patch::Apply") && deployer.contains(".delete("));
    assert!(deployer.contains(".patch_status("));
    grants("gateway.networking.k8s.io", "gateways/status", &["patch"]);
}

#[test]
fn istiod_lite_serves_kubernetes_with_the_ca_secret_as_non_root() {
    let objs = render(json!({}));
    let d = deployment(&objs);
    let spec = d.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let c = only_container(pod);
    assert_eq!(c.image.as_deref(), Some("ambit/istiod-lite:0.1.0"));
    let a = args(c);
    assert_eq!(a[0], "serve");
    assert_eq!(flag(&a, "--source").as_deref(), Some("kubernetes"));
    assert_eq!(flag(&a, "--trust-domain").as_deref(), Some("cluster.local"));
    assert_eq!(flag(&a, "--root-namespace").as_deref(), Some(NS));
    assert_eq!(
        flag(&a, "--node-proxy-service-account"),
        Some(format!("{NS}/ztunnel"))
    );
    assert_eq!(flag(&a, "--token-audience").as_deref(), Some("istio-ca"));
    assert_eq!(
        flag(&a, "--serving-dns"),
        Some(format!("istiod-lite.{NS}.svc"))
    );
    assert_eq!(
        flag(&a, "--waypoint-image").as_deref(),
        Some("ambit/waypoint:0.1.0")
    );
    // The Secret is istiod-lite's data directory, read-only.
    let data_dir = flag(&a, "--data-dir").unwrap();
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == data_dir)
        .expect("the CA volume at --data-dir");
    assert_eq!(mount.read_only, Some(true));
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = vol.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("ambit-ca"));
    assert_eq!(secret.default_mode, Some(0o440));

    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u != 0));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(capabilities(c), (vec![], vec!["ALL".to_string()]));

    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/ready"));

    // The Service reaches these pods on 15012 and 15014.
    let s = service(&objs);
    assert_eq!(s.metadata.name.as_deref(), Some("istiod-lite"));
    let ss = s.spec.as_ref().unwrap();
    let ports: Vec<i32> = ss.ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [15012, 15014]);
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in ss.selector.as_ref().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "Service selector {k}");
    }
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "Deployment selector {k}");
    }
    let container_ports: BTreeSet<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    for p in ss.ports.iter().flatten() {
        let target = p.target_port.as_ref().unwrap();
        let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) = target else {
            panic!("target ports are named: {target:?}");
        };
        assert!(container_ports.contains(name), "{name}");
    }
}

#[test]
fn ztunnel_runs_on_the_host_network_with_the_measured_capabilities() {
    let objs = render(json!({}));
    let ds = daemonset(&objs);
    let template = &ds.spec.as_ref().unwrap().template;
    let pod = template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.service_account_name.as_deref(), Some("ztunnel"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = only_container(pod);
    assert_eq!(c.image.as_deref(), Some("ambit/ztunnel:0.1.0"));

    // docs/install.md: measured with the real ztunnel --capture.
    let (add, drop) = capabilities(c);
    assert_eq!(add, ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(drop, ["ALL"]);
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));

    let a = args(c);
    assert!(a.contains(&"--capture".to_string()), "{a:?}");
    assert_eq!(
        flag(&a, "--bpf-pin-dir").as_deref(),
        Some("/sys/fs/bpf/ambit")
    );
    assert_eq!(flag(&a, "--capture-uplink"), None);
    // ztunnel dials the Service and checks the name istiod-lite serves.
    let istiod_args = args(only_container(deployment_pod(deployment(&objs))));
    let name = flag(&istiod_args, "--serving-dns").unwrap();
    assert_eq!(flag(&a, "--control-plane-name"), Some(name.clone()));
    assert_eq!(
        flag(&a, "--xds-address"),
        Some(format!("https://{name}:15012"))
    );
    let svc = service(&objs);
    assert_eq!(
        name,
        format!(
            "{}.{}.svc",
            svc.metadata.name.as_deref().unwrap(),
            svc.metadata.namespace.as_deref().unwrap()
        )
    );
    assert_eq!(flag(&a, "--trust-domain").as_deref(), Some("cluster.local"));

    // bpffs from the host, under the pin directory.
    let bpf = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == bpf.name)
        .unwrap();
    assert_eq!(
        vol.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );

    // The token the CA reviews: projected, for the CA's audience, where
    // --token-file points.
    let token_file = flag(&a, "--token-file").unwrap();
    let (dir, file) = token_file.rsplit_once('/').unwrap();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("token mount");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap();
    let sat = vol.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(sat.path, file);
    assert_eq!(sat.audience.as_deref(), Some("istio-ca"));
    // And the root it verifies istiod-lite with, from the ConfigMap.
    let root = flag(&a, "--ca-root-cert").unwrap();
    let (dir, _) = root.rsplit_once('/').unwrap();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("root mount");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap();
    assert_eq!(
        vol.config_map.as_ref().map(|c| c.name.as_str()),
        Some("ambit-ca-root")
    );

    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );
    assert_eq!(
        flag(&a, "--readiness-addr").as_deref(),
        Some("0.0.0.0:15021")
    );
    let ann = template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "15020");
    assert_eq!(flag(&a, "--metrics-addr").as_deref(), Some("0.0.0.0:15020"));
    assert!(c
        .env
        .iter()
        .flatten()
        .all(|e| e.name != "AMBIT_OTLP_ENDPOINT"));
    // The admin port stays on localhost unless asked.
    assert_eq!(flag(&a, "--admin-addr"), None);
    assert!(c.ports.iter().flatten().all(|p| p.container_port != 15000));
    // Every node, tainted ones too.
    let tolerations = pod.tolerations.clone().unwrap();
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
}

#[test]
fn overrides_take_effect() {
    let objs = render(json!({
        "image": {"hub": "registry.example/mesh", "tag": "v9"},
        "trustDomain": "corp.example",
        "otlpEndpoint": "http://otel.observability:4317",
        "ztunnel": {"capture": {"enabled": false, "uplink": "eth0"}},
        "waypoint": {"deploy": false},
        "istiod": {"rootNamespace": "mesh-root"},
    }));
    let ds = daemonset(&objs);
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = only_container(pod);
    assert_eq!(c.image.as_deref(), Some("registry.example/mesh/ztunnel:v9"));
    let a = args(c);
    // No capture: no capture flags (the uplink is ignored), no added
    // capabilities, no bpffs.
    assert!(
        !a.iter()
            .any(|x| x.starts_with("--capture") || x.starts_with("--bpf")),
        "{a:?}"
    );
    assert_eq!(capabilities(c), (vec![], vec!["ALL".to_string()]));
    assert!(pod.volumes.iter().flatten().all(|v| v.host_path.is_none()));
    assert!(c
        .volume_mounts
        .iter()
        .flatten()
        .all(|m| m.mount_path != "/sys/fs/bpf"));
    assert_eq!(flag(&a, "--trust-domain").as_deref(), Some("corp.example"));
    // ztunnel reads mesh-wide policies from istiod-lite's root namespace.
    assert_eq!(flag(&a, "--root-namespace").as_deref(), Some("mesh-root"));
    let otlp = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "AMBIT_OTLP_ENDPOINT")
        .expect("OTLP endpoint");
    assert_eq!(
        otlp.value.as_deref(),
        Some("http://otel.observability:4317")
    );

    let d = deployment(&objs);
    let c = only_container(d.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/mesh/istiod-lite:v9")
    );
    let a = args(c);
    assert_eq!(flag(&a, "--waypoint-image"), None);
    assert_eq!(flag(&a, "--trust-domain").as_deref(), Some("corp.example"));
    assert_eq!(flag(&a, "--root-namespace").as_deref(), Some("mesh-root"));

    // Deployed waypoints trace to the same collector.
    let objs = render(json!({"otlpEndpoint": "http://otel.observability:4317"}));
    let d = deployment(&objs);
    let a = args(only_container(
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap(),
    ));
    assert_eq!(
        flag(&a, "--waypoint-otlp-endpoint").as_deref(),
        Some("http://otel.observability:4317")
    );

    // Capture with an uplink; admin on the pod IP, for ambitctl.
    let objs = render(json!({"ztunnel": {"capture": {"uplink": "eth0"}, "adminOnPodIP": true}}));
    let ds = daemonset(&objs);
    let c = only_container(ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    let a = args(c);
    assert_eq!(flag(&a, "--capture-uplink").as_deref(), Some("eth0"));
    assert_eq!(flag(&a, "--admin-addr").as_deref(), Some("$(POD_IP):15000"));
    let pod_ip = c.env.iter().flatten().find(|e| e.name == "POD_IP").unwrap();
    let field = pod_ip
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "status.podIP");
    let admin = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == 15000)
        .unwrap();
    assert_eq!(admin.name.as_deref(), Some("http-admin"));

    // The privileged escape hatch is all or nothing.
    let objs = render(json!({"ztunnel": {"privileged": true}}));
    let ds = daemonset(&objs);
    let c = only_container(ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.privileged, sc.allow_privilege_escalation),
        (Some(true), Some(true))
    );
}

/// A value nobody reads is a setting that silently does nothing.
#[test]
fn every_value_is_read_by_a_template() {
    let c = chart();
    let sources: String = c.templates.values().cloned().collect();
    fn leaves(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(o) if !o.is_empty() => {
                for (k, v) in o {
                    let p = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    leaves(v, &p, out);
                }
            }
            _ => out.push(at.to_string()),
        }
    }
    let mut paths = Vec::new();
    leaves(&c.values, "", &mut paths);
    let used = |p: &str| {
        sources
            .match_indices(&format!(".Values.{p}"))
            .any(|(i, m)| {
                let next = sources[i + m.len()..].chars().next().unwrap_or(' ');
                !(next.is_alphanumeric() || next == '_')
            })
    };
    let unused: Vec<&String> = paths
        .iter()
        .filter(|p| {
            // A value read as a whole subtree (toYaml) counts for its leaves.
            let parts: Vec<&str> = p.split('.').collect();
            !(1..=parts.len()).any(|n| used(&parts[..n].join(".")))
        })
        .collect();
    assert!(unused.is_empty(), "values no template reads: {unused:?}");
}

/// Helm refuses values its schema does not describe, so a misspelt value
/// fails the install instead of being ignored; the schema admits every value
/// the chart documents.
#[test]
fn values_schema_refuses_misspelt_and_mistyped_values() {
    let c = chart();
    let schema = c.schema.as_ref().expect("values.schema.json");
    deploy_tests::values_schema::validate(schema, &c.values, "").unwrap();
    for (over, why) in [
        (
            json!({"ztunnel": {"captur": {"enabled": false}}}),
            "ztunnel.captur: not a value",
        ),
        (json!({"imag": {"tag": "v1"}}), "imag: not a value"),
        (
            json!({"istiod": {"replicas": "two"}}),
            "is not of type integer",
        ),
        (json!({"istiod": {"replicas": 0}}), "below 1"),
        (
            json!({"ztunnel": {"capture": {"enabled": "yes"}}}),
            "is not of type boolean",
        ),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "is not one of",
        ),
        (json!({"trustDomain": ""}), "shorter than 1"),
    ] {
        match c.render("mesh", NS, &over) {
            Ok(_) => panic!("{over} was accepted"),
            Err(e) => assert!(e.contains(why), "{over}: {e}"),
        }
    }
    // What users pass: a numeric tag from --set, free-form scheduling.
    render(json!({
        "image": {"tag": 1.2},
        "istiod": {"affinity": {"nodeAffinity": {}}, "nodeSelector": {"kubernetes.io/os": "linux"}},
        "ztunnel": {"tolerations": [{"key": "k", "operator": "Exists"}]},
    }));
}

fn render_one(src: &str, data: Value) -> Result<String, String> {
    let mut t = Templates::default();
    t.add("t.yaml", src).map_err(|e| e.to_string())?;
    t.render("t.yaml", &data).map_err(|e| e.to_string())
}

#[test]
fn renderer_follows_go_template_semantics_for_the_subset() {
    let data = json!({"Values": {"a": {"b": "x", "n": 3, "list": [1, 2], "m": {"k": "v"}, "off": false, "empty": ""}}});
    let ok = |src: &str, want: &str| {
        assert_eq!(render_one(src, data.clone()).unwrap(), want, "{src}");
    };
    ok("a: {{ .Values.a.b }}\n", "a: x\n");
    ok(
        "a:\n  {{- if .Values.a.off }} on{{ else }} off{{ end }}\n",
        "a: off\n",
    );
    ok(
        "{{ if .Values.a.missing }}1{{ else if .Values.a.n }}2{{ end }}",
        "2",
    );
    ok(
        "{{- range .Values.a.list }}\n- {{ . }}\n{{- end }}",
        "\n- 1\n- 2",
    );
    ok(
        "{{ with .Values.a.m }}{{ .k }}{{ $.Values.a.b }}{{ end }}",
        "vx",
    );
    ok("{{ with .Values.a.empty }}yes{{ else }}no{{ end }}", "no");
    ok(
        "{{ .Values.a.b | quote }} {{ quote .Values.a.n }}",
        "\"x\" \"3\"",
    );
    ok(
        "{{ default \"d\" .Values.a.empty }}{{ default \"d\" .Values.a.b }}",
        "dx",
    );
    ok("{{ printf \"%s-%d\" .Values.a.b .Values.a.n }}", "x-3");
    ok("m:{{ toYaml .Values.a.m | nindent 2 }}", "m:\n  k: v");
    ok("{{/* note */}}a{{- /* trimmed */ -}}  b", "ab");
    ok(
        "{{ define \"h\" }}[{{ .k }}]{{ end }}{{ include \"h\" .Values.a.m | indent 1 }}",
        " [v]",
    );
    ok(
        "{{ template \"h2\" .Values.a.m }}{{ define \"h2\" }}<{{ .k }}>{{ end }}",
        "<v>",
    );
    ok(
        "{{ if and .Values.a.n (not .Values.a.off) }}y{{ end }}",
        "y",
    );
    ok("{{ if eq .Values.a.b \"x\" }}y{{ end }}", "y");
}

#[test]
fn renderer_refuses_what_it_does_not_implement_or_would_render_blank() {
    let data = json!({"Values": {"a": {"b": "x", "m": {"k": "v"}}}});
    let refused = |src: &str, why: &str| match render_one(src, data.clone()) {
        Ok(out) => panic!("{src} rendered {out:?}"),
        Err(e) => assert!(e.contains(why), "{src}: {e}"),
    };
    refused("{{ .Values.a.typo }}", "<no value>");
    refused("{{ .Values.nope.b }}", "nil pointer");
    refused("{{ .Values.a.m }}", "needs toYaml");
    refused("{{ upper .Values.a.b }}", "unsupported function");
    refused("{{ $x := .Values.a.b }}", "variables");
    refused("{{ block \"x\" . }}{{ end }}", "not supported");
    refused("{{ if .Values.a.b }}", "without `end`");
    refused("{{ end }}", "without a block");
    refused("{{ include \"missing\" . }}", "no template");
    refused("{{ printf \"%q\" .Values.a.b }}", "not supported");
    refused("{{ .Values.a.b ", "unclosed");
    refused("{{ .Values.a.b | .Values.a.b }}", "must be a function");
}
