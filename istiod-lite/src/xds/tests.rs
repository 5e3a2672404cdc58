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
use mesh_core::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use mesh_core::xds::client::{Handler, ResourceSet};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Streaming;

use super::{Snapshot, XdsMetrics, XdsServer};

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
    let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
    publish(&snapshots, yaml);
    let mut registry = Registry::default();
    let metrics = XdsMetrics::register(&mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = XdsServer::new(rx, None, metrics);
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
