//! The delta ADS server: `DeltaAggregatedResources` over the current
//! [`Snapshot`], one task per client stream.
//!
//! Per stream and type it tracks what the client holds (name → version),
//! seeded from `initial_resource_versions` on reconnect, and sends only the
//! difference. Responses go through a two-slot channel: a slow client holds
//! up its own task, never the others, and since the task always diffs
//! against the newest snapshot, pushes it could not send coalesce.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use mesh_core::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_core::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use prost_types::value::Kind;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use mesh_core::proto::ADDRESS_TYPE;

use super::metrics::XdsMetrics;
use super::snapshot::{Entry, Snapshot, TYPES};
use super::visibility::{self, Viewer};
use crate::node_auth::{check_waypoint, Authenticator, Caller};

#[derive(Clone)]
pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// `None` on the plaintext test port: the node is taken from its metadata.
    auth: Option<Arc<dyn Authenticator>>,
    metrics: XdsMetrics,
    full_pushes: Arc<Semaphore>,
}

impl XdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        auth: Option<Arc<dyn Authenticator>>,
        metrics: XdsMetrics,
    ) -> Self {
        XdsServer {
            snapshots,
            auth,
            metrics,
            full_pushes: Arc::new(Semaphore::new(CONCURRENT_FULL_PUSHES)),
        }
    }
}

impl XdsServer {
    /// What an authenticated caller is sent. A waypoint pod must be one in
    /// the model being served (checked once: a pod that stops being one is
    /// then simply sent no L7 resources).
    fn viewer(&self, caller: Caller) -> Result<Viewer, Status> {
        match caller {
            Caller::Node(node) => Ok(Viewer::Node(node)),
            Caller::Waypoint(w) => {
                let key = w.key();
                let snapshot = self.snapshots.borrow().clone();
                let found = snapshot
                    .visibility
                    .waypoint_pod(&key)
                    .map(|p| (true, p.service_account.as_str()));
                check_waypoint(&w, found).map_err(Status::permission_denied)?;
                Ok(Viewer::Waypoint(key))
            }
        }
    }
}

