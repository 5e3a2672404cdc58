//! The Kubernetes API source: kube-rs watchers feed reflector stores, and a
//! debounced loop turns the stores into a [`ClusterState`] for
//! [`pipeline::publish`], the same back half the manifests directory uses.
//!
//! * Namespaces, Pods and Services are watched typed: the API server validates
//!   them, so one that does not deserialize would be a client bug.
//! * AuthorizationPolicy and PeerAuthentication are watched as
//!   [`DynamicObject`]s and converted one by one: CRD schemas are loose, and a
//!   typed watcher fails a whole list on one bad object. A policy that does not
//!   parse is kept, marked broken, and enforced fail-closed (as the manifests
//!   source does), and translation reports it as rejected.
//! * Watch errors back off (kube's default), are logged and counted; a 410
//!   Gone makes kube's watcher re-list, and the reflector swaps the new list
//!   in whole, so objects deleted while we were away go too.
//! * Memory: the reflector stores and one merged stream; nothing queues
//!   events (a burst only marks the state dirty).
//!
//! * Gateway API `Gateway` and `HTTPRoute` are watched the same way (for
//!   waypoint assignment); one that does not parse is left out and reported.
//! * A kind whose CRD is not installed (the list answers 404) counts as
//!   listed and empty: without the CRD no such object can exist, so nothing
//!   is lost, and the watch keeps retrying so installing it later works.
//!   Any other error keeps the first publish waiting: publishing without a
//!   kind that exists but could not be read might widen access.
//!
//! * Ambit's `TrafficPolicy` (`ambit.dev/v1alpha1`) is watched the same way
//!   (optional like the other CRDs); one that does not parse is left out and
//!   reported.
//! * HTTPRoute status: after each publish, the conditions translation
//!   computed are written to `httproutes/status` ([`write_route_status`]):
//!   a JSON merge patch carrying the object's `resourceVersion`, so a
//!   concurrent writer makes it fail (409) rather than be overwritten; only
//!   entries with our `controllerName` are replaced, and only when they
//!   differ.
//!
//! Not watched yet: EndpointSlices (translation derives endpoints from pod
//! selectors) and ServiceAccounts (identity comes from the pod spec).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::gateway_api::{Gateway, HttpRoute};
use super::{ClusterState, Rejected};
use crate::ambit_types::{self, TrafficPolicy};
use crate::istio_types::{AuthorizationPolicy, PeerAuthentication};
use crate::pipeline::{self, MeshOptions, Outputs, PipelineMetrics};
use crate::translate::routes::{self, RouteStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// `istiod_kubernetes_watch_errors_total{kind}`.
#[derive(Clone, Default)]
pub struct KubernetesMetrics {
    watch_errors: Family<KindLabels, Counter>,
}

impl KubernetesMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = KubernetesMetrics::default();
        registry.register(
            "kubernetes_watch_errors",
            "Kubernetes list/watch errors by kind (each is retried with backoff)",
            m.watch_errors.clone(),
        );
        m
    }

    fn watch_error(&self, kind: Kind) {
        self.watch_errors
            .get_or_create(&KindLabels {
                kind: kind.name().to_string(),
            })
            .inc();
    }
}

/// How the Kubernetes source behaves; `Default` is what `serve` uses.
pub struct KubernetesConfig {
    /// Publish once no event has arrived for this long...
    pub debounce: Duration,
    /// ...or this long after the first unpublished event, whichever is first.
    pub max_delay: Duration,
    /// Server-side timeout of each watch request, in seconds (kube's 290 s
    /// when `None`); tests shorten it to exercise resumes.
    pub watch_timeout_secs: Option<u32>,
    pub metrics: KubernetesMetrics,
    /// Sent once every kind has been listed and the first state published
    /// (or failed to publish), so a caller can hold its servers until then.
    pub synced: Option<oneshot::Sender<()>>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            watch_timeout_secs: None,
            metrics: KubernetesMetrics::default(),
            synced: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
    Service,
    AuthorizationPolicy,
    PeerAuthentication,
    Gateway,
    HttpRoute,
    TrafficPolicy,
}

