//! The waypoint: Ambit's L7 proxy, entered only when L7 policy applies.
//!
//! * [`inbound`]: HBONE in (15008) as the waypoint's own identity; HTTP or L4.
//! * [`proxy`]: the request path (route, authorize, limit, forward, account).
//! * [`upstream`]: HTTP/1.1 inside HBONE to the chosen endpoint's ztunnel.
//! * [`h2c`]: HTTP/1.1 `Upgrade: h2c` into the HTTP/2 server.
//! * [`sniff`]: is a tunnel's payload HTTP/1.x, HTTP/2 or opaque bytes.
//! * [`route`]: Gateway API HTTPRoute matching, filters and backend choice.
//! * [`authz`]: L7 AuthorizationPolicy decisions.
//! * [`resilience`]: circuit breaking, outlier ejection, local rate limits.
//! * [`telemetry`]: OpenTelemetry spans over OTLP, W3C trace context.
//! * [`xds`]: the mesh and L7 config from the control plane.
//! * [`state`], [`settings`], [`metrics`], [`admin`]: the process around them.

pub mod admin;
pub mod authz;
pub mod h2c;
pub mod inbound;
pub mod metrics;
pub mod proxy;
pub mod resilience;
pub mod route;
pub mod settings;
pub mod sniff;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod xds;

use std::sync::Arc;

use anyhow::Context;
use mesh_core::config::MeshConfig;
use mesh_core::hbone::{Pool, PoolConfig};
use mesh_core::reload::Reloaded;

use crate::metrics::ResultLabels;
use crate::settings::Settings;
use crate::state::WaypointState;

/// Runs the waypoint until SIGTERM/SIGINT, then drains.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    settings.validate().map_err(anyhow::Error::msg)?;
    let config = match &settings.config {
        Some(path) => mesh_core::reload::load_config(path).map_err(anyhow::Error::msg)?,
        None => MeshConfig {
            trust_domain: settings.control_plane.trust_domain.clone(),
            ..MeshConfig::default()
        },
    };
    let store = settings.control_plane.initial_certificates()?;
    let state = Arc::new(WaypointState::new(settings, config, store));

    let admin_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the admin runtime")?;
    let ca_client = {
        let _in_runtime = admin_rt.enter();
        let observed = state.clone();
        state.settings.control_plane.ca_client(
            &state.settings.node,
            &state.certs,
            own_workload(&state),
            move |result| {
                observed
                    .metrics
                    .certificate_fetches
                    .get_or_create(&ResultLabels { result })
                    .inc();
            },
        )?
    };

    // Bound up front so a port clash fails the start, not a later request.
    let s = &state.settings;
    let bind = |addr, what: &str| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| format!("binding the {what} listener on {addr}"))
    };
    let admin_listeners = [
        (bind(s.admin_addr, "admin")?, admin::Endpoint::Admin),
        (bind(s.metrics_addr, "metrics")?, admin::Endpoint::Metrics),
        (
            bind(s.readiness_addr, "readiness")?,
            admin::Endpoint::Readiness,
        ),
    ];
    let hbone = bind(s.hbone_addr, "HBONE")?;

    let xds_address = state.settings.control_plane.xds_address.clone();
    let admin_state = state.clone();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            admin_rt.block_on(async move {
                for (l, kind) in admin_listeners {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(admin::serve(l, kind, admin_state.clone()));
                        }
                        Err(e) => tracing::error!(?kind, "admin listener: {e}"),
                    }
                }
                if let Some(addr) = xds_address {
                    let st = admin_state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = xds::run(st, addr).await {
                            tracing::error!("xDS client stopped: {e:#}");
                        }
                    });
                }
                if let Some(ca) = ca_client {
                    tokio::spawn(ca.run(admin_state.watch_mesh()));
                }
                watch_static(admin_state).await;
                std::future::pending::<()>().await;
            });
        })
        .context("spawning the admin thread")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(state.settings.workers())
        .thread_name("dataplane")
        .enable_all()
        .build()
        .context("building the data-plane runtime")?;
    rt.block_on(async move {
        let pool = Pool::new(PoolConfig {
            idle_timeout: state.settings.pool_idle_timeout,
            connect_timeout: state.settings.connect_timeout,
            ..PoolConfig::default()
        });
        state.init_upstream(upstream::Upstream::new(
            pool,
            state.certs.clone(),
            state.settings.pool_idle_timeout,
        ));
        let listener = tokio::net::TcpListener::from_std(hbone)?;
        tokio::spawn(inbound::serve(state.clone(), listener));
        state.set_ready();
        let view = state.view();
        tracing::info!(
            gateway = %state.settings.gateway,
            identity = ?view.own.as_ref().map(|w| w.identity.to_string()),
            addr = %state.settings.hbone_addr,
            "waypoint ready"
        );
        wait_for_signal().await?;
        tracing::info!(deadline = ?state.settings.drain_timeout, "draining");
        if state.drain.drain(state.settings.drain_timeout).await {
            tracing::info!("drained, exiting");
        } else {
            tracing::warn!("drain deadline passed with tunnels still open, exiting");
        }
        Ok(())
    })
}

/// A waypoint asks the CA for its own identity only: the workload at its
/// HBONE address, which must be a waypoint (`nativeTunnel`).
fn own_workload(state: &WaypointState) -> mesh_core::ca_client::Scope {
    let ip = state.settings.hbone_addr.ip();
    Arc::new(move |w: &mesh_core::config::WorkloadInfo| {
        w.workload.native_tunnel && w.workload.addresses.contains(&ip)
    })
}

/// Follows the static config file and certificate directory, if given.
async fn watch_static(state: Arc<WaypointState>) {
    let s = &state.settings;
    mesh_core::reload::watch(
        s.config.clone(),
        s.control_plane.certs.clone(),
        state.certs.clone(),
        s.reload_interval,
        |change| {
            let (result, ok) = match change {
                Reloaded::Config(Ok(config)) => {
                    let routes = config.http_routes.len();
                    state.apply(config);
                    tracing::info!(routes, "config reloaded");
                    ("config_ok", true)
                }
                Reloaded::Config(Err(e)) => {
                    tracing::error!("config rejected, keeping the last good config: {e}");
                    ("config_rejected", false)
                }
                Reloaded::Certificates(Ok(n)) => {
                    tracing::info!(certificates = n, "certificates reloaded");
                    ("certificates_ok", true)
                }
                Reloaded::Certificates(Err(e)) => {
                    tracing::error!("certificates rejected, keeping the current ones: {e}");
                    ("certificates_rejected", false)
                }
            };
            let _ = ok;
            state
                .metrics
                .config_updates
                .get_or_create(&ResultLabels { result })
                .inc();
        },
    )
    .await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
