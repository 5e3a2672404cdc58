//! The Kubernetes source against the in-process fake API server, end to end
//! to a delta ADS client, and against the manifests source on one table.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mesh_core::grpc::ControlPlane;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use mesh_core::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use mesh_core::proto::ADDRESS_TYPE;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Streaming;

use super::{follow_kubernetes, KubernetesConfig, KubernetesMetrics};
use crate::pipeline::{self, MeshOptions, Outputs, PipelineMetrics};
use crate::sources::{manifests, ClusterState};
use crate::xds::{XdsMetrics, XdsServer};
use kube_fake::FakeApiServer;

fn options() -> MeshOptions {
    MeshOptions::new("cluster.local", "istio-system")
}

struct Harness {
    outputs: Arc<Outputs>,
    registry: Arc<Mutex<Registry>>,
}

impl Harness {
    /// Starts `follow_kubernetes` against `fake` and waits for its first publish.
    async fn follow(fake: FakeApiServer, watch_timeout_secs: Option<u32>) -> Harness {
        let outputs = Arc::new(Outputs::default());
        let mut registry = Registry::with_prefix("istiod");
        let pipeline_metrics = PipelineMetrics::register(&mut registry);
        let (synced, is_synced) = oneshot::channel();
        let config = KubernetesConfig {
            watch_timeout_secs,
            metrics: KubernetesMetrics::register(&mut registry),
            synced: Some(synced),
            ..Default::default()
        };
        tokio::spawn(follow_kubernetes(
            fake.client(),
            options(),
            outputs.clone(),
            pipeline_metrics,
            config,
        ));
        tokio::time::timeout(Duration::from_secs(10), is_synced)
            .await
            .expect("first publish within 10 s")
            .unwrap();
        Harness {
            outputs,
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    fn scrape(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }

    async fn xds(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = XdsServer::new(
            self.outputs.snapshots.subscribe(),
            None,
            XdsMetrics::register(&mut self.registry.lock().unwrap()),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(server))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    fn rejected(&self) -> Vec<String> {
        self.outputs
            .rejected
            .borrow()
            .iter()
            .map(|r| r.object.clone())
            .collect()
    }
}

/// A delta ADS client that applies what it receives and ACKs it.
struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    held: BTreeSet<String>,
    /// Every name ever sent in `removed_resources`.
    removals: Vec<String>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        let channel = ControlPlane::plaintext(format!("http://{addr}"))
            .channel()
            .unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "test~n1".into(),
                ..Default::default()
            }),
            type_url: ADDRESS_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Client {
            tx,
            rx,
            held: BTreeSet::new(),
            removals: Vec::new(),
        }
    }

    fn pods(&self) -> Vec<String> {
        self.held
            .iter()
            .filter_map(|n| n.strip_prefix("Kubernetes//Pod/"))
            .map(str::to_string)
            .collect()
    }

    /// Applies responses until the held pods are `want` (10 s at most).
    async fn until_pods(&mut self, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.pods() != want {
            let r = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("pods {want:?} never arrived; held {:?}", self.pods()))
                .unwrap()
                .unwrap();
            for res in &r.resources {
                self.held.insert(res.name.clone());
            }
            for name in &r.removed_resources {
                self.held.remove(name);
                self.removals.push(name.clone());
            }
            self.tx
                .send(DeltaDiscoveryRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
}

fn namespace(name: &str, ambient: bool) -> serde_json::Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": "node1", "serviceAccountName": "default",
                 "containers": [{"name": "app"}]},
        "status": {"podIP": ip},
    })
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fake_api_server_lists_watches_and_expires_history() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};

    let fake = FakeApiServer::start_with(Duration::from_millis(100)).await;
    fake.apply(pod("demo", "a", "198.19.1.2"));
    let pods: Api<Pod> = Api::all(fake.client());
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.unwrap();

    let mut events = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    fake.apply(pod("demo", "b", "198.19.1.3"));
    fake.apply(pod("demo", "b", "198.19.1.4"));
    assert!(fake.delete("Pod", "demo", "a"));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match events.next().await.unwrap().unwrap() {
            WatchEvent::Added(p) => seen.push(format!("added {}", p.metadata.name.unwrap())),
            WatchEvent::Modified(p) => seen.push(format!("modified {}", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(format!("deleted {}", p.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen, ["added b", "modified b", "deleted a"]);
    // Bookmarks carry the current version once everything is delivered.
    loop {
        if let WatchEvent::Bookmark(b) = events.next().await.unwrap().unwrap() {
            assert!(b.metadata.resource_version.parse::<u64>().unwrap() > rv.parse().unwrap());
            break;
        }
    }

    fake.compact();
    let mut stale = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stale.next().await.unwrap().unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(
        stale.next().await.is_none(),
        "the stream ends after the error"
    );
    assert_eq!(fake.requests("expired /api/v1/pods"), 1);

    // The fake refuses what it does not implement, loudly.
    let selected = pods.list(&ListParams::default().labels("app in (a)")).await;
    assert!(selected.is_err());
    let selected = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await;
    assert!(selected.is_err());
}

#[tokio::test]
async fn the_fake_api_server_drives_xds_clients() {
    let fake = FakeApiServer::start_with(Duration::from_millis(200)).await;
    fake.apply(namespace("demo", false));
    fake.apply(namespace("legacy", false));
    fake.apply(pod("demo", "a", "198.19.1.2"));
    fake.apply(pod("demo", "b", "198.19.1.3"));
    fake.apply(pod("legacy", "c", "198.19.1.4"));
    let h = Harness::follow(fake.clone(), Some(30)).await;
    let mut c = Client::connect(h.xds().await).await;
    c.until_pods(&[]).await;

    // Labelling the namespace enrols its pods; only its pods.
    fake.apply(namespace("demo", true));
    c.until_pods(&["demo/a", "demo/b"]).await;

    // A pod deletion is a removal.
    fake.delete("Pod", "demo", "a");
    c.until_pods(&["demo/b"]).await;
    assert_eq!(c.removals, ["Kubernetes//Pod/demo/a"]);

    // Removing the label removes the namespace's pods; adding it back returns them.
    fake.apply(namespace("demo", false));
    c.until_pods(&[]).await;
    assert!(c.removals.contains(&"Kubernetes//Pod/demo/b".to_string()));
    fake.apply(namespace("demo", true));
    c.until_pods(&["demo/b"]).await;

    // A malformed policy is rejected on its own; everything else flows.
    fake.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "demo"},
        "spec": {"action": "ALLOW", "rules": [{"from": "not a list"}]},
    }));
    fake.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "good", "namespace": "demo"},
        "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]},
    }));
    fake.apply(pod("demo", "d", "198.19.1.5"));
    c.until_pods(&["demo/b", "demo/d"]).await;
    wait_for("the bad policy to be rejected", || {
        h.rejected() == ["AuthorizationPolicy demo/bad"]
    })
    .await;
    let mesh = h.outputs.mesh.borrow().clone();
    let policies: Vec<_> = mesh.policies.iter().map(|p| p.name.clone()).collect();
    assert!(policies.contains(&"good".to_string()), "{policies:?}");

    // Changes the watches never deliver, then history compacted: only a
    // re-list (after 410 Gone) can bring the state back in line.
    let lists_before = fake.requests("list /api/v1/pods");
    fake.pause_watches();
    fake.delete("Pod", "demo", "b");
    fake.apply(pod("demo", "e", "198.19.1.6"));
    fake.compact();
    c.until_pods(&["demo/d", "demo/e"]).await;
    assert!(fake.requests("expired /api/v1/pods") >= 1);
    assert!(fake.requests("list /api/v1/pods") > lists_before);
    assert!(
        h.scrape()
            .contains("istiod_kubernetes_watch_errors_total{kind=\"Pod\"}"),
        "{}",
        h.scrape()
    );

    // And it keeps following after the re-list.
    fake.apply(pod("demo", "f", "198.19.1.7"));
    c.until_pods(&["demo/d", "demo/e", "demo/f"]).await;
}

