//! Translation tests: manifests in, the mesh model out (table style).

use crate::sources::manifests::load_str;
use crate::sources::ClusterState;
use crate::translate::{translate, MeshOptions, Translation};
use mesh_core::config::{parse_mesh_config, MtlsMode, PolicyAction, PolicyScope};

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
        ["client", "reviews-v1", "reviews-v2"],
        "legacy/outsider is not in the mesh"
    );
    assert_eq!(t.config.services[0].ports[0].target(), 9080);
    assert_eq!(t.config.peer_authentications[0].mode, MtlsMode::Strict);
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
