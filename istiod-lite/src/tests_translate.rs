//! Translation tests: manifests in, the mesh model out (table style).

use crate::sources::manifests::load_str;
use crate::sources::ClusterState;
use crate::translate::{translate, MeshOptions, Translation};
use mesh_core::config::{
    parse_mesh_config, HttpPolicyAction, MtlsMode, ParentKind, PolicyAction, PolicyScope,
    TargetKind, WaypointRef,
};

fn run(yaml: &str) -> Translation {
    let mut state = ClusterState::default();
    let mut rejected = Vec::new();
    load_str("test.yaml", yaml, &mut state, &mut rejected);
    let mut t = translate(&state, &MeshOptions::new("cluster.local", "istio-system"));
    rejected.extend(t.rejected);
    t.rejected = rejected;
    // Whatever is rendered must be a config ztunnel accepts.
    let rendered = serde_yaml::to_string(&t.config).expect("serializes");
    parse_mesh_config(&rendered)
        .unwrap_or_else(|e| panic!("rendered config invalid: {e}\n{rendered}"));
    t
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"#;

fn pod(ns: &str, name: &str, ip: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: node1, serviceAccountName: {name}-sa, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{podIP: \"{ip}\"}}\n"
    )
}

#[test]
fn enrollment_follows_istio_labels() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("demo", "in", "198.19.1.10", "app: a"),
        pod(
            "demo",
            "out",
            "198.19.1.11",
            "istio.io/dataplane-mode: none",
        ),
        pod("legacy", "plain", "198.19.1.12", "app: b"),
        pod(
            "legacy",
            "opted-in",
            "198.19.1.13",
            "istio.io/dataplane-mode: ambient",
        ),
    ]
    .concat();
    let t = run(&yaml);
    let names: Vec<_> = t
        .config
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    assert_eq!(names, ["demo/in", "legacy/opted-in"]);
    assert_eq!(t.config.workloads[0].service_account, "in-sa");
    assert_eq!(t.config.workloads[0].node, "node1");
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
}

#[test]
fn services_select_enrolled_endpoints_and_resolve_named_ports() {
    let yaml = [
        NAMESPACES.to_string(),
        pod(
            "demo",
            "reviews-v1",
            "198.19.1.20",
            "app: reviews, version: v1",
        ),
        pod(
            "demo",
            "reviews-v2",
            "198.19.2.20",
            "app: reviews, version: v2",
        ),
        pod("demo", "other", "198.19.2.21", "app: other"),
        r#"---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec:
  selector: {app: reviews}
  clusterIP: 198.18.100.10
  ports: [{name: http, port: 9080, targetPort: http}]
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    assert_eq!(t.config.services.len(), 1);
    let svc = &t.config.services[0];
    assert_eq!(svc.ports[0].port, 9080);
    assert_eq!(
        svc.ports[0].target(),
        8080,
        "named targetPort resolved on the endpoint"
    );
    let members: Vec<_> = t
        .config
        .workloads
        .iter()
        .filter(|w| w.services.contains(&"demo/reviews".to_string()))
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(members, ["reviews-v1", "reviews-v2"]);
}

#[test]
fn authorization_policies_keep_their_l4_meaning() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("demo", "web", "198.19.1.30", "app: web"),
        r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {ports: ["8080"]}}]
  - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-posts, namespace: demo}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["legacy"]}}]
    to: [{operation: {methods: ["POST"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["203.0.113.0/24"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: demo}
spec: {action: AUDIT, rules: [{}]}
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    let by_name = |n: &str| {
        t.config
            .policies
            .iter()
            .find(|p| p.name == n)
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    let allow = by_name("allow-client");
    assert_eq!(allow.scope, PolicyScope::WorkloadSelector);
    assert_eq!(
        allow.rules.len(),
        1,
        "the L7-only ALLOW rule matches nothing at L4, so it is dropped"
    );
    assert_eq!(allow.rules[0].to[0].ports, [8080]);
    assert_eq!(
        t.config.workloads[0].authorization_policies,
        ["demo/allow-client"]
    );
    let deny = by_name("deny-posts");
    assert_eq!(
        (deny.action, deny.scope),
        (PolicyAction::Deny, PolicyScope::Namespace)
    );
    assert_eq!(
        deny.rules[0].from[0].namespaces,
        ["legacy"],
        "DENY keeps its L4 part"
    );
    assert_eq!(by_name("mesh-deny").scope, PolicyScope::Global);
    assert!(t.config.policies.iter().all(|p| p.name != "audit"));
    assert!(t.notes.iter().any(|n| n.contains("AUDIT")), "{:?}", t.notes);
}

#[test]
fn peer_authentication_modes_and_selectors() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("demo", "db", "198.19.1.40", "app: db"),
        r#"---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-db, namespace: demo}
spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: none-selected, namespace: demo}
spec: {selector: {matchLabels: {app: nothing}}, mtls: {mode: PERMISSIVE}}
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    assert_eq!(
        t.config.peer_authentications.len(),
        1,
        "a selector that selects nothing must not widen"
    );
    let pa = &t.config.peer_authentications[0];
    assert_eq!(
        (pa.mode, pa.workloads.clone()),
        (MtlsMode::Strict, vec!["db".to_string()])
    );
}

#[test]
fn bad_objects_are_rejected_with_reasons_and_the_rest_flows() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("demo", "fine", "198.19.1.49", "app: fine"),
        pod("demo", "good", "198.19.1.50", "app: good"),
        pod("demo", "z-dup", "198.19.1.50", "app: dup"),
        pod("demo", "badip", "300.1.1.1", "app: x"),
        r#"---
apiVersion: v1
kind: Pod
metadata: {name: nowhere, namespace: demo}
spec: {containers: []}
status: {podIP: "198.19.1.51"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, namespace: demo}
---
apiVersion: networking.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: wrong-group, namespace: demo}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: demo}
spec: {rules: [{to: [{operation: {ports: ["http"]}}]}]}
---
kind: Service
metadata: {namespace: demo}
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    let names: Vec<_> = t.config.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["fine"], "only the pod without problems");
    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    for want in [
        // Two pods claiming one address: neither gets it.
        "Pod demo/good (translation): address 198.19.1.50 is claimed by 2 pods",
        "Pod demo/z-dup (translation): address 198.19.1.50 is claimed by 2 pods",
        "Pod demo/badip (translation): status.podIP \"300.1.1.1\" is not an IP address",
        "Pod demo/nowhere (translation): no spec.nodeName",
        "ConfigMap demo/cm (test.yaml, document 8): kind ConfigMap is not supported",
        "AuthorizationPolicy demo/wrong-group (test.yaml, document 9): apiVersion \"networking.istio.io/v1\"",
        "AuthorizationPolicy demo/bad-port (translation): port \"http\" is not a port number; enforced as deny-all",
        "Service demo/ (test.yaml, document 11): metadata.name is missing",
    ] {
        assert!(reasons.iter().any(|r| r.starts_with(want)), "missing {want:?} in {reasons:#?}");
    }
}