#[tokio::test]
async fn watches_that_time_out_resume_without_a_relist() {
    let fake = FakeApiServer::start_with(Duration::from_millis(200)).await;
    fake.apply(namespace("demo", true));
    let h = Harness::follow(fake.clone(), Some(1)).await;
    let lists = fake.requests("list /api/v1/pods");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(fake.requests("watch /api/v1/pods") >= 3, "resumed watches");
    fake.apply(pod("demo", "a", "198.19.1.2"));
    wait_for("the pod to be published", || {
        h.outputs.mesh.borrow().workloads.len() == 1
    })
    .await;
    assert_eq!(fake.requests("list /api/v1/pods"), lists, "no re-list");
    assert_eq!(fake.requests("expired /api/v1/pods"), 0);
}

#[tokio::test]
async fn a_burst_of_changes_is_published_in_few_snapshots() {
    let fake = FakeApiServer::start().await;
    fake.apply(namespace("demo", true));
    let h = Harness::follow(fake.clone(), None).await;
    let before = h.outputs.snapshots.borrow().version;
    for i in 0..50 {
        fake.apply(pod(
            "demo",
            &format!("p{i}"),
            &format!("198.19.3.{}", i + 1),
        ));
    }
    wait_for("all 50 pods", || {
        h.outputs.mesh.borrow().workloads.len() == 50
    })
    .await;
    let published = h.outputs.snapshots.borrow().version - before;
    assert!(
        (1..=3).contains(&published),
        "{published} snapshots for one burst"
    );
}

