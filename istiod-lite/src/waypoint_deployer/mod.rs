//! Waypoints deployed by istiod-lite itself (Kubernetes mode), as Istio
//! does: for every `Gateway` of class `istio-waypoint`, a ServiceAccount, a
//! ConfigMap with the mesh root, a Service and a Deployment running the
//! `waypoint` binary, in the Gateway's namespace and named after it
//! ([`objects`]). Off unless an image is given (`--waypoint-image`).
//!
//! * Every object is written with server-side apply (field manager
//!   `istiod-lite`, forced): writing the whole desired object again is a
//!   no-op when nothing changed and undoes any drift when something did.
//! * Every object has the Gateway as its controlling owner, so the
//!   Kubernetes garbage collector deletes it with the Gateway; the deployer
//!   itself deletes only what it owns under a Gateway that stopped being a
//!   waypoint (the owner is still there then).
//! * It re-applies when the Gateway changes, when one of its objects is
//!   changed or deleted by someone else (watches selected by the
//!   `app.kubernetes.io/managed-by=istiod-lite` label, so only managed
//!   objects are seen), and every `resync` as a safety net. Its own writes
//!   are recognised by their resourceVersion and cause nothing.
//! * Gateway status: `Accepted` and `Programmed` conditions and
//!   `status.addresses` (the Service's cluster IP), written as a JSON merge
//!   patch carrying the Gateway's resourceVersion (a concurrent writer makes
//!   it fail with 409 rather than be overwritten, as for HTTPRoute status),
//!   and only when it differs.
//! * A Gateway that cannot have a waypoint (a name that cannot name a
//!   Service, `spec.addresses`, no uid) gets `Accepted: False` with the
//!   reason, is counted, and changes nothing already deployed. API errors
//!   are counted and retried per Gateway with jittered exponential backoff.

pub mod objects;
pub mod status;

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::time::Instant;

use crate::sources::gateway_api::{GATEWAY_NAME_LABEL, GROUP};
use objects::{waypoint_gateway, WaypointGateway, WaypointTemplate, MANAGED_SELECTOR};
use status::GatewayStatus;

/// Longest wait between a first event and acting on it.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// The field manager of every write, as `kubectl get --show-managed-fields`
/// shows it.
pub const FIELD_MANAGER: &str = "istiod-lite";

/// How a reconcile of one Gateway ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReconcileResult {
    /// Objects in place and the Service has an address.
    programmed,
    /// Objects in place, the Service has no cluster IP yet.
    no_address,
    /// The Gateway cannot have a waypoint (see its `Accepted` condition).
    invalid,
    /// An API call failed; retried with backoff.
    failed,
    /// The Gateway stopped being a waypoint; what the deployer owned under
    /// it was deleted.
    removed,
}

/// The objects the deployer writes, and the Gateway it reads.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelValue)]
pub enum ObjectKind {
    ServiceAccount,
    ConfigMap,
    Service,
    Deployment,
    Gateway,
}

const MANAGED_KINDS: [ObjectKind; 4] = [
    ObjectKind::ServiceAccount,
    ObjectKind::ConfigMap,
    ObjectKind::Service,
    ObjectKind::Deployment,
];

