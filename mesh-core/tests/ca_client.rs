//! The CA client against a small in-test CA server (mesh-core cannot depend on
//! istiod-lite): filling the store, refusing bad answers, rotation, outages
//! and departing workloads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_core::ca::CertificateAuthority;
use mesh_core::ca_client::{CaClient, FetchError};
use mesh_core::config::{MeshConfig, MeshState};
use mesh_core::grpc::ControlPlane;
use mesh_core::proto::istio::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_core::proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_core::tls::CertificateStore;
use mesh_core::Identity;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Sign,
    /// Answers with a certificate for another identity.
    WrongIdentity,
    Unavailable,
}

struct FakeCa {
    ca: CertificateAuthority,
    mode: Mutex<Mode>,
    calls: AtomicUsize,
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let req = request.into_inner();
        let identity: Identity = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => s.parse().ok(),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("no identity"))?;
        let ttl = Duration::from_secs(req.validity_duration as u64);
        let mode = *self.mode.lock().unwrap();
        let chain = match mode {
            Mode::Sign => self
                .ca
                .sign_csr(&req.csr, &identity, ttl)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            Mode::WrongIdentity => {
                let other: Identity = "spiffe://cluster.local/ns/demo/sa/other".parse().unwrap();
                self.ca.issue(&other, ttl).unwrap().chain_pem
            }
            Mode::Unavailable => return Err(Status::unavailable("CA is down")),
        };
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![chain],
        }))
    }
}

async fn serve(fake: Arc<FakeCa>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = async_stream(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::from_arc(fake))
            .serve_with_incoming(incoming),
    );
    addr
}

/// Accepted connections as a stream, without tokio-stream's `net` feature.
fn async_stream(
    listener: tokio::net::TcpListener,
) -> impl tonic::codegen::tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(s, _)| s);
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn fake_ca() -> Arc<FakeCa> {
    Arc::new(FakeCa {
        ca: CertificateAuthority::generate("cluster.local").unwrap(),
        mode: Mutex::new(Mode::Sign),
        calls: AtomicUsize::new(0),
    })
}

fn mesh(workloads: &[(&str, &str, &str, &str)]) -> Arc<MeshState> {
    let workloads = workloads
        .iter()
        .map(|(name, sa, node, ip)| {
            serde_json::from_value(serde_json::json!({
                "name": name, "namespace": "demo", "serviceAccount": sa,
                "node": node, "addresses": [ip],
                // Workloads named waypoint-* are waypoints.
                "nativeTunnel": name.starts_with("waypoint"),
            }))
            .unwrap()
        })
        .collect();
    Arc::new(MeshState::new(MeshConfig {
        trust_domain: "cluster.local".into(),
        workloads,
        ..Default::default()
    }))
}

