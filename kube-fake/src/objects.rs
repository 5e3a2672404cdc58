//! Writes over HTTP: the `status` subresource (merge patch), and create,
//! server-side apply, delete and read of namespaced objects; the garbage
//! collector.

use super::*;

/// `PATCH /api[s]/.../namespaces/<ns>/<plural>/<name>/status` with a JSON
/// merge patch: only the `status` subresource changes.
pub(super) async fn patch_status(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
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
        let rv = store_object(&mut inner, resource, &(ns, name), &mut obj, "MODIFIED");
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

/// A request on one namespaced object, or on the namespaced collection
/// (`POST` only).
pub(super) struct ObjectRoute {
    resource: Resource,
    namespace: String,
    name: Option<String>,
}

/// `/api/v1/namespaces/<ns>/<plural>[/<name>]` or
/// `/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]`, for a served
/// namespaced kind; subresources (`/status`) are not routed here.
pub(super) fn object_route(req: &Request<Incoming>) -> Option<ObjectRoute> {
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

pub(super) async fn serve_object(
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
pub(super) fn collect_garbage(inner: &mut Inner) -> Option<u64> {
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
