//! Delta ADS protocol tests with a hand-written client on a real gRPC stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::config::parse_mesh_config;
use mesh_core::grpc::ControlPlane;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use mesh_core::proto::envoy::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as XdsStatus,
};
use mesh_core::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, HTTP_AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, TRAFFIC_POLICY_TYPE,
};
use mesh_core::xds::client::{Handler, ResourceSet};
use mesh_core::xds::{MeshHandler, WAYPOINT_TYPES};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Streaming;

use super::{Snapshot, XdsMetrics, XdsServer};
use crate::node_auth::{Authenticator, Caller, WaypointCaller};

fn mesh(extra_workloads: &str) -> String {
    format!(
        r#"
workloads:
- {{name: a, namespace: demo, node: n1, addresses: [198.19.1.2]}}
- {{name: b, namespace: demo, node: n2, addresses: [198.19.2.2], authorizationPolicies: [demo/p]}}
{extra_workloads}
policies:
- {{name: p, namespace: demo, scope: WorkloadSelector, action: Allow, rules: [{{}}]}}
"#
    )
}

fn publish(tx: &watch::Sender<Arc<Snapshot>>, yaml: &str) {
    let config = parse_mesh_config(yaml).unwrap();
    let next = tx.borrow().next(mesh_core::xds::encode(&config));
    if let Some(next) = next {
        let visibility = super::visibility::Visibility::of(&config);
        tx.send_replace(Arc::new(next.with_visibility(visibility)));
    }
}

struct Harness {
    addr: std::net::SocketAddr,
    snapshots: watch::Sender<Arc<Snapshot>>,
    registry: Arc<Mutex<Registry>>,
}

async fn start(yaml: &str) -> Harness {
    start_with_auth(yaml, None).await
}

async fn start_with_auth(yaml: &str, auth: Option<Arc<dyn Authenticator>>) -> Harness {
    let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
    publish(&snapshots, yaml);
    let mut registry = Registry::default();
    let metrics = XdsMetrics::register(&mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = XdsServer::new(rx, auth, metrics);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Harness {
        addr,
        snapshots,
        registry: Arc::new(Mutex::new(registry)),
    }
}

impl Harness {
    fn scrape(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }
}

/// A bare delta stream: what we send and what we receive.
struct RawClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl RawClient {
    async fn connect(addr: std::net::SocketAddr, first: Vec<DeltaDiscoveryRequest>) -> RawClient {
        let channel = ControlPlane::plaintext(format!("http://{addr}"))
            .channel()
            .unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        for r in first {
            tx.send(r).await.unwrap();
        }
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawClient { tx, rx }
    }

    /// As [`RawClient::connect`], presenting `token`; the server's refusal
    /// is returned.
    async fn connect_as(
        addr: std::net::SocketAddr,
        token: &str,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> Result<RawClient, tonic::Status> {
        let channel = ControlPlane::plaintext(format!("http://{addr}"))
            .channel()
            .unwrap();
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", value.clone());
                Ok(r)
            },
        );
        let (tx, rx) = mpsc::channel(16);
        for r in first {
            tx.send(r).await.unwrap();
        }
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawClient { tx, rx })
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(r) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("unexpected response: {r:?}");
        }
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
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

/// Subscribes as node n2, where workload b (and its policy) lives.
fn subscribe(type_url: &str) -> DeltaDiscoveryRequest {
    subscribe_as("n2", type_url)
}