fn id(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
        .parse()
        .unwrap()
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Outcomes = Arc<Mutex<Vec<(Identity, Result<(), String>)>>>;

fn client(addr: SocketAddr, store: &CertificateStore, ttl: Duration) -> (CaClient, Outcomes) {
    let outcomes: Outcomes = Arc::default();
    let seen = outcomes.clone();
    let client = CaClient::new(
        &ControlPlane::plaintext(format!("http://{addr}")),
        "node-a".to_string(),
        store.clone(),
        ttl,
    )
    .unwrap()
    .with_observer(move |id, r| {
        seen.lock()
            .unwrap()
            .push((id.clone(), r.map_err(|e| e.label().to_string())));
    });
    (client, outcomes)
}

#[tokio::test]
async fn fills_the_store_for_local_identities_only_and_drops_departed_ones() {
    let fake = fake_ca();
    let addr = serve(fake.clone()).await;
    let store = CertificateStore::new(fake.ca.trust_roots().unwrap());
    let (client, _) = client(addr, &store, Duration::from_secs(3600));
    let (tx, rx) = watch::channel(mesh(&[
        ("web-1", "web", "node-a", "10.0.0.1"),
        ("web-2", "web", "node-a", "10.0.0.2"),
        ("api-1", "api", "node-a", "10.0.0.3"),
        ("db-1", "db", "node-b", "10.0.0.4"),
    ]));
    let task = tokio::spawn(client.run(rx));

    eventually("web and api certificates", Duration::from_secs(10), || {
        store.get(&id("web")).is_some() && store.get(&id("api")).is_some()
    })
    .await;
    let web = store.get(&id("web")).unwrap();
    assert_eq!(web.identity(), &id("web"));
    let left = web.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(3500), "{left:?}");
    assert!(store.get(&id("db")).is_none(), "db runs on node-b");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "one CSR per identity");

    // api leaves the node: its certificate goes; web stays untouched.
    tx.send_replace(mesh(&[
        ("web-1", "web", "node-a", "10.0.0.1"),
        ("api-1", "api", "node-b", "10.0.0.3"),
    ]));
    eventually("api certificate dropped", Duration::from_secs(5), || {
        store.get(&id("api")).is_none()
    })
    .await;
    assert!(Arc::ptr_eq(&store.get(&id("web")).unwrap(), &web));

    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("client stops when the mesh sender goes")
        .unwrap();
}