impl ObjectKind {
    fn resource(self) -> ApiResource {
        match self {
            ObjectKind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
            ObjectKind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            ObjectKind::Service => ApiResource::erase::<Service>(&()),
            ObjectKind::Deployment => ApiResource::erase::<Deployment>(&()),
            ObjectKind::Gateway => ApiResource {
                group: GROUP.into(),
                version: "v1".into(),
                api_version: format!("{GROUP}/v1"),
                kind: "Gateway".into(),
                plural: "gateways".into(),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    apply,
    delete,
    status,
    watch,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: ReconcileResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiErrorLabels {
    kind: ObjectKind,
    operation: Operation,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// `istiod_waypoint_reconciles_total{result}`,
/// `istiod_waypoint_api_errors_total{kind,operation}`,
/// `istiod_waypoint_rejected_gateways_total{reason}`,
/// `istiod_waypoint_gateways` (waypoint Gateways currently deployed).
#[derive(Clone, Default)]
pub struct DeployerMetrics {
    reconciles: Family<ResultLabels, Counter>,
    api_errors: Family<ApiErrorLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    gateways: Gauge,
}

impl DeployerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = DeployerMetrics::default();
        registry.register(
            "waypoint_reconciles",
            "Reconciles of waypoint Gateways by the waypoint deployer, by result",
            m.reconciles.clone(),
        );
        registry.register(
            "waypoint_api_errors",
            "Failed Kubernetes API calls of the waypoint deployer (each is retried with backoff)",
            m.api_errors.clone(),
        );
        registry.register(
            "waypoint_rejected_gateways",
            "Reconciles of istio-waypoint Gateways that cannot have a waypoint, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "waypoint_gateways",
            "istio-waypoint Gateways whose waypoint is deployed",
            m.gateways.clone(),
        );
        m
    }

    fn reconciled(&self, result: ReconcileResult) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    fn api_error(&self, kind: ObjectKind, operation: Operation) {
        self.api_errors
            .get_or_create(&ApiErrorLabels { kind, operation })
            .inc();
    }
}

/// What `serve` hands over: the deployer runs only with an image.
#[derive(Debug, Clone, Default)]
pub struct DeployerSettings {
    /// `--waypoint-image`; `None` or empty: waypoints are deployed by hand.
    pub image: Option<String>,
    /// `--waypoint-xds-address`; default `https://istiod-lite.<namespace>.svc:15012`
    /// with istiod-lite's own namespace.
    pub xds_address: Option<String>,
    pub control_plane_name: String,
    pub trust_domain: String,
    pub root_namespace: String,
    /// `--waypoint-otlp-endpoint`: where deployed waypoints send spans.
    pub otlp_endpoint: Option<String>,
    pub token_audience: String,
    pub root_cert_pem: String,
}

/// How the deployer loop behaves; `Default` is what `serve` uses.
pub struct DeployerConfig {
    pub template: WaypointTemplate,
    /// Every Gateway is re-applied this often even without events.
    pub resync: Duration,
    /// Events are acted on once none has come for this long.
    pub debounce: Duration,
    /// First retry delay after a failed API call; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub metrics: DeployerMetrics,
}

impl DeployerConfig {
    pub fn new(template: WaypointTemplate, metrics: DeployerMetrics) -> Self {
        DeployerConfig {
            template,
            resync: Duration::from_secs(300),
            debounce: Duration::from_millis(50),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            metrics,
        }
    }
}

/// The deployer's template from `serve`'s settings, or `None` (logged
/// once) when no image was given.
pub fn template(client: &Client, settings: DeployerSettings) -> Option<WaypointTemplate> {
    let Some(image) = settings.image.filter(|i| !i.trim().is_empty()) else {
        tracing::info!(
            "no --waypoint-image: istiod-lite deploys no waypoints; each istio-waypoint \
             Gateway needs its Deployment, Service and ServiceAccount deployed by hand"
        );
        return None;
    };
    let xds_address = settings.xds_address.unwrap_or_else(|| {
        format!(
            "https://istiod-lite.{}.svc:15012",
            client.default_namespace()
        )
    });
    tracing::info!(%image, %xds_address, "deploying a waypoint for every istio-waypoint Gateway");
    Some(WaypointTemplate {
        image,
        xds_address,
        control_plane_name: settings.control_plane_name,
        trust_domain: settings.trust_domain,
        root_namespace: settings.root_namespace,
        otlp_endpoint: settings.otlp_endpoint,
        token_audience: settings.token_audience,
        root_cert_pem: settings.root_cert_pem,
    })
}

/// What a watch tells the loop.
enum Signal {
    /// A Gateway changed (or was listed, or deleted).
    Gateway(String),
    /// A managed object changed or was deleted.
    Managed {
        gateway: String,
        kind: ObjectKind,
        name: String,
        resource_version: String,
        owner_uid: Option<String>,
        deleted: bool,
    },
    Error {
        kind: ObjectKind,
        error: watcher::Error,
    },
}

fn gateway_key(o: &DynamicObject) -> String {
    format!(
        "{}/{}",
        o.metadata.namespace.as_deref().unwrap_or_default(),
        o.name_any()
    )
}

fn managed_signal(kind: ObjectKind, o: DynamicObject, deleted: bool) -> Option<Signal> {
    // Not labelled with a Gateway: not one of ours after all.
    let gateway = o.labels().get(GATEWAY_NAME_LABEL)?.clone();
    let owner_uid = o
        .owner_references()
        .iter()
        .find(|r| r.kind == "Gateway" && r.controller == Some(true))
        .map(|r| r.uid.clone());
    Some(Signal::Managed {
        gateway: format!(
            "{}/{gateway}",
            o.metadata.namespace.as_deref().unwrap_or_default()
        ),
        kind,
        name: o.name_any(),
        resource_version: o.resource_version().unwrap_or_default(),
        owner_uid,
        deleted,
    })
}

fn watch_managed(client: &Client, kind: ObjectKind) -> BoxStream<'static, Signal> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource());
    watcher(api, watcher::Config::default().labels(MANAGED_SELECTOR))
        .default_backoff()
        .filter_map(move |item| async move {
            match item {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    managed_signal(kind, o, false)
                }
                Ok(watcher::Event::Delete(o)) => managed_signal(kind, o, true),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(error) => Some(Signal::Error { kind, error }),
            }
        })
        .boxed()
}

/// What the deployer remembers of one Gateway.
#[derive(Default)]
struct GatewayState {
    /// Fingerprint of the objects last applied without error: while it
    /// matches and nothing drifted, applying again is skipped.
    applied: Option<u64>,
    /// The resourceVersion each managed object had after our last write;
    /// a watch event with it is our own write coming back.
    written: HashMap<(ObjectKind, String), String>,
    /// Managed objects seen labelled with this Gateway's name, and the uid
    /// of the Gateway that controls each.
    owned: HashMap<(ObjectKind, String), Option<String>>,
    /// The cluster IP of the Service, from the last apply.
    address: Option<String>,
    /// The Gateway's resourceVersion when its status was last written: until
    /// the store shows a newer one, it has not seen that write.
    status_from: Option<String>,
    failures: u32,
    retry_at: Option<Instant>,
}

struct Deployer {
    client: Client,
    config: DeployerConfig,
    gateways: Store<DynamicObject>,
    states: HashMap<String, GatewayState>,
}

/// Runs the deployer until its watches end (never, short of a kube bug).
pub async fn run(client: Client, config: DeployerConfig) {
    let gateway_resource = ObjectKind::Gateway.resource();
    let writer = reflector::store::Writer::new(gateway_resource.clone());
    let gateways = writer.as_reader();
    let gateway_stream = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &gateway_resource),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|o: &mut DynamicObject| o.managed_fields_mut().clear())
    .reflect(writer)
    .filter_map(|item| async move {
        match item {
            Ok(
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o),
            ) => Some(Signal::Gateway(gateway_key(&o))),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(error) => Some(Signal::Error {
                kind: ObjectKind::Gateway,
                error,
            }),
        }
    })
    .boxed();
    let mut streams = vec![gateway_stream];
    streams.extend(MANAGED_KINDS.iter().map(|k| watch_managed(&client, *k)));
    let mut events = futures::stream::select_all(streams);

    let mut deployer = Deployer {
        client,
        config,
        gateways,
        states: HashMap::new(),
    };
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    // When to act on the dirty Gateways: `debounce` after the last event,
    // but never more than MAX_DELAY after the first, so a steady trickle of
    // events cannot starve the reconciles.
    let mut settle: Option<(Instant, Instant)> = None;
    let touch = |settle: &mut Option<(Instant, Instant)>, debounce: Duration| {
        let now = Instant::now();
        let first = settle.map_or(now, |(first, _)| first);
        *settle = Some((first, (now + debounce).min(first + MAX_DELAY)));
    };
    let mut next_resync = Instant::now() + deployer.config.resync;
    let mut gateway_crd_missing = false;
    loop {
        let retry = deployer.states.values().filter_map(|s| s.retry_at).min();
        let deadline = [settle.map(|(_, at)| at), retry, Some(next_resync)]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            item = events.next() => match item {
                Some(Signal::Gateway(key)) => {
                    dirty.insert(key);
                    touch(&mut settle, deployer.config.debounce);
                }
                Some(Signal::Managed { gateway, kind, name, resource_version, owner_uid, deleted }) => {
                    let state = deployer.states.entry(gateway.clone()).or_default();
                    let object = (kind, name);
                    let ours = !deleted && state.written.get(&object) == Some(&resource_version);
                    if deleted {
                        state.owned.remove(&object);
                        state.written.remove(&object);
                    } else {
                        state.owned.insert(object, owner_uid);
                    }
                    if !ours {
                        // Someone else's change, or a deletion: apply again.
                        state.applied = None;
                        dirty.insert(gateway);
                        touch(&mut settle, deployer.config.debounce);
                    }
                }
                Some(Signal::Error { kind, error }) => {
                    if kind == ObjectKind::Gateway && is_not_found(&error) {
                        if !gateway_crd_missing {
                            tracing::info!("Gateway API CRDs not installed: no waypoints to deploy until they are");
                            gateway_crd_missing = true;
                        }
                        continue;
                    }
                    deployer.config.metrics.api_error(kind, Operation::watch);
                    tracing::warn!(?kind, "waypoint deployer watch error (retrying with backoff): {error}");
                }
                None => {
                    tracing::error!("every waypoint deployer watch ended; no longer deploying waypoints");
                    return;
                }
            },
            _ = mesh_core::backoff::sleep_until(deadline) => {
                let now = Instant::now();
                if next_resync <= now {
                    next_resync = now + deployer.config.resync;
                    for g in deployer.gateways.state() {
                        let key = gateway_key(&g);
                        deployer.states.entry(key.clone()).or_default().applied = None;
                        dirty.insert(key);
                    }
                }
                for (key, state) in deployer.states.iter_mut() {
                    if state.retry_at.is_some_and(|at| at <= now) {
                        state.retry_at = None;
                        dirty.insert(key.clone());
                    }
                }
                if settle.is_some_and(|(_, at)| at > now) {
                    continue;
                }
                settle = None;
                for key in std::mem::take(&mut dirty) {
                    deployer.reconcile(&key).await;
                }
                let deployed = deployer.states.values().filter(|s| s.applied.is_some()).count();
                deployer.config.metrics.gateways.set(deployed as i64);
            }
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(r))
        | watcher::Error::WatchStartFailed(kube::Error::Api(r)) => r.code == 404,
        _ => false,
    }
}