#[test]
fn bundled_demo_manifests_render() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let (state, rejected) =
        crate::sources::manifests::load_dir(&dir).expect("examples/demo readable");
    assert!(rejected.is_empty(), "{rejected:?}");
    let t = translate(&state, &MeshOptions::new("cluster.local", "istio-system"));
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let names: Vec<_> = t.config.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        ["client", "reviews-v1", "reviews-v2", "waypoint-0"],
        "legacy/outsider is not in the mesh; the waypoint's pod is"
    );
    assert_eq!(t.config.services[0].ports[0].target(), 9080);
    let wp = Some(WaypointRef::new("demo", "waypoint"));
    assert_eq!(t.config.services[0].waypoint, wp, "reviews");
    for w in &t.config.workloads[..3] {
        assert_eq!(w.waypoint, wp, "{}", w.name);
    }
    let pod = &t.config.workloads[3];
    assert!(pod.native_tunnel && pod.waypoint.is_none());
    assert_eq!(pod.services, ["demo/waypoint"]);
    let waypoint_svc = t
        .config
        .services
        .iter()
        .find(|s| s.name == "waypoint")
        .expect("the waypoint's Service");
    assert!(
        waypoint_svc.waypoint.is_none(),
        "a waypoint has no waypoint"
    );
    assert_eq!(t.config.peer_authentications[0].mode, MtlsMode::Strict);
    // The 90/10 split reaches the model, its backends resolved.
    let split = &t.config.http_routes[0];
    assert_eq!(split.key(), "demo/reviews-split");
    let backends: Vec<_> = split.rules[0]
        .backend_refs
        .iter()
        .map(|b| (b.name.as_str(), b.weight))
        .collect();
    assert_eq!(backends, [("reviews-v1", 90), ("reviews-v2", 10)]);
    let status = &t.route_status[0].parents[0];
    assert!(status.accepted.status);
    assert!(status.resolved_refs.status, "{status:?}");
    assert!(
        t.config
            .http_policies
            .iter()
            .any(|p| p.name == "reviews-readers"),
        "the L7 policy reaches the waypoint"
    );
    let rendered = serde_yaml::to_string(&t.config).expect("serializes");
    parse_mesh_config(&rendered).expect("ztunnel accepts the rendered demo config");
}

#[test]
fn exclusion_annotations_become_workload_ports() {
    let annotated = |name: &str, ip: &str, annotations: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, annotations: {{{annotations}}}}}\n\
             spec: {{nodeName: node1, containers: [{{name: app}}]}}\nstatus: {{podIP: \"{ip}\"}}\n"
        )
    };
    let yaml = [
        NAMESPACES.to_string(),
        annotated(
            "db",
            "198.19.1.60",
            "ambit.dev/exclude-ports: \"22\", traffic.sidecar.istio.io/excludeInboundPorts: \"5432\"",
        ),
        annotated("typo", "198.19.1.61", "ambit.dev/exclude-ports: \"ssh\""),
    ]
    .concat();
    let t = run(&yaml);
    let db = t
        .config
        .workloads
        .iter()
        .find(|w| w.name == "db")
        .expect("db enrolled");
    assert_eq!(db.excluded_outbound_ports, [22]);
    assert_eq!(db.excluded_inbound_ports, [22, 5432]);
    let typo = t
        .config
        .workloads
        .iter()
        .find(|w| w.name == "typo")
        .expect("still enrolled");
    assert!(
        typo.excluded_outbound_ports.is_empty(),
        "a bad annotation excludes nothing"
    );
    assert!(
        t.rejected
            .iter()
            .any(|r| r.to_string().contains("\"ssh\" is not a port number")),
        "{:?}",
        t.rejected
    );
}

