use super::*;
use kube_fake::FakeApiServer;
use serde_json::{json, Value};
use tonic::metadata::MetadataValue;

const REVIEWS: &str = "create tokenreviews";

fn bearer(token: &str) -> MetadataMap {
    let mut m = MetadataMap::new();
    let v: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    m.insert("authorization", v);
    m
}

/// A UserInfo as the API server gives it for a service-account token.
fn sa_user(ns: &str, sa: &str, extra: Value) -> Value {
    json!({
        "username": format!("system:serviceaccount:{ns}:{sa}"),
        "uid": "5d1b7c53-0000-0000-0000-000000000000",
        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
        "extra": extra,
    })
}

fn on_node(node: &str) -> Value {
    json!({
        "authentication.kubernetes.io/credential-id": ["JTI=abc"],
        "authentication.kubernetes.io/node-name": [node],
        "authentication.kubernetes.io/pod-name": ["ztunnel-x"],
        "authentication.kubernetes.io/pod-uid": ["1111"],
    })
}

fn of_pod(name: &str, uid: &str) -> Value {
    json!({
        "authentication.kubernetes.io/pod-name": [name],
        "authentication.kubernetes.io/pod-uid": [uid],
    })
}

fn authenticator(fake: &FakeApiServer) -> KubernetesAuthenticator {
    KubernetesAuthenticator::new(fake.client(), KubernetesAuthConfig::default())
}

fn node(name: &str) -> Caller {
    Caller::Node(name.to_string())
}

async fn refused(auth: &KubernetesAuthenticator, token: &str) -> Status {
    match auth.authenticate(&bearer(token)).await {
        Ok(caller) => panic!("{token}: accepted as {caller}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn ztunnel_token_with_node_extra_is_its_node_and_is_cached() {
    let fake = FakeApiServer::start().await;
    fake.add_token(
        "zt-a",
        &["istio-ca"],
        sa_user("istio-system", "ztunnel", on_node("node-a")),
    );
    let mut registry = Registry::default();
    let metrics = KubeAuthMetrics::register(&mut registry);
    let auth = authenticator(&fake).with_metrics(metrics);

    assert_eq!(
        auth.authenticate(&bearer("zt-a")).await.unwrap(),
        node("node-a")
    );
    // Reconnects within the TTL do not ask again; no pod was read.
    assert_eq!(
        auth.clone().authenticate(&bearer("zt-a")).await.unwrap(),
        node("node-a")
    );
    assert_eq!(fake.requests(REVIEWS), 1);
    assert_eq!(fake.requests("get pod"), 0);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("node_token_reviews_total{result=\"accepted\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("node_token_reviews_total{result=\"cached\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn other_accounts_and_users_are_permission_denied() {
    let fake = FakeApiServer::start().await;
    fake.add_token(
        "web",
        &["istio-ca"],
        sa_user("demo", "web", on_node("node-a")),
    );
    // The right name in another namespace is another account.
    fake.add_token(
        "fake-zt",
        &["istio-ca"],
        sa_user("demo", "ztunnel", on_node("node-a")),
    );
    fake.add_token(
        "human",
        &["istio-ca"],
        json!({"username": "alice", "groups": ["system:authenticated"]}),
    );
    // A service-account name without the service-account group: not one.
    fake.add_token(
        "spoofed",
        &["istio-ca"],
        json!({"username": "system:serviceaccount:istio-system:ztunnel", "groups": ["oidc"]}),
    );
    let auth = authenticator(&fake);

    let err = refused(&auth, "web").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "service account demo/web may not act for a node (allowed: istio-system/ztunnel), nor \
         as a waypoint: the token's pod demo/ztunnel-x no longer exists"
    );
    let err = refused(&auth, "fake-zt").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("demo/ztunnel may not"), "{err:?}");
    for token in ["human", "spoofed"] {
        let err = refused(&auth, token).await;
        assert_eq!(err.code(), Code::PermissionDenied, "{token}");
        assert!(
            err.message().contains("is not a service account"),
            "{err:?}"
        );
    }

    // Another allow list admits it.
    let auth = KubernetesAuthenticator::new(
        fake.client(),
        KubernetesAuthConfig {
            node_proxy_accounts: vec!["demo/web".parse().unwrap()],
            ..Default::default()
        },
    );
    assert_eq!(
        auth.authenticate(&bearer("web")).await.unwrap(),
        node("node-a")
    );
}

#[tokio::test]
async fn unauthenticated_reviews_and_wrong_audiences_are_unauthenticated() {
    let fake = FakeApiServer::start().await;
    fake.add_token(
        "for-api",
        &["https://kubernetes.default.svc"],
        sa_user("istio-system", "ztunnel", on_node("node-a")),
    );
    fake.add_token(
        "for-ca",
        &["istio-ca"],
        sa_user("istio-system", "ztunnel", on_node("node-a")),
    );
    // An API server that ignores audiences: it must not be taken as a yes.
    fake.add_token_review_answer(
        "audience-blind",
        json!({"authenticated": true, "user": sa_user("istio-system", "ztunnel", on_node("node-a"))}),
    );
    let auth = authenticator(&fake);

    let err = refused(&auth, "unknown").await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        err.message(),
        "token not accepted by the Kubernetes API server (TokenReview): invalid bearer token"
    );
    let err = refused(&auth, "for-api").await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("invalid for the target audiences"),
        "{err:?}"
    );
    let err = refused(&auth, "audience-blind").await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("did not confirm audience"),
        "{err:?}"
    );

    // A refusal is a decision: cached like an acceptance.
    let _ = refused(&auth, "unknown").await;
    assert_eq!(fake.requests(REVIEWS), 3);

    // The configured audience is the one asked for.
    let auth = KubernetesAuthenticator::new(
        fake.client(),
        KubernetesAuthConfig {
            audiences: vec!["https://kubernetes.default.svc".into()],
            ..Default::default()
        },
    );
    assert_eq!(
        auth.authenticate(&bearer("for-api")).await.unwrap(),
        node("node-a")
    );
    assert_eq!(refused(&auth, "for-ca").await.code(), Code::Unauthenticated);

    for (metadata, want) in [
        (MetadataMap::new(), "missing token"),
        (bearer(""), "empty bearer token"),
    ] {
        let err = auth.authenticate(&metadata).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains(want), "{err:?}");
    }
}

