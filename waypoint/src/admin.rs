//! Admin (15000, `/config_dump`), metrics (15020) and readiness (15021), on
//! their own single-thread runtime so a scrape never competes with requests.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::admin::{text, typed, OPENMETRICS};
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
    let name = match kind {
        Endpoint::Admin => "admin",
        Endpoint::Metrics => "metrics",
        Endpoint::Readiness => "readiness",
    };
    mesh_core::admin::serve(listener, name, move |req| route(kind, &state, req)).await
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
            typed(OPENMETRICS, state.metrics.encode())
        }
        (Endpoint::Admin, &Method::GET, "/config_dump") => {
            let body = serde_json::to_string_pretty(&config_dump(state)).unwrap_or_default();
            typed("application/json", body)
        }
        (Endpoint::Admin, &Method::GET, "/") => text(
            StatusCode::OK,
            "/config_dump    identity, certificate, routes, policies, upstream pool (JSON)\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
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
        "version": env!("CARGO_PKG_VERSION"),
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
        "configSource": match (&state.settings.control_plane.xds_address, &state.settings.config) {
            (Some(addr), _) => json!({"xds": addr, "status": state.xds_status()}),
            (None, Some(path)) => json!({"file": path}),
            (None, None) => json!(null),
        },
        "httpRoutes": config.http_routes,
        "httpPolicies": config.http_policies,
        "trafficPolicies": config.traffic_policies,
    })
}
