//! The Kubernetes backend: objects from the API server of a kubeconfig
//! context, component endpoints through the API server's pod proxy
//! subresource (`/api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH`, as
//! `kubectl get --raw` would reach them, no port-forward), and waypoints
//! declared by creating their Gateway.
//!
//! Lists are cluster-wide and unfiltered, then filtered here by label: one
//! request per kind whatever the question, and no reliance on server-side
//! selectors.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

use crate::backend::{
    waypoint_gateway, ApplyOutcome, Backend, Component, ComponentKind, Endpoint, WaypointApply,
};
use crate::http::Reply;
use crate::inventory::{self, Inventory, GATEWAY_NAME, USE_WAYPOINT};

/// Where ambitctl looks for the components, and their labels.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// The namespace of ztunnel and istiod-lite (`istio-system`).
    pub system_namespace: String,
    /// The `app` (Istio's manifests) or `app.kubernetes.io/name` (Ambit's
    /// Helm chart) label value of the ztunnel pods.
    pub ztunnel_app: String,
    /// The same for istiod-lite's pods.
    pub istiod_app: String,
    pub timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            kubeconfig: None,
            context: None,
            system_namespace: "istio-system".into(),
            ztunnel_app: "ztunnel".into(),
            istiod_app: "istiod-lite".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Container port names taken as a proxy's admin port and istiod-lite's
/// monitoring port; without one, the well-known port.
const ADMIN_PORT_NAMES: &[&str] = &["admin", "http-admin"];
const MONITORING_PORT_NAMES: &[&str] = &["http-monitoring", "monitoring"];

pub struct KubeBackend {
    client: kube::Client,
    /// Without retries, for the pod proxy.
    proxy_client: kube::Client,
    context: String,
    options: KubeOptions,
}

/// A custom resource type read or written here.
fn crd(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn gateway_resource() -> ApiResource {
    crd("gateway.networking.k8s.io", "v1", "Gateway", "gateways")
}

impl KubeBackend {
    /// Connects as kubectl would: `--kubeconfig`, else `KUBECONFIG`, else
    /// `~/.kube/config`, else the in-cluster service account.
    pub async fn connect(options: KubeOptions) -> anyhow::Result<KubeBackend> {
        let kube_options = KubeConfigOptions {
            context: options.context.clone(),
            ..Default::default()
        };
        let (config, context) = match &options.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                let ctx = options
                    .context
                    .clone()
                    .or_else(|| kc.current_context.clone())
                    .unwrap_or_else(|| "-".into());
                let config = kube::Config::from_custom_kubeconfig(kc, &kube_options)
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?;
                (config, ctx)
            }
            None if options.context.is_some() => {
                let config = kube::Config::from_kubeconfig(&kube_options)
                    .await
                    .context("loading the kubeconfig")?;
                (config, options.context.clone().unwrap_or_default())
            }
            None => {
                let config = kube::Config::infer().await.context(
                    "no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster); \
                     for a local cluster use --local FILE or AMBIT_LOCAL",
                )?;
                let ctx = Kubeconfig::read()
                    .ok()
                    .and_then(|k| k.current_context)
                    .unwrap_or_else(|| "in-cluster".into());
                (config, ctx)
            }
        };
        let url = config.cluster_url.to_string();
        // The pod proxy answers 503 for a component that is down: kube's
        // default retry would spend the whole timeout on it, and a
        // status report should say "unreachable" at once.
        let mut proxy_config = config.clone();
        proxy_config.default_retry = false;
        let proxy_client =
            kube::Client::try_from(proxy_config).context("creating the Kubernetes client")?;
        let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
        Ok(KubeBackend {
            client,
            proxy_client,
            context: format!("{context} ({url})"),
            options,
        })
    }

    /// For tests: an existing client.
    pub fn with_client(client: kube::Client, options: KubeOptions) -> KubeBackend {
        KubeBackend {
            proxy_client: client.clone(),
            client,
            context: "test".into(),
            options,
        }
    }

    async fn list<K>(&self) -> anyhow::Result<Vec<Value>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
        <K as kube::Resource>::DynamicType: Default,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let list = api
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing {}", K::plural(&Default::default())))?;
        list.items
            .into_iter()
            .map(|o| Ok(with_type::<K>(serde_json::to_value(o)?)))
            .collect()
    }

    /// A custom resource list; a CRD that is not installed is no objects.
    async fn list_crd(
        &self,
        ar: &ApiResource,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<Vec<Value>> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), ar);
        match api.list(&ListParams::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .map(|mut o| {
                    o.types.get_or_insert_with(|| kube::core::TypeMeta {
                        api_version: ar.api_version.clone(),
                        kind: ar.kind.clone(),
                    });
                    Ok(serde_json::to_value(o)?)
                })
                .collect(),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                notes.push(format!(
                    "{}.{} is not served (CRD not installed?)",
                    ar.plural, ar.group
                ));
                Ok(Vec::new())
            }
            Err(e) => Err(e).with_context(|| format!("listing {}.{}", ar.plural, ar.group)),
        }
    }

    fn proxy_path(namespace: &str, pod: &str, port: u16, path: &str) -> String {
        let path = path.strip_prefix('/').unwrap_or(path);
        format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/{path}")
    }
}

