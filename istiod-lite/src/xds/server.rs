//! The delta ADS server: `DeltaAggregatedResources` over the current
//! [`Snapshot`], one task per client stream.
//!
//! Per stream and type it tracks what the client holds (name → version),
//! seeded from `initial_resource_versions` on reconnect, and sends only the
//! difference. Responses go through a two-slot channel: a slow client holds
//! up its own task, never the others, and since the task always diffs
//! against the newest snapshot, pushes it could not send coalesce.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use mesh_core::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_core::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use prost_types::value::Kind;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::metrics::XdsMetrics;
use super::snapshot::{Snapshot, TYPES};
use crate::node_auth::Authenticator;

#[derive(Clone)]
pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// `None` on the plaintext test port: the node is taken from its metadata.
    auth: Option<Arc<dyn Authenticator>>,
    metrics: XdsMetrics,
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
        let authenticated =
            match &self.auth {
                Some(auth) => Some(auth.authenticate(request.metadata()).await.inspect_err(
                    |e| {
                        self.metrics.count_rejected_stream();
                        tracing::warn!("xDS stream refused: {}", e.message());
                    },
                )?),
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
            node: authenticated,
            peer,
            subscriptions: HashMap::new(),
            nonce: 0,
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
    /// What the client holds: name → version.
    sent: HashMap<String, String>,
    /// The snapshot version `sent` reflects, if it reflects one fully.
    synced_to: Option<u64>,
    /// Whether a response of this type went out: the first one is sent even
    /// when empty, so the client knows it has the (empty) state.
    answered: bool,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

struct Stream {
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: XdsMetrics,
    /// The authenticated node, or the node the client says it is (plaintext port).
    node: Option<String>,
    peer: String,
    subscriptions: HashMap<String, Subscription>,
    nonce: u64,
}

impl Stream {
    async fn run(mut self) {
        self.metrics.clients.inc();
        let outcome = self.serve().await;
        self.metrics.clients.dec();
        let node = self.node.as_deref().unwrap_or("?");
        match outcome {
            Ok(()) => tracing::info!(node, peer = %self.peer, "xDS client disconnected"),
            Err(e) => tracing::info!(node, peer = %self.peer, "xDS stream ended: {e}"),
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
            }
        }
    }

    async fn on_request(&mut self, r: DeltaDiscoveryRequest) -> Result<(), String> {
        if self.node.is_none() {
            self.node = r
                .node
                .as_ref()
                .and_then(|n| n.metadata.as_ref())
                .and_then(|m| m.fields.get("NODE_NAME"))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .or_else(|| r.node.as_ref().map(|n| n.id.clone()));
            if let Some(node) = &self.node {
                tracing::info!(node, peer = %self.peer, "xDS client connected");
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
            match &r.error_detail {
                Some(e) => {
                    self.metrics.count_nack(&type_url);
                    tracing::warn!(
                        node = self.node.as_deref().unwrap_or("?"),
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
        // Named subscriptions must be answered even if the client had them.
        for name in &newly_named {
            sub.sent.remove(name);
        }
        if first || !newly_named.is_empty() {
            sub.synced_to = None;
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

    async fn push(&mut self, type_url: &str, snapshot: &Snapshot) -> Result<(), String> {
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let Some(current) = snapshot.resources.get(type_url) else {
            return Ok(());
        };
        // Only the names changed since the previous snapshot need a look
        // when the client is known to hold exactly that one.
        let candidates: Vec<&String> = match (sub.synced_to, snapshot.changed.get(type_url)) {
            (Some(v), Some(changed)) if v + 1 == snapshot.version => changed.iter().collect(),
            (Some(v), _) if v == snapshot.version => Vec::new(),
            _ => current.keys().chain(sub.sent.keys()).collect(),
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut seen = HashSet::new();
        for name in candidates {
            if !seen.insert(name.as_str()) {
                continue;
            }
            match current.get(name) {
                Some(entry) if sub.wants(name) => {
                    if sub.sent.get(name) != Some(&entry.version) {
                        resources.push(Resource {
                            name: name.clone(),
                            version: entry.version.clone(),
                            resource: Some(entry.resource.clone()),
                            ..Default::default()
                        });
                    }
                }
                _ => {
                    if sub.sent.contains_key(name) {
                        removed.push(name.clone());
                    }
                }
            }
        }
        for r in &resources {
            sub.sent.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            sub.sent.remove(name);
        }
        sub.synced_to = Some(snapshot.version);
        if resources.is_empty() && removed.is_empty() && sub.answered {
            return Ok(());
        }
        sub.answered = true;
        let count = resources.len() + removed.len();
        let nonce = self.next_nonce();
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            type_url: type_url.to_string(),
            resources,
            removed_resources: removed,
            nonce,
        };
        self.metrics.count_push(type_url, count);
        self.send(response).await
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