const KINDS: usize = 8;

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
        }
    }

    /// Kinds whose CRDs a cluster may simply not have: a 404 on their list
    /// means "none" (the watch keeps retrying, so installing them later
    /// works). Without the CRD no such object can exist, so "none" is exact.
    fn optional(self) -> bool {
        matches!(
            self,
            Kind::Gateway
                | Kind::HttpRoute
                | Kind::AuthorizationPolicy
                | Kind::PeerAuthentication
                | Kind::TrafficPolicy
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn istio_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn gateway_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn ambit_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: ambit_types::GROUP.into(),
        version: "v1alpha1".into(),
        api_version: format!("{}/v1alpha1", ambit_types::GROUP),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(r))
        | watcher::Error::WatchStartFailed(kube::Error::Api(r)) => r.code == 404,
        _ => false,
    }
}

/// What the merged watch streams tell the loop: never the objects themselves
/// (those are in the stores), so a burst costs no memory.
enum Signal {
    Changed { kind: Kind, listed: bool },
    Error { kind: Kind, error: watcher::Error },
}

fn signal<K>(kind: Kind, item: Result<watcher::Event<K>, watcher::Error>) -> Signal {
    match item {
        Ok(event) => Signal::Changed {
            kind,
            listed: matches!(event, watcher::Event::InitDone),
        },
        Err(error) => Signal::Error { kind, error },
    }
}

/// A reflector-backed watch of every `K` in the cluster.
fn watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    config: &watcher::Config,
    kind: Kind,
) -> BoxStream<'static, Signal>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Default + Eq + std::hash::Hash + Send + Sync,
{
    watcher(api, config.clone())
        .default_backoff()
        // Server-side-apply bookkeeping is often the bulk of an object and
        // nothing here reads it.
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |item| signal(kind, item))
        .boxed()
}

fn watch_dynamic(
    client: &Client,
    resource: &ApiResource,
    config: &watcher::Config,
    kind: Kind,
) -> (Store<DynamicObject>, BoxStream<'static, Signal>) {
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), resource);
    let stream = watcher(api, config.clone())
        .default_backoff()
        .modify(|o: &mut DynamicObject| o.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |item| signal(kind, item))
        .boxed();
    (reader, stream)
}

/// The reflector stores, readable from any thread.
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    authorization_policies: Store<DynamicObject>,
    peer_authentications: Store<DynamicObject>,
    gateways: Store<DynamicObject>,
    http_routes: Store<DynamicObject>,
    traffic_policies: Store<DynamicObject>,
}

fn key<K: Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

/// A CRD object as the manifests source would see the same document.
fn as_yaml(o: &DynamicObject, kind: Kind) -> Result<serde_yaml::Value, Rejected> {
    let reject = |reason: String| Rejected {
        origin: "kubernetes".into(),
        object: format!("{} {}", kind.name(), key(o)),
        reason,
    };
    let json = serde_json::to_value(o).map_err(|e| reject(e.to_string()))?;
    serde_yaml::to_value(json).map_err(|e| reject(e.to_string()))
}

/// A CRD object (Gateway API, Ambit) in its serde type, or why it is left out.
fn gateway_api_object<T: DeserializeOwned>(o: &DynamicObject, kind: Kind) -> Result<T, Rejected> {
    serde_yaml::from_value(as_yaml(o, kind)?).map_err(|e| Rejected {
        origin: "kubernetes".into(),
        object: format!("{} {}", kind.name(), key(o)),
        reason: e.to_string(),
    })
}

