//! An in-process Kubernetes API server for tests: real HTTP/1.1, real
//! list/watch semantics, just the resources istiod-lite watches.
//!
//! What it does like the real one, because kube-rs's watcher depends on it:
//! one global, monotonically increasing resourceVersion; lists carry it in
//! `metadata.resourceVersion`; a watch resumes after a given version and
//! streams every later change as JSON lines; a resume from before the retained
//! history gets a `410 Expired` ERROR event (HTTP 200, as the real server
//! answers watches), so the client re-lists; BOOKMARK events carry the
//! current version; `timeoutSeconds` ends a watch.
//!
//! What it does not: pagination (`limit` is ignored, which the real server
//! also does when serving from its watch cache, so no `continue` token is
//! ever returned), field selectors and set-based label selectors (refused
//! with 400, so a test never silently matches more than it asked for), a
//! watch event for an object leaving a label selection (the real server
//! sends DELETED), namespaced list/watch URLs (only the cluster-wide ones),
//! validation beyond names and kinds, admission, RBAC.
//! Beyond list/watch it answers TokenReviews of tokens tests register and
//! reads single pods, for node authentication, and takes JSON merge patches
//! of a namespaced object's `status` subresource (`PATCH
//! .../namespaces/<ns>/<plural>/<name>/status`), as istiod-lite writes
//! HTTPRoute status: only `status` is changed, a `metadata.resourceVersion`
//! in the patch must be the current one (else 409 Conflict), and the change
//! is a MODIFIED event like any other. Like the real server, `generation`
//! starts at 1 and grows when `spec` changes, and an [`FakeApiServer::apply`]
//! without `status` keeps the object's status.
//!
//! Writes to namespaced objects, for istiod-lite's waypoint deployer:
//! `POST` to a collection creates (409 AlreadyExists if present); `PATCH`
//! with `application/apply-patch+yaml` is server-side apply (needs
//! `fieldManager`; creates, or merges into the stored object; a no-op
//! writes nothing, as on the real server); `DELETE` and `GET` of one object.
//! Creation fills in uid, generation and, for a Service, a cluster IP from
//! 10.96.0.0/16. Server-side apply here tracks no field ownership: fields an
//! applier stops sending stay, lists replace rather than merge by key, and
//! `force` changes nothing because nothing ever conflicts. Equality-based
//! label selectors filter lists and watches. The garbage collector runs
//! after every delete and HTTP write: an object none of whose
//! `ownerReferences` exists any more is deleted (DELETED event), down the
//! chain, as background propagation does, but before the request returns
//! rather than later; foreground and orphan propagation, finalizers and the
//! removal of dangling references from objects that keep a live owner are
//! not emulated.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

mod auth;
mod list_watch;
mod objects;
mod proxy;
mod selector;

use auth::*;
use list_watch::*;
use objects::*;
use selector::*;

/// A served resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Resource {
    kind: &'static str,
    api_version: &'static str,
    /// The list URL, cluster-wide.
    path: &'static str,
    namespaced: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        kind: "Namespace",
        api_version: "v1",
        path: "/api/v1/namespaces",
        namespaced: false,
    },
    Resource {
        kind: "Pod",
        api_version: "v1",
        path: "/api/v1/pods",
        namespaced: true,
    },
    Resource {
        kind: "Service",
        api_version: "v1",
        path: "/api/v1/services",
        namespaced: true,
    },
    Resource {
        kind: "AuthorizationPolicy",
        api_version: "security.istio.io/v1",
        path: "/apis/security.istio.io/v1/authorizationpolicies",
        namespaced: true,
    },
    Resource {
        kind: "PeerAuthentication",
        api_version: "security.istio.io/v1",
        path: "/apis/security.istio.io/v1/peerauthentications",
        namespaced: true,
    },
    Resource {
        kind: "Gateway",
        api_version: "gateway.networking.k8s.io/v1",
        path: "/apis/gateway.networking.k8s.io/v1/gateways",
        namespaced: true,
    },
    Resource {
        kind: "HTTPRoute",
        api_version: "gateway.networking.k8s.io/v1",
        path: "/apis/gateway.networking.k8s.io/v1/httproutes",
        namespaced: true,
    },
    Resource {
        kind: "TrafficPolicy",
        api_version: "ambit.dev/v1alpha1",
        path: "/apis/ambit.dev/v1alpha1/trafficpolicies",
        namespaced: true,
    },
    Resource {
        kind: "ServiceAccount",
        api_version: "v1",
        path: "/api/v1/serviceaccounts",
        namespaced: true,
    },
    Resource {
        kind: "ConfigMap",
        api_version: "v1",
        path: "/api/v1/configmaps",
        namespaced: true,
    },
    Resource {
        kind: "Deployment",
        api_version: "apps/v1",
        path: "/apis/apps/v1/deployments",
        namespaced: true,
    },
];