#[test]
fn unreadable_or_unusual_objects_fail_closed() {
    let yaml = [
        NAMESPACES.to_string(),
        pod("demo", "app", "198.19.1.70", "app: a"),
        r#"---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: demo}
spec: {nodeName: node1, containers: [{name: job}]}
status: {phase: Succeeded, podIP: "198.19.1.71"}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: demo}
spec: {nodeName: node1, hostNetwork: true, containers: [{name: agent}]}
status: {podIP: "198.18.0.1"}
---
apiVersion: v1
kind: Pod
metadata: {name: loop, namespace: demo}
spec: {nodeName: node1, containers: [{name: x}]}
status: {podIP: "127.0.0.1"}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: future-field, namespace: demo}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/a"], futureMatcher: ["x"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-typo, namespace: demo}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["eighty"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-sa, namespace: demo}
spec: {action: ALLOW, rules: [{from: [{source: {serviceAccounts: ["demo/client"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only, namespace: demo}
spec: {targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}, action: ALLOW}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: odd, namespace: demo}
spec: {mtls: {mode: SOMETIMES}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: per-port, namespace: demo}
spec: {selector: {matchLabels: {app: a}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {"8080": {mode: STRICT}}}
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    let names: Vec<_> = t.config.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        ["app"],
        "finished, host-network and loopback pods are not workloads"
    );
    let policy = |n: &str| t.config.policies.iter().find(|p| p.name == n);
    let future = policy("future-field").expect("kept as a stand-in");
    assert_eq!(
        (future.action, future.rules.len()),
        (PolicyAction::Allow, 0),
        "unknown field: allows nothing"
    );
    let deny = policy("deny-typo").expect("kept as a stand-in");
    assert_eq!(
        (deny.action, deny.rules.len()),
        (PolicyAction::Deny, 1),
        "unreadable DENY: denies everything"
    );
    assert!(deny.rules[0].from.is_empty() && deny.rules[0].to.is_empty());
    let by_sa = policy("by-sa").expect("serviceAccounts understood");
    assert_eq!(by_sa.rules[0].from[0].principals, ["*/ns/demo/sa/client"]);
    assert!(
        policy("waypoint-only").is_none(),
        "targetRef (singular) binds it to the waypoint"
    );
    let pa = |n: &str| {
        t.config
            .peer_authentications
            .iter()
            .find(|p| p.name == n)
            .map(|p| p.mode)
    };
    assert_eq!(
        pa("odd"),
        Some(MtlsMode::Strict),
        "unknown mode fails closed"
    );
    assert_eq!(
        pa("per-port"),
        Some(MtlsMode::Strict),
        "port-level STRICT is not lost"
    );
}

/// A waypoint as Istio deploys it: the Gateway, one pod labelled with its
/// name (and dataplane-mode none, as Istio's are) and a Service selecting it.
fn waypoint(ns: &str, name: &str, ip: &str, vip: &str, gateway_meta: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: {ns}{gateway_meta}}}\n\
         spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}-0, namespace: {ns}, labels: {{gateway.networking.k8s.io/gateway-name: {name}, istio.io/dataplane-mode: none}}}}\n\
         spec: {{nodeName: node2, serviceAccountName: {name}, containers: [{{name: waypoint}}]}}\n\
         status: {{podIP: \"{ip}\"}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{selector: {{gateway.networking.k8s.io/gateway-name: {name}}}, clusterIP: {vip}, ports: [{{port: 15008}}]}}\n"
    )
}