/// One table, both sources: the same objects must give the same mesh.
const TABLE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: node2, serviceAccountName: waypoint, containers: [{name: proxy}]}
status: {podIP: "198.19.2.30"}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: demo, labels: {app: reviews}}
spec: {nodeName: node1, serviceAccountName: reviews, containers: [{name: app, ports: [{name: http, containerPort: 9080}]}]}
status: {podIP: "198.19.1.10"}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: demo, labels: {app: reviews}, annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "9090"}}
spec: {nodeName: node2, serviceAccountName: reviews, containers: [{name: app, ports: [{name: http, containerPort: 9080}]}]}
status: {podIP: "198.19.2.10"}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: demo, labels: {app: reviews, istio.io/dataplane-mode: none}}
spec: {nodeName: node1, serviceAccountName: other, containers: [{name: app}]}
status: {podIP: "198.19.1.11"}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: legacy, labels: {app: plain}}
spec: {nodeName: node1, containers: [{name: app}]}
status: {podIP: "198.19.1.12"}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: legacy, labels: {app: plain, istio.io/dataplane-mode: ambient}}
spec: {nodeName: node2, serviceAccountName: plain, containers: [{name: app}]}
status: {podIP: "198.19.2.12"}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewers, namespace: demo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/productpage"]}}]
    to: [{operation: {ports: ["9080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: malformed, namespace: demo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules: [{from: [{source: {principals: "not a list"}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive, namespace: legacy}
spec:
  selector: {matchLabels: {app: plain}}
  mtls: {mode: PERMISSIVE}
"#;

/// What must agree: the model, every served resource's version, and what
/// was rejected (by object and reason).
/// (model as YAML, (type, name, version) served, (object, reason) rejected).
type EndState = (String, Vec<(String, String, String)>, Vec<(String, String)>);

fn end_state(outputs: &Outputs) -> EndState {
    let mesh = serde_yaml::to_string(&**outputs.mesh.borrow()).unwrap();
    let snapshot = outputs.snapshots.borrow().clone();
    let mut served: Vec<_> = snapshot
        .resources
        .iter()
        .flat_map(|(t, m)| {
            m.iter()
                .map(move |(n, e)| (t.to_string(), n.clone(), e.version.clone()))
        })
        .collect();
    served.sort();
    let mut rejected: Vec<_> = outputs
        .rejected
        .borrow()
        .iter()
        .map(|r| (r.object.clone(), r.reason.clone()))
        .collect();
    rejected.sort();
    (mesh, served, rejected)
}

#[tokio::test]
async fn manifests_and_the_api_server_agree_on_one_table() {
    let from_manifests = Outputs::default();
    let mut state = ClusterState::default();
    let mut rejected = Vec::new();
    manifests::load_str("table.yaml", TABLE, &mut state, &mut rejected);
    assert!(rejected.is_empty(), "{rejected:?}");
    pipeline::publish(
        &state,
        rejected,
        &options(),
        &from_manifests,
        &PipelineMetrics::default(),
    )
    .unwrap();

    let fake = FakeApiServer::start().await;
    fake.apply_yaml(TABLE);
    let h = Harness::follow(fake, None).await;

    let (mesh, served, rejected) = end_state(&h.outputs);
    assert_eq!(
        (mesh.clone(), served.clone(), rejected.clone()),
        end_state(&from_manifests)
    );
    // The table means something: not two empty meshes agreeing.
    let m = h.outputs.mesh.borrow().clone();
    let workloads: Vec<_> = m
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    assert_eq!(
        workloads,
        [
            "demo/reviews-v1",
            "demo/reviews-v2",
            "demo/waypoint-0",
            "legacy/opted-in"
        ]
    );
    assert_eq!(m.services.len(), 2);
    // Gateway API objects flow from the API server too: the namespace's
    // waypoint is assigned to its service and workloads.
    let reviews = m.services.iter().find(|s| s.name == "reviews").unwrap();
    assert_eq!(
        reviews.waypoint.as_ref().map(|w| w.name.as_str()),
        Some("waypoint")
    );
    assert!(served.len() > 4, "{served:?}");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "AuthorizationPolicy demo/malformed");
}

#[tokio::test]
async fn a_cluster_without_istio_or_gateway_api_crds_is_still_followed() {
    let fake = FakeApiServer::start().await;
    for kind in [
        "Gateway",
        "HTTPRoute",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "TrafficPolicy",
    ] {
        fake.uninstall(kind);
    }
    fake.apply_yaml(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo}
spec: {nodeName: node1, containers: [{name: app}]}
status: {podIP: "198.19.1.10"}
"#,
    );
    // Harness::follow waits for the first publish: it must come although
    // five kinds can never be listed.
    let h = Harness::follow(fake, None).await;
    assert_eq!(h.outputs.mesh.borrow().workloads.len(), 1);
}

/// Our entries of `status.parents`: (parent name, [(type, status, reason,
/// observedGeneration)]).
type Entries = Vec<(String, Vec<(String, String, String, i64)>)>;

fn our_entries(route: &serde_json::Value) -> Entries {
    route["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["controllerName"] == crate::translate::routes::CONTROLLER_NAME)
        .map(|e| {
            let conditions = e["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    (
                        c["type"].as_str().unwrap_or_default().to_string(),
                        c["status"].as_str().unwrap_or_default().to_string(),
                        c["reason"].as_str().unwrap_or_default().to_string(),
                        c["observedGeneration"].as_i64().unwrap_or(-1),
                    )
                })
                .collect();
            (
                e["parentRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                conditions,
            )
        })
        .collect()
}

fn cond(t: &str, s: &str, r: &str, g: i64) -> (String, String, String, i64) {
    (t.into(), s.into(), r.into(), g)
}

#[tokio::test]
async fn route_status_is_written_back_without_fighting() {
    let fake = FakeApiServer::start_with(Duration::from_millis(200)).await;
    fake.apply_yaml(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: ambit.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: limits, namespace: demo}
spec: {targetRef: {kind: Service, name: reviews}, connectionPool: {maxRequests: 10}}
"#,
    );
    let other_controller = json!({
        "parentRef": {"name": "edge"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "theirs", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    let route = |backend: &str| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "demo"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "reviews"},
                               {"group": "", "kind": "Service", "name": "ghost"}],
                "rules": [{"backendRefs": [{"name": backend, "port": 9080}]}],
            },
        })
    };
    let mut first = route("reviews");
    first["status"] = json!({"parents": [other_controller.clone()]});
    fake.apply(first);
    let h = Harness::follow(fake.clone(), None).await;
    let patches = "patch status /apis/gateway.networking.k8s.io/v1/httproutes";

    wait_for("our status entries", || {
        fake.get("HTTPRoute", "demo", "r")
            .is_some_and(|r| our_entries(&r).len() == 2)
    })
    .await;
    let r = fake.get("HTTPRoute", "demo", "r").unwrap();
    assert_eq!(
        our_entries(&r),
        [
            (
                "reviews".to_string(),
                vec![
                    cond("Accepted", "True", "Accepted", 1),
                    cond("ResolvedRefs", "True", "ResolvedRefs", 1)
                ]
            ),
            (
                "ghost".to_string(),
                vec![
                    cond("Accepted", "False", "NoMatchingParent", 1),
                    cond("ResolvedRefs", "True", "ResolvedRefs", 1)
                ]
            ),
        ]
    );
    assert_eq!(
        r["status"]["parents"][0], other_controller,
        "another controller's entry is kept as it was"
    );
    let m = h.outputs.mesh.borrow().clone();
    assert_eq!(m.http_routes.len(), 1);
    assert_eq!(
        m.traffic_policies[0].name, "limits",
        "TrafficPolicy flows from the API server"
    );

    // Our own write is a change like any other; it must not cause another.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fake.requests(patches), 1, "written once");

    // A new generation: the conditions follow it.
    let accepted_since = r["status"]["parents"][1]["conditions"][0]["lastTransitionTime"].clone();
    fake.apply(route("nope"));
    wait_for("status of generation 2", || {
        fake.get("HTTPRoute", "demo", "r").is_some_and(|r| {
            our_entries(&r)
                .first()
                .is_some_and(|(_, c)| c[1] == cond("ResolvedRefs", "False", "BackendNotFound", 2))
        })
    })
    .await;
    let r = fake.get("HTTPRoute", "demo", "r").unwrap();
    assert_eq!(r["status"]["parents"][0], other_controller);
    assert_eq!(
        r["status"]["parents"][1]["conditions"][0]["lastTransitionTime"], accepted_since,
        "Accepted did not change, so neither does its transition time"
    );
    assert_eq!(h.outputs.route_status.borrow()[0].generation, Some(2));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fake.requests(patches), 2);
}