fn resource_of_kind(kind: &str) -> Option<Resource> {
    RESOURCES.iter().copied().find(|r| r.kind == kind)
}

struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Resumes from before this version get 410.
    oldest: u64,
    objects: BTreeMap<Resource, BTreeMap<(String, String), Value>>,
    /// Every change since `oldest`, in order (tests are small: kept whole).
    history: Vec<Change>,
    next_uid: u64,
    requests: HashMap<String, u64>,
    /// Kinds whose CRD is "not installed": their paths answer 404.
    uninstalled: Vec<&'static str>,
    /// What TokenReview says about each token ([`FakeApiServer::add_token`]).
    tokens: HashMap<String, FakeToken>,
    /// Services created without a cluster IP so far (the allocator's state).
    next_cluster_ip: u32,
}

struct Shared {
    inner: Mutex<Inner>,
    /// The current resourceVersion; watch tasks wake on it.
    changed: watch::Sender<u64>,
    /// Bumped by `close_watches`: every open watch ends.
    generation: watch::Sender<u64>,
    /// While true, open watches deliver nothing (a partitioned client).
    paused: watch::Sender<bool>,
    bookmark_interval: Duration,
}

/// The running fake. Dropping it does not stop the server task (tests end
/// with their runtime).
#[derive(Clone)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1:0 with a 1 s bookmark interval.
    pub async fn start() -> FakeApiServer {
        Self::start_with(Duration::from_secs(1)).await
    }

    pub async fn start_with(bookmark_interval: Duration) -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                // Real clusters never start at 0, and "0" means "any" to a
                // list: keep the two apart.
                rv: 100,
                oldest: 100,
                ..Default::default()
            }),
            changed: watch::channel(100).0,
            generation: watch::channel(0).0,
            paused: watch::channel(false).0,
            bookmark_interval,
        });
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move {
                            Ok::<_, Infallible>(match auth_route(&req) {
                                Some(route) => serve_auth(&s, route, req).await,
                                None if proxy::handles(&req) => proxy::serve(&s, req).await,
                                None => match object_route(&req) {
                                    Some(route) => serve_object(&s, route, req).await,
                                    None if req.method() == hyper::Method::PATCH => {
                                        patch_status(&s, req).await
                                    }
                                    None => handle(&s, req),
                                },
                            })
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube client for this server, over plain HTTP.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr)
            .parse()
            .expect("a valid URL");
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client")
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().expect("fake API server lock")
    }

    /// Creates or replaces an object (by kind, namespace and name), like
    /// `kubectl apply` of a whole object; returns its new resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let resource = resource_of_kind(&kind)
            .unwrap_or_else(|| panic!("fake API server does not serve kind {kind:?}"));
        assert_eq!(
            obj["apiVersion"], resource.api_version,
            "apiVersion of {kind}"
        );
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let ns = if resource.namespaced {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            obj["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let rv = {
            let mut inner = self.lock();
            let previous = inner
                .objects
                .get(&resource)
                .and_then(|m| m.get(&(ns.clone(), name.clone())))
                .cloned();
            let uid = match &previous {
                Some(p) => p["metadata"]["uid"].clone(),
                None => {
                    inner.next_uid += 1;
                    json!(format!("00000000-0000-0000-0000-{:012}", inner.next_uid))
                }
            };
            let generation = match &previous {
                None => 1,
                Some(p) => {
                    let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                    if p["spec"] == obj["spec"] {
                        g
                    } else {
                        g + 1
                    }
                }
            };
            obj["metadata"]["generation"] = json!(generation);
            if let Some(p) = &previous {
                if obj.get("status").is_none() && p.get("status").is_some() {
                    obj["status"] = p["status"].clone();
                }
            }
            let event = if inner
                .objects
                .get(&resource)
                .is_some_and(|m| m.contains_key(&(ns.clone(), name.clone())))
            {
                "MODIFIED"
            } else {
                "ADDED"
            };
            obj["metadata"]["uid"] = uid;
            store_object(&mut inner, resource, &(ns, name), &mut obj, event)
        };
        self.shared.changed.send_replace(rv);
        rv
    }

    /// Applies every document of a multi-document YAML string.
    pub fn apply_yaml(&self, yaml: &str) {
        use serde::Deserialize;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = serde_json::Value::deserialize(doc).expect("YAML document");
            if !v.is_null() {
                self.apply(v);
            }
        }
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: &str, ns: &str, name: &str) -> bool {
        let resource = resource_of_kind(kind)
            .unwrap_or_else(|| panic!("fake API server does not serve {kind}"));
        let ns = if resource.namespaced { ns } else { "" };
        let rv = {
            let mut inner = self.lock();
            let Some(mut obj) = inner
                .objects
                .get_mut(&resource)
                .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
            else {
                return false;
            };
            inner.rv += 1;
            let rv = inner.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            inner.history.push(Change {
                rv,
                resource,
                kind: "DELETED",
                object: obj,
            });
            collect_garbage(&mut inner).unwrap_or(rv)
        };
        self.shared.changed.send_replace(rv);
        true
    }

    /// Forgets the change history, as etcd compaction does: any watch resuming
    /// from an earlier version gets 410 Gone. Open watches are ended (so they
    /// resume, and get 410) and un-paused.
    pub fn compact(&self) {
        {
            let mut inner = self.lock();
            // A version of its own, so even a client that had seen everything
            // (bookmarks keep it current) holds one that is now too old.
            inner.rv += 1;
            inner.oldest = inner.rv;
            inner.history.clear();
        }
        self.close_watches();
        self.shared.paused.send_replace(false);
    }

    /// Answers 404 for `kind` from now on, as a cluster without its CRD.
    pub fn uninstall(&self, kind: &'static str) {
        self.lock().uninstalled.push(kind);
    }

    /// Ends every open watch stream, as an API server restart or a load
    /// balancer would.
    pub fn close_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Open watches stop delivering (events and bookmarks) until `resume` or
    /// `compact`: changes made meanwhile reach clients only by re-listing.
    pub fn pause_watches(&self) {
        self.shared.paused.send_replace(true);
    }

    pub fn resume_watches(&self) {
        self.shared.paused.send_replace(false);
    }

    /// The stored object, as a GET would return it.
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let resource = resource_of_kind(kind)?;
        let ns = if resource.namespaced { ns } else { "" };
        self.lock()
            .objects
            .get(&resource)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// How many requests of each sort were served: `list <path>`,
    /// `watch <path>`, `expired <path>` (410s sent), `patch status <path>`
    /// (accepted), `conflict <path>` (409s sent).
    pub fn requests(&self, what: &str) -> u64 {
        self.lock().requests.get(what).copied().unwrap_or(0)
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "read-only fake",
        );
    }
    let path = req.uri().path();
    let uninstalled = shared
        .inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .uninstalled
        .clone();
    let Some(resource) = RESOURCES
        .iter()
        .copied()
        .find(|r| r.path == path && !uninstalled.contains(&r.kind))
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {path}"),
        );
    };
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url_decode_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    if query.get("fieldSelector").is_some_and(|s| !s.is_empty()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the fake API server does not implement fieldSelector",
        );
    }
    let selector = match LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
    {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    if query.get("watch").map(String::as_str) == Some("true")
        || query.get("watch").map(String::as_str) == Some("1")
    {
        list_watch::watch(shared, resource, &query, selector)
    } else {
        list(shared, resource, &selector)
    }
}