type ResponseStream = Pin<
    Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let refused = |e: Status| {
            self.metrics.count_rejected_stream();
            tracing::warn!("xDS stream refused: {}", e.message());
            e
        };
        let viewer = match &self.auth {
            Some(auth) => {
                let caller = auth
                    .authenticate(request.metadata())
                    .await
                    .map_err(refused)?;
                Some(self.viewer(caller).map_err(refused)?)
            }
            None => None,
        };
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let (tx, rx) = mpsc::channel(2);
        let stream = Stream {
            requests: request.into_inner(),
            responses: tx,
            snapshots: self.snapshots.clone(),
            metrics: self.metrics.clone(),
            viewer,
            peer,
            subscriptions: HashMap::new(),
            nonce: 0,
            full_pushes: self.full_pushes.clone(),
            in_flight: None,
        };
        tokio::spawn(stream.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one client stream has asked for and holds, per type.
#[derive(Default)]
struct Subscription {
    wildcard: bool,
    names: HashSet<String>,
    /// What the client holds, name → version: for named subscriptions, and
    /// for a wildcard one until its first push (from `initial_resource_versions`).
    sent: HashMap<String, String>,
    /// What a wildcard client holds after its first push: exactly this snapshot.
    held: Option<Arc<Snapshot>>,
    /// Names to send again on the next push (newly named by the client).
    resend: Vec<String>,
    /// Whether a response of this type went out: the first one is sent even
    /// when empty, so the client knows it has the (empty) state.
    answered: bool,
}

struct Stream {
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: XdsMetrics,
    /// The authenticated caller, or the node the client says it is
    /// (plaintext port); `None` sees everything.
    viewer: Option<Viewer>,
    peer: String,
    subscriptions: HashMap<String, Subscription>,
    nonce: u64,
    full_pushes: Arc<Semaphore>,
    /// A full push in flight: its nonce and permit, held until the client
    /// answers it (or the deadline passes).
    in_flight: Option<(String, OwnedSemaphorePermit, Instant)>,
}

/// Full pushes (a new client, or one that fell behind) under way at once.
/// Each holds a copy of the whole state in encode and socket buffers until
/// the client answers; bounding them bounds that memory in a reconnect storm.
pub const CONCURRENT_FULL_PUSHES: usize = 8;

/// Suffix of `system_version_info` on every part of a split push but the last.
pub use mesh_core::xds::client::PARTIAL;

/// Address resources per response (about 250 KB at Istio's sizes).
pub const RESOURCES_PER_RESPONSE: usize = 1000;

/// How long a full push may hold its slot without an answer from the client.
const FULL_PUSH_DEADLINE: Duration = Duration::from_secs(30);

impl Stream {
    async fn run(mut self) {
        self.metrics.clients.inc();
        let outcome = self.serve().await;
        self.metrics.clients.dec();
        let caller = self.caller();
        match outcome {
            Ok(()) => tracing::info!(caller, peer = %self.peer, "xDS client disconnected"),
            Err(e) => tracing::info!(caller, peer = %self.peer, "xDS stream ended: {e}"),
        }
    }

    async fn serve(&mut self) -> Result<(), String> {
        loop {
            tokio::select! {
                request = self.requests.message() => {
                    match request {
                        Ok(Some(r)) => self.on_request(r).await?,
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(e.message().to_string()),
                    }
                }
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return Err("control plane shutting down".into());
                    }
                    self.push_all().await?;
                }
                _ = deadline(&self.in_flight) => {
                    tracing::warn!(peer = %self.peer, "client did not answer a full push in time");
                    self.in_flight = None;
                }
            }
        }
    }

    async fn on_request(&mut self, r: DeltaDiscoveryRequest) -> Result<(), String> {
        if self.viewer.is_none() {
            self.viewer = r
                .node
                .as_ref()
                .and_then(|n| n.metadata.as_ref())
                .and_then(|m| m.fields.get("NODE_NAME"))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .or_else(|| r.node.as_ref().map(|n| n.id.clone()))
                .map(Viewer::ClaimedNode);
            if self.viewer.is_some() {
                tracing::info!(caller = self.caller(), peer = %self.peer, "xDS client connected");
            }
        }
        let type_url = r.type_url.clone();
        if !TYPES.contains(&type_url.as_str()) {
            // Answered (empty) so a client waiting on it is not left hanging.
            self.metrics.count_unknown_type();
            tracing::warn!(type_url, peer = %self.peer, "xDS request for a type not served");
            let nonce = self.next_nonce();
            return self
                .send(DeltaDiscoveryResponse {
                    type_url,
                    nonce,
                    ..Default::default()
                })
                .await;
        }
        if !r.response_nonce.is_empty() {
            if self
                .in_flight
                .as_ref()
                .is_some_and(|(n, _, _)| *n == r.response_nonce)
            {
                self.in_flight = None;
            }
            match &r.error_detail {
                Some(e) => {
                    self.metrics.count_nack(&type_url);
                    tracing::warn!(
                        caller = self.caller(),
                        type_url,
                        nonce = r.response_nonce,
                        "client rejected an update (NACK), it keeps its previous resources: {}",
                        e.message
                    );
                }
                None => self.metrics.count_ack(&type_url),
            }
        }
        let first = !self.subscriptions.contains_key(&type_url);
        let sub = self.subscriptions.entry(type_url.clone()).or_default();
        let mut newly_named = Vec::new();
        if first {
            // An empty first subscribe is the legacy wildcard; "*" the explicit one.
            sub.wildcard = r.resource_names_subscribe.is_empty();
            sub.sent = r.initial_resource_versions.clone();
        }
        for name in r.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else if sub.names.insert(name.clone()) {
                newly_named.push(name);
            }
        }
        for name in r.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
            }
            sub.sent.remove(&name);
        }
        if !sub.wildcard {
            if let Some(held) = sub.held.take() {
                // Leaving wildcard mode: track by name from what it holds.
                sub.sent = held
                    .resources
                    .get(type_url.as_str())
                    .map(|m| {
                        m.iter()
                            .map(|(n, e)| (n.clone(), e.version.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
            }
        }
        // Named subscriptions must be answered even if the client had them.
        for name in &newly_named {
            sub.sent.remove(name);
        }
        sub.resend.extend(newly_named.iter().cloned());
        if first || !newly_named.is_empty() {
            let snapshot = self.snapshots.borrow().clone();
            self.push(&type_url, &snapshot).await?;
        }
        Ok(())
    }

    async fn push_all(&mut self) -> Result<(), String> {
        let snapshot = self.snapshots.borrow_and_update().clone();
        for type_url in TYPES {
            if self.subscriptions.contains_key(type_url) {
                self.push(type_url, &snapshot).await?;
            }
        }
        Ok(())
    }

    async fn push(&mut self, type_url: &str, snapshot: &Arc<Snapshot>) -> Result<(), String> {
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let Some(current) = snapshot.resources.get(type_url) else {
            return Ok(());
        };
        // Only wildcard pushes can be the whole state; a named subscription
        // is small whatever happens.
        let full = sub.wildcard
            && match &sub.held {
                Some(held) => held.version + 1 < snapshot.version,
                None => true,
            };
        let mut permit = None;
        if full {
            // Wait for a slot before building the copy the slot accounts for;
            // our own previous full push's slot is released first.
            self.in_flight = None;
            permit = self.full_pushes.clone().acquire_owned().await.ok();
        }
        let viewer = self.viewer.clone();
        let viewer = viewer.as_ref();
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let mut diff = Diff::default();
        if sub.wildcard {
            let filtered = visibility::filtered(type_url);
            match &sub.held {
                Some(held) => diff.between(held, snapshot, type_url, viewer),
                None => diff.against_versions(&sub.sent, current, |n| {
                    !filtered || snapshot.visibility.visible(type_url, viewer, n)
                }),
            }
            for name in std::mem::take(&mut sub.resend) {
                // Naming a policy does not make it this node's business.
                let visible = !filtered || snapshot.visibility.visible(type_url, viewer, &name);
                if visible && !diff.resources.iter().any(|r| r.name == name) {
                    if let Some(entry) = current.get(&name) {
                        diff.send(&name, entry);
                    }
                }
            }
            // From here on the client holds exactly this snapshot: a
            // reference to it replaces a per-name map of what was sent.
            sub.sent = HashMap::new();
            sub.held = Some(snapshot.clone());
        } else {
            sub.resend.clear();
            let names = &sub.names;
            let filtered = visibility::filtered(type_url);
            diff.against_versions(&sub.sent, current, |n| {
                names.contains(n) && (!filtered || snapshot.visibility.visible(type_url, viewer, n))
            });
            for r in &diff.resources {
                sub.sent.insert(r.name.clone(), r.version.clone());
            }
            for name in &diff.removed {
                sub.sent.remove(name);
            }
        }
        if diff.resources.is_empty() && diff.removed.is_empty() && sub.answered {
            return Ok(());
        }
        sub.answered = true;
        self.metrics
            .count_push(type_url, diff.resources.len() + diff.removed.len());
        // Large address responses go out in parts: the gRPC encoder keeps a
        // buffer as big as the largest message it sent for the life of the
        // stream, so one 2.6 MB push would cost that much per client for
        // good. Addresses alone are split: they grant nothing, so a client
        // between two parts is at worst missing a destination (fail closed),
        // while a policy set arriving in parts could briefly lack a DENY.
        let mut parts: Vec<Vec<Resource>> = Vec::new();
        if type_url == ADDRESS_TYPE && diff.resources.len() > RESOURCES_PER_RESPONSE {
            let mut rest = diff.resources;
            while rest.len() > RESOURCES_PER_RESPONSE {
                let tail = rest.split_off(RESOURCES_PER_RESPONSE);
                parts.push(std::mem::replace(&mut rest, tail));
            }
            parts.push(rest);
        } else {
            parts.push(diff.resources);
        }
        let last = parts.len() - 1;
        let mut removed = Some(diff.removed);
        for (i, resources) in parts.into_iter().enumerate() {
            let nonce = self.next_nonce();
            // Parts before the last say so: a client counts itself in sync
            // with a version only once it has all of it.
            let system_version_info = if i == last {
                snapshot.version.to_string()
            } else {
                format!("{}{PARTIAL}", snapshot.version)
            };
            let response = DeltaDiscoveryResponse {
                system_version_info,
                type_url: type_url.to_string(),
                resources,
                removed_resources: if i == last {
                    removed.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                nonce,
            };
            if i == last {
                if let Some(p) = permit.take() {
                    self.in_flight = Some((
                        response.nonce.clone(),
                        p,
                        Instant::now() + FULL_PUSH_DEADLINE,
                    ));
                }
            }
            // Bounded: a client that stops reading must not hold a full-push
            // slot (or this task) forever.
            match tokio::time::timeout(FULL_PUSH_DEADLINE, self.send(response)).await {
                Ok(sent) => sent?,
                Err(_) => return Err("client stopped reading; stream closed".into()),
            }
        }
        Ok(())
    }

    /// Who this stream serves, for log lines.
    fn caller(&self) -> String {
        self.viewer
            .as_ref()
            .map_or_else(|| "?".to_string(), ToString::to_string)
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    async fn send(&mut self, r: DeltaDiscoveryResponse) -> Result<(), String> {
        self.responses
            .send(Ok(r))
            .await
            .map_err(|_| "client went away".to_string())
    }
}

/// Fires when the in-flight full push's deadline passes; never without one.
async fn deadline(in_flight: &Option<(String, OwnedSemaphorePermit, Instant)>) {
    match in_flight {
        Some((_, _, at)) => tokio::time::sleep_until((*at).into()).await,
        None => std::future::pending().await,
    }
}

/// What one response carries.
#[derive(Default)]
struct Diff {
    resources: Vec<Resource>,
    removed: Vec<String>,
}

impl Diff {
    fn send(&mut self, name: &str, entry: &Entry) {
        self.resources.push(Resource {
            name: name.to_string(),
            version: entry.version.clone(),
            resource: Some(entry.resource.clone()),
            ..Default::default()
        });
    }

    /// From a snapshot the client holds to `new`, as seen by `viewer`: when
    /// `new` directly follows it, only the names `new` records as changed,
    /// and those whose visibility to `viewer` shifted, are looked at.
    fn between(&mut self, old: &Snapshot, new: &Snapshot, type_url: &str, viewer: Option<&Viewer>) {
        if old.version == new.version {
            return;
        }
        let empty = Default::default();
        let before = old.resources.get(type_url).unwrap_or(&empty);
        let after = new.resources.get(type_url).unwrap_or(&empty);
        let filtered = visibility::filtered(type_url);
        // What the client holds of `name`, and what it should hold.
        let held = |name: &str| {
            before
                .get(name)
                .filter(|_| !filtered || old.visibility.visible(type_url, viewer, name))
        };
        let wanted = |name: &str| {
            after
                .get(name)
                .filter(|_| !filtered || new.visibility.visible(type_url, viewer, name))
        };
        let look = |diff: &mut Diff, name: &String| match (held(name), wanted(name)) {
            (Some(o), Some(e)) if o.version == e.version => {}
            (_, Some(e)) => diff.send(name, e),
            (Some(_), None) => diff.removed.push(name.clone()),
            (None, None) => {}
        };
        match new.changed.get(type_url) {
            Some(changed) if old.version + 1 == new.version => {
                let mut names: Vec<String> = changed.clone();
                if filtered {
                    names.extend(new.visibility.shifted(&old.visibility, type_url, viewer));
                    names.sort();
                    names.dedup();
                }
                for name in &names {
                    look(self, name);
                }
            }
            _ => {
                for name in after
                    .keys()
                    .chain(before.keys().filter(|n| !after.contains_key(*n)))
                {
                    look(self, name);
                }
            }
        }
    }

    /// From a name → version map (a resumed or named subscription) to `current`.
    fn against_versions(
        &mut self,
        sent: &HashMap<String, String>,
        current: &BTreeMap<String, Arc<Entry>>,
        wants: impl Fn(&str) -> bool,
    ) {
        for (name, e) in current {
            if wants(name) && sent.get(name) != Some(&e.version) {
                self.send(name, e);
            }
        }
        for name in sent.keys() {
            if !wants(name) || !current.contains_key(name) {
                self.removed.push(name.clone());
            }
        }
    }
}