fn service(ns: &str, name: &str, vip: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec: {{selector: {{app: {name}}}, clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    )
}

/// `namespace/name` and its waypoint's `namespace/name` (or `-`).
type Pairs = Vec<(String, String)>;

/// For services, then workloads.
fn waypoints_of(t: &Translation) -> (Pairs, Pairs) {
    let wp = |w: &Option<WaypointRef>| w.as_ref().map_or("-".into(), WaypointRef::key);
    (
        t.config
            .services
            .iter()
            .map(|s| (s.key(), wp(&s.waypoint)))
            .collect(),
        t.config
            .workloads
            .iter()
            .map(|w| (format!("{}/{}", w.namespace, w.name), wp(&w.waypoint)))
            .collect(),
    )
}

fn pairs(v: &[(&str, &str)]) -> Pairs {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const WAYPOINT_NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: infra}
"#;

#[test]
fn namespace_label_sends_services_and_workloads_through_the_waypoint() {
    let yaml = [
        WAYPOINT_NAMESPACES.to_string(),
        waypoint("demo", "wp", "198.19.2.90", "198.18.128.90", ""),
        pod("demo", "api", "198.19.1.10", "app: api"),
        pod("demo", "web", "198.19.1.11", "app: web"),
        service("demo", "api", "198.18.128.10", ""),
        service("demo", "web", "198.18.128.11", ""),
    ]
    .concat();
    let t = run(&yaml);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let (services, workloads) = waypoints_of(&t);
    assert_eq!(
        services,
        pairs(&[
            ("demo/api", "demo/wp"),
            ("demo/web", "demo/wp"),
            ("demo/wp", "-"),
        ]),
        "the waypoint's own Service has no waypoint"
    );
    assert_eq!(
        workloads,
        pairs(&[
            ("demo/api", "demo/wp"),
            ("demo/web", "demo/wp"),
            ("demo/wp-0", "-"),
        ]),
        "the waypoint's pod is in the mesh despite dataplane-mode none, without a waypoint"
    );
    let wp_pod = &t.config.workloads[2];
    assert!(wp_pod.native_tunnel);
    assert!(t.config.workloads[..2].iter().all(|w| !w.native_tunnel));
    assert_eq!(
        t.config.services[0].waypoint,
        Some(WaypointRef {
            namespace: "demo".into(),
            name: "wp".into(),
            hostname: None,
            hbone_port: 15008,
        })
    );
}

#[test]
fn object_labels_override_the_namespace() {
    let yaml = [
        WAYPOINT_NAMESPACES.to_string(),
        waypoint("demo", "wp", "198.19.2.90", "198.18.128.90", ""),
        waypoint("demo", "special", "198.19.2.91", "198.18.128.91", ""),
        waypoint("infra", "shared", "198.19.2.92", "198.18.128.92", ""),
        pod("demo", "api", "198.19.1.10", "app: api"),
        pod(
            "demo",
            "batch",
            "198.19.1.11",
            "app: batch, istio.io/use-waypoint: none",
        ),
        pod(
            "demo",
            "db",
            "198.19.1.12",
            "app: db, istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
        ),
        service(
            "demo",
            "api",
            "198.18.128.10",
            "istio.io/use-waypoint: special",
        ),
        service(
            "demo",
            "batch",
            "198.18.128.11",
            "istio.io/use-waypoint: none",
        ),
        service(
            "demo",
            "db",
            "198.18.128.12",
            "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
        ),
    ]
    .concat();
    let t = run(&yaml);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let (services, workloads) = waypoints_of(&t);
    assert_eq!(
        services,
        pairs(&[
            ("demo/api", "demo/special"),
            ("demo/batch", "-"),
            ("demo/db", "infra/shared"),
            ("demo/special", "-"),
            ("demo/wp", "-"),
            ("infra/shared", "-"),
        ])
    );
    assert_eq!(
        workloads,
        pairs(&[
            ("demo/api", "demo/wp"),
            ("demo/batch", "-"),
            ("demo/db", "infra/shared"),
            ("demo/special-0", "-"),
            ("demo/wp-0", "-"),
            ("infra/shared-0", "-"),
        ]),
        "a pod's own label beats the namespace's; its service's does not apply to it"
    );
}

#[test]
fn a_missing_or_foreign_waypoint_is_rejected_and_fails_closed() {
    let yaml = [
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: nope}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: demo}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
"#
        .to_string(),
        pod("demo", "api", "198.19.1.10", "app: api"),
        pod("demo", "web", "198.19.1.11", "app: web"),
        pod(
            "demo",
            "edge",
            "198.19.1.12",
            "app: edge, istio.io/use-waypoint: ingress",
        ),
        service("demo", "api", "198.18.128.10", ""),
        service(
            "demo",
            "bad",
            "198.18.128.11",
            "istio.io/use-waypoint: Bad_Name",
        ),
    ]
    .concat();
    let t = run(&yaml);
    let (services, workloads) = waypoints_of(&t);
    assert_eq!(
        services,
        pairs(&[("demo/api", "demo/nope"), ("demo/bad", "-")]),
        "the reference stays, so the data plane refuses rather than skips the waypoint"
    );
    assert_eq!(
        workloads,
        pairs(&[
            ("demo/api", "demo/nope"),
            ("demo/edge", "demo/ingress"),
            ("demo/web", "demo/nope"),
        ])
    );
    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    let count = |want: &str| reasons.iter().filter(|r| r.contains(want)).count();
    assert_eq!(
        count("Namespace demo (translation): istio.io/use-waypoint: Gateway demo/nope does not exist; the reference is kept"),
        1,
        "one reason for the whole namespace: {reasons:#?}"
    );
    assert_eq!(
        count("Pod demo/edge (translation): istio.io/use-waypoint: Gateway demo/ingress is of class \"istio\", not a waypoint"),
        1,
        "{reasons:#?}"
    );
    assert_eq!(
        count("Service demo/bad (translation): istio.io/use-waypoint: \"demo/Bad_Name\" is not a Gateway name"),
        1,
        "{reasons:#?}"
    );
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
}