fn count(inner: &mut Inner, what: String) {
    *inner.requests.entry(what).or_default() += 1;
}

/// Stores `obj` under a new resourceVersion and records the change.
pub(crate) fn store_object(
    inner: &mut Inner,
    resource: Resource,
    key: &(String, String),
    obj: &mut Value,
    event: &'static str,
) -> u64 {
    inner.rv += 1;
    let rv = inner.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    inner
        .objects
        .entry(resource)
        .or_default()
        .insert(key.clone(), obj.clone());
    inner.history.push(Change {
        rv,
        resource,
        kind: event,
        object: obj.clone(),
    });
    rv
}

/// The body of a JSON merge patch request, or the answer refusing it.
pub(crate) async fn read_merge_patch(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if content_type != "application/merge-patch+json" {
        return Err(status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the fake takes JSON merge patches only, not {content_type:?}"),
        ));
    }
    let Ok(body) = req.into_body().collect().await else {
        return Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unreadable body",
        ));
    };
    serde_json::from_slice(&body.to_bytes())
        .map_err(|e| status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()))
}

/// The stored objects of `resource` that `selector` selects.
fn selected(inner: &Inner, resource: &Resource, selector: &LabelSelector) -> Vec<Value> {
    inner
        .objects
        .get(resource)
        .map(|m| {
            m.values()
                .filter(|o| selector.matches(o))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn empty() -> Body {
    BodyExt::boxed(Full::new(Bytes::new()))
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

/// `a=b&c=d%2Fe` → pairs; enough for the parameters kube sends.
fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

impl FakeApiServer {
    /// Serves `kind` again after [`FakeApiServer::uninstall`], as when its
    /// CRD is installed; what was stored before is still there.
    pub fn install(&self, kind: &str) {
        self.lock().uninstalled.retain(|k| *k != kind);
    }
}