fn fingerprint(objects: &[(ObjectKind, Value)]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (kind, o) in objects {
        kind.hash(&mut h);
        o.to_string().hash(&mut h);
    }
    h.finish()
}

impl Deployer {
    fn api(&self, kind: ObjectKind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &kind.resource())
    }

    fn backoff(&mut self, key: &str) {
        let state = self.states.entry(key.to_string()).or_default();
        state.failures = state.failures.saturating_add(1);
        let exp = state.failures.saturating_sub(1).min(16);
        let delay = self
            .config
            .min_backoff
            .saturating_mul(1 << exp)
            .min(self.config.max_backoff);
        state.retry_at = Some(Instant::now() + mesh_core::backoff::jitter(delay));
    }

    async fn reconcile(&mut self, key: &str) {
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let reference = ObjectRef::<DynamicObject>::new_with(name, ObjectKind::Gateway.resource())
            .within(namespace);
        let Some(gateway) = self.gateways.get(&reference) else {
            // Gone: the garbage collector removes what it owned.
            self.states.remove(key);
            return;
        };
        let json = match serde_json::to_value(&*gateway) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(gateway = key, "unreadable Gateway: {e}");
                return;
            }
        };
        match waypoint_gateway(&json) {
            None => self.remove_owned(key, &gateway).await,
            Some(Err(invalid)) => {
                tracing::info!(
                    gateway = key,
                    reason = invalid.reason,
                    "no waypoint: {}",
                    invalid.message
                );
                self.config.metrics.reconciled(ReconcileResult::invalid);
                self.config
                    .metrics
                    .rejected
                    .get_or_create(&ReasonLabels {
                        reason: invalid.reason.to_string(),
                    })
                    .inc();
                let mut message = invalid.message;
                if self.states.get(key).is_some_and(|s| !s.owned.is_empty()) {
                    message.push_str("; the waypoint deployed before stays until the Gateway is fixed or deleted");
                }
                self.write_status(
                    key,
                    &gateway,
                    GatewayStatus::invalid(invalid.reason, message),
                )
                .await;
            }
            Some(Ok(wp)) => {
                let status = self.apply(key, &wp).await;
                self.write_status(key, &gateway, status).await;
            }
        }
    }

    /// Applies the waypoint's objects (skipped when they are what was last
    /// applied and nothing drifted); the status to report.
    async fn apply(&mut self, key: &str, wp: &WaypointGateway) -> GatewayStatus {
        let t = &self.config.template;
        // Referenced objects first, so the pods never start without them.
        let desired = [
            (ObjectKind::ServiceAccount, wp.service_account()),
            (ObjectKind::ConfigMap, wp.root_cert(t)),
            (ObjectKind::Service, wp.service()),
            (ObjectKind::Deployment, wp.deployment(t)),
        ];
        let print = fingerprint(&desired);
        let state = self.states.entry(key.to_string()).or_default();
        if state.applied == Some(print) {
            return match state.address.clone() {
                Some(ip) => GatewayStatus::programmed(ip),
                None => GatewayStatus::no_address(),
            };
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for (kind, object) in &desired {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            match self
                .api(*kind, &wp.namespace)
                .patch(name, &params, &Patch::Apply(object))
                .await
            {
                Ok(written) => {
                    let state = self.states.entry(key.to_string()).or_default();
                    let id = (*kind, name.to_string());
                    state
                        .written
                        .insert(id.clone(), written.resource_version().unwrap_or_default());
                    state.owned.insert(id, Some(wp.uid.clone()));
                    if *kind == ObjectKind::Service {
                        state.address = written.data["spec"]["clusterIP"]
                            .as_str()
                            .filter(|ip| !ip.is_empty() && *ip != "None")
                            .map(str::to_string);
                    }
                }
                Err(e) => {
                    self.config.metrics.api_error(*kind, Operation::apply);
                    self.config.metrics.reconciled(ReconcileResult::failed);
                    tracing::warn!(
                        gateway = key,
                        ?kind,
                        "applying the waypoint's {kind:?} failed (retrying with backoff): {e}"
                    );
                    self.backoff(key);
                    return GatewayStatus::pending(format!(
                        "applying {kind:?} {}/{name} failed, retrying: {e}",
                        wp.namespace
                    ));
                }
            }
        }
        let state = self.states.entry(key.to_string()).or_default();
        state.applied = Some(print);
        state.failures = 0;
        state.retry_at = None;
        tracing::debug!(gateway = key, "waypoint applied");
        match state.address.clone() {
            Some(ip) => {
                self.config.metrics.reconciled(ReconcileResult::programmed);
                GatewayStatus::programmed(ip)
            }
            None => {
                self.config.metrics.reconciled(ReconcileResult::no_address);
                GatewayStatus::no_address()
            }
        }
    }

    /// The Gateway is no longer of the waypoint class: deletes the objects
    /// it controls (the garbage collector would not, its owner still being
    /// there). Objects owned by an earlier Gateway of the same name are the
    /// collector's.
    async fn remove_owned(&mut self, key: &str, gateway: &DynamicObject) {
        let Some(uid) = gateway.uid() else {
            return;
        };
        let Some(state) = self.states.get(key) else {
            return;
        };
        let mine: Vec<(ObjectKind, String)> = state
            .owned
            .iter()
            .filter(|(_, owner)| owner.as_deref() == Some(uid.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        if mine.is_empty() {
            self.states.remove(key);
            return;
        }
        let namespace = gateway.metadata.namespace.clone().unwrap_or_default();
        let mut failed = false;
        for (kind, name) in mine {
            match self
                .api(kind, &namespace)
                .delete(&name, &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    failed = true;
                    self.config.metrics.api_error(kind, Operation::delete);
                    tracing::warn!(
                        gateway = key,
                        ?kind,
                        "deleting {namespace}/{name} failed (retrying with backoff): {e}"
                    );
                    continue;
                }
            }
            if let Some(state) = self.states.get_mut(key) {
                state.owned.remove(&(kind, name.clone()));
                state.written.remove(&(kind, name));
            }
        }
        if failed {
            self.config.metrics.reconciled(ReconcileResult::failed);
            self.backoff(key);
        } else {
            tracing::info!(
                gateway = key,
                "no longer an istio-waypoint Gateway: its waypoint was removed"
            );
            self.config.metrics.reconciled(ReconcileResult::removed);
            if let Some(state) = self.states.get_mut(key) {
                state.applied = None;
                state.address = None;
            }
        }
    }

    async fn write_status(&mut self, key: &str, gateway: &DynamicObject, status: GatewayStatus) {
        let rv = gateway.resource_version().unwrap_or_default();
        let state = self.states.entry(key.to_string()).or_default();
        if state.status_from.as_deref() == Some(rv.as_str()) {
            // Written from this version already; the store has not caught up.
            return;
        }
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
        let generation = gateway.metadata.generation.unwrap_or_default();
        let Some(merged) = status.merged_into(&gateway.data["status"], generation, &now) else {
            return;
        };
        let body = serde_json::json!({
            "metadata": {"resourceVersion": rv},
            "status": merged,
        });
        let namespace = gateway.metadata.namespace.clone().unwrap_or_default();
        match self
            .api(ObjectKind::Gateway, &namespace)
            .patch_status(
                &gateway.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
        {
            Ok(_) => {
                if let Some(state) = self.states.get_mut(key) {
                    state.status_from = Some(rv);
                }
            }
            // Someone wrote first: their change is an event, which brings
            // us back here with the new version.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(
                    gateway = key,
                    "Gateway status write conflicted; retried after the next change"
                );
            }
            Err(e) => {
                self.config
                    .metrics
                    .api_error(ObjectKind::Gateway, Operation::status);
                tracing::warn!(
                    gateway = key,
                    "writing Gateway status failed (retrying with backoff): {e}"
                );
                self.backoff(key);
            }
        }
    }
}

#[cfg(test)]
mod tests;