fn subscribe_as(node: &str, type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("test~{node}"),
            metadata: Some(prost_types::Struct {
                fields: [(
                    "NODE_NAME".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(node.into())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }),
        type_url: type_url.into(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<_> = r.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

#[tokio::test]
async fn subscribe_then_incremental_updates_and_removals() {
    let h = start(&mesh("")).await;
    let mut c = RawClient::connect(h.addr, vec![subscribe(ADDRESS_TYPE)]).await;
    let first = c.recv().await;
    assert_eq!(first.type_url, ADDRESS_TYPE);
    assert_eq!(
        names(&first),
        vec!["Kubernetes//Pod/demo/a", "Kubernetes//Pod/demo/b"]
    );
    assert!(!first.nonce.is_empty());
    c.ack(&first).await;

    // One pod added: exactly one resource goes out.
    publish(
        &h.snapshots,
        &mesh("- {name: c, namespace: demo, node: n1, addresses: [198.19.1.3]}"),
    );
    let add = c.recv().await;
    assert_eq!(names(&add), vec!["Kubernetes//Pod/demo/c"]);
    assert!(add.removed_resources.is_empty());
    c.ack(&add).await;

    // And removed again: one removal, no resources.
    publish(&h.snapshots, &mesh(""));
    let del = c.recv().await;
    assert!(del.resources.is_empty());
    assert_eq!(del.removed_resources, vec!["Kubernetes//Pod/demo/c"]);
    c.ack(&del).await;

    // A change to something else entirely sends nothing for unchanged names.
    publish(&h.snapshots, &mesh(""));
    c.nothing_for(Duration::from_millis(300)).await;
    assert!(
        h.scrape()
            .contains("xds_acks_total{type_url=\"type.googleapis.com/istio.workload.Address\"} 3"),
        "{}",
        h.scrape()
    );
}

#[tokio::test]
async fn nack_is_counted_and_not_answered_with_a_resend() {
    let h = start(&mesh("")).await;
    let mut c = RawClient::connect(h.addr, vec![subscribe(ADDRESS_TYPE)]).await;
    let first = c.recv().await;
    c.tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(XdsStatus {
            code: 3,
            message: "workload b: I do not like it".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    c.nothing_for(Duration::from_millis(300)).await;
    assert!(h
        .scrape()
        .contains("xds_nacks_total{type_url=\"type.googleapis.com/istio.workload.Address\"} 1"));
    // The stream still works after a NACK.
    publish(
        &h.snapshots,
        &mesh("- {name: c, namespace: demo, node: n1, addresses: [198.19.1.3]}"),
    );
    assert_eq!(names(&c.recv().await), vec!["Kubernetes//Pod/demo/c"]);
}

#[tokio::test]
async fn reconnect_resumes_from_the_versions_held() {
    let h = start(&mesh("")).await;
    let held = {
        let mut c = RawClient::connect(h.addr, vec![subscribe(ADDRESS_TYPE)]).await;
        let first = c.recv().await;
        c.ack(&first).await;
        first
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    // While away: c appears, a goes.
    publish(
        &h.snapshots,
        "workloads:\n- {name: b, namespace: demo, node: n2, addresses: [198.19.2.2], authorizationPolicies: [demo/p]}\n- {name: c, namespace: demo, node: n1, addresses: [198.19.1.3]}\npolicies:\n- {name: p, namespace: demo, scope: WorkloadSelector, action: Allow, rules: [{}]}\n",
    );
    let mut again = subscribe(ADDRESS_TYPE);
    again.initial_resource_versions = held;
    let mut c = RawClient::connect(h.addr, vec![again]).await;
    let resume = c.recv().await;
    assert_eq!(
        names(&resume),
        vec!["Kubernetes//Pod/demo/c"],
        "b is unchanged"
    );
    assert_eq!(resume.removed_resources, vec!["Kubernetes//Pod/demo/a"]);
}

#[tokio::test]
async fn unknown_type_is_answered_and_the_stream_survives() {
    let h = start(&mesh("")).await;
    let mut c = RawClient::connect(
        h.addr,
        vec![subscribe(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        )],
    )
    .await;
    let r = c.recv().await;
    assert_eq!(
        r.type_url,
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert!(r.resources.is_empty() && !r.nonce.is_empty());
    c.tx.send(subscribe(AUTHORIZATION_TYPE)).await.unwrap();
    let authz = c.recv().await;
    assert_eq!(names(&authz), vec!["demo/p"]);
    assert!(h.scrape().contains("xds_unknown_type_requests_total 1"));
}

#[tokio::test]
async fn policies_are_pushed_before_the_addresses_naming_them() {
    let h = start(&mesh("")).await;
    let mut c = RawClient::connect(
        h.addr,
        vec![subscribe(AUTHORIZATION_TYPE), subscribe(ADDRESS_TYPE)],
    )
    .await;
    let (a, b) = (c.recv().await, c.recv().await);
    c.ack(&a).await;
    c.ack(&b).await;
    publish(
        &h.snapshots,
        "workloads:\n- {name: a, namespace: demo, node: n1, addresses: [198.19.1.2]}\n- {name: b, namespace: demo, node: n2, addresses: [198.19.2.2], authorizationPolicies: [demo/q]}\npolicies:\n- {name: q, namespace: demo, scope: WorkloadSelector, action: Allow, rules: [{}]}\n",
    );
    let first = c.recv().await;
    let second = c.recv().await;
    assert_eq!(first.type_url, AUTHORIZATION_TYPE);
    assert_eq!(names(&first), vec!["demo/q"]);
    assert_eq!(first.removed_resources, vec!["demo/p"]);
    assert_eq!(second.type_url, ADDRESS_TYPE);
    assert_eq!(names(&second), vec!["Kubernetes//Pod/demo/b"]);
}

/// Rejects any workload named "bad"; applies everything else.
#[derive(Clone, Default)]
struct Picky {
    applied: Arc<Mutex<Vec<usize>>>,
}

impl Handler for Picky {
    fn check(&mut self, _: &str, name: &str, _: &prost_types::Any) -> Result<(), String> {
        if name.ends_with("/bad") {
            Err("bad by name".into())
        } else {
            Ok(())
        }
    }
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        let n = resources.get(ADDRESS_TYPE).map_or(0, |m| m.len());
        self.applied.lock().unwrap().push(n);
        Ok(())
    }
}

#[tokio::test]
async fn mesh_client_nacks_a_bad_resource_and_keeps_the_rest() {
    let h = start(&mesh("")).await;
    let client = mesh_core::xds::client::Client::new(
        ControlPlane::plaintext(format!("http://{}", h.addr)),
        "test~n1".into(),
        "n1",
        &[ADDRESS_TYPE],
    );
    let status = client.status();
    let picky = Picky::default();
    let applied = picky.applied.clone();
    let task = tokio::spawn(client.run(picky));
    tokio::task::spawn_blocking({
        let applied = applied.clone();
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while applied.lock().unwrap().last() != Some(&2) {
                assert!(std::time::Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    })
    .await
    .unwrap();
    publish(
        &h.snapshots,
        &mesh("- {name: bad, namespace: demo, node: n1, addresses: [198.19.1.9]}\n- {name: good, namespace: demo, node: n1, addresses: [198.19.1.8]}"),
    );
    let s = status.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.lock().unwrap().nacks == 0 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert_eq!(
        applied.lock().unwrap().last(),
        Some(&3),
        "a, b and good; not bad"
    );
    let st = status.lock().unwrap().clone();
    assert!(st.last_nack.unwrap().contains("bad by name"));
    assert!(st.synced && st.connected);
    task.abort();
}

#[tokio::test]
async fn large_address_pushes_go_out_in_parts_and_add_up() {
    let extra: String = (0..2500)
        .map(|i| {
            format!(
                "- {{name: w{i}, namespace: bulk, node: n3, addresses: [198.18.{}.{}]}}\n",
                10 + i / 250,
                1 + i % 250
            )
        })
        .collect();
    let h = start(&mesh(&extra)).await;
    let mut c = RawClient::connect(h.addr, vec![subscribe(ADDRESS_TYPE)]).await;
    let mut names = std::collections::HashSet::new();
    let mut parts = 0;
    while names.len() < 2502 {
        let r = c.recv().await;
        assert!(r.resources.len() <= super::server::RESOURCES_PER_RESPONSE);
        // Only the last part lets a client count itself in sync.
        let last = names.len() + r.resources.len() == 2502;
        assert_eq!(
            r.system_version_info.ends_with(super::server::PARTIAL),
            !last,
            "{}",
            r.system_version_info
        );
        names.extend(r.resources.iter().map(|r| r.name.clone()));
        c.ack(&r).await;
        parts += 1;
    }
    assert_eq!(parts, 3, "2,502 addresses in parts of at most 1,000");
    c.nothing_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_node_is_sent_only_the_policies_that_can_apply_to_its_workloads() {
    let h = start(&mesh("")).await;
    let mut c = RawClient::connect(h.addr, vec![subscribe_as("n1", AUTHORIZATION_TYPE)]).await;
    // demo/p selects b, on n2: n1 gets an (empty) first answer.
    let first = c.recv().await;
    assert!(first.resources.is_empty(), "{:?}", names(&first));
    c.ack(&first).await;

    // a (on n1) now names demo/p: the unchanged policy becomes n1's business.
    let with_a = "workloads:\n- {name: a, namespace: demo, node: n1, addresses: [198.19.1.2], authorizationPolicies: [demo/p]}\n- {name: b, namespace: demo, node: n2, addresses: [198.19.2.2], authorizationPolicies: [demo/p]}\npolicies:\n- {name: p, namespace: demo, scope: WorkloadSelector, action: Allow, rules: [{}]}\n";
    publish(&h.snapshots, with_a);
    let gained = c.recv().await;
    assert_eq!(names(&gained), vec!["demo/p"]);
    c.ack(&gained).await;

    // And no longer: it is withdrawn from n1.
    publish(&h.snapshots, &mesh(""));
    let lost = c.recv().await;
    assert!(lost.resources.is_empty());
    assert_eq!(lost.removed_resources, vec!["demo/p"]);
}

#[tokio::test]
async fn naming_a_policy_does_not_make_it_visible() {
    let h = start(&mesh("")).await;
    let mut req = subscribe_as("n1", AUTHORIZATION_TYPE);
    req.resource_names_subscribe = vec!["*".into(), "demo/p".into()];
    let mut c = RawClient::connect(h.addr, vec![req]).await;
    let first = c.recv().await;
    assert!(
        first.resources.is_empty(),
        "n1 asked for demo/p by name: {:?}",
        names(&first)
    );
}

/// A waypoint (Gateway demo/wp, pod on n3) in front of demo/app; demo/plain
/// has no waypoint. `app_waypoint` is the app Service's waypoint field, and
/// `routes` the httpRoutes section.
fn l7_mesh(app_waypoint: &str, routes: &str) -> String {
    format!(
        r#"
workloads:
- {{name: a, namespace: demo, node: n1, addresses: [198.19.1.2], services: [demo/app]}}
- {{name: p, namespace: demo, node: n1, addresses: [198.19.1.3], services: [demo/plain]}}
- {{name: wp-0, namespace: demo, node: n3, addresses: [198.19.3.9], services: [demo/wp], nativeTunnel: true}}
services:
- {{name: wp, namespace: demo, addresses: [198.18.0.9], ports: [{{port: 15008}}]}}
- {{name: app, namespace: demo, addresses: [198.18.0.2], ports: [{{port: 80}}]{app_waypoint}}}
- {{name: plain, namespace: demo, addresses: [198.18.0.3], ports: [{{port: 80}}]}}
httpRoutes:
{routes}
httpPolicies:
- {{name: on-wp, namespace: demo, targets: [{{kind: Gateway, name: wp}}], action: Deny, rules: [{{to: [{{paths: [/admin]}}]}}]}}
- {{name: on-plain, namespace: demo, targets: [{{kind: Service, name: plain}}], action: Allow, rules: [{{}}]}}
trafficPolicies:
- {{name: cb, namespace: demo, target: {{kind: Service, name: app}}, connectionPool: {{maxRequests: 10}}}}
- {{name: via-route, namespace: demo, target: {{kind: HTTPRoute, name: to-app}}, rateLimit: {{maxTokens: 5, tokensPerFill: 1, fillInterval: 1s}}}}
"#
    )
}

const WITH_WAYPOINT: &str = ", waypoint: {namespace: demo, name: wp}";

const ROUTES: &str = r#"
- name: to-app
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: app}]
  rules: [{backendRefs: [{name: app, port: 80}]}]
- name: to-plain
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: plain}]
  rules: [{backendRefs: [{name: plain, port: 80}]}]
"#;

const ROUTES_CHANGED: &str = r#"
- name: to-app
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: app}]
  rules: [{backendRefs: [{name: app, port: 80, weight: 3}], timeouts: {request: 2s}}]
- name: to-plain
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: plain}]
  rules: [{backendRefs: [{name: plain, port: 80}]}]
"#;

const ONLY_PLAIN_ROUTE: &str = r#"
- name: to-plain
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: plain}]
  rules: [{backendRefs: [{name: plain, port: 80}]}]
