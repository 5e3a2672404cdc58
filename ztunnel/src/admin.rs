//! Admin (15000), metrics (15020) and readiness (15021) HTTP servers. They run on
//! their own single-thread runtime so a slow scrape never competes with traffic.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::admin::{text, typed, OPENMETRICS};
use serde_json::json;
use tokio::net::TcpListener;

use crate::state::ProxyState;

/// Gets (`None`) or sets (`Some(filter)`) the log filter; returns the filter in force.
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

pub async fn serve(listener: TcpListener, kind: Endpoint, state: Arc<ProxyState>, log: LogControl) {
    mesh_core::admin::serve(listener, kind.name(), move |req| {
        route(kind, &state, &log, req)
    })
    .await
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Admin => "admin",
            Endpoint::Metrics => "metrics",
            Endpoint::Readiness => "readiness",
        }
    }
}

fn route(
    kind: Endpoint,
    state: &ProxyState,
    log: &LogControl,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (kind, req.method(), path) {
        (Endpoint::Readiness, &Method::GET, "/healthz/ready") => {
            if state.is_ready() && !state.drain.is_draining() {
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
        (Endpoint::Admin, m, "/logging") if m == Method::GET || m == Method::POST => {
            let query = req.uri().query().unwrap_or("");
            let level = query.split('&').find_map(|kv| kv.strip_prefix("level="));
            // Only POST changes the level: a GET (say, from a browser) never does.
            if m == Method::GET {
                return match log(None) {
                    Ok(now) => text(StatusCode::OK, format!("{now}\n")),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                };
            }
            let Some(level) = level else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "usage: POST /logging?level=<filter>\n",
                );
            };
            match log(Some(level)) {
                Ok(now) => {
                    tracing::info!(filter = %now, "log level changed");
                    text(StatusCode::OK, format!("{now}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (Endpoint::Admin, &Method::GET, "/") => text(
            StatusCode::OK,
            "/config_dump          current config, certificates and pooled connections (JSON)\n\
             /logging[?level=F]    show or (POST) set the log filter\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn config_dump(state: &ProxyState) -> serde_json::Value {
    let mesh = state.mesh();
    let mut local: Vec<String> = mesh
        .local_workloads(state.node())
        .map(|w| w.key())
        .collect();
    local.sort();
    let certs: Vec<_> = state
        .certs
        .all()
        .iter()
        .map(|c| {
            json!({
                "identity": c.identity().to_string(),
                "notBefore": unix(c.not_before()),
                "notAfter": unix(c.not_after()),
                "refreshAt": unix(c.refresh_at()),
            })
        })
        .collect();
    let pool: Vec<_> = state
        .pool()
        .map(|p| p.connections())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, conns, streams)| {
            json!({
                "source": k.src.to_string(),
                "destination": k.dst.to_string(),
                "address": k.dst_addr.to_string(),
                "connections": conns,
                "streams": streams,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": state.node(),
        "ready": state.is_ready(),
        "draining": state.drain.is_draining(),
        "capture": capture_state(state, &mesh),
        "localWorkloads": local,
        "certificates": certs,
        "hbonePool": pool,
        "configSource": match (&state.settings.control_plane.xds_address, &state.settings.config) {
            (Some(addr), _) => json!({"xds": addr, "status": state.xds_status()}),
            (None, Some(path)) => json!({"file": path}),
            (None, None) => json!(null),
        },
        "config": mesh.config(),
    })
}

/// Whether each local workload's traffic is captured, read back from the
/// kernel (the route to its address and the tc programs on that interface)
/// rather than from what the capture task meant to do, so `ambitctl check`
/// reports what really holds. Waypoints are left out: nothing captures them.
fn capture_state(state: &ProxyState, mesh: &mesh_core::config::MeshState) -> serde_json::Value {
    if !state.settings.capture {
        return json!({"enabled": false});
    }
    let mut workloads = Vec::new();
    for w in mesh
        .local_workloads(state.node())
        .filter(|w| !w.workload.native_tunnel)
    {
        for ip in &w.workload.addresses {
            let entry = match ebpf_redirect::interface_for(*ip) {
                Ok(ifname) if Some(&ifname) == state.settings.capture_uplink.as_ref() => json!({
                    "workload": w.key(), "address": ip, "interface": ifname, "attached": false,
                    "error": "the address routes via the uplink",
                }),
                Ok(ifname) => match ebpf_redirect::ingress_programs(&ifname) {
                    Ok(progs) => json!({
                        "workload": w.key(), "address": ip, "interface": ifname,
                        "attached": !progs.is_empty(),
                        "error": progs.is_empty().then_some("no capture program on the interface"),
                    }),
                    Err(e) => json!({
                        "workload": w.key(), "address": ip, "interface": ifname,
                        "attached": false, "error": e.to_string(),
                    }),
                },
                Err(e) => json!({
                    "workload": w.key(), "address": ip, "attached": false, "error": e.to_string(),
                }),
            };
            workloads.push(entry);
        }
    }
    json!({
        "enabled": true,
        "interfaces": state.metrics.capture_interfaces.get(),
        "workloads": workloads,
    })
}
