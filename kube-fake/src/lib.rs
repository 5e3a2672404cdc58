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

mod proxy;

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
            inner.rv += 1;
            let rv = inner.rv;
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
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            inner
                .objects
                .entry(resource)
                .or_default()
                .insert((ns, name), obj.clone());
            inner.history.push(Change {
                rv,
                resource,
                kind: event,
                object: obj,
            });
            rv
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
        watch(shared, resource, &query, selector)
    } else {
        list(shared, resource, &selector)
    }
}

/// `PATCH /api[s]/.../namespaces/<ns>/<plural>/<name>/status` with a JSON
/// merge patch: only the `status` subresource changes.
async fn patch_status(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let target = segments
        .iter()
        .position(|s| *s == "namespaces")
        .filter(|&i| segments.len() == i + 5 && segments[i + 4] == "status")
        .and_then(|i| {
            let list = format!("/{}/{}", segments[..i].join("/"), segments[i + 2]);
            let resource = RESOURCES.iter().copied().find(|r| r.path == list)?;
            Some((
                resource,
                segments[i + 1].to_string(),
                segments[i + 3].to_string(),
            ))
        });
    let Some((resource, ns, name)) = target else {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake only patches status subresources",
        );
    };
    let patch = match read_merge_patch(req).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let (rv, object) = {
        let mut inner = shared.inner.lock().expect("fake API server lock");
        let current = inner
            .objects
            .get(&resource)
            .and_then(|m| m.get(&(ns.clone(), name.clone())))
            .cloned();
        let Some(mut obj) = current else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} {ns}/{name} not found", resource.kind),
            );
        };
        if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
            if obj["metadata"]["resourceVersion"] != want {
                count(&mut inner, format!("conflict {}", resource.path));
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
        }
        if let Some(s) = patch.get("status") {
            let mut merged = obj.get("status").cloned().unwrap_or(Value::Null);
            merge_patch(&mut merged, s);
            obj["status"] = merged;
        }
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner
            .objects
            .entry(resource)
            .or_default()
            .insert((ns, name), obj.clone());
        inner.history.push(Change {
            rv,
            resource,
            kind: "MODIFIED",
            object: obj.clone(),
        });
        count(&mut inner, format!("patch status {}", resource.path));
        (rv, obj)
    };
    shared.changed.send_replace(rv);
    json_response(StatusCode::OK, &object)
}

/// RFC 7386: objects merge key by key, `null` deletes, anything else
/// (arrays included) replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn count(inner: &mut Inner, what: String) {
    *inner.requests.entry(what).or_default() += 1;
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