impl Stores {
    /// A consistent-enough copy: each store is read atomically; a change
    /// racing between two reads is picked up by the next publish.
    fn snapshot(&self) -> (ClusterState, Vec<Rejected>) {
        let mut state = ClusterState::default();
        let mut rejected = Vec::new();
        for n in self.namespaces.state() {
            state.namespaces.insert(n.name_any(), (*n).clone());
        }
        for p in self.pods.state() {
            state.pods.insert(key(&*p), (*p).clone());
        }
        for s in self.services.state() {
            state.services.insert(key(&*s), (*s).clone());
        }
        for o in self.authorization_policies.state() {
            match as_yaml(&o, Kind::AuthorizationPolicy) {
                Ok(v) => {
                    let mut p = AuthorizationPolicy::parse_or_broken(&v);
                    // Even a broken object's identity is known here; it
                    // decides where the fail-closed policy applies.
                    p.metadata.name = o.metadata.name.clone();
                    p.metadata.namespace = o.metadata.namespace.clone();
                    state.authorization_policies.insert(key(&*o), p);
                }
                Err(r) => rejected.push(r),
            }
        }
        for o in self.peer_authentications.state() {
            match as_yaml(&o, Kind::PeerAuthentication) {
                Ok(v) => {
                    let mut p = PeerAuthentication::parse_or_broken(&v);
                    p.metadata.name = o.metadata.name.clone();
                    p.metadata.namespace = o.metadata.namespace.clone();
                    state.peer_authentications.insert(key(&*o), p);
                }
                Err(r) => rejected.push(r),
            }
        }
        // As in the manifests source, a Gateway API object that does not
        // parse is left out (a waypoint it would be then counts as missing,
        // which fails closed) and reported.
        for o in self.gateways.state() {
            match gateway_api_object::<Gateway>(&o, Kind::Gateway) {
                Ok(mut g) => {
                    g.metadata.namespace = o.metadata.namespace.clone();
                    state.gateways.insert(key(&*o), g);
                }
                Err(r) => rejected.push(r),
            }
        }
        for o in self.http_routes.state() {
            match gateway_api_object::<HttpRoute>(&o, Kind::HttpRoute) {
                Ok(mut r) => {
                    r.metadata.namespace = o.metadata.namespace.clone();
                    state.http_routes.insert(key(&*o), r);
                }
                Err(r) => rejected.push(r),
            }
        }
        for o in self.traffic_policies.state() {
            match gateway_api_object::<TrafficPolicy>(&o, Kind::TrafficPolicy) {
                Ok(mut p) => {
                    p.metadata.namespace = o.metadata.namespace.clone();
                    state.traffic_policies.insert(key(&*o), p);
                }
                Err(r) => rejected.push(r),
            }
        }
        (state, rejected)
    }
}

/// Follows the cluster forever: watches, and publishes a new snapshot after
/// every settled burst of changes. Nothing is published until every kind has
/// been listed once: a partial view would look like workloads leaving.
pub async fn follow_kubernetes(
    client: Client,
    options: MeshOptions,
    outputs: Arc<Outputs>,
    metrics: PipelineMetrics,
    mut config: KubernetesConfig,
) {
    let mut wc = watcher::Config::default();
    if let Some(t) = config.watch_timeout_secs {
        wc = wc.timeout(t);
    }
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (services, svc_writer) = reflector::store::<Service>();
    let (authorization_policies, ap_stream) = watch_dynamic(
        &client,
        &istio_resource("AuthorizationPolicy", "authorizationpolicies"),
        &wc,
        Kind::AuthorizationPolicy,
    );
    let (peer_authentications, pa_stream) = watch_dynamic(
        &client,
        &istio_resource("PeerAuthentication", "peerauthentications"),
        &wc,
        Kind::PeerAuthentication,
    );
    let (gateways, gw_stream) = watch_dynamic(
        &client,
        &gateway_resource("Gateway", "gateways"),
        &wc,
        Kind::Gateway,
    );
    let (http_routes, hr_stream) = watch_dynamic(
        &client,
        &gateway_resource("HTTPRoute", "httproutes"),
        &wc,
        Kind::HttpRoute,
    );
    let (traffic_policies, tp_stream) = watch_dynamic(
        &client,
        &ambit_resource("TrafficPolicy", "trafficpolicies"),
        &wc,
        Kind::TrafficPolicy,
    );
    tokio::spawn(write_route_status(
        client.clone(),
        http_routes.clone(),
        outputs.route_status.subscribe(),
    ));
    let stores = Stores {
        namespaces,
        pods,
        services,
        authorization_policies,
        peer_authentications,
        gateways,
        http_routes,
        traffic_policies,
    };
    let mut events = futures::stream::select_all([
        watch(Api::all(client.clone()), ns_writer, &wc, Kind::Namespace),
        watch(Api::all(client.clone()), pod_writer, &wc, Kind::Pod),
        watch(Api::all(client), svc_writer, &wc, Kind::Service),
        ap_stream,
        pa_stream,
        gw_stream,
        hr_stream,
        tp_stream,
    ]);

    let mut listed = [false; KINDS];
    // Set while changes wait to be published: (first change, latest change).
    let mut dirty: Option<(Instant, Instant)> = None;
    loop {
        let deadline =
            dirty.map(|(first, last)| (last + config.debounce).min(first + config.max_delay));
        tokio::select! {
            item = events.next() => match item {
                Some(Signal::Changed { kind, listed: done }) => {
                    if done && !listed[kind.index()] {
                        tracing::info!(kind = kind.name(), "listed");
                        listed[kind.index()] = true;
                    }
                    let now = Instant::now();
                    dirty = Some(dirty.map_or((now, now), |(first, _)| (first, now)));
                }
                Some(Signal::Error { kind, error }) => {
                    if kind.optional() && is_not_found(&error) {
                        if !listed[kind.index()] {
                            tracing::warn!(kind = kind.name(), "CRD not installed: treated as none until it is");
                            listed[kind.index()] = true;
                            let now = Instant::now();
                            dirty = Some(dirty.map_or((now, now), |(first, _)| (first, now)));
                        }
                        continue;
                    }
                    config.metrics.watch_error(kind);
                    tracing::warn!(kind = kind.name(), "watch error (retrying with backoff): {error}");
                }
                None => {
                    // Watchers retry forever; this is unreachable short of a
                    // kube bug, and silence would be worse than a loud exit.
                    tracing::error!("every Kubernetes watch stream ended; no longer following the cluster");
                    return;
                }
            },
            _ = mesh_core::backoff::sleep_until(deadline) => {
                if !listed.iter().all(|l| *l) {
                    // Stores keep the changes; the last first list marks dirty again.
                    dirty = None;
                    continue;
                }
                dirty = None;
                let (stores, options, outputs, metrics) =
                    (stores.clone(), options.clone(), outputs.clone(), metrics.clone());
                let done = tokio::task::spawn_blocking(move || {
                    let (state, rejected) = stores.snapshot();
                    pipeline::publish(&state, rejected, &options, &outputs, &metrics)
                })
                .await;
                match done {
                    Ok(Ok(())) => {
                        // Serving starts on a good first state only.
                        if let Some(tx) = config.synced.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Err(e)) => tracing::error!("cluster state not applied, keeping the last good state: {e}"),
                    Err(e) => tracing::error!("publish task failed, keeping the last good state: {e}"),
                }
            }
        }
    }
}