/// Typed lists carry no `kind` per item: put it back, as a manifest has it.
fn with_type<K: kube::Resource>(mut v: Value) -> Value
where
    K::DynamicType: Default,
{
    let dt = Default::default();
    v["kind"] = json!(K::kind(&dt));
    v["apiVersion"] = json!(K::api_version(&dt));
    v
}

impl Backend for KubeBackend {
    fn describe(&self) -> String {
        format!("kubernetes context {}", self.context)
    }

    async fn inventory(&self) -> anyhow::Result<Inventory> {
        let mut inv = Inventory::default();
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for ns in namespaces
            .list(&ListParams::default())
            .await
            .context("listing namespaces")?
            .items
        {
            inv.add(with_type::<Namespace>(serde_json::to_value(ns)?));
        }
        for p in self.list::<Pod>().await? {
            inv.add(p);
        }
        for s in self.list::<Service>().await? {
            inv.add(s);
        }
        let mut notes = Vec::new();
        for ar in [
            gateway_resource(),
            crd(
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
            crd(
                "security.istio.io",
                "v1",
                "PeerAuthentication",
                "peerauthentications",
            ),
        ] {
            for o in self.list_crd(&ar, &mut notes).await? {
                inv.add(o);
            }
        }
        inv.notes = notes;
        Ok(inv)
    }

    async fn components(&self) -> anyhow::Result<Vec<Component>> {
        let pods = self.list::<Pod>().await?;
        let o = &self.options;
        let has = |p: &Value, app: &str| {
            ["app", "app.kubernetes.io/name"]
                .iter()
                .any(|k| inventory::label(p, k) == Some(app))
        };
        let running = |p: &&Value| {
            p["metadata"]["deletionTimestamp"].is_null()
                && !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
        };
        let mut out = Vec::new();
        for p in pods.iter().filter(running) {
            let (ns, name) = (inventory::namespace(p), inventory::name(p));
            let node = inventory::pod_node(p).map(str::to_string);
            let endpoint = |names: &[&str], default: u16| Endpoint::PodProxy {
                namespace: ns.to_string(),
                pod: name.to_string(),
                port: inventory::named_port(p, names).unwrap_or(default),
            };
            let in_system = ns == o.system_namespace;
            let (kind, cname, endpoint) = if in_system && has(p, &o.istiod_app) {
                (
                    ComponentKind::ControlPlane,
                    format!("{ns}/{name}"),
                    endpoint(MONITORING_PORT_NAMES, 15014),
                )
            } else if in_system && has(p, &o.ztunnel_app) {
                (
                    ComponentKind::Ztunnel,
                    node.clone().unwrap_or_else(|| format!("{ns}/{name}")),
                    endpoint(ADMIN_PORT_NAMES, 15000),
                )
            } else if let Some(gw) = inventory::label(p, GATEWAY_NAME) {
                (
                    ComponentKind::Waypoint,
                    format!("{ns}/{gw}"),
                    endpoint(ADMIN_PORT_NAMES, 15000),
                )
            } else {
                continue;
            };
            out.push(Component {
                kind,
                name: cname,
                node,
                pod: Some(format!("{ns}/{name}")),
                endpoint,
            });
        }
        Ok(out)
    }

    async fn get(&self, component: &Component, path: &str) -> anyhow::Result<Reply> {
        let Endpoint::PodProxy {
            namespace,
            pod,
            port,
        } = &component.endpoint
        else {
            bail!("{} is not a pod of this cluster", component.name);
        };
        let uri = Self::proxy_path(namespace, pod, *port, path);
        let req = http::Request::get(&uri)
            .body(kube::client::Body::empty())
            .context("building the request")?;
        let fetch = async {
            let resp = self
                .proxy_client
                .send(req)
                .await
                .with_context(|| format!("GET {uri}"))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading {uri}: {e}"))?
                .to_bytes();
            anyhow::Ok(Reply {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        let reply = tokio::time::timeout(self.options.timeout, fetch)
            .await
            .with_context(|| format!("GET {uri}: no answer within {:?}", self.options.timeout))??;
        // The API server's own refusal (no such pod, cannot dial it) is a
        // Status object; the component's answers are not.
        if reply.status >= 400 {
            if let Ok(status) = serde_json::from_str::<Value>(&reply.body) {
                if status["kind"] == "Status" {
                    bail!(
                        "API server proxy to pod {namespace}/{pod}:{port}: {} ({})",
                        status["message"].as_str().unwrap_or("failed"),
                        reply.status
                    );
                }
            }
        }
        Ok(reply)
    }

    async fn apply_waypoint(&self, req: &WaypointApply) -> anyhow::Result<ApplyOutcome> {
        let ar = gateway_resource();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &req.namespace, &ar);
        let gateway = waypoint_gateway(&req.namespace, &req.name);
        let obj: DynamicObject = serde_json::from_value(gateway.clone())?;
        let location = format!(
            "Gateway {}/{} via {}",
            req.namespace, req.name, self.context
        );
        let state = match api.create(&PostParams::default(), &obj).await {
            Ok(_) => "created",
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let current = api
                    .get(&req.name)
                    .await
                    .with_context(|| format!("reading Gateway {}/{}", req.namespace, req.name))?;
                let class = current.data["spec"]["gatewayClassName"].as_str().unwrap_or("");
                if class != inventory::WAYPOINT_CLASS {
                    bail!(
                        "Gateway {}/{} exists with class {class:?}, not {}",
                        req.namespace,
                        req.name,
                        inventory::WAYPOINT_CLASS
                    );
                }
                "unchanged"
            }
            Err(kube::Error::Api(e)) if e.code == 404 => bail!(
                "creating Gateway {}/{}: {} (are the Gateway API CRDs installed, and namespace {} there?)",
                req.namespace,
                req.name,
                e.message,
                req.namespace
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("creating Gateway {}/{}", req.namespace, req.name)
                })
            }
        };
        if req.enroll_namespace {
            let namespaces: Api<Namespace> = Api::all(self.client.clone());
            let patch = json!({"metadata": {"labels": {USE_WAYPOINT: req.name}}});
            namespaces
                .patch(
                    &req.namespace,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .with_context(|| {
                    format!(
                        "labelling namespace {} {USE_WAYPOINT}={}",
                        req.namespace, req.name
                    )
                })?;
        }
        Ok(ApplyOutcome {
            gateway: state.into(),
            location,
            namespace_labelled: req.enroll_namespace,
            object: gateway,
        })
    }
}