fn list(shared: &Shared, resource: Resource, selector: &LabelSelector) -> Response<Body> {
    let mut inner = shared.inner.lock().expect("fake API server lock");
    count(&mut inner, format!("list {}", resource.path));
    let items = selected(&inner, &resource, selector);
    let body = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

fn watch(
    shared: &Arc<Shared>,
    resource: Resource,
    query: &HashMap<String, String>,
    selector: LabelSelector,
) -> Response<Body> {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let since: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && v.as_str() != "0")
        .map(|v| v.parse().unwrap_or(0));
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = shared.clone();
    {
        let mut inner = shared.inner.lock().expect("fake API server lock");
        count(&mut inner, format!("watch {}", resource.path));
    }
    tokio::spawn(async move {
        let _ = stream_watch(&shared, resource, &selector, since, timeout, tx).await;
    });
    let body =
        StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn line(event: &Value) -> Bytes {
    let mut s = event.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Streams changes of `resource` after `since` (everything current when
/// `None`, as "watch from any version" does) until the timeout, a
/// `close_watches`, or the client going away.
async fn stream_watch(
    shared: &Shared,
    resource: Resource,
    selector: &LabelSelector,
    since: Option<u64>,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), mpsc::error::SendError<Bytes>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut generation = shared.generation.subscribe();
    let mut changed = shared.changed.subscribe();
    let mut paused = shared.paused.subscribe();
    let mut bookmarks = tokio::time::interval(shared.bookmark_interval);
    bookmarks.tick().await;

    let mut last = match since {
        Some(rv) => {
            let expired = {
                let mut inner = shared.inner.lock().expect("fake API server lock");
                let expired = rv < inner.oldest;
                if expired {
                    count(&mut inner, format!("expired {}", resource.path));
                }
                expired
            };
            if expired {
                tx.send(line(&json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": format!("too old resource version: {rv}"),
                        "reason": "Expired",
                        "code": 410,
                    },
                })))
                .await?;
                return Ok(());
            }
            rv
        }
        None => {
            let (rv, objects) = {
                let inner = shared.inner.lock().expect("fake API server lock");
                let objects = selected(&inner, &resource, selector);
                (inner.rv, objects)
            };
            for object in objects {
                tx.send(line(&json!({"type": "ADDED", "object": object})))
                    .await?;
            }
            rv
        }
    };

    loop {
        if !*paused.borrow_and_update() {
            // A change the selector filters out still counts as delivered,
            // or bookmarks would wait for it forever. An object leaving the
            // selection is not turned into DELETED, as the real server does.
            let pending: Vec<(u64, Option<Value>)> = {
                let inner = shared.inner.lock().expect("fake API server lock");
                inner
                    .history
                    .iter()
                    .filter(|c| c.rv > last && c.resource == resource)
                    .map(|c| {
                        let event = selector
                            .matches(&c.object)
                            .then(|| json!({"type": c.kind, "object": c.object}));
                        (c.rv, event)
                    })
                    .collect()
            };
            for (rv, event) in pending {
                last = rv;
                if let Some(event) = event {
                    tx.send(line(&event)).await?;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = generation.changed() => return Ok(()),
            _ = tx.closed() => return Ok(()),
            r = changed.changed() => if r.is_err() { return Ok(()) },
            r = paused.changed() => if r.is_err() { return Ok(()) },
            _ = bookmarks.tick() => {
                if *paused.borrow() {
                    continue;
                }
                // Only versions whose changes were all delivered may be
                // bookmarked, or the client would skip them on resume.
                let rv = {
                    let inner = shared.inner.lock().expect("fake API server lock");
                    let undelivered = inner.history.iter().any(|c| c.rv > last && c.resource == resource);
                    if undelivered { None } else { Some(inner.rv) }
                };
                if let Some(rv) = rv {
                    last = last.max(rv);
                    tx.send(line(&json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": resource.kind,
                            "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": rv.to_string()},
                        },
                    })))
                    .await?;
                }
            }
        }
    }
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

// Node authentication (istiod-lite's KubernetesAuthenticator): TokenReview
// creation and reading one pod. Kept apart from the list/watch machinery.

/// What TokenReview answers for a registered token.
enum FakeToken {
    /// A valid token of `user` (a UserInfo), issued for `audiences`.
    Valid { audiences: Vec<String>, user: Value },
    /// This `status`, verbatim: answers a real server would not give.
    Raw(Value),
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

impl FakeApiServer {
    /// Makes `token` valid for `audiences`, authenticating as `user` (a
    /// UserInfo: username, groups, extra). Other tokens are reviewed as not
    /// authenticated.
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        self.lock()
            .tokens
            .insert(token.to_string(), FakeToken::Valid { audiences, user });
    }

    /// Reviews of `token` answer with this `status`, whatever was asked.
    pub fn add_token_review_answer(&self, token: &str, status: Value) {
        self.lock()
            .tokens
            .insert(token.to_string(), FakeToken::Raw(status));
    }
}

enum AuthRoute {
    TokenReview,
    Pod { namespace: String, name: String },
}

