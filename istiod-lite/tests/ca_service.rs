//! The gRPC CA end to end: a real tonic server on loopback, called through
//! mesh-core's control-plane client (plaintext and TLS).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use istiod_lite::ca_service::{CaService, IMPERSONATED_IDENTITY};
use istiod_lite::kube_auth::{KubernetesAuthConfig, KubernetesAuthenticator};
use istiod_lite::metrics::Metrics;
use istiod_lite::node_auth::{Authenticator, NodeAuthenticator};
use istiod_lite::tls_serve::{server_config, tls_incoming};
use istiod_lite::waypoint_tokens::{token_path, WaypointTokens};
use mesh_core::ca::{generate_csr, CertificateAuthority};
use mesh_core::config::{MeshConfig, Workload};
use mesh_core::grpc::ControlPlane;
use mesh_core::proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::istio::ca::IstioCertificateRequest;
use mesh_core::tls::WorkloadCertificate;
use mesh_core::Identity;
use rustls::pki_types::UnixTime;
use tokio::sync::watch;
use tonic::Code;

fn workload(name: &str, sa: &str, node: &str, ip: &str) -> Workload {
    serde_yaml::from_str(&format!(
        "{{name: {name}, namespace: demo, serviceAccount: {sa}, node: {node}, addresses: [{ip}]}}"
    ))
    .unwrap()
}

fn mesh(workloads: Vec<Workload>) -> Arc<MeshConfig> {
    Arc::new(MeshConfig {
        trust_domain: "cluster.local".into(),
        workloads,
        ..Default::default()
    })
}

fn id(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
        .parse()
        .unwrap()
}

struct Harness {
    ca: Arc<CertificateAuthority>,
    mesh: watch::Sender<Arc<MeshConfig>>,
    metrics: Arc<Metrics>,
    dir: PathBuf,
    service: CaService,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness {
    fn new(name: &str) -> Self {
        Self::with_auth(name, |dir| {
            Arc::new(NodeAuthenticator::from_file(dir.join("tokens.yaml")).unwrap())
        })
    }

    fn with_auth(name: &str, auth: impl FnOnce(&Path) -> Arc<dyn Authenticator>) -> Self {
        let dir = std::env::temp_dir().join(format!("ambit-ca-svc-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("tokens.yaml"),
            "node-a: token-a\nnode-b: token-b\n",
        )
        .unwrap();
        for (file, token) in [("a", "token-a"), ("b", "token-b"), ("bogus", "token-x")] {
            std::fs::write(dir.join(file), format!("{token}\n")).unwrap();
        }
        let auth = auth(&dir);
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let (mesh, rx) = watch::channel(mesh(vec![
            workload("web-1", "web", "node-a", "10.0.0.1"),
            workload("db-1", "db", "node-b", "10.0.0.2"),
        ]));
        let metrics = Arc::new(Metrics::new());
        let service = CaService::new(
            ca.clone(),
            auth,
            rx,
            Duration::from_secs(24 * 3600),
            Duration::from_secs(48 * 3600),
        )
        .with_metrics(metrics.clone());
        Harness {
            ca,
            mesh,
            metrics,
            dir,
            service,
        }
    }

    async fn serve_plaintext(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = self.service.clone().into_server();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn control_plane(&self, addr: SocketAddr, token: Option<&str>) -> ControlPlane {
        ControlPlane {
            token_file: token.map(|t| self.dir.join(t)),
            ..ControlPlane::plaintext(format!("http://{addr}"))
        }
    }
}

fn request(csr: &str, identity: Option<&str>, validity: i64) -> IstioCertificateRequest {
    let metadata = identity.map(|i| prost_types::Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(i.to_string())),
            },
        )]),
    });
    IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: validity,
        metadata,
    }
}

async fn call(
    cp: &ControlPlane,
    req: IstioCertificateRequest,
) -> Result<Vec<String>, tonic::Status> {
    let mut client =
        IstioCertificateServiceClient::with_interceptor(cp.channel().unwrap(), cp.auth());
    Ok(client
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain)
}

fn verify_chain(ca: &CertificateAuthority, cert: &WorkloadCertificate) {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        ca.trust_roots().unwrap().store(),
        mesh_core::tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&cert.chain()[0], &cert.chain()[1..], UnixTime::now())
        .unwrap();
}

