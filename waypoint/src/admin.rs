//! Admin (15000, `/config_dump`), metrics (15020) and readiness (15021), on
//! their own single-thread runtime so a scrape never competes with requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;

use crate::state::WaypointState;

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

pub async fn serve(listener: TcpListener, kind: Endpoint, state: Arc<WaypointState>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(?kind, "admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(kind, &state, req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn route(kind: Endpoint, state: &WaypointState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (kind, req.method(), req.uri().path()) {
        (Endpoint::Readiness, &Method::GET, "/healthz/ready") => {
            if state.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Endpoint::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut resp = text(StatusCode::OK, state.metrics.encode());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (Endpoint::Admin, &Method::GET, "/config_dump") => {
            let body = serde_json::to_string_pretty(&config_dump(state)).unwrap_or_default();
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        (Endpoint::Admin, &Method::GET, "/") => text(
            StatusCode::OK,
            "/config_dump    identity, certificate, routes, policies, upstream pool (JSON)\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn config_dump(state: &WaypointState) -> serde_json::Value {
    let view = state.view();
    let identity = view.own.as_ref().map(|w| w.identity.clone());
    let cert = identity.as_ref().and_then(|id| state.certs.get(id));
    let config = view.mesh.config();
    json!({
        "gateway": format!("{}/{}", state.gateway.0, state.gateway.1),
        "workload": view.own.as_ref().map(|w| w.key()),
        "identity": identity.map(|i| i.to_string()),
        "certificate": cert.map(|c| json!({
            "notBefore": unix(c.not_before()),
            "notAfter": unix(c.not_after()),
            "refreshAt": unix(c.refresh_at()),
        })),
        "ready": state.is_ready(),
        "draining": state.drain.is_draining(),
        "upstreamIdleConnections": state.upstream().map(|u| u.idle_connections()),
        "configSource": match (&state.settings.xds_address, &state.settings.config) {
            (Some(addr), _) => json!({"xds": addr, "status": state.xds_status()}),
            (None, Some(path)) => json!({"file": path}),
            (None, None) => json!(null),
        },
        "httpRoutes": config.http_routes,
        "httpPolicies": config.http_policies,
        "trafficPolicies": config.traffic_policies,
    })
}