fn auth_route(req: &Request<Incoming>) -> Option<AuthRoute> {
    let path = req.uri().path();
    if req.method() == hyper::Method::POST && path == TOKEN_REVIEWS {
        return Some(AuthRoute::TokenReview);
    }
    if req.method() != hyper::Method::GET {
        return None;
    }
    let (namespace, rest) = path.strip_prefix("/api/v1/namespaces/")?.split_once('/')?;
    let name = rest.strip_prefix("pods/")?;
    (!name.is_empty() && !name.contains('/')).then(|| AuthRoute::Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

async fn serve_auth(shared: &Shared, route: AuthRoute, req: Request<Incoming>) -> Response<Body> {
    match route {
        AuthRoute::Pod { namespace, name } => {
            let mut inner = shared.inner.lock().expect("fake API server lock");
            count(&mut inner, "get pod".to_string());
            let pod = resource_of_kind("Pod")
                .and_then(|r| inner.objects.get(&r))
                .and_then(|m| m.get(&(namespace, name.clone())));
            match pod {
                Some(pod) => json_response(StatusCode::OK, pod),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ),
            }
        }
        AuthRoute::TokenReview => {
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let review: Value = match serde_json::from_slice(&body.to_bytes()) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            if review["apiVersion"] != "authentication.k8s.io/v1" || review["kind"] != "TokenReview"
            {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not a TokenReview");
            }
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let asked: Vec<&str> = review["spec"]["audiences"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut inner = shared.inner.lock().expect("fake API server lock");
            count(&mut inner, "create tokenreviews".to_string());
            let answer = match inner.tokens.get(token) {
                None => json!({"user": {}, "error": "invalid bearer token"}),
                Some(FakeToken::Raw(status)) => status.clone(),
                Some(FakeToken::Valid { audiences, user }) => {
                    // As the API server: the answer names the audiences both
                    // the token and the review have; none in common is a
                    // failed review. Unasked, the token's own count.
                    let common: Vec<&str> = if asked.is_empty() {
                        audiences.iter().map(String::as_str).collect()
                    } else {
                        asked
                            .iter()
                            .copied()
                            .filter(|a| audiences.iter().any(|t| t == a))
                            .collect()
                    };
                    if common.is_empty() {
                        json!({"user": {}, "error": format!(
                            "token audiences {audiences:?} is invalid for the target audiences {asked:?}"
                        )})
                    } else {
                        json!({"authenticated": true, "user": user, "audiences": common})
                    }
                }
            };
            json_response(
                StatusCode::CREATED,
                &json!({
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {},
                    "spec": review["spec"],
                    "status": answer,
                }),
            )
        }
    }
}

// Writes over HTTP to namespaced objects (istiod-lite's waypoint deployer):
// create, server-side apply, delete, read one; the garbage collector; label
// selectors on list/watch. Kept apart from the list/watch machinery.

/// A label selector's requirements, in the equality-based form
/// (`k=v`, `k==v`, `k!=v`, `k`, `!k`); set-based ones (`in`, `notin`) are
/// refused, so a test never silently matches more than asked.
#[derive(Debug, Clone, Default)]
struct LabelSelector {
    requirements: Vec<(String, LabelOp)>,
}

#[derive(Debug, Clone)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl LabelSelector {
    fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.contains(" in ") || part.contains(" notin ") || part.contains('(') {
                return Err(format!(
                    "the fake API server does not implement set-based selectors ({part:?})"
                ));
            }
            let req = if let Some((k, v)) = part.split_once("!=") {
                (k, LabelOp::NotEquals(v.to_string()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k, LabelOp::Equals(v.to_string()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k, LabelOp::Equals(v.to_string()))
            } else if let Some(k) = part.strip_prefix('!') {
                (k, LabelOp::Absent)
            } else {
                (part, LabelOp::Exists)
            };
            requirements.push((req.0.trim().to_string(), req.1));
        }
        Ok(LabelSelector { requirements })
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.requirements.iter().all(|(key, op)| {
            let value = labels.get(key).and_then(Value::as_str);
            match op {
                LabelOp::Equals(v) => value == Some(v.as_str()),
                LabelOp::NotEquals(v) => value != Some(v.as_str()),
                LabelOp::Exists => value.is_some(),
                LabelOp::Absent => value.is_none(),
            }
        })
    }
}

/// A request on one namespaced object, or on the namespaced collection
/// (`POST` only).
struct ObjectRoute {
    resource: Resource,
    namespace: String,
    name: Option<String>,
}

/// `/api/v1/namespaces/<ns>/<plural>[/<name>]` or
/// `/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]`, for a served
/// namespaced kind; subresources (`/status`) are not routed here.
fn object_route(req: &Request<Incoming>) -> Option<ObjectRoute> {
    let method = req.method();
    if ![
        hyper::Method::GET,
        hyper::Method::POST,
        hyper::Method::PATCH,
        hyper::Method::DELETE,
    ]
    .contains(method)
    {
        return None;
    }
    let path = req.uri().path();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let i = segments.iter().position(|s| *s == "namespaces")?;
    let (namespace, plural, name) = match segments.len() - i {
        3 => (segments[i + 1], segments[i + 2], None),
        4 => (segments[i + 1], segments[i + 2], Some(segments[i + 3])),
        _ => return None,
    };
    // Collections are only written to; reading them is list/watch's job.
    if name.is_none() != (method == hyper::Method::POST) {
        return None;
    }
    let list = format!("/{}/{}", segments[..i].join("/"), plural);
    let resource = RESOURCES
        .iter()
        .copied()
        .find(|r| r.path == list && r.namespaced)?;
    Some(ObjectRoute {
        resource,
        namespace: namespace.to_string(),
        name: name.map(str::to_string),
    })
}

async fn serve_object(
    shared: &Shared,
    route: ObjectRoute,
    req: Request<Incoming>,
) -> Response<Body> {
    let uninstalled = shared
        .inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .uninstalled
        .contains(&route.resource.kind);
    if uninstalled {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "the server could not find the requested resource ({})",
                route.resource.path
            ),
        );
    }
    let method = req.method().clone();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| url_decode_pairs(q).into_iter().collect())
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let body = body.to_bytes();
    let ObjectRoute {
        resource,
        namespace,
        name,
    } = route;
    if method == hyper::Method::GET || method == hyper::Method::DELETE {
        let name = name.unwrap_or_default();
        let key = (namespace, name.clone());
        let mut inner = shared.inner.lock().expect("fake API server lock");
        let verb = if method == hyper::Method::GET {
            "get"
        } else {
            "delete"
        };
        count(&mut inner, format!("{verb} {}", resource.path));
        let Some(obj) = inner
            .objects
            .get(&resource)
            .and_then(|m| m.get(&key))
            .cloned()
        else {
            return not_found(resource, &name);
        };
        if method == hyper::Method::GET {
            return json_response(StatusCode::OK, &obj);
        }
        let rv = remove_object(&mut inner, resource, &key);
        let rv = collect_garbage(&mut inner).unwrap_or(rv);
        drop(inner);
        shared.changed.send_replace(rv);
        return json_response(StatusCode::OK, &obj);
    }
    if method == hyper::Method::PATCH && content_type != "application/apply-patch+yaml" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "the fake takes server-side apply on objects (merge patches on status only), not {content_type:?}"
            ),
        );
    }
    // YAML is a superset of JSON, and kube sends JSON even for apply.
    let object: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => match serde_yaml::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        },
    };
    if object["kind"] != resource.kind || object["apiVersion"] != resource.api_version {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "body is {} {}, the URL is for {} {}",
                object["apiVersion"], object["kind"], resource.api_version, resource.kind
            ),
        );
    }
    let body_name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = name.unwrap_or_else(|| body_name.clone());
    if name.is_empty() || body_name != name {
        return invalid(
            resource,
            &name,
            "metadata.name must be given and match the URL",
        );
    }
    if object["metadata"]["namespace"]
        .as_str()
        .is_some_and(|ns| ns != namespace)
    {
        return invalid(resource, &name, "metadata.namespace does not match the URL");
    }
    let key = (namespace, name.clone());
    let mut inner = shared.inner.lock().expect("fake API server lock");
    let current = inner
        .objects
        .get(&resource)
        .and_then(|m| m.get(&key))
        .cloned();
    let (code, rv, stored) = if method == hyper::Method::POST {
        count(&mut inner, format!("create {}", resource.path));
        if current.is_some() {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", resource.kind),
            );
        }
        let (rv, stored) = create_object(&mut inner, resource, &key, object);
        (StatusCode::CREATED, rv, stored)
    } else {
        if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
            return invalid(
                resource,
                &name,
                "fieldManager is required for apply patches",
            );
        }
        count(&mut inner, format!("apply {}", resource.path));
        match current {
            None => {
                let (rv, stored) = create_object(&mut inner, resource, &key, object);
                (StatusCode::CREATED, rv, stored)
            }
            Some(current) => {
                let mut merged = current.clone();
                let mut patch = object;
                // Server-owned fields the applier cannot set.
                if let Some(meta) = patch["metadata"].as_object_mut() {
                    for field in ["uid", "resourceVersion", "generation", "creationTimestamp"] {
                        meta.remove(field);
                    }
                }
                apply_merge(&mut merged, &patch);
                if merged == current {
                    // As the real server: a no-op apply writes nothing, so
                    // it neither bumps resourceVersion nor makes an event.
                    (StatusCode::OK, None, current)
                } else {
                    if merged["spec"] != current["spec"] {
                        let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                        merged["metadata"]["generation"] = json!(g + 1);
                    }
                    let rv = store_object(&mut inner, resource, &key, &mut merged, "MODIFIED");
                    (StatusCode::OK, Some(rv), merged)
                }
            }
        }
    };
    let rv = rv.map(|rv| collect_garbage(&mut inner).unwrap_or(rv));
    drop(inner);
    if let Some(rv) = rv {
        shared.changed.send_replace(rv);
    }
    json_response(code, &stored)
}

