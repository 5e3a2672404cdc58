//! The waypoint deployer against the in-process fake API server, and the
//! fake's write semantics the deployer relies on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use super::objects::WaypointTemplate;
use super::{run, template, DeployerConfig, DeployerMetrics, DeployerSettings};
use kube_fake::FakeApiServer;

const MANAGED: [&str; 4] = ["ServiceAccount", "ConfigMap", "Service", "Deployment"];

fn test_template() -> WaypointTemplate {
    WaypointTemplate {
        image: "registry.test/ambit/waypoint:1".into(),
        xds_address: "https://istiod-lite.istio-system.svc:15012".into(),
        control_plane_name: "istiod.istio-system.svc".into(),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        otlp_endpoint: None,
        token_audience: "istio-ca".into(),
        root_cert_pem: "-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n".into(),
    }
}

fn gateway(ns: &str, name: &str, class: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

struct Harness {
    fake: FakeApiServer,
    registry: Arc<Mutex<Registry>>,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut DeployerConfig)) -> Harness {
        let fake = FakeApiServer::start_with(Duration::from_millis(100)).await;
        let mut registry = Registry::with_prefix("istiod");
        let mut config =
            DeployerConfig::new(test_template(), DeployerMetrics::register(&mut registry));
        // Long enough that every test below passes on events alone.
        config.resync = Duration::from_secs(3600);
        config.debounce = Duration::from_millis(20);
        config.min_backoff = Duration::from_millis(50);
        config.max_backoff = Duration::from_millis(400);
        tune(&mut config);
        tokio::spawn(run(fake.client(), config));
        Harness {
            fake,
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    fn scrape(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }

    fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.fake.get(kind, ns, name)
    }

    /// Waits until `cond` holds of the object (or of its absence).
    async fn until(
        &self,
        what: &str,
        kind: &str,
        ns: &str,
        name: &str,
        cond: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let obj = self.get(kind, ns, name);
            if cond(obj.as_ref()) {
                return obj;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out: {what}; {kind} {ns}/{name} is {obj:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn until_exists(&self, kind: &str, ns: &str, name: &str) -> Value {
        self.until("exists", kind, ns, name, |o| o.is_some())
            .await
            .unwrap_or_default()
    }

    async fn until_condition(
        &self,
        ns: &str,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Value {
        self.until(
            &format!("{type_}={status} ({reason})"),
            "Gateway",
            ns,
            name,
            |g| condition(g, type_).is_some_and(|c| c["status"] == status && c["reason"] == reason),
        )
        .await
        .unwrap_or_default()
    }

    async fn until_metric(&self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.scrape();
            if text.contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle} in\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn condition(gateway: Option<&Value>, type_: &str) -> Option<Value> {
    gateway?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn owner_uid(obj: &Value) -> Value {
    let owners = obj["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(owners.len(), 1, "{obj:#}");
    assert_eq!(owners[0]["kind"], "Gateway");
    assert_eq!(owners[0]["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(owners[0]["controller"], true);
    assert_eq!(owners[0]["blockOwnerDeletion"], true);
    owners[0]["uid"].clone()
}

#[tokio::test]
async fn a_waypoint_gateway_gets_its_objects_and_status() {
    let h = Harness::start().await;
    h.fake.apply(gateway("demo", "wp", "istio-waypoint"));
    h.fake.apply(gateway("demo", "ingress", "istio"));
    let gw = h
        .until_condition("demo", "wp", "Programmed", "True", "Programmed")
        .await;
    let uid = gw["metadata"]["uid"].clone();
    for kind in MANAGED {
        let name = if kind == "ConfigMap" {
            "wp-ca-root-cert"
        } else {
            "wp"
        };
        let obj = h.until_exists(kind, "demo", name).await;
        assert_eq!(owner_uid(&obj), uid, "{kind} is owned by the Gateway");
        assert_eq!(
            obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "wp"
        );
        assert_eq!(
            obj["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "istiod-lite"
        );
    }
    let d = h.get("Deployment", "demo", "wp").unwrap();
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.test/ambit/waypoint:1");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--gateway", "demo/wp"]),
        "{args:?}"
    );
    assert!(
        args.windows(2).any(|w| w
            == [
                "--xds-address",
                "https://istiod-lite.istio-system.svc:15012"
            ]),
        "{args:?}"
    );
    assert_eq!(d["spec"]["template"]["spec"]["serviceAccountName"], "wp");
    let svc = h.get("Service", "demo", "wp").unwrap();
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [15008, 15021, 15020]);
    assert_eq!(
        h.get("ConfigMap", "demo", "wp-ca-root-cert").unwrap()["data"]["root-cert.pem"],
        test_template().root_cert_pem
    );

    // Status: accepted, programmed, and the Service's cluster IP as address.
    let ip = svc["spec"]["clusterIP"].as_str().unwrap();
    assert!(ip.starts_with("10.96."), "{ip}");
    assert_eq!(
        gw["status"]["addresses"],
        json!([{"type": "IPAddress", "value": ip}])
    );
    let accepted = condition(Some(&gw), "Accepted").unwrap();
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    assert_eq!(accepted["observedGeneration"], 1);

    // Other classes are not ours: no objects, no status.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for kind in MANAGED {
        assert!(
            h.get(kind, "demo", "ingress").is_none(),
            "{kind} for a non-waypoint Gateway"
        );
    }
    assert!(h
        .get("Gateway", "demo", "ingress")
        .unwrap()
        .get("status")
        .is_none());
    h.until_metric("istiod_waypoint_reconciles_total{result=\"programmed\"} 1")
        .await;
    assert!(
        h.scrape().contains("istiod_waypoint_gateways 1"),
        "{}",
        h.scrape()
    );

    // Settled: nothing is written again on its own.
    let applies = h.fake.requests("apply /apis/apps/v1/deployments");
    let status_writes = h
        .fake
        .requests("patch status /apis/gateway.networking.k8s.io/v1/gateways");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.fake.requests("apply /apis/apps/v1/deployments"), applies);
    assert_eq!(
        h.fake
            .requests("patch status /apis/gateway.networking.k8s.io/v1/gateways"),
        status_writes
    );
}

#[tokio::test]
async fn a_gateway_change_updates_the_objects() {
    let h = Harness::start().await;
    h.fake.apply(gateway("demo", "wp", "istio-waypoint"));
    h.until_condition("demo", "wp", "Programmed", "True", "Programmed")
        .await;

    let mut changed = gateway("demo", "wp", "istio-waypoint");
    changed["spec"]["infrastructure"] =
        json!({"labels": {"team": "payments"}, "annotations": {"owner": "ops"}});
    h.fake.apply(changed);
    for kind in ["ServiceAccount", "Service", "Deployment"] {
        h.until("infrastructure label", kind, "demo", "wp", |o| {
            o.is_some_and(|o| {
                o["metadata"]["labels"]["team"] == "payments"
                    && o["metadata"]["annotations"]["owner"] == "ops"
            })
        })
        .await;
    }
    let d = h.get("Deployment", "demo", "wp").unwrap();
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["team"],
        "payments"
    );
    assert_eq!(
        d["metadata"]["generation"], 2,
        "the pod template changed once"
    );
    // The status follows the new generation.
    h.until("observedGeneration 2", "Gateway", "demo", "wp", |g| {
        condition(g, "Programmed").is_some_and(|c| c["observedGeneration"] == 2)
    })
    .await;

    // No longer a waypoint: what it owned goes, the Gateway stays.
    h.fake.apply(gateway("demo", "wp", "istio"));
    for kind in MANAGED {
        let name = if kind == "ConfigMap" {
            "wp-ca-root-cert"
        } else {
            "wp"
        };
        h.until("removed", kind, "demo", name, |o| o.is_none())
            .await;
    }
    assert!(h.get("Gateway", "demo", "wp").is_some());
    h.until_metric("istiod_waypoint_reconciles_total{result=\"removed\"} 1")
        .await;
}

#[tokio::test]
async fn drift_and_deletion_by_someone_else_are_undone() {
    let h = Harness::start().await;
    h.fake.apply(gateway("demo", "wp", "istio-waypoint"));
    h.until_condition("demo", "wp", "Programmed", "True", "Programmed")
        .await;
    let first = h.until_exists("Deployment", "demo", "wp").await;

    // Someone deletes the Deployment: it comes back (a new object).
    assert!(h.fake.delete("Deployment", "demo", "wp"));
    let again = h
        .until("recreated", "Deployment", "demo", "wp", |o| {
            o.is_some_and(|o| o["metadata"]["uid"] != first["metadata"]["uid"])
        })
        .await
        .unwrap();
    assert_eq!(
        again["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.test/ambit/waypoint:1"
    );

    // Someone changes the image: it is set back.
    let mut edited = again.clone();
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil/waypoint");
    h.fake.apply(edited);
    h.until("image restored", "Deployment", "demo", "wp", |o| {
        o.is_some_and(|o| {
            o["spec"]["template"]["spec"]["containers"][0]["image"]
                == "registry.test/ambit/waypoint:1"
        })
    })
    .await;

    // The Service too, and the status keeps pointing at its address.
    assert!(h.fake.delete("Service", "demo", "wp"));
    let svc = h.until_exists("Service", "demo", "wp").await;
    let ip = svc["spec"]["clusterIP"].clone();
    h.until(
        "address follows the new Service",
        "Gateway",
        "demo",
        "wp",
        |g| g.is_some_and(|g| g["status"]["addresses"][0]["value"] == ip),
    )
    .await;
}

#[tokio::test]
async fn deleting_the_gateway_deletes_the_waypoint() {
    let h = Harness::start().await;
    h.fake.apply(gateway("demo", "wp", "istio-waypoint"));
    h.fake.apply(gateway("demo", "other", "istio-waypoint"));
    h.until_condition("demo", "wp", "Programmed", "True", "Programmed")
        .await;
    h.until_condition("demo", "other", "Programmed", "True", "Programmed")
        .await;

    assert!(h.fake.delete("Gateway", "demo", "wp"));
    // The garbage collector's work, and the deployer does not undo it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for kind in MANAGED {
        let name = if kind == "ConfigMap" {
            "wp-ca-root-cert"
        } else {
            "wp"
        };
        assert!(
            h.get(kind, "demo", name).is_none(),
            "{kind} outlived its Gateway"
        );
        assert!(
            h.fake.requests(&format!("collected {}", path(kind))) >= 1,
            "{kind} collected"
        );
    }
    // The other waypoint is untouched.
    for kind in ["ServiceAccount", "Service", "Deployment"] {
        assert!(
            h.get(kind, "demo", "other").is_some(),
            "{kind} of the other Gateway"
        );
    }
}

fn path(kind: &str) -> &'static str {
    match kind {
        "ServiceAccount" => "/api/v1/serviceaccounts",
        "ConfigMap" => "/api/v1/configmaps",
        "Service" => "/api/v1/services",
        "Deployment" => "/apis/apps/v1/deployments",
        _ => unreachable!("{kind}"),
    }
}

#[tokio::test]
async fn gateways_that_cannot_have_a_waypoint_get_a_reason_and_nothing_else() {
    let h = Harness::start().await;
    h.fake.apply(gateway("demo", "wp.v1", "istio-waypoint"));
    let mut addressed = gateway("demo", "fixed-ip", "istio-waypoint");
    addressed["spec"]["addresses"] = json!([{"type": "IPAddress", "value": "10.1.2.3"}]);
    h.fake.apply(addressed);

    let g = h
        .until_condition("demo", "wp.v1", "Accepted", "False", "Invalid")
        .await;
    let message = condition(Some(&g), "Accepted").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("wp.v1"), "{message}");
    assert_eq!(
        condition(Some(&g), "Programmed").unwrap()["status"],
        "False"
    );
    h.until_condition(
        "demo",
        "fixed-ip",
        "Accepted",
        "False",
        "UnsupportedAddress",
    )
    .await;
    h.until_metric("istiod_waypoint_rejected_gateways_total{reason=\"Invalid\"}")
        .await;
    h.until_metric("istiod_waypoint_rejected_gateways_total{reason=\"UnsupportedAddress\"}")
        .await;
    for kind in MANAGED {
        assert_eq!(
            h.fake.requests(&format!("apply {}", path(kind))),
            0,
            "{kind} applied"
        );
    }

    // Fixing the Gateway deploys it.
    h.fake.apply(gateway("demo", "fixed-ip", "istio-waypoint"));
    h.until_condition("demo", "fixed-ip", "Programmed", "True", "Programmed")
        .await;
    h.until_exists("Deployment", "demo", "fixed-ip").await;
}

#[tokio::test]
async fn api_errors_are_counted_and_retried_with_backoff() {
    let h = Harness::start().await;
    h.fake.uninstall("Deployment");
    h.fake.apply(gateway("demo", "wp", "istio-waypoint"));
    let g = h
        .until_condition("demo", "wp", "Programmed", "False", "Pending")
        .await;
    let message = condition(Some(&g), "Programmed").unwrap()["message"].clone();
    assert!(
        message.as_str().unwrap().contains("Deployment"),
        "{message}"
    );
    // Retried: more than one failed apply, each counted.
    h.until_metric("istiod_waypoint_api_errors_total{kind=\"Deployment\",operation=\"apply\"} 3")
        .await;
    assert!(h
        .scrape()
        .contains("istiod_waypoint_reconciles_total{result=\"failed\"}"));
    // What could be written was.
    assert!(h.get("Service", "demo", "wp").is_some());

    h.fake.install("Deployment");
    h.until_condition("demo", "wp", "Programmed", "True", "Programmed")
        .await;
    h.until_exists("Deployment", "demo", "wp").await;
}

#[tokio::test]
async fn resync_repairs_what_no_event_reported() {
    let h = Harness::start_with(|c| c.resync = Duration::from_millis(300)).await;
    h.fake.apply(gateway("demo", "wp", "istio-waypoint"));
    h.until_condition("demo", "wp", "Programmed", "True", "Programmed")
        .await;
    // Watches that see nothing: only the periodic re-apply can notice.
    h.fake.pause_watches();
    assert!(h.fake.delete("ServiceAccount", "demo", "wp"));
    h.until_exists("ServiceAccount", "demo", "wp").await;
    h.fake.resume_watches();
}

#[tokio::test]
async fn without_an_image_nothing_is_deployed() {
    let fake = FakeApiServer::start().await;
    let client = fake.client();
    for image in [None, Some(String::new()), Some("  ".to_string())] {
        let settings = DeployerSettings {
            image,
            ..Default::default()
        };
        assert!(template(&client, settings).is_none());
    }
    // With one, the address defaults to istiod-lite in our own namespace.
    let t = template(
        &client,
        DeployerSettings {
            image: Some("img".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        t.xds_address,
        format!(
            "https://istiod-lite.{}.svc:15012",
            client.default_namespace()
        )
    );
    let t = template(
        &client,
        DeployerSettings {
            image: Some("img".into()),
            xds_address: Some("https://cp.example:15012".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.xds_address, "https://cp.example:15012");
}

#[tokio::test]
async fn serve_refuses_waypoint_flags_without_kubernetes() {
    let dir = std::env::temp_dir().join(format!("istiod-waypoint-flags-{}", std::process::id()));
    let options = crate::serve::ServeOptions {
        source: crate::serve::SourceKind::Manifests,
        manifests: Some(dir.clone()),
        data_dir: dir.join("ca"),
        mesh: crate::pipeline::MeshOptions::new("cluster.local", "istio-system"),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        xds_plaintext_addr: None,
        monitoring_addr: "127.0.0.1:0".parse().unwrap(),
        bootstrap_tokens: Some(dir.join("tokens.yaml")),
        token_audiences: vec![],
        node_proxy_accounts: vec![],
        cert_ttl: Duration::from_secs(3600),
        max_cert_ttl: Duration::from_secs(3600),
        serving_dns: vec![],
        serving_ips: vec![],
        poll_interval: Duration::from_millis(100),
        waypoint_image: Some("img".into()),
        waypoint_xds_address: None,
        waypoint_otlp_endpoint: None,
    };
    let e = tokio::task::spawn_blocking(move || crate::serve::run(options))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("--waypoint-image"), "{e}");
    assert!(!dir.exists(), "refused before touching anything");
}

// The fake API server's writes, as the deployer uses them.

fn resource(kind: &str) -> ApiResource {
    match kind {
        "Deployment" => ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
        "Service" => ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
        "ConfigMap" => ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        _ => ApiResource::erase::<k8s_openapi::api::core::v1::ServiceAccount>(&()),
    }
}

fn config_map(name: &str, data: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "demo", "labels": labels},
           "data": {"k": data}})
}

fn object(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn fake_api_server_creates_applies_and_deletes() {
    let fake = FakeApiServer::start_with(Duration::from_millis(100)).await;
    let cms: Api<DynamicObject> =
        Api::namespaced_with(fake.client(), "demo", &resource("ConfigMap"));
    let watch_all: Api<DynamicObject> = Api::all_with(fake.client(), &resource("ConfigMap"));
    let list = watch_all.list(&ListParams::default()).await.unwrap();
    let mut events = watch_all
        .watch(
            &WatchParams::default().timeout(10),
            &list.metadata.resource_version.unwrap(),
        )
        .await
        .unwrap()
        .boxed();

    // Create, once.
    let created = cms
        .create(
            &PostParams::default(),
            &object(config_map("a", "1", json!({}))),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    match cms
        .create(
            &PostParams::default(),
            &object(config_map("a", "1", json!({}))),
        )
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected 409, got {other:?}"),
    }

    // Apply: a change bumps the version, a no-op does not.
    let ssa = PatchParams::apply("test").force();
    let applied = cms
        .patch("a", &ssa, &Patch::Apply(config_map("a", "2", json!({}))))
        .await
        .unwrap();
    assert_eq!(applied.data["data"]["k"], "2");
    assert_eq!(applied.metadata.uid, created.metadata.uid);
    assert_ne!(
        applied.metadata.resource_version,
        created.metadata.resource_version
    );
    let again = cms
        .patch("a", &ssa, &Patch::Apply(config_map("a", "2", json!({}))))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        applied.metadata.resource_version
    );
    // Apply creates, too; a field manager is required; merge patches are refused.
    cms.patch(
        "b",
        &ssa,
        &Patch::Apply(config_map("b", "1", json!({"sel": "yes"}))),
    )
    .await
    .unwrap();
    let no_manager = cms
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Apply(config_map("b", "1", json!({}))),
        )
        .await;
    assert!(
        matches!(&no_manager, Err(kube::Error::Api(e)) if e.code == 422),
        "{no_manager:?}"
    );
    let merge = cms
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "x"}})),
        )
        .await;
    assert!(
        matches!(&merge, Err(kube::Error::Api(e)) if e.code == 415),
        "{merge:?}"
    );

    // Delete, once.
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let gone = cms.delete("a", &DeleteParams::default()).await;
    assert!(
        matches!(&gone, Err(kube::Error::Api(e)) if e.code == 404),
        "{gone:?}"
    );

    let mut seen = Vec::new();
    while seen.len() < 4 {
        match events.next().await.unwrap().unwrap() {
            WatchEvent::Added(o) => seen.push(format!("added {}", o.metadata.name.unwrap())),
            WatchEvent::Modified(o) => seen.push(format!("modified {}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => seen.push(format!("deleted {}", o.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen, ["added a", "modified a", "added b", "deleted a"]);

    // A Service gets a cluster IP, and keeps it across applies.
    let svcs: Api<DynamicObject> =
        Api::namespaced_with(fake.client(), "demo", &resource("Service"));
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                     "spec": {"ports": [{"port": 80}]}});
    let first = svcs.patch("s", &ssa, &Patch::Apply(&svc)).await.unwrap();
    let ip = first.data["spec"]["clusterIP"].clone();
    assert!(
        ip.as_str().is_some_and(|ip| ip.starts_with("10.96.")),
        "{ip}"
    );
    let second = svcs.patch("s", &ssa, &Patch::Apply(&svc)).await.unwrap();
    assert_eq!(second.data["spec"]["clusterIP"], ip);
}

#[tokio::test]
async fn fake_api_server_selects_by_label() {
    let fake = FakeApiServer::start_with(Duration::from_millis(100)).await;
    let cms: Api<DynamicObject> =
        Api::namespaced_with(fake.client(), "demo", &resource("ConfigMap"));
    let all: Api<DynamicObject> = Api::all_with(fake.client(), &resource("ConfigMap"));
    let ssa = PatchParams::apply("test");
    cms.patch(
        "in",
        &ssa,
        &Patch::Apply(config_map("in", "1", json!({"m": "yes"}))),
    )
    .await
    .unwrap();
    cms.patch(
        "out",
        &ssa,
        &Patch::Apply(config_map("out", "1", json!({"m": "no"}))),
    )
    .await
    .unwrap();
    let names = |l: kube::core::ObjectList<DynamicObject>| {
        l.items
            .into_iter()
            .map(|o| o.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("m=yes"))
                .await
                .unwrap()
        ),
        ["in"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("m!=yes"))
                .await
                .unwrap()
        ),
        ["out"]
    );
    assert_eq!(
        names(all.list(&ListParams::default().labels("m")).await.unwrap()).len(),
        2
    );
    assert!(names(all.list(&ListParams::default().labels("!m")).await.unwrap()).is_empty());

    let rv = all
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = all
        .watch(&WatchParams::default().labels("m=yes").timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    cms.patch(
        "out",
        &ssa,
        &Patch::Apply(config_map("out", "2", json!({"m": "no"}))),
    )
    .await
    .unwrap();
    cms.patch(
        "in",
        &ssa,
        &Patch::Apply(config_map("in", "2", json!({"m": "yes"}))),
    )
    .await
    .unwrap();
    let mut bookmarked = false;
    let mut modified = Vec::new();
    while !bookmarked {
        match events.next().await.unwrap().unwrap() {
            WatchEvent::Modified(o) => modified.push(o.metadata.name.unwrap()),
            // Bookmarks still come: filtered-out changes count as delivered.
            WatchEvent::Bookmark(_) => bookmarked = true,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(modified, ["in"]);
}

#[tokio::test]
async fn fake_api_server_collects_garbage() {
    let fake = FakeApiServer::start().await;
    fake.apply(gateway("demo", "owner", "istio-waypoint"));
    let owner_uid = fake.get("Gateway", "demo", "owner").unwrap()["metadata"]["uid"].clone();
    let ssa = PatchParams::apply("test");
    let cms: Api<DynamicObject> =
        Api::namespaced_with(fake.client(), "demo", &resource("ConfigMap"));
    let owned_by =
        |uid: &Value| json!([{"apiVersion": "x/v1", "kind": "K", "name": "n", "uid": uid}]);
    let mut child = config_map("child", "1", json!({}));
    child["metadata"]["ownerReferences"] = owned_by(&owner_uid);
    let child = cms
        .patch("child", &ssa, &Patch::Apply(&child))
        .await
        .unwrap();
    let mut grandchild = config_map("grandchild", "1", json!({}));
    grandchild["metadata"]["ownerReferences"] = owned_by(&json!(child.metadata.uid.unwrap()));
    cms.patch("grandchild", &ssa, &Patch::Apply(&grandchild))
        .await
        .unwrap();
    let free = config_map("free", "1", json!({}));
    cms.patch("free", &ssa, &Patch::Apply(&free)).await.unwrap();

    assert!(fake.delete("Gateway", "demo", "owner"));
    assert!(fake.get("ConfigMap", "demo", "child").is_none());
    assert!(fake.get("ConfigMap", "demo", "grandchild").is_none());
    assert!(
        fake.get("ConfigMap", "demo", "free").is_some(),
        "no owner, not garbage"
    );
    assert_eq!(fake.requests("collected /api/v1/configmaps"), 2);

    // Written with an owner that no longer exists: collected at once.
    let mut orphan = config_map("orphan", "1", json!({}));
    orphan["metadata"]["ownerReferences"] = owned_by(&owner_uid);
    cms.patch("orphan", &ssa, &Patch::Apply(&orphan))
        .await
        .unwrap();
    assert!(fake.get("ConfigMap", "demo", "orphan").is_none());
}