#[test]
fn auto_waypoint_takes_only_services_with_l7_config() {
    let yaml = [
        WAYPOINT_NAMESPACES.to_string(),
        waypoint(
            "demo",
            "wp",
            "198.19.2.90",
            "198.18.128.90",
            ", annotations: {ambit.dev/waypoint-mode: auto}",
        ),
        pod("demo", "routed", "198.19.1.10", "app: routed"),
        pod("demo", "guarded", "198.19.1.11", "app: guarded"),
        pod("demo", "targeted", "198.19.1.12", "app: targeted"),
        pod("demo", "plain", "198.19.1.13", "app: plain"),
        pod("demo", "l4only", "198.19.1.14", "app: l4only"),
        service("demo", "routed", "198.18.128.10", ""),
        service("demo", "guarded", "198.18.128.11", ""),
        service("demo", "targeted", "198.18.128.12", ""),
        service("demo", "plain", "198.18.128.13", ""),
        service("demo", "l4only", "198.18.128.14", ""),
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: routed, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: routed, port: 80}]
  rules: [{backendRefs: [{name: routed, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: via-gateway-kind, namespace: demo}
spec:
  parentRefs: [{name: some-ingress}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: demo}
spec:
  selector: {matchLabels: {app: guarded}}
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: targeted, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: targeted}]
  action: ALLOW
  rules: [{from: [{source: {namespaces: ["demo"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ports, namespace: demo}
spec:
  selector: {matchLabels: {app: l4only}}
  action: ALLOW
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let (services, workloads) = waypoints_of(&t);
    assert_eq!(
        services,
        pairs(&[
            ("demo/guarded", "demo/wp"),
            ("demo/l4only", "-"),
            ("demo/plain", "-"),
            ("demo/routed", "demo/wp"),
            ("demo/targeted", "demo/wp"),
            ("demo/wp", "-"),
        ])
    );
    assert!(
        workloads.iter().all(|(_, wp)| wp == "-"),
        "an auto waypoint takes no workload traffic: {workloads:?}"
    );

    // A policy bound to the waypoint itself needs every service through it.
    let gateway_policy = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-waypoint, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;
    let t = run(&format!("{yaml}{gateway_policy}"));
    let (services, _) = waypoints_of(&t);
    assert!(
        services
            .iter()
            .all(|(s, wp)| wp == "demo/wp" || s == "demo/wp"),
        "{services:?}"
    );
}

#[test]
fn waypoint_for_narrows_what_a_waypoint_takes() {
    let yaml = [
        WAYPOINT_NAMESPACES.to_string(),
        waypoint(
            "demo",
            "wp",
            "198.19.2.90",
            "198.18.128.90",
            ", labels: {istio.io/waypoint-for: service}",
        ),
        pod("demo", "api", "198.19.1.10", "app: api"),
        service("demo", "api", "198.18.128.10", ""),
    ]
    .concat();
    let t = run(&yaml);
    let (services, workloads) = waypoints_of(&t);
    assert_eq!(services[0], ("demo/api".into(), "demo/wp".into()));
    assert_eq!(workloads[0], ("demo/api".into(), "-".into()));
}

#[test]
fn unusable_gateway_objects_are_rejected() {
    let yaml = [
        WAYPOINT_NAMESPACES.to_string(),
        pod("demo", "api", "198.19.1.10", "app: api"),
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: old, namespace: demo}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: demo}
spec: {parentRefs: "api"}
"#
        .to_string(),
    ]
    .concat();
    let t = run(&yaml);
    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    for want in [
        "Gateway demo/old (test.yaml, document 5): apiVersion \"networking.istio.io/v1\"",
        "HTTPRoute demo/broken (test.yaml, document 6): ",
        // The Gateway is a waypoint, but nothing serves it.
        "Gateway demo/wp (translation): waypoint has no Service demo/wp in the mesh",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(want)),
            "missing {want:?} in {reasons:#?}"
        );
    }
    assert_eq!(
        t.config.workloads[0].waypoint,
        Some(WaypointRef::new("demo", "wp")),
        "kept: the data plane refuses what needs an unreachable waypoint"
    );
}

// L7: HTTPRoute, targeted AuthorizationPolicy, TrafficPolicy.

/// Services reviews, reviews-v1, reviews-v2 (port 9080) in demo, the
/// waypoint `waypoint`, a Service in `other`, and a Gateway of another class.
fn l7_base() -> String {
    let svc = |ns: &str, name: &str, vip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{selector: {{app: {name}}}, clusterIP: {vip}, ports: [{{name: http, port: 9080}}]}}\n"
        )
    };
    [
        NAMESPACES.to_string(),
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n".to_string(),
        waypoint("demo", "waypoint", "198.19.2.30", "10.96.0.20", ""),
        svc("demo", "reviews", "10.96.0.10"),
        svc("demo", "reviews-v1", "10.96.0.11"),
        svc("demo", "reviews-v2", "10.96.0.12"),
        svc("other", "foreign", "10.96.0.13"),
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: demo}\n\
         spec: {gatewayClassName: other-class, listeners: [{name: http, port: 80, protocol: HTTP}]}\n"
            .to_string(),
    ]
    .concat()
}

fn route(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: {ns}, generation: 3, creationTimestamp: \"2026-01-02T03:04:05Z\"}}\n\
         spec:\n{spec}"
    )
}

/// Per parent of route `ns/name`: (parent name, Accepted, ResolvedRefs), each
/// condition as `Reason=True|False`.
fn conditions(t: &Translation, key: &str) -> Vec<(String, String, String)> {
    let s = t
        .route_status
        .iter()
        .find(|s| s.key() == key)
        .unwrap_or_else(|| panic!("no status for {key}"));
    assert_eq!(s.generation, Some(3), "observedGeneration source");
    let c = |c: &crate::translate::routes::RouteCondition| {
        format!("{}={}", c.reason, if c.status { "True" } else { "False" })
    };
    s.parents
        .iter()
        .map(|p| {
            (
                p.parent_ref.name.clone(),
                c(&p.accepted),
                c(&p.resolved_refs),
            )
        })
        .collect()
}

fn triple(a: &str, b: &str, c: &str) -> (String, String, String) {
    (a.into(), b.into(), c.into())
}