/// Server-side apply's effect on the fields the applier sends: objects merge
/// key by key, anything else (lists included) replaces. Unlike the real
/// server nothing records who owns which field, so fields an applier stops
/// sending stay, and lists are not merged by key.
fn apply_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) => apply_merge(existing, v),
                    None => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn not_found(resource: Resource, name: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", resource.kind),
    )
}

fn invalid(resource: Resource, name: &str, why: &str) -> Response<Body> {
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("{} \"{name}\" is invalid: {why}", resource.kind),
    )
}

/// A new object with the fields the server fills in: uid, generation 1, and
/// for a Service without one a cluster IP, as the real allocator does.
fn create_object(
    inner: &mut Inner,
    resource: Resource,
    key: &(String, String),
    mut obj: Value,
) -> (Option<u64>, Value) {
    inner.next_uid += 1;
    obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", inner.next_uid));
    obj["metadata"]["namespace"] = json!(key.0);
    obj["metadata"]["generation"] = json!(1);
    if resource.kind == "Service"
        && obj["spec"]["type"] != "ExternalName"
        && obj["spec"]["clusterIP"].as_str().is_none_or(str::is_empty)
    {
        inner.next_cluster_ip += 1;
        let n = inner.next_cluster_ip;
        let ip = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
        obj["spec"]["clusterIP"] = json!(ip);
        obj["spec"]["clusterIPs"] = json!([ip]);
    }
    let rv = store_object(inner, resource, key, &mut obj, "ADDED");
    (Some(rv), obj)
}