#[tokio::test]
async fn the_fake_api_server_patches_status_with_optimistic_concurrency() {
    let fake = FakeApiServer::start().await;
    fake.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "demo"},
        "spec": {"parentRefs": []},
    }));
    let rv = fake.get("HTTPRoute", "demo", "r").unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let api = kube::Api::<kube::api::DynamicObject>::namespaced_with(
        fake.client(),
        "demo",
        &kube::api::ApiResource {
            group: "gateway.networking.k8s.io".into(),
            version: "v1".into(),
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "HTTPRoute".into(),
            plural: "httproutes".into(),
        },
    );
    let patch = |rv: &str| {
        json!({"metadata": {"resourceVersion": rv}, "status": {"parents": [{"controllerName": "x"}]},
               "spec": {"hostnames": ["ignored"]}})
    };
    let pp = kube::api::PatchParams::default();
    api.patch_status("r", &pp, &kube::api::Patch::Merge(&patch(&rv)))
        .await
        .unwrap();
    let r = fake.get("HTTPRoute", "demo", "r").unwrap();
    assert_eq!(r["status"]["parents"][0]["controllerName"], "x");
    assert!(r["spec"].get("hostnames").is_none(), "only status changes");
    assert_eq!(r["metadata"]["generation"], 1);
    // The same, stale, version now conflicts.
    match api
        .patch_status("r", &pp, &kube::api::Patch::Merge(&patch(&rv)))
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409),
        other => panic!("expected 409, got {other:?}"),
    }
    assert!(api
        .patch_status("nope", &pp, &kube::api::Patch::Merge(&patch(&rv)))
        .await
        .is_err());
}