#[tokio::test]
async fn local_workload_identity_is_signed() {
    let h = Harness::new("local");
    let addr = h.serve_plaintext().await;
    let cp = h.control_plane(addr, Some("a"));
    let web = id("web");
    let (csr, key) = generate_csr(&web).unwrap();

    let chain = call(&cp, request(&csr, Some(&web.to_string()), 3600))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf and root as separate strings");
    assert_eq!(chain[1], h.ca.root_pem());
    let cert = WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.as_bytes()).unwrap();
    assert_eq!(cert.identity(), &web);
    verify_chain(&h.ca, &cert);
    let left = cert.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        left <= Duration::from_secs(3600) && left > Duration::from_secs(3500),
        "{left:?}"
    );

    // No validity asked: the default; too much asked: the maximum.
    for (asked, want) in [(0, 24), (-5, 24), (365 * 24 * 3600, 48)] {
        let (csr, key) = generate_csr(&web).unwrap();
        let chain = call(&cp, request(&csr, Some(&web.to_string()), asked))
            .await
            .unwrap();
        let cert =
            WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.as_bytes()).unwrap();
        let left = cert.not_after().duration_since(SystemTime::now()).unwrap();
        let want = Duration::from_secs(want * 3600);
        assert!(
            left <= want && left > want - Duration::from_secs(60),
            "{asked}: {left:?}"
        );
    }
    let text = h.metrics.encode();
    assert!(
        text.contains("istiod_ca_requests_total{result=\"issued\"} 4"),
        "{text}"
    );
}