#[tokio::test]
async fn a_node_proxy_skips_waypoints_and_a_waypoint_gets_only_its_own_identity() {
    let fake = fake_ca();
    let addr = serve(fake.clone()).await;
    let workloads = [
        ("web-1", "web", "node-a", "10.0.0.1"),
        ("waypoint-0", "waypoint", "node-a", "10.0.0.9"),
    ];

    let ztunnel_store = CertificateStore::new(fake.ca.trust_roots().unwrap());
    let (ztunnel, _) = client(addr, &ztunnel_store, Duration::from_secs(3600));
    let (_tx1, rx1) = watch::channel(mesh(&workloads));
    let t1 = tokio::spawn(ztunnel.run(rx1));

    let waypoint_store = CertificateStore::new(fake.ca.trust_roots().unwrap());
    let (waypoint, _) = client(addr, &waypoint_store, Duration::from_secs(3600));
    let own: std::net::IpAddr = "10.0.0.9".parse().unwrap();
    let waypoint = waypoint.with_scope(Arc::new(move |w| {
        w.workload.native_tunnel && w.workload.addresses.contains(&own)
    }));
    let (_tx2, rx2) = watch::channel(mesh(&workloads));
    let t2 = tokio::spawn(waypoint.run(rx2));

    eventually(
        "both proxies have their certificates",
        Duration::from_secs(10),
        || ztunnel_store.get(&id("web")).is_some() && waypoint_store.get(&id("waypoint")).is_some(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ztunnel_store.get(&id("waypoint")).is_none(),
        "ztunnel never holds a waypoint's identity"
    );
    assert!(
        waypoint_store.get(&id("web")).is_none(),
        "a waypoint never holds its neighbours'"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    t1.abort();
    t2.abort();
}

#[tokio::test]
async fn wrong_identity_and_untrusted_answers_are_rejected() {
    let fake = fake_ca();
    let addr = serve(fake.clone()).await;
    let store = CertificateStore::new(fake.ca.trust_roots().unwrap());
    let (client, _) = client(addr, &store, Duration::from_secs(3600));

    *fake.mode.lock().unwrap() = Mode::WrongIdentity;
    let err = client.fetch(&id("web")).await.unwrap_err();
    assert!(matches!(err, FetchError::WrongIdentity { .. }), "{err}");
    assert!(err.to_string().contains("sa/other"), "{err}");
    assert_eq!(err.label(), "bad_response");

    // Signed by a CA we do not trust.
    *fake.mode.lock().unwrap() = Mode::Sign;
    let other_roots = CertificateAuthority::generate("cluster.local")
        .unwrap()
        .trust_roots()
        .unwrap();
    store.set_roots(other_roots);
    let err = client.fetch(&id("web")).await.unwrap_err();
    assert!(matches!(err, FetchError::Untrusted(_)), "{err}");

    // Nothing was stored by either.
    assert!(store.all().is_empty());

    // And the run loop keeps a rejected answer out of the store too.
    store.set_roots(fake.ca.trust_roots().unwrap());
    *fake.mode.lock().unwrap() = Mode::WrongIdentity;
    let (client, outcomes) = self::client(addr, &store, Duration::from_secs(3600));
    let (_tx, rx) = watch::channel(mesh(&[("web-1", "web", "node-a", "10.0.0.1")]));
    let task = tokio::spawn(client.run(rx));
    eventually("a rejected attempt", Duration::from_secs(5), || {
        !outcomes.lock().unwrap().is_empty()
    })
    .await;
    assert!(store.get(&id("web")).is_none());
    // Retried after the backoff, then accepted once the CA behaves.
    *fake.mode.lock().unwrap() = Mode::Sign;
    eventually("certificate after retry", Duration::from_secs(5), || {
        store.get(&id("web")).is_some()
    })
    .await;
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes[0].1, Err("bad_response".to_string()));
    assert_eq!(outcomes.last().unwrap().1, Ok(()));
    task.abort();
}

#[tokio::test]
async fn rotates_at_half_life_and_keeps_the_cert_while_the_ca_is_down() {
    let fake = fake_ca();
    let addr = serve(fake.clone()).await;
    let store = CertificateStore::new(fake.ca.trust_roots().unwrap());
    let (client, outcomes) = client(addr, &store, Duration::from_secs(4));
    let (_tx, rx) = watch::channel(mesh(&[("web-1", "web", "node-a", "10.0.0.1")]));
    let task = tokio::spawn(client.run(rx));

    eventually("first certificate", Duration::from_secs(5), || {
        store.get(&id("web")).is_some()
    })
    .await;
    let first = store.get(&id("web")).unwrap();
    let t0 = std::time::Instant::now();
    eventually("rotated certificate", Duration::from_secs(5), || {
        !Arc::ptr_eq(&store.get(&id("web")).unwrap(), &first)
    })
    .await;
    let rotated_after = t0.elapsed();
    // X.509 times have whole seconds, so "4 s" is 3-4 s left: renewal at 1.5-2 s.
    assert!(
        rotated_after > Duration::from_millis(1000) && rotated_after < Duration::from_millis(3000),
        "{rotated_after:?}"
    );
    let second = store.get(&id("web")).unwrap();
    assert!(second.not_after() >= first.not_after());

    // The CA goes away: the current certificate stays, and is retried.
    *fake.mode.lock().unwrap() = Mode::Unavailable;
    let before = outcomes.lock().unwrap().len();
    eventually("failed renewals", Duration::from_secs(8), || {
        outcomes.lock().unwrap()[before..]
            .iter()
            .filter(|(_, r)| r.is_err())
            .count()
            >= 2
    })
    .await;
    assert!(store.get(&id("web")).is_some(), "kept while the CA is down");
    // (A renewal already under way when the CA went down may still succeed.)
    assert!(outcomes.lock().unwrap()[before..]
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .all(|label| label == "unreachable"));

    // Back again: a fresh certificate arrives within the (short) backoff.
    *fake.mode.lock().unwrap() = Mode::Sign;
    let stale = store.get(&id("web")).unwrap();
    eventually(
        "certificate after the outage",
        Duration::from_secs(8),
        || !Arc::ptr_eq(&store.get(&id("web")).unwrap(), &stale),
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn an_absent_ca_is_an_unreachable_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let roots = CertificateAuthority::generate("cluster.local")
        .unwrap()
        .trust_roots()
        .unwrap();
    let store = CertificateStore::new(roots);
    let (client, _) = client(addr, &store, Duration::from_secs(60));
    let err = client.fetch(&id("web")).await.unwrap_err();
    assert_eq!(err.label(), "unreachable", "{err}");
}