/// Stores `obj` under a new resourceVersion and records the change.
fn store_object(
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

/// Removes an object (which must exist) with a DELETED event; its version.
fn remove_object(inner: &mut Inner, resource: Resource, key: &(String, String)) -> u64 {
    let removed = inner.objects.get_mut(&resource).and_then(|m| m.remove(key));
    inner.rv += 1;
    let rv = inner.rv;
    if let Some(mut obj) = removed {
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push(Change {
            rv,
            resource,
            kind: "DELETED",
            object: obj,
        });
    }
    rv
}

/// The garbage collector, run after every delete and HTTP write: an object
/// with owner references none of whose owners exists (by uid) is deleted,
/// with its own DELETED event, and so on down the chain, as background
/// propagation does. The real collector is asynchronous; here it has
/// finished by the time the request that caused it returns. Returns the
/// last version it wrote, if any.
fn collect_garbage(inner: &mut Inner) -> Option<u64> {
    let mut last = None;
    loop {
        let live: std::collections::HashSet<String> = inner
            .objects
            .values()
            .flat_map(|m| m.values())
            .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        let orphans: Vec<(Resource, (String, String))> = inner
            .objects
            .iter()
            .flat_map(|(r, m)| m.iter().map(move |(k, o)| (*r, k, o)))
            .filter(|(_, _, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|owners| {
                        !owners.is_empty()
                            && owners.iter().all(|owner| {
                                owner["uid"].as_str().is_none_or(|uid| !live.contains(uid))
                            })
                    })
            })
            .map(|(r, k, _)| (r, k.clone()))
            .collect();
        if orphans.is_empty() {
            return last;
        }
        for (resource, key) in orphans {
            last = Some(remove_object(inner, resource, &key));
            count(inner, format!("collected {}", resource.path));
        }
    }
}

impl FakeApiServer {
    /// Serves `kind` again after [`FakeApiServer::uninstall`], as when its
    /// CRD is installed; what was stored before is still there.
    pub fn install(&self, kind: &str) {
        self.lock().uninstalled.retain(|k| *k != kind);
    }
}
