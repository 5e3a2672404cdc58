//! The pod proxy subresource, `GET /api/v1/namespaces/<ns>/pods/<name>[:<port>]/proxy[/<path>]`,
//! as `kubectl get --raw` and ambitctl use it to reach a pod's HTTP port
//! without port-forwarding: the request goes to the pod's `status.podIP` at
//! `port` (without one, the first declared container port, as the real
//! server chooses) over plain HTTP/1.1, and the answer comes back as it was.
//! Like the real server, failing to reach the pod is a 503 Status
//! (`error trying to reach service: ...`), an unknown pod a 404 Status.
//!
//! Also here, because the generic object routes are for namespaced kinds
//! only: a JSON merge patch of a Namespace's labels and annotations
//! (`PATCH /api/v1/namespaces/<name>`), as `kubectl label namespace` and
//! `ambitctl waypoint apply --enroll-namespace` send it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{count, empty, json_response, resource_of_kind, status, Body, Shared};

/// The largest answer relayed, as a bound on a misbehaving test server.
const MAX_ANSWER: usize = 64 << 20;
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

enum Route {
    PodProxy {
        namespace: String,
        pod: String,
        port: Option<u16>,
        /// What follows `/proxy`, with the query.
        path: String,
    },
    PatchNamespace {
        name: String,
    },
}

fn route(req: &Request<Incoming>) -> Option<Route> {
    let path = req.uri().path();
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    if req.method() == hyper::Method::PATCH && !rest.is_empty() && !rest.contains('/') {
        return Some(Route::PatchNamespace {
            name: rest.to_string(),
        });
    }
    if req.method() != hyper::Method::GET {
        return None;
    }
    let (namespace, rest) = rest.split_once('/')?;
    let (target, after) = rest.strip_prefix("pods/")?.split_once("/proxy")?;
    if !(after.is_empty() || after.starts_with('/')) {
        return None;
    }
    let (pod, port) = match target.split_once(':') {
        Some((pod, port)) => (pod, Some(port.parse().ok()?)),
        None => (target, None),
    };
    let mut path = if after.is_empty() { "/" } else { after }.to_string();
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    Some(Route::PodProxy {
        namespace: namespace.to_string(),
        pod: pod.to_string(),
        port,
        path,
    })
}

/// Whether [`serve`] answers this request (the server's routing hook).
pub(crate) fn handles(req: &Request<Incoming>) -> bool {
    route(req).is_some()
}

pub(crate) async fn serve(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let Some(route) = route(&req) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "not a proxy route");
    };
    match route {
        Route::PodProxy {
            namespace,
            pod,
            port,
            path,
        } => pod_proxy(shared, &namespace, &pod, port, &path).await,
        Route::PatchNamespace { name } => patch_namespace(shared, &name, req).await,
    }
}

async fn pod_proxy(
    shared: &Shared,
    namespace: &str,
    name: &str,
    port: Option<u16>,
    path: &str,
) -> Response<Body> {
    let pod = {
        let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        count(&mut inner, "proxy pod".to_string());
        resource_of_kind("Pod")
            .and_then(|r| inner.objects.get(&r))
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    };
    let Some(pod) = pod else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
    };
    let first_port = || {
        pod["spec"]["containers"]
            .as_array()?
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .find_map(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
    };
    let Some(port) = port.or_else(first_port) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no port given and the pod declares none",
        );
    };
    let Some(ip) = pod["status"]["podIP"].as_str() else {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!("pod {namespace}/{name} has no IP address yet"),
        );
    };
    let target = format!("{ip}:{port}");
    match tokio::time::timeout(ANSWER_TIMEOUT, forward(&target, path)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!("error trying to reach service: dial tcp {target}: {e}"),
        ),
        Err(_) => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!("error trying to reach service: {target}: no answer"),
        ),
    }
}

/// One GET over a fresh connection, read to its end. Written by hand so the
/// fake needs no HTTP client of its own.
async fn forward(target: &str, path: &str) -> std::io::Result<Response<Body>> {
    let mut tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "i/o timeout"))??;
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: kube-fake-proxy\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut tcp)
        .take(MAX_ANSWER as u64)
        .read_to_end(&mut raw)
        .await?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let code: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("malformed HTTP status line"))?;
    let mut resp =
        Response::builder().status(StatusCode::from_u16(code).map_err(|_| bad("bad HTTP status"))?);
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        } else if k.eq_ignore_ascii_case("content-type") {
            resp = resp.header("content-type", v);
        }
    }
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("malformed chunked body"))?;
    }
    Ok(resp
        .body(BodyExt::boxed(http_body_util::Full::new(Bytes::from(body))))
        .unwrap_or_else(|_| Response::new(empty())))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// Merges `metadata.labels` and `metadata.annotations` of a JSON merge patch
/// into a Namespace (`null` removes a key); anything else in the patch is
/// refused, which is all a namespace patch of a test needs.
async fn patch_namespace(shared: &Shared, name: &str, req: Request<Incoming>) -> Response<Body> {
    let patch = match crate::read_merge_patch(req).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    let allowed = patch.as_object().is_some_and(|o| {
        o.keys().all(|k| k == "metadata")
            && o.get("metadata")
                .and_then(Value::as_object)
                .is_some_and(|m| m.keys().all(|k| k == "labels" || k == "annotations"))
    });
    if !allowed {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "the fake patches only a namespace's metadata.labels and metadata.annotations",
        );
    }
    let Some(resource) = resource_of_kind("Namespace") else {
        return status(StatusCode::NOT_FOUND, "NotFound", "namespaces not served");
    };
    let (rv, object) = {
        let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (String::new(), name.to_string());
        let Some(mut obj) = inner
            .objects
            .get(&resource)
            .and_then(|m| m.get(&key))
            .cloned()
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("namespaces \"{name}\" not found"),
            );
        };
        for field in ["labels", "annotations"] {
            let Some(changes) = patch["metadata"][field].as_object() else {
                continue;
            };
            if !obj["metadata"][field].is_object() {
                obj["metadata"][field] = json!({});
            }
            if let Some(map) = obj["metadata"][field].as_object_mut() {
                for (k, v) in changes {
                    if v.is_null() {
                        map.remove(k);
                    } else {
                        map.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        count(&mut inner, "patch namespace".to_string());
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner
            .objects
            .entry(resource)
            .or_default()
            .insert(key, obj.clone());
        inner.history.push(super::Change {
            rv,
            resource,
            kind: "MODIFIED",
            object: obj.clone(),
        });
        (rv, obj)
    };
    shared.changed.send_replace(rv);
    json_response(StatusCode::OK, &object)
}
