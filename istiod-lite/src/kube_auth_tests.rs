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

async fn refused(auth: &KubernetesAuthenticator, token: &str) -> Status {
    match auth.authenticate(&bearer(token)).await {
        Ok(node) => panic!("{token}: accepted as {node}"),
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

    assert_eq!(auth.authenticate(&bearer("zt-a")).await.unwrap(), "node-a");
    // Reconnects within the TTL do not ask again; no pod was read.
    assert_eq!(
        auth.clone().authenticate(&bearer("zt-a")).await.unwrap(),
        "node-a"
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
        "service account demo/web may not act for a node (allowed: istio-system/ztunnel)"
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
    assert_eq!(auth.authenticate(&bearer("web")).await.unwrap(), "node-a");
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
        "node-a"
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

    assert_eq!(auth.authenticate(&bearer("bound")).await.unwrap(), "node-b");
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
