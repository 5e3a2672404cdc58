//! A delta ADS client: subscribes (wildcard) to a set of resource types,
//! keeps every resource it has accepted, ACKs or NACKs each response, and
//! reconnects with jittered backoff, resuming with the versions it holds.
//! While the control plane is away the last accepted state stays in force.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost_types::{value::Kind, Any, Struct, Value};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::grpc::ControlPlane;
use crate::proto::envoy::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};

/// An accepted resource.
#[derive(Clone, Debug)]
pub struct Stored {
    pub version: String,
    pub resource: Any,
}

/// Everything accepted so far: type URL → name → resource.
pub type ResourceSet = HashMap<String, BTreeMap<String, Stored>>;

/// What the client does with resources.
pub trait Handler: Send + 'static {
    /// Checks one resource on arrival. An error NACKs the response and keeps
    /// the previous version of this resource (or none); the others still apply.
    fn check(&mut self, type_url: &str, name: &str, resource: &Any) -> Result<(), String>;

    /// Applies the whole accepted set after a response. An error NACKs the
    /// response and undoes it.
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String>;
}

/// What the client has seen, for config dumps and readiness.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatus {
    pub connected: bool,
    /// Whether a response of every subscribed type has been applied since start.
    pub synced: bool,
    pub responses: u64,
    pub nacks: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub last_nack: Option<String>,
    /// Seconds since the Unix epoch of the last applied response.
    pub last_update: Option<u64>,
    pub resources: BTreeMap<String, usize>,
}

pub struct Client {
    control_plane: ControlPlane,
    node: Node,
    types: Vec<String>,
    status: Arc<Mutex<ClientStatus>>,
}

/// Marks a response that is one part of a larger push, not the last
/// (suffix of `system_version_info`); set by istiod-lite, harmless to others.
pub const PARTIAL: &str = "+partial";

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

impl Client {
    /// `node_name` goes into the node metadata (`NODE_NAME`, as Istio's proxies
    /// send it); the control plane trusts the bearer token over it when it has one.
    pub fn new(
        control_plane: ControlPlane,
        node_id: String,
        node_name: &str,
        types: &[&str],
    ) -> Self {
        let metadata = Struct {
            fields: [(
                "NODE_NAME".to_string(),
                Value {
                    kind: Some(Kind::StringValue(node_name.to_string())),
                },
            )]
            .into(),
        };
        Client {
            control_plane,
            node: Node {
                id: node_id,
                cluster: String::new(),
                metadata: Some(metadata),
                user_agent_name: "ambit".to_string(),
            },
            types: types.iter().map(|t| t.to_string()).collect(),
            status: Arc::default(),
        }
    }

    pub fn status(&self) -> Arc<Mutex<ClientStatus>> {
        self.status.clone()
    }

    /// Runs forever, reconnecting as needed.
    pub async fn run(self, mut handler: impl Handler) {
        let mut resources = ResourceSet::new();
        let mut synced: Vec<String> = Vec::new();
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = self
                .session(&mut handler, &mut resources, &mut synced, &mut backoff)
                .await;
            let error = match outcome {
                Ok(()) => "control plane closed the stream".to_string(),
                Err(e) => e,
            };
            tracing::warn!(error = %error, retry_in = ?backoff, "xDS stream down, keeping the last config");
            {
                let mut s = self.lock_status();
                s.connected = false;
                s.reconnects += 1;
                s.last_error = Some(error);
            }
            tokio::time::sleep(crate::backoff::jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, ClientStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn session(
        &self,
        handler: &mut impl Handler,
        resources: &mut ResourceSet,
        synced: &mut Vec<String>,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let channel = self.control_plane.channel().map_err(|e| e.to_string())?;
        let mut client =
            AggregatedDiscoveryServiceClient::with_interceptor(channel, self.control_plane.auth())
                .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(self.types.len() + 4);
        for (i, t) in self.types.iter().enumerate() {
            let initial_resource_versions = resources
                .get(t)
                .map(|m| {
                    m.iter()
                        .map(|(n, s)| (n.clone(), s.version.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let first = DeltaDiscoveryRequest {
                // The node travels on the first message of the stream only.
                node: (i == 0).then(|| self.node.clone()),
                type_url: t.clone(),
                initial_resource_versions,
                ..Default::default()
            };
            tx.send(first).await.map_err(|_| "request queue closed")?;
        }
        let mut stream = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("opening stream: {}", e.message()))?
            .into_inner();
        self.lock_status().connected = true;
        loop {
            let response = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("{:?}: {}", e.code(), e.message())),
            };
            *backoff = BACKOFF_MIN;
            let type_url = response.type_url.clone();
            let partial = response.system_version_info.ends_with(PARTIAL);
            let reply = self.handle(response, handler, resources);
            if reply.error_detail.is_none() && !partial && !synced.contains(&type_url) {
                synced.push(type_url);
                if self.types.iter().all(|t| synced.contains(t)) {
                    self.lock_status().synced = true;
                }
            }
            tx.send(reply).await.map_err(|_| "request stream closed")?;
        }
    }

    fn handle(
        &self,
        response: DeltaDiscoveryResponse,
        handler: &mut impl Handler,
        resources: &mut ResourceSet,
    ) -> DeltaDiscoveryRequest {
        let type_url = response.type_url;
        let mut errors = Vec::new();
        if !self.types.contains(&type_url) {
            errors.push(format!("not subscribed to type {type_url:?}"));
        } else {
            let set = resources.entry(type_url.clone()).or_default();
            // Previous values of everything this response touches, to undo it.
            let mut undo: Vec<(String, Option<Stored>)> = Vec::new();
            for r in response.resources {
                let Some(body) = r.resource else {
                    // A version-only refresh (TTL heartbeat): nothing to change.
                    continue;
                };
                match handler.check(&type_url, &r.name, &body) {
                    Ok(()) => {
                        let old = set.insert(
                            r.name.clone(),
                            Stored {
                                version: r.version,
                                resource: body,
                            },
                        );
                        undo.push((r.name, old));
                    }
                    Err(why) => errors.push(format!("{}: {why}", r.name)),
                }
            }
            for name in response.removed_resources {
                if let Some(old) = set.remove(&name) {
                    undo.push((name, Some(old)));
                }
            }
            if let Err(why) = handler.apply(resources) {
                errors.push(why);
                let set = resources.entry(type_url.clone()).or_default();
                for (name, old) in undo.into_iter().rev() {
                    match old {
                        Some(v) => set.insert(name, v),
                        None => set.remove(&name),
                    };
                }
            }
        }
        let mut status = self.lock_status();
        status.responses += 1;
        status.resources = resources
            .iter()
            .map(|(t, m)| (t.clone(), m.len()))
            .collect();
        let error_detail = if errors.is_empty() {
            status.last_update = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            None
        } else {
            let message = errors.join("; ");
            tracing::error!(type_url = %type_url, "xDS update rejected (NACK): {message}");
            status.nacks += 1;
            status.last_nack = Some(message.clone());
            Some(Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            })
        };
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: response.nonce,
            error_detail,
            ..Default::default()
        }
    }
}