/// The uid the fake gave a pod.
async fn uid_of(fake: &FakeApiServer, ns: &str, name: &str) -> String {
    let pod = Api::<Pod>::namespaced(fake.client(), ns)
        .get(name)
        .await
        .unwrap();
    pod.metadata.uid.unwrap()
}

fn pod(name: &str, sa: &str, node: Option<&str>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "istio-system"},
        "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
    })
}

#[tokio::test]
async fn without_node_extra_the_pod_gives_the_node_if_its_uid_matches() {
    let fake = FakeApiServer::start().await;
    fake.apply(pod("ztunnel-b", "ztunnel", Some("node-b")));
    fake.apply(pod("other", "istiod", Some("node-c")));
    fake.apply(pod("pending", "ztunnel", None));
    let uid = uid_of(&fake, "istio-system", "ztunnel-b").await;
    let other_uid = uid_of(&fake, "istio-system", "other").await;
    let pending_uid = uid_of(&fake, "istio-system", "pending").await;
    let zt = |extra| sa_user("istio-system", "ztunnel", extra);
    fake.add_token("bound", &["istio-ca"], zt(of_pod("ztunnel-b", &uid)));
    // A token of an earlier pod of the same name.
    fake.add_token("stale", &["istio-ca"], zt(of_pod("ztunnel-b", "dead-beef")));
    fake.add_token("gone", &["istio-ca"], zt(of_pod("ztunnel-gone", "1234")));
    // Claims a pod that runs as another account.
    fake.add_token("borrowed", &["istio-ca"], zt(of_pod("other", &other_uid)));
    fake.add_token(
        "pending",
        &["istio-ca"],
        zt(of_pod("pending", &pending_uid)),
    );
    // A legacy secret token: bound to nothing.
    fake.add_token("legacy", &["istio-ca"], zt(json!({})));
    let auth = authenticator(&fake);
    let reads = fake.requests("get pod");

    assert_eq!(
        auth.authenticate(&bearer("bound")).await.unwrap(),
        node("node-b")
    );
    assert_eq!(fake.requests("get pod"), reads + 1);

    let err = refused(&auth, "stale").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "the token was issued to pod istio-system/ztunnel-b with UID dead-beef, which no \
             longer exists (a pod of that name now has UID {uid})"
        )
    );
    let err = refused(&auth, "gone").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "the token's pod istio-system/ztunnel-gone no longer exists"
    );
    let err = refused(&auth, "borrowed").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("runs as service account istiod"),
        "{err:?}"
    );
    let err = refused(&auth, "pending").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not scheduled"), "{err:?}");
    let err = refused(&auth, "legacy").await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not bound to a pod"), "{err:?}");
}