#[test]
fn http_routes_become_model_routes_with_status() {
    let yaml = [
        l7_base(),
        route(
            "demo",
            "split",
            "  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]\n  hostnames: [reviews]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs:\n    - {name: reviews-v1, port: 9080, weight: 90}\n    - {group: \"\", kind: Service, name: reviews-v2, port: 9080, weight: 10}\n    timeouts: {request: 2s}\n",
        ),
        route("demo", "to-waypoint", "  parentRefs: [{name: waypoint, sectionName: mesh}]\n  rules: [{backendRefs: [{name: reviews, port: 9080}]}]\n"),
        route("demo", "missing", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{backendRefs: [{name: nope, port: 9080, weight: 1}, {name: reviews, port: 9080, weight: 1}]}]\n"),
        route("demo", "wrong-port", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{backendRefs: [{name: reviews, port: 80}]}]\n"),
        route("demo", "cross-ns", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{backendRefs: [{name: foreign, namespace: other, port: 9080}]}]\n"),
        route("demo", "bad-kind", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{backendRefs: [{group: example.com, kind: Bucket, name: b}]}]\n"),
        route("demo", "sticky", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{sessionPersistence: {sessionName: s}, backendRefs: [{name: reviews, port: 9080}]}]\n"),
        route("demo", "cors", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{filters: [{type: CORS, cors: {allowOrigins: [\"*\"]}}], backendRefs: [{name: reviews, port: 9080}]}]\n"),
        route("demo", "bad-regex", "  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]\n"),
        route(
            "demo",
            "mixed",
            "  parentRefs:\n  - {group: \"\", kind: Service, name: ghost}\n  - {group: \"\", kind: Service, name: reviews, port: 1234}\n  - {group: \"\", kind: ConfigMap, name: cm}\n  - {name: edge}\n  - {name: nowhere}\n  - {name: waypoint, port: 80}\n  - {group: \"\", kind: Service, name: reviews, sectionName: http}\n  rules: [{backendRefs: [{name: reviews, port: 9080}]}]\n",
        ),
        route("other", "consumer", "  parentRefs: [{name: waypoint, namespace: demo}, {group: \"\", kind: Service, name: reviews, namespace: demo}]\n  rules: [{backendRefs: [{name: foreign, port: 9080}]}]\n"),
    ]
    .concat();
    let t = run(&yaml);
    let by_name = |n: &str| t.config.http_routes.iter().find(|r| r.name == n);

    let split = by_name("split").expect("split applied");
    assert_eq!(
        split.creation_timestamp.as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
    assert_eq!(split.hostnames, ["reviews"]);
    assert_eq!(
        (
            split.parents[0].kind,
            split.parents[0].namespace.as_str(),
            split.parents[0].name.as_str(),
            split.parents[0].port
        ),
        (ParentKind::Service, "demo", "reviews", Some(9080))
    );
    let weights: Vec<_> = split.rules[0]
        .backend_refs
        .iter()
        .map(|b| (b.name.as_str(), b.port, b.weight))
        .collect();
    assert_eq!(
        weights,
        [("reviews-v1", 9080, 90), ("reviews-v2", 9080, 10)]
    );
    assert_eq!(
        conditions(&t, "demo/split"),
        [triple("reviews", "Accepted=True", "ResolvedRefs=True")]
    );

    let wp = by_name("to-waypoint").expect("applied");
    assert_eq!(
        (
            wp.parents[0].kind,
            wp.parents[0].name.as_str(),
            wp.parents[0].port
        ),
        (ParentKind::Gateway, "waypoint", None)
    );

    // Unresolvable backends stay, with their weight: their share gets 500.
    let missing = by_name("missing").expect("still applied");
    assert_eq!(missing.rules[0].backend_refs[0].name, "nope");
    assert_eq!(
        conditions(&t, "demo/missing"),
        [triple("reviews", "Accepted=True", "BackendNotFound=False")]
    );
    assert_eq!(
        conditions(&t, "demo/wrong-port"),
        [triple("reviews", "Accepted=True", "BackendNotFound=False")]
    );
    // References that must not be followed resolve to nothing.
    let cross = &by_name("cross-ns").expect("applied").rules[0].backend_refs[0];
    assert_eq!(
        (cross.name.as_str(), cross.namespace.as_deref()),
        ("RefNotPermitted.foreign", Some("other"))
    );
    assert_eq!(
        conditions(&t, "demo/cross-ns"),
        [triple("reviews", "Accepted=True", "RefNotPermitted=False")]
    );
    let kind = &by_name("bad-kind").expect("applied").rules[0].backend_refs[0];
    assert_eq!((kind.name.as_str(), kind.port), ("InvalidKind.b", 1));
    assert_eq!(
        conditions(&t, "demo/bad-kind"),
        [triple("reviews", "Accepted=True", "InvalidKind=False")]
    );

    // Whole routes refused, never half-applied.
    for name in ["sticky", "cors", "bad-regex"] {
        assert!(by_name(name).is_none(), "{name} must not be applied");
        assert_eq!(
            conditions(&t, &format!("demo/{name}"))[0].1,
            "UnsupportedValue=False",
            "{name}"
        );
    }
    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    for want in [
        "HTTPRoute demo/sticky (translation): rules[0]: unknown field `sessionPersistence`",
        "HTTPRoute demo/cors (translation): rules[0]: filter type \"CORS\" is not supported by Ambit; the route is not applied",
        "HTTPRoute demo/bad-regex (translation): rules[0]: regular expression \"(\"",
    ] {
        assert!(reasons.iter().any(|r| r.starts_with(want)), "missing {want:?} in {reasons:#?}");
    }
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("HTTPRoute"))
            .count(),
        3,
        "{reasons:#?}"
    );

    // Each parent on its own; another class's Gateway gets no entry from us.
    assert_eq!(
        conditions(&t, "demo/mixed"),
        [
            triple("ghost", "NoMatchingParent=False", "ResolvedRefs=True"),
            triple("reviews", "NoMatchingParent=False", "ResolvedRefs=True"),
            triple("cm", "UnsupportedValue=False", "ResolvedRefs=True"),
            triple("nowhere", "NoMatchingParent=False", "ResolvedRefs=True"),
            triple("waypoint", "NoMatchingParent=False", "ResolvedRefs=True"),
            triple("reviews", "Accepted=True", "ResolvedRefs=True"),
        ]
    );
    let mixed = by_name("mixed").expect("applied to its good parent");
    assert_eq!(mixed.parents.len(), 1);
    assert_eq!(
        mixed.parents[0].port,
        Some(9080),
        "sectionName names the port"
    );

    // The waypoint's listener takes routes of its own namespace only, and a
    // Service of another namespace (a GAMMA consumer route) is refused: the
    // route binds nothing.
    assert_eq!(
        conditions(&t, "other/consumer"),
        [
            triple(
                "waypoint",
                "NotAllowedByListeners=False",
                "ResolvedRefs=True"
            ),
            triple("reviews", "UnsupportedValue=False", "ResolvedRefs=True"),
        ]
    );
    assert!(by_name("consumer").is_none());
}

#[test]
fn targeted_authorization_policies_become_http_policies() {
    let policy = |name: &str, spec: &str| {
        format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n{spec}")
    };
    let yaml = [
        l7_base(),
        pod("demo", "web", "198.19.1.30", "app: web"),
        policy(
            "full",
            r#"  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
        notPrincipals: ["*/sa/bad"]
        serviceAccounts: ["demo/robot"]
        namespaces: [demo]
        notNamespaces: [legacy]
        ipBlocks: ["198.19.0.0/16"]
        remoteIpBlocks: ["203.0.113.0/24"]
        notIpBlocks: ["198.19.9.0/24"]
    to:
    - operation:
        methods: [GET, HEAD]
        notMethods: [DELETE]
        paths: ["/api/*"]
        notPaths: ["/api/admin"]
        hosts: ["reviews.demo.svc.cluster.local"]
        notHosts: ["*.internal"]
        ports: ["9080"]
        notPorts: ["9090"]
    when:
    - {key: "request.headers[x-user]", values: [alice]}
    - {key: source.namespace, notValues: [legacy]}
"#,
        ),
        policy("on-service", "  targetRef: {kind: Service, group: \"\", name: reviews}\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n"),
        policy("audit", "  targetRefs: [{kind: Service, name: reviews}]\n  action: AUDIT\n  rules: [{}]\n"),
        policy("custom", "  targetRefs: [{kind: Service, name: reviews}]\n  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]\n"),
        policy("jwt", "  targetRefs: [{kind: Service, name: reviews}]\n  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n"),
        policy("claims", "  targetRefs: [{kind: Service, name: reviews}]\n  action: DENY\n  rules: [{when: [{key: \"request.auth.claims[iss]\", values: [x]}]}]\n"),
        policy("both", "  selector: {matchLabels: {app: web}}\n  targetRefs: [{kind: Service, name: reviews}]\n  rules: [{}]\n"),
        policy("entry-only", "  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: ext}]\n  rules: [{}]\n"),
        policy("route-and-service", "  targetRefs: [{kind: HTTPRoute, group: gateway.networking.k8s.io, name: r}, {kind: Service, name: reviews}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [/x]}}]}]\n"),
        policy("unreadable", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  rules: [{to: [{operation: {futurePaths: [/x]}}]}]\n"),
        policy("l4", "  selector: {matchLabels: {app: web}}\n  rules: [{from: [{source: {namespaces: [demo]}}]}]\n"),
    ]
    .concat();
    let t = run(&yaml);
    let http = |n: &str| t.config.http_policies.iter().find(|p| p.name == n);
    let targets = |n: &str| {
        http(n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .targets
            .iter()
            .map(|t| (t.kind, t.name.clone()))
            .collect::<Vec<_>>()
    };

    let full = http("full").expect("full translated");
    assert_eq!(full.action, HttpPolicyAction::Allow);
    assert_eq!(
        targets("full"),
        [(TargetKind::Gateway, "waypoint".to_string())]
    );
    let from = &full.rules[0].from[0];
    assert_eq!(
        from.principals,
        ["cluster.local/ns/demo/sa/client", "*/ns/demo/sa/robot"]
    );
    assert_eq!(from.not_principals, ["*/sa/bad"]);
    assert_eq!(
        (from.namespaces.clone(), from.not_namespaces.clone()),
        (vec!["demo".to_string()], vec!["legacy".to_string()])
    );
    let blocks: Vec<String> = from.ip_blocks.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        blocks,
        ["198.19.0.0/16", "203.0.113.0/24"],
        "remoteIpBlocks join ipBlocks"
    );
    assert_eq!(from.not_ip_blocks.len(), 1);
    let to = &full.rules[0].to[0];
    assert_eq!(
        (to.methods.clone(), to.not_methods.clone()),
        (
            vec!["GET".to_string(), "HEAD".into()],
            vec!["DELETE".to_string()]
        )
    );
    assert_eq!(
        (to.paths.clone(), to.not_paths.clone()),
        (vec!["/api/*".to_string()], vec!["/api/admin".to_string()])
    );
    assert_eq!(
        (to.hosts.clone(), to.not_hosts.clone()),
        (
            vec!["reviews.demo.svc.cluster.local".to_string()],
            vec!["*.internal".to_string()]
        )
    );
    assert_eq!(
        (to.ports.clone(), to.not_ports.clone()),
        (vec![9080], vec![9090])
    );
    let when = &full.rules[0].when;
    assert_eq!(
        (when[0].key.as_str(), when[0].values.clone()),
        ("request.headers[x-user]", vec!["alice".to_string()])
    );
    assert_eq!(
        (when[1].key.as_str(), when[1].not_values.clone()),
        ("source.namespace", vec!["legacy".to_string()])
    );

    assert_eq!(
        targets("on-service"),
        [(TargetKind::Service, "reviews".to_string())]
    );
    assert_eq!(
        http("on-service").map(|p| p.action),
        Some(HttpPolicyAction::Deny)
    );
    assert_eq!(
        http("audit").map(|p| p.action),
        Some(HttpPolicyAction::Audit)
    );

    // Fail closed on the targets that can be read.
    let stand_in = |n: &str| {
        let p = http(n).unwrap_or_else(|| panic!("{n}: no stand-in"));
        (
            p.action,
            p.rules.len(),
            p.rules
                .iter()
                .all(|r| r.from.is_empty() && r.to.is_empty() && r.when.is_empty()),
        )
    };
    assert_eq!(
        stand_in("custom"),
        (HttpPolicyAction::Deny, 1, true),
        "CUSTOM denies everything"
    );
    assert_eq!(
        stand_in("jwt"),
        (HttpPolicyAction::Allow, 0, true),
        "an ALLOW allows nothing"
    );
    assert_eq!(stand_in("claims"), (HttpPolicyAction::Deny, 1, true));
    assert_eq!(
        stand_in("route-and-service"),
        (HttpPolicyAction::Deny, 1, true)
    );
    assert_eq!(
        targets("route-and-service"),
        [(TargetKind::Service, "reviews".to_string())]
    );
    assert_eq!(stand_in("unreadable"), (HttpPolicyAction::Allow, 0, true));
    assert_eq!(
        targets("unreadable"),
        [(TargetKind::Gateway, "waypoint".to_string())]
    );
    assert!(http("entry-only").is_none() && http("both").is_none());

    // Selector and targetRefs: the L4 stand-in on the selected workloads.
    let l4 = |n: &str| t.config.policies.iter().find(|p| p.name == n);
    let both = l4("both").expect("L4 stand-in");
    assert_eq!(
        (both.scope, both.rules.len()),
        (PolicyScope::WorkloadSelector, 0)
    );
    assert!(
        l4("l4").is_some(),
        "selector policies keep their L4 translation"
    );
    assert!(
        l4("full").is_none() && l4("unreadable").is_none(),
        "targeted policies are not ztunnel's"
    );

    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    for want in [
        "AuthorizationPolicy demo/custom (translation): action CUSTOM (external authorization) is not supported by Ambit; enforced as deny-all",
        "AuthorizationPolicy demo/jwt (translation): rules[0]: requestPrincipals (JWT) is not supported by Ambit; enforced as deny-all",
        "AuthorizationPolicy demo/claims (translation): rules[0]: condition key \"request.auth.claims[iss]\" is not supported by Ambit; enforced as deny-all",
        "AuthorizationPolicy demo/both (translation): both selector and targetRefs are set; enforced as deny-all",
        "AuthorizationPolicy demo/entry-only (translation): targetRef kind \"ServiceEntry\" of group \"networking.istio.io\" is not supported",
        "AuthorizationPolicy demo/route-and-service (translation): targetRef kind \"HTTPRoute\"",
        "AuthorizationPolicy demo/unreadable (translation): ",
    ] {
        assert!(reasons.iter().any(|r| r.starts_with(want)), "missing {want:?} in {reasons:#?}");
    }
    assert!(reasons
        .iter()
        .any(|r| r.starts_with("AuthorizationPolicy demo/entry-only")
            && r.ends_with("not enforced (no target Ambit supports)")));
    assert_eq!(reasons.len(), 7, "{reasons:#?}");
}

#[test]
fn the_waypoint_gateway_class_targets_every_waypoint_only_from_the_root_namespace() {
    let policy = |ns: &str, name: &str| {
        format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  targetRefs: [{{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{methods: [TRACE]}}}}]}}]\n")
    };
    let yaml = [
        l7_base(),
        policy("istio-system", "mesh-wide"),
        policy("demo", "not-root"),
    ]
    .concat();
    let t = run(&yaml);
    let mesh_wide = t
        .config
        .http_policies
        .iter()
        .find(|p| p.name == "mesh-wide")
        .expect("translated");
    assert_eq!(mesh_wide.targets[0].kind, TargetKind::GatewayClass);
    assert_eq!(mesh_wide.action, HttpPolicyAction::Deny);
    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("AuthorizationPolicy demo/not-root")
            && r.contains("GatewayClass target must be \"istio-waypoint\" on a policy in the root namespace")),
        "{reasons:#?}"
    );
}