#[tokio::test]
async fn identity_of_another_node_is_denied_until_it_moves_here() {
    let h = Harness::new("other-node");
    let addr = h.serve_plaintext().await;
    let cp = h.control_plane(addr, Some("a"));
    let db = id("db");
    let (csr, _) = generate_csr(&db).unwrap();

    let err = call(&cp, request(&csr, Some(&db.to_string()), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.message(),
        "identity spiffe://cluster.local/ns/demo/sa/db has no workload on node node-a"
    );
    // An identity no workload has at all, and one of a foreign trust domain.
    for other in [
        "spiffe://cluster.local/ns/demo/sa/nobody",
        "spiffe://other.domain/ns/demo/sa/web",
    ] {
        let (csr, _) = generate_csr(&other.parse().unwrap()).unwrap();
        let err = call(&cp, request(&csr, Some(other), 0)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{other}: {err:?}");
    }

    // The CA follows the live mesh config: a db replica scheduled on node-a.
    h.mesh.send_modify(|m| {
        let mut next = (**m).clone();
        next.workloads
            .push(workload("db-2", "db", "node-a", "10.0.0.3"));
        *m = Arc::new(next);
    });
    let chain = call(&cp, request(&csr, Some(&db.to_string()), 0))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    let text = h.metrics.encode();
    assert!(
        text.contains("istiod_ca_requests_total{result=\"denied\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn missing_wrong_or_unknown_tokens_are_unauthenticated() {
    let h = Harness::new("tokens");
    let addr = h.serve_plaintext().await;
    let web = id("web");
    let (csr, _) = generate_csr(&web).unwrap();
    let req = || request(&csr, Some("spiffe://cluster.local/ns/demo/sa/web"), 0);

    let err = call(&h.control_plane(addr, None), req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("missing node token"), "{err:?}");

    let err = call(&h.control_plane(addr, Some("bogus")), req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("unknown node or waypoint"),
        "{err:?}"
    );

    // Not a bearer token at all.
    let cp = h.control_plane(addr, None);
    let mut client = IstioCertificateServiceClient::new(cp.channel().unwrap());
    let mut r = tonic::Request::new(req());
    r.metadata_mut()
        .insert("authorization", "Basic dG9rZW4tYQ==".parse().unwrap());
    let err = client.create_certificate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The right token of another node is still the other node.
    let err = call(&h.control_plane(addr, Some("b")), req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let text = h.metrics.encode();
    assert!(
        text.contains("istiod_ca_requests_total{result=\"unauthenticated\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_not_panics() {
    let h = Harness::new("bad");
    let addr = h.serve_plaintext().await;
    let cp = h.control_plane(addr, Some("a"));
    let web = "spiffe://cluster.local/ns/demo/sa/web";

    // CSR for another identity than the one impersonated.
    let (db_csr, _) = generate_csr(&id("db")).unwrap();
    let err = call(&cp, request(&db_csr, Some(web), 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("must name exactly"), "{err:?}");

    for garbage in [
        "",
        "not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = call(&cp, request(garbage, Some(web), 0)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{garbage:?}");
        assert!(err.message().contains("CSR"), "{err:?}");
    }

    let (csr, _) = generate_csr(&id("web")).unwrap();
    let err = call(&cp, request(&csr, None, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("no identity of its own"), "{err:?}");

    let err = call(&cp, request(&csr, Some("web"), 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("spiffe://"), "{err:?}");

    // The server is still fine afterwards.
    assert!(call(&cp, request(&csr, Some(web), 0)).await.is_ok());
}

#[tokio::test]
async fn serves_over_tls_with_its_own_serving_certificate() {
    let h = Harness::new("tls");
    let serving =
        h.ca.issue_server(
            &[mesh_core::grpc::CONTROL_PLANE_NAME.to_string()],
            &["127.0.0.1".parse::<IpAddr>().unwrap()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let config = server_config(&serving.chain_pem, &serving.key_pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(h.service.clone().into_server())
            .serve_with_incoming(tls_incoming(listener, config)),
    );

    // A client that connects and never says anything must not block others,
    // and one that speaks plaintext gets a failed handshake, not a crash.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
    }

    let cp = ControlPlane {
        address: format!("https://127.0.0.1:{}", addr.port()),
        roots: Some(h.ca.trust_roots().unwrap()),
        server_name: mesh_core::grpc::CONTROL_PLANE_NAME.to_string(),
        token_file: Some(h.dir.join("a")),
    };
    let web = id("web");
    let (csr, key) = generate_csr(&web).unwrap();
    let chain = tokio::time::timeout(
        Duration::from_secs(5),
        call(&cp, request(&csr, Some(&web.to_string()), 0)),
    )
    .await
    .expect("a silent client blocked the accept loop")
    .unwrap();
    let cert = WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.as_bytes()).unwrap();
    assert_eq!(cert.identity(), &web);
    verify_chain(&h.ca, &cert);

    // A client trusting another root refuses the server.
    let other = CertificateAuthority::generate("cluster.local").unwrap();
    let cp = ControlPlane {
        roots: Some(other.trust_roots().unwrap()),
        ..cp
    };
    let err = call(&cp, request(&csr, Some(&web.to_string()), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

/// Just enough of a Kubernetes API server for TokenReview: `token-a` is
/// ztunnel's projected token on node-a, for audience istio-ca; anything else
/// is not authenticated. (The full fake API server is the library's own,
/// test-only.)
async fn token_review_server() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    assert_eq!(
                        req.uri().path(),
                        "/apis/authentication.k8s.io/v1/tokenreviews"
                    );
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let status = if review["spec"]["token"] == "token-a"
                        && review["spec"]["audiences"] == serde_json::json!(["istio-ca"])
                    {
                        serde_json::json!({
                            "authenticated": true,
                            "audiences": ["istio-ca"],
                            "user": {
                                "username": "system:serviceaccount:istio-system:ztunnel",
                                "groups": ["system:serviceaccounts", "system:serviceaccounts:istio-system"],
                                "extra": {"authentication.kubernetes.io/node-name": ["node-a"]},
                            },
                        })
                    } else {
                        serde_json::json!({"error": "invalid bearer token"})
                    };
                    let answer = serde_json::json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "spec": review["spec"],
                        "status": status,
                    });
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(201)
                            .header("content-type", "application/json")
                            .body(Full::new(bytes::Bytes::from(answer.to_string())))
                            .unwrap(),
                    )
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn token_review_authenticated_node_gets_only_its_identities() {
    let apiserver = token_review_server().await;
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{apiserver}").parse().unwrap(),
    ))
    .unwrap();
    let h = Harness::with_auth("token-review", |_| {
        Arc::new(KubernetesAuthenticator::new(
            client,
            KubernetesAuthConfig::default(),
        ))
    });
    let addr = h.serve_plaintext().await;
    // The file holding "token-a" stands for ztunnel's projected token.
    let cp = h.control_plane(addr, Some("a"));

    let web = id("web");
    let (csr, key) = generate_csr(&web).unwrap();
    let chain = call(&cp, request(&csr, Some(&web.to_string()), 0))
        .await
        .unwrap();
    let cert = WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.as_bytes()).unwrap();
    assert_eq!(cert.identity(), &web);
    verify_chain(&h.ca, &cert);

    let db = id("db");
    let (csr, _) = generate_csr(&db).unwrap();
    let err = call(&cp, request(&csr, Some(&db.to_string()), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.message(),
        "identity spiffe://cluster.local/ns/demo/sa/db has no workload on node node-a"
    );

    let err = call(
        &h.control_plane(addr, Some("b")),
        request(&csr, Some(&db.to_string()), 0),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("invalid bearer token"), "{err:?}");
}

fn waypoint_workload(name: &str, sa: &str, node: &str, ip: &str) -> Workload {
    serde_yaml::from_str(&format!(
        "{{name: {name}, namespace: demo, serviceAccount: {sa}, node: {node}, addresses: [{ip}], nativeTunnel: true}}"
    ))
    .unwrap()
}

/// Manifests mode: node bootstrap tokens plus the waypoint tokens istiod-lite
/// issues, with waypoint pod demo/wp-0 (account wp) on node-a next to web-1.
fn with_waypoint_tokens(name: &str) -> (Harness, WaypointTokens) {
    let mut tokens = None;
    let h = Harness::with_auth(name, |dir| {
        let _ = std::fs::remove_dir_all(dir.join("wp-tokens"));
        let t = WaypointTokens::open(dir.join("wp-tokens")).unwrap();
        tokens = Some(t.clone());
        Arc::new(
            NodeAuthenticator::from_file(dir.join("tokens.yaml"))
                .unwrap()
                .with_waypoint_tokens(t),
        )
    });
    let tokens = tokens.unwrap();
    h.mesh.send_modify(|m| {
        let mut next = (**m).clone();
        next.workloads
            .push(waypoint_workload("wp-0", "wp", "node-a", "10.0.0.9"));
        *m = Arc::new(next);
    });
    tokens.sync(&h.mesh.borrow());
    (h, tokens)
}

#[tokio::test]
async fn manifests_waypoint_token_obtains_its_own_identity_only() {
    let (h, tokens) = with_waypoint_tokens("wp-own");
    let addr = h.serve_plaintext().await;
    let token_file = token_path(tokens.dir(), "demo", "wp-0");
    assert!(token_file.starts_with(&h.dir));
    let cp = ControlPlane {
        token_file: Some(token_file.clone()),
        ..ControlPlane::plaintext(format!("http://{addr}"))
    };
    let wp = id("wp");
    let (csr, key) = generate_csr(&wp).unwrap();
    let chain = call(&cp, request(&csr, Some(&wp.to_string()), 0))
        .await
        .unwrap();
    let cert = WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.as_bytes()).unwrap();
    assert_eq!(cert.identity(), &wp);

    // Its neighbour on node-a is not its to have.
    let (csr, _) = generate_csr(&id("web")).unwrap();
    let err = call(&cp, request(&csr, Some(&id("web").to_string()), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "waypoint pod demo/wp-0 may obtain only its own identity \
         spiffe://cluster.local/ns/demo/sa/wp, not spiffe://cluster.local/ns/demo/sa/web"
    );

    // The pod leaves the model: its token is revoked, file and all.
    h.mesh.send_modify(|m| {
        let mut next = (**m).clone();
        next.workloads.retain(|w| w.name != "wp-0");
        *m = Arc::new(next);
    });
    let token = std::fs::read_to_string(&token_file).unwrap();
    tokens.sync(&h.mesh.borrow());
    assert!(!token_file.exists());
    std::fs::write(h.dir.join("revoked"), token).unwrap();
    let (csr, _) = generate_csr(&wp).unwrap();
    let err = call(
        &h.control_plane(addr, Some("revoked")),
        request(&csr, Some(&wp.to_string()), 0),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let text = h.metrics.encode();
    for want in [
        "istiod_ca_requests_total{result=\"issued\"} 1",
        "istiod_ca_requests_total{result=\"denied\"} 1",
        "istiod_ca_requests_total{result=\"unauthenticated\"} 1",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}

#[tokio::test]
async fn manifests_node_token_no_longer_obtains_its_waypoints_identity() {
    let (h, _tokens) = with_waypoint_tokens("wp-node");
    let addr = h.serve_plaintext().await;
    let cp = h.control_plane(addr, Some("a"));
    let wp = id("wp");
    let (csr, _) = generate_csr(&wp).unwrap();
    let err = call(&cp, request(&csr, Some(&wp.to_string()), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "identity spiffe://cluster.local/ns/demo/sa/wp is a waypoint's on node node-a: a \
         waypoint obtains its identity with its own token, a node's token cannot"
    );
    // Its own workloads' identities still.
    let (csr, _) = generate_csr(&id("web")).unwrap();
    assert!(call(&cp, request(&csr, Some(&id("web").to_string()), 0))
        .await
        .is_ok());
}