#[tokio::test]
async fn garbage_answers_and_unreachable_servers_are_unavailable_and_not_cached() {
    let fake = FakeApiServer::start().await;
    fake.add_token_review_answer("typed-wrong", json!({"authenticated": "yes"}));
    fake.add_token_review_answer(
        "no-user",
        json!({"authenticated": true, "audiences": ["istio-ca"]}),
    );
    let auth = authenticator(&fake);

    let err = refused(&auth, "typed-wrong").await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().starts_with("TokenReview failed: "), "{err:?}");
    let _ = refused(&auth, "typed-wrong").await;
    assert_eq!(
        fake.requests(REVIEWS),
        2,
        "a failure is not an answer to keep"
    );

    let err = refused(&auth, "no-user").await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("named no user"), "{err:?}");

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{closed}").parse().unwrap(),
    ))
    .unwrap();
    let auth = KubernetesAuthenticator::new(client, KubernetesAuthConfig::default());
    let err = refused(&auth, "any").await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().starts_with("TokenReview failed"), "{err:?}");

    // Accepts, then never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap()))
            .unwrap();
    let auth = KubernetesAuthenticator::new(
        client,
        KubernetesAuthConfig {
            timeout: Duration::from_millis(200),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let err = refused(&auth, "any").await;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("no answer"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_cache_expires_and_stays_bounded() {
    let fake = FakeApiServer::start().await;
    for (token, node) in [("t1", "n1"), ("t2", "n2"), ("t3", "n3")] {
        fake.add_token(
            token,
            &["istio-ca"],
            sa_user("istio-system", "ztunnel", on_node(node)),
        );
    }
    let auth = KubernetesAuthenticator::new(
        fake.client(),
        KubernetesAuthConfig {
            cache_capacity: 2,
            cache_ttl: Duration::from_millis(300),
            ..Default::default()
        },
    );
    for token in ["t1", "t2", "t3", "t3", "t2"] {
        auth.authenticate(&bearer(token)).await.unwrap();
    }
    assert_eq!(fake.requests(REVIEWS), 3);
    assert_eq!(auth.lock().entries.len(), 2);
    // t1, the oldest, made room for t3.
    auth.authenticate(&bearer("t1")).await.unwrap();
    assert_eq!(fake.requests(REVIEWS), 4);

    tokio::time::sleep(Duration::from_millis(400)).await;
    auth.authenticate(&bearer("t1")).await.unwrap();
    assert_eq!(fake.requests(REVIEWS), 5);
}

#[test]
fn service_accounts_parse() {
    let sa: ServiceAccount = DEFAULT_NODE_PROXY_ACCOUNT.parse().unwrap();
    assert_eq!(sa.to_string(), "istio-system/ztunnel");
    assert_eq!(
        KubernetesAuthConfig::default().node_proxy_accounts,
        vec![sa]
    );
    for bad in ["ztunnel", "/ztunnel", "istio-system/", "a/b/c", ""] {
        assert!(bad.parse::<ServiceAccount>().is_err(), "{bad}");
    }
}

mod waypoints {
    use super::*;
    use crate::ca_service::{CaService, IMPERSONATED_IDENTITY};
    use crate::metrics::Metrics;
    use mesh_core::ca::{generate_csr, CertificateAuthority};
    use mesh_core::config::{parse_mesh_config, MeshConfig};
    use mesh_core::proto::istio::ca::istio_certificate_service_server::IstioCertificateService;
    use mesh_core::proto::istio::ca::IstioCertificateRequest;
    use mesh_core::Identity;
    use tokio::sync::watch;

    fn demo_pod(name: &str, sa: &str, gateway: Option<&str>) -> Value {
        let labels = match gateway {
            Some(g) => json!({"gateway.networking.k8s.io/gateway-name": g}),
            None => json!({}),
        };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo", "labels": labels},
            "spec": {"serviceAccountName": sa, "nodeName": "node-a", "containers": []},
        })
    }

    /// The model: on node-a, the waypoint pod of Gateway demo/wp (account
    /// wp), an application pod, and `lookalike-0`, labelled for Gateway
    /// demo/not-wp, which is not of class istio-waypoint, so the model does
    /// not count it as a waypoint.
    const MESH: &str = r#"
workloads:
- {name: wp-0, namespace: demo, serviceAccount: wp, node: node-a, addresses: [10.0.0.9], nativeTunnel: true}
- {name: app-0, namespace: demo, serviceAccount: app, node: node-a, addresses: [10.0.0.2]}
- {name: lookalike-0, namespace: demo, serviceAccount: lookalike, node: node-a, addresses: [10.0.0.3]}
"#;

    struct World {
        fake: FakeApiServer,
        ca: CaService,
        metrics: Arc<Metrics>,
    }

    async fn world() -> World {
        let fake = FakeApiServer::start().await;
        fake.apply(demo_pod("wp-0", "wp", Some("wp")));
        // The waypoint's account running a pod that is no waypoint.
        fake.apply(demo_pod("debug", "wp", None));
        fake.apply(demo_pod("lookalike-0", "lookalike", Some("not-wp")));
        fake.apply(demo_pod("app-0", "app", None));
        for (token, pod, sa) in [
            ("wp-token", "wp-0", "wp"),
            ("wp-on-debug", "debug", "wp"),
            ("lookalike", "lookalike-0", "lookalike"),
            ("app", "app-0", "app"),
        ] {
            let uid = uid_of(&fake, "demo", pod).await;
            fake.add_token(token, &["istio-ca"], sa_user("demo", sa, of_pod(pod, &uid)));
        }
        fake.add_token(
            "zt-a",
            &["istio-ca"],
            sa_user("istio-system", "ztunnel", on_node("node-a")),
        );
        let mesh: Arc<MeshConfig> = Arc::new(parse_mesh_config(MESH).unwrap());
        let (_tx, rx) = watch::channel(mesh);
        // The sender may go: the CA reads the last value.
        let metrics = Arc::new(Metrics::new());
        let ca = CaService::new(
            Arc::new(CertificateAuthority::generate("cluster.local").unwrap()),
            Arc::new(authenticator(&fake)),
            rx,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .with_metrics(metrics.clone());
        World { fake, ca, metrics }
    }

    fn sa(name: &str) -> String {
        format!("spiffe://cluster.local/ns/demo/sa/{name}")
    }

    /// Asks the CA for `identity` with `token`.
    async fn ask(w: &World, token: &str, identity: &str) -> Result<Vec<String>, Status> {
        let id: Identity = identity.parse().unwrap();
        let (csr, _) = generate_csr(&id).unwrap();
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: Some(prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.into())),
                    },
                )]
                .into(),
            }),
        });
        *request.metadata_mut() = bearer(token);
        w.ca.create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }

    #[tokio::test]
    async fn a_waypoint_token_obtains_its_own_identity_only() {
        let w = world().await;
        let chain = ask(&w, "wp-token", &sa("wp")).await.unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(
            authenticator(&w.fake)
                .authenticate(&bearer("wp-token"))
                .await
                .unwrap(),
            Caller::Waypoint(WaypointCaller {
                namespace: "demo".into(),
                pod: "wp-0".into(),
                service_account: Some("wp".into()),
            })
        );

        // Not its neighbour's, though it runs on the same node.
        let err = ask(&w, "wp-token", &sa("app")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "waypoint pod demo/wp-0 may obtain only its own identity \
             spiffe://cluster.local/ns/demo/sa/wp, not spiffe://cluster.local/ns/demo/sa/app"
        );
        let text = w.metrics.encode();
        assert!(
            text.contains("istiod_ca_requests_total{result=\"issued\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("istiod_ca_requests_total{result=\"denied\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_waypoint_account_on_another_pod_or_a_lookalike_is_refused() {
        let w = world().await;
        let err = ask(&w, "wp-on-debug", &sa("wp")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "service account demo/wp may not act for a node (allowed: istio-system/ztunnel), \
             nor as a waypoint: its pod demo/debug is not a waypoint pod (no label \
             gateway.networking.k8s.io/gateway-name)"
        );
        // Labelled, but for a Gateway the model does not take as a waypoint.
        let err = ask(&w, "lookalike", &sa("lookalike")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message()
                .starts_with("pod demo/lookalike-0 is not a waypoint pod: it must be labelled"),
            "{err:?}"
        );
        // An ordinary workload's token is no credential at all.
        let err = ask(&w, "app", &sa("app")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("is not a waypoint pod"), "{err:?}");
        let text = w.metrics.encode();
        assert!(
            text.contains("istiod_ca_requests_total{result=\"denied\"} 3"),
            "{text}"
        );
        assert!(!text.contains("result=\"issued\""), "{text}");
    }

    #[tokio::test]
    async fn a_node_token_no_longer_obtains_its_waypoints_identity() {
        let w = world().await;
        let err = ask(&w, "zt-a", &sa("wp")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "identity spiffe://cluster.local/ns/demo/sa/wp is a waypoint's on node node-a: a \
             waypoint obtains its identity with its own token, a node's token cannot"
        );
        // Its other workloads' identities still.
        assert!(ask(&w, "zt-a", &sa("app")).await.is_ok());
        assert!(ask(&w, "zt-a", &sa("lookalike")).await.is_ok());
    }
}