"#;

fn publish_l7(tx: &watch::Sender<Arc<Snapshot>>, yaml: &str) {
    let config = parse_mesh_config(yaml).unwrap();
    let next = tx.borrow().next_with_l7(
        mesh_core::xds::encode(&config),
        mesh_core::xds::encode_l7(&config),
    );
    if let Some(next) = next {
        let visibility = super::visibility::Visibility::of(&config);
        tx.send_replace(Arc::new(next.with_visibility(visibility)));
    }
}

async fn start_l7(yaml: &str) -> Harness {
    let h = start("{}").await;
    publish_l7(&h.snapshots, yaml);
    h
}

#[tokio::test]
async fn a_waypoint_node_gets_its_routes_changes_and_removals() {
    let h = start_l7(&l7_mesh(WITH_WAYPOINT, ROUTES)).await;
    let mut c = RawClient::connect(
        h.addr,
        vec![
            subscribe_as("n3", HTTP_AUTHORIZATION_TYPE),
            subscribe_as("n3", TRAFFIC_POLICY_TYPE),
            subscribe_as("n3", HTTP_ROUTE_TYPE),
        ],
    )
    .await;
    let mut first = std::collections::HashMap::new();
    for _ in 0..3 {
        let r = c.recv().await;
        c.ack(&r).await;
        first.insert(r.type_url.clone(), names(&r));
    }
    // Only what concerns demo/wp: not the route or policy of demo/plain.
    assert_eq!(first[HTTP_ROUTE_TYPE], vec!["demo/to-app"]);
    assert_eq!(first[HTTP_AUTHORIZATION_TYPE], vec!["demo/on-wp"]);
    assert_eq!(
        first[TRAFFIC_POLICY_TYPE],
        vec!["demo/cb", "demo/via-route"]
    );

    // The route changes: it alone is sent again, decodable as the model.
    publish_l7(&h.snapshots, &l7_mesh(WITH_WAYPOINT, ROUTES_CHANGED));
    let changed = c.recv().await;
    assert_eq!(changed.type_url, HTTP_ROUTE_TYPE);
    assert_eq!(names(&changed), vec!["demo/to-app"]);
    let body = changed.resources[0].resource.as_ref().unwrap();
    let route = mesh_core::xds::decode_http_route(body).unwrap();
    assert_eq!(route.rules[0].backend_refs[0].weight, 3);
    c.ack(&changed).await;
    c.nothing_for(Duration::from_millis(200)).await;

    // The route is deleted: removed, and so is the traffic policy that
    // concerned the waypoint only through it.
    publish_l7(&h.snapshots, &l7_mesh(WITH_WAYPOINT, ONLY_PLAIN_ROUTE));
    let mut removed = std::collections::HashMap::new();
    for _ in 0..2 {
        let r = c.recv().await;
        assert!(r.resources.is_empty(), "{:?}", names(&r));
        c.ack(&r).await;
        removed.insert(r.type_url.clone(), r.removed_resources.clone());
    }
    assert_eq!(removed[TRAFFIC_POLICY_TYPE], vec!["demo/via-route"]);
    assert_eq!(removed[HTTP_ROUTE_TYPE], vec!["demo/to-app"]);
    c.nothing_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_plain_ztunnel_node_is_sent_no_l7_resources() {
    let h = start_l7(&l7_mesh(WITH_WAYPOINT, ROUTES)).await;
    let mut c = RawClient::connect(
        h.addr,
        vec![
            subscribe_as("n1", HTTP_AUTHORIZATION_TYPE),
            subscribe_as("n1", TRAFFIC_POLICY_TYPE),
            subscribe_as("n1", HTTP_ROUTE_TYPE),
        ],
    )
    .await;
    for _ in 0..3 {
        let r = c.recv().await;
        assert!(r.resources.is_empty(), "{}: {:?}", r.type_url, names(&r));
        c.ack(&r).await;
    }
    publish_l7(&h.snapshots, &l7_mesh(WITH_WAYPOINT, ROUTES_CHANGED));
    c.nothing_for(Duration::from_millis(300)).await;
    // Naming a route does not make it visible either.
    let mut named = subscribe_as("n1", HTTP_ROUTE_TYPE);
    named.node = None;
    named.resource_names_subscribe = vec!["demo/to-app".into()];
    c.tx.send(named).await.unwrap();
    c.nothing_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_route_follows_its_service_onto_the_waypoint() {
    // demo/app does not use the waypoint yet: its route is not n3's business.
    let h = start_l7(&l7_mesh("", ROUTES)).await;
    let mut c = RawClient::connect(h.addr, vec![subscribe_as("n3", HTTP_ROUTE_TYPE)]).await;
    let first = c.recv().await;
    assert!(first.resources.is_empty(), "{:?}", names(&first));
    c.ack(&first).await;
    // The Service takes the waypoint; the route itself is unchanged.
    publish_l7(&h.snapshots, &l7_mesh(WITH_WAYPOINT, ROUTES));
    let gained = c.recv().await;
    assert_eq!(names(&gained), vec!["demo/to-app"]);
    c.ack(&gained).await;
    publish_l7(&h.snapshots, &l7_mesh("", ROUTES));
    let lost = c.recv().await;
    assert_eq!(lost.removed_resources, vec!["demo/to-app"]);
}

#[tokio::test]
async fn the_waypoint_client_assembles_l7_and_nacks_a_garbage_route() {
    let yaml = l7_mesh(WITH_WAYPOINT, ROUTES);
    let h = start_l7(&yaml).await;
    let client = mesh_core::xds::client::Client::new(
        ControlPlane::plaintext(format!("http://{}", h.addr)),
        "waypoint~n3".into(),
        "n3",
        &WAYPOINT_TYPES,
    );
    let status = client.status();
    let configs: Arc<Mutex<Vec<mesh_core::config::MeshConfig>>> = Arc::default();
    let sink = {
        let configs = configs.clone();
        move |c: mesh_core::config::MeshConfig| {
            configs.lock().unwrap().push(c);
            Ok(())
        }
    };
    let task = tokio::spawn(client.run(MeshHandler::new("cluster.local", Some("n3"), sink)));
    let wait = |what: &'static str, cond: Box<dyn Fn() -> bool + Send>| {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !cond() {
                assert!(std::time::Instant::now() < deadline, "waiting for {what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let s = status.clone();
    wait("sync", Box::new(move || s.lock().unwrap().synced))
        .await
        .unwrap();
    {
        let configs = configs.lock().unwrap();
        let last = configs.last().unwrap();
        assert_eq!(last.workloads.len(), 3);
        let keys = |v: Vec<String>| v.join(",");
        assert_eq!(
            keys(last.http_routes.iter().map(|r| r.key()).collect()),
            "demo/to-app"
        );
        assert_eq!(
            keys(last.http_policies.iter().map(|p| p.key()).collect()),
            "demo/on-wp"
        );
        assert_eq!(last.traffic_policies.len(), 2);
    }

    // The control plane serves garbage under the route's name.
    let config = parse_mesh_config(&yaml).unwrap();
    let mut l7 = mesh_core::xds::encode_l7(&config);
    for r in &mut l7.http_routes {
        if r.name == "demo/to-app" {
            r.resource.value = vec![0x22, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
        }
    }
    let next = h
        .snapshots
        .borrow()
        .next_with_l7(mesh_core::xds::encode(&config), l7)
        .unwrap()
        .with_visibility(super::visibility::Visibility::of(&config));
    let applied_before = configs.lock().unwrap().len();
    h.snapshots.send_replace(Arc::new(next));
    let s = status.clone();
    wait("a NACK", Box::new(move || s.lock().unwrap().nacks == 1))
        .await
        .unwrap();
    let st = status.lock().unwrap().clone();
    assert!(
        st.last_nack
            .as_deref()
            .unwrap_or("")
            .contains("demo/to-app"),
        "{st:?}"
    );
    // The previous route stays in force: whatever was applied still has it.
    let configs = configs.lock().unwrap();
    assert!(configs.len() >= applied_before);
    assert_eq!(configs.last().unwrap().http_routes.len(), 1);
    assert!(h
        .scrape()
        .contains("xds_nacks_total{type_url=\"type.googleapis.com/ambit.route.v1.HTTPRoute\"} 1"));
    task.abort();
}

#[tokio::test]
async fn a_reconnecting_waypoint_resumes_its_routes() {
    let h = start_l7(&l7_mesh(WITH_WAYPOINT, ROUTES)).await;
    let mut held: std::collections::HashMap<String, String> = {
        let mut c = RawClient::connect(h.addr, vec![subscribe_as("n3", HTTP_ROUTE_TYPE)]).await;
        let first = c.recv().await;
        c.ack(&first).await;
        first
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    };
    // Unchanged while away: nothing to send but the (empty) first answer.
    let mut again = subscribe_as("n3", HTTP_ROUTE_TYPE);
    again.initial_resource_versions = held.clone();
    let mut c = RawClient::connect(h.addr, vec![again]).await;
    let resume = c.recv().await;
    assert!(resume.resources.is_empty() && resume.removed_resources.is_empty());
    drop(c);

    // Changed while away; and the client claims a route it may not see.
    publish_l7(&h.snapshots, &l7_mesh(WITH_WAYPOINT, ROUTES_CHANGED));
    held.insert("demo/to-plain".into(), "0".into());
    let mut again = subscribe_as("n3", HTTP_ROUTE_TYPE);
    again.initial_resource_versions = held;
    let mut c = RawClient::connect(h.addr, vec![again]).await;
    let resume = c.recv().await;
    assert_eq!(names(&resume), vec!["demo/to-app"]);
    assert_eq!(resume.removed_resources, vec!["demo/to-plain"]);
}

/// Callers by token: `node-<name>` is that node, `pod-<name>` the pod
/// `demo/<name>` claiming to be a waypoint running as `wp-sa`.
struct ByToken;

#[tonic::async_trait]
impl Authenticator for ByToken {
    async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, tonic::Status> {
        let token = mesh_core::grpc::bearer_token(metadata).unwrap_or_default();
        if let Some(node) = token.strip_prefix("node-") {
            return Ok(Caller::Node(node.into()));
        }
        if let Some(pod) = token.strip_prefix("pod-") {
            return Ok(Caller::Waypoint(WaypointCaller {
                namespace: "demo".into(),
                pod: pod.into(),
                service_account: Some("wp-sa".into()),
            }));
        }
        Err(tonic::Status::unauthenticated("unknown token"))
    }
}

/// [`l7_mesh`] with L4 policies: one mesh-wide, one namespace-wide for demo
/// (which has workloads on n1 and n3), and the waypoint pod running as wp-sa.
fn l7_mesh_with_l4() -> String {
    l7_mesh(WITH_WAYPOINT, ROUTES).replace(
        "nativeTunnel: true}",
        "nativeTunnel: true, serviceAccount: wp-sa}",
    ) + r#"
policies:
- {name: all, namespace: istio-system, scope: Global, action: Deny, rules: []}
- {name: ns, namespace: demo, scope: Namespace, action: Allow, rules: []}
"#
}

async fn first_names(
    c: &mut RawClient,
    n: usize,
) -> std::collections::HashMap<String, Vec<String>> {
    let mut out = std::collections::HashMap::new();
    for _ in 0..n {
        let r = c.recv().await;
        c.ack(&r).await;
        out.insert(r.type_url.clone(), names(&r));
    }
    out
}

#[tokio::test]
async fn an_authenticated_waypoint_gets_its_gateways_l7_and_its_node_none() {
    let h = start_with_auth(&l7_mesh_with_l4(), Some(Arc::new(ByToken))).await;
    publish_l7(&h.snapshots, &l7_mesh_with_l4());
    let types = [HTTP_ROUTE_TYPE, HTTP_AUTHORIZATION_TYPE, AUTHORIZATION_TYPE];
    // What it says in its node metadata does not matter: the token does.
    let subscribe_all = |claimed: &str| types.iter().map(|t| subscribe_as(claimed, t)).collect();

    let mut wp = RawClient::connect_as(h.addr, "pod-wp-0", subscribe_all("n1"))
        .await
        .unwrap();
    let got = first_names(&mut wp, 3).await;
    assert_eq!(got[HTTP_ROUTE_TYPE], vec!["demo/to-app"]);
    assert_eq!(got[HTTP_AUTHORIZATION_TYPE], vec!["demo/on-wp"]);
    // L4 policies are the ztunnels' business: the mesh-wide one only.
    assert_eq!(got[AUTHORIZATION_TYPE], vec!["istio-system/all"]);

    // The node hosting it no longer gets any L7 resource.
    let mut n3 = RawClient::connect_as(h.addr, "node-n3", subscribe_all("n3"))
        .await
        .unwrap();
    let got = first_names(&mut n3, 3).await;
    assert!(got[HTTP_ROUTE_TYPE].is_empty(), "{got:?}");
    assert!(got[HTTP_AUTHORIZATION_TYPE].is_empty(), "{got:?}");
    assert_eq!(got[AUTHORIZATION_TYPE], vec!["demo/ns", "istio-system/all"]);

    // A change reaches the waypoint, not the node.
    let changed = l7_mesh_with_l4().replace(ROUTES, ROUTES_CHANGED);
    publish_l7(&h.snapshots, &changed);
    let r = wp.recv().await;
    assert_eq!(
        (r.type_url.as_str(), names(&r)),
        (HTTP_ROUTE_TYPE, vec!["demo/to-app".to_string()])
    );
    n3.nothing_for(Duration::from_millis(300)).await;

    // A pod that is not a waypoint pod of the model is refused outright.
    let err = match RawClient::connect_as(h.addr, "pod-a", subscribe_all("n1")).await {
        Ok(_) => panic!("a non-waypoint pod was served"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("pod demo/a is not a waypoint pod"),
        "{err:?}"
    );
    // So is a waypoint pod claimed by another service account.
    let impostor = l7_mesh_with_l4().replace("serviceAccount: wp-sa", "serviceAccount: other");
    publish_l7(&h.snapshots, &impostor);
    let err = match RawClient::connect_as(h.addr, "pod-wp-0", subscribe_all("n3")).await {
        Ok(_) => panic!("a waypoint of another account was served"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("runs as service account other"),
        "{err:?}"
    );
    let text = h.scrape();
    assert!(text.contains("xds_rejected_streams_total 2"), "{text}");
}