#[test]
fn traffic_policies_are_read_and_checked() {
    let tp = |name: &str, spec: &str| {
        format!("---\napiVersion: ambit.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n{spec}")
    };
    let yaml = [
        l7_base(),
        tp("svc", "  targetRef: {kind: Service, name: reviews}\n  connectionPool: {maxRequests: 100, maxPendingRequests: 10}\n  outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}\n"),
        tp("per-route", "  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: split}\n  rateLimit: {maxTokens: 10, tokensPerFill: 5, fillInterval: 1s}\n"),
        tp("gateway", "  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}\n"),
        tp("zero", "  targetRef: {kind: Service, name: reviews}\n  outlierDetection: {consecutive5xx: 0, baseEjectionTime: 1s}\n"),
        tp("typo", "  targetRef: {kind: Service, name: reviews}\n  retries: {attempts: 3}\n"),
        "---\napiVersion: example.com/v1\nkind: TrafficPolicy\nmetadata: {name: foreign, namespace: demo}\nspec: {}\n".to_string(),
    ]
    .concat();
    let t = run(&yaml);
    let names: Vec<_> = t
        .config
        .traffic_policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["per-route", "svc"]);
    let svc = &t.config.traffic_policies[1];
    assert_eq!(
        (svc.target.kind, svc.target.name.as_str()),
        (TargetKind::Service, "reviews")
    );
    assert_eq!(svc.connection_pool.and_then(|c| c.max_requests), Some(100));
    assert_eq!(svc.outlier_detection.map(|o| o.consecutive_5xx), Some(5));
    let route = &t.config.traffic_policies[0];
    assert_eq!(
        (route.target.kind, route.rate_limit.map(|r| r.max_tokens)),
        (TargetKind::HttpRoute, Some(10))
    );
    assert!(
        t.notes.iter().any(|n| n
            .contains("TrafficPolicy demo/per-route: target HTTPRoute demo/split does not exist")),
        "{:?}",
        t.notes
    );
    let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
    for want in [
        "TrafficPolicy demo/gateway (translation): targetRef kind \"Gateway\"",
        "TrafficPolicy demo/zero (translation): outlierDetection.consecutive5xx must be at least 1; not applied",
        "TrafficPolicy demo/typo (test.yaml, document",
        "TrafficPolicy demo/foreign (test.yaml, document",
    ] {
        assert!(reasons.iter().any(|r| r.starts_with(want)), "missing {want:?} in {reasons:#?}");
    }
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown field `retries`")),
        "{reasons:#?}"
    );
}
