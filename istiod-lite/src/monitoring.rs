//! The monitoring port (15014): `/metrics`, `/ready`, and debug views of what
//! is being served (`/debug/config`: the mesh model; `/debug/rejected`: objects
//! left out and why, the manifests-mode stand-in for Kubernetes status;
//! `/debug/routes`: every HTTPRoute's conditions per parent; `/debug/version`:
//! the build, for `ambitctl status`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::pipeline::Outputs;

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, outputs: Arc<Outputs>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("monitoring accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (metrics, outputs) = (metrics.clone(), outputs.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&metrics, &outputs, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn route(metrics: &Metrics, outputs: &Outputs, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/ready" => {
            let version = outputs.snapshots.borrow().version;
            if version > 0 {
                reply(
                    StatusCode::OK,
                    "text/plain",
                    format!("ready (snapshot {version})\n"),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no snapshot yet\n".into(),
                )
            }
        }
        "/debug/config" => {
            let mesh = outputs.mesh.borrow().clone();
            match serde_json::to_string_pretty(&*mesh) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/debug/version" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::json!({"component": "istiod-lite", "version": env!("CARGO_PKG_VERSION")})
                .to_string(),
        ),
        "/debug/rejected" => {
            let rejected = outputs.rejected.borrow().clone();
            let list: Vec<_> = rejected
                .iter()
                .map(|r| serde_json::json!({"object": r.object, "origin": r.origin, "reason": r.reason}))
                .collect();
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::Value::Array(list).to_string(),
            )
        }
        "/debug/routes" => {
            let routes = outputs.route_status.borrow().clone();
            match serde_json::to_string_pretty(&*routes) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