/// Writes each published route status to its HTTPRoute, for as long as
/// statuses are published.
async fn write_route_status(
    client: Client,
    routes_store: Store<DynamicObject>,
    mut statuses: tokio::sync::watch::Receiver<Arc<Vec<RouteStatus>>>,
) {
    let resource = gateway_resource("HTTPRoute", "httproutes");
    // The resourceVersion each route had when we last patched it: until the
    // store shows a newer one it has not seen our write, and comparing with
    // it would write the same status again.
    let mut patched_from: std::collections::HashMap<String, String> = Default::default();
    while statuses.changed().await.is_ok() {
        let current = statuses.borrow_and_update().clone();
        for status in current.iter() {
            let reference = ObjectRef::<DynamicObject>::new_with(&status.name, resource.clone())
                .within(&status.namespace);
            let Some(obj) = routes_store.get(&reference) else {
                continue;
            };
            // Computed from an older spec: the next publish brings the right one.
            if obj.metadata.generation != status.generation {
                continue;
            }
            let rv = obj.metadata.resource_version.clone().unwrap_or_default();
            if patched_from.get(&status.key()) == Some(&rv) {
                continue;
            }
            let existing = obj.data["status"]["parents"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ))
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
            let Some(parents) = routes::merged_parents(&existing, status, &now) else {
                continue;
            };
            let body = serde_json::json!({
                "metadata": {"resourceVersion": rv},
                "status": {"parents": parents},
            });
            let api =
                Api::<DynamicObject>::namespaced_with(client.clone(), &status.namespace, &resource);
            match api
                .patch_status(&status.name, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(_) => {
                    tracing::debug!(route = %status.key(), "status written");
                    patched_from.insert(status.key(), rv);
                }
                // Someone else wrote first: their change is an event, and
                // the publish it causes brings us back here.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(route = %status.key(), "status write conflicted; retried after the next change")
                }
                Err(e) => {
                    tracing::warn!(route = %status.key(), "writing HTTPRoute status failed: {e}")
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "kubernetes_tests.rs"]
mod tests;
