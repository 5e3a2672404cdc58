//! Ambit ztunnel: the per-node L4 proxy.
//!
//! Captured outbound connections of local workloads (15001, or SOCKS5 on 15080)
//! leave through mTLS HBONE tunnels made with the source workload's certificate;
//! HBONE arriving for local workloads (15008) is authenticated, authorized and
//! delivered; captured plaintext (15006) is admitted only where policy allows.

pub mod admin;
pub mod capture;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod settings;
pub mod socket;
pub mod state;
pub mod telemetry;
pub mod xds;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use mesh_core::config::{MeshConfig, MeshState};
use mesh_core::hbone::{Pool, PoolConfig};

use crate::admin::{Endpoint, LogControl};
use crate::settings::{HboneListen, Listen, Settings};
use crate::state::ProxyState;

/// Runs a ztunnel until SIGTERM/SIGINT, then drains.
pub fn run(settings: Settings, log: LogControl) -> anyhow::Result<()> {
    settings.validate().map_err(anyhow::Error::msg)?;
    let config = match &settings.config {
        Some(path) => reload::load_config(path).map_err(anyhow::Error::msg)?,
        // Empty until the control plane's first push; readiness waits for it.
        None => MeshConfig {
            trust_domain: settings.control_plane.trust_domain.clone(),
            ..MeshConfig::default()
        },
    };
    let store = settings.control_plane.initial_certificates()?;
    let state = Arc::new(ProxyState::new(settings, MeshState::new(config), store));
    if state.settings.control_plane.certs.is_some() {
        warn_missing_certs(&state);
    }
    // Control-plane work (xDS, CA) and the admin servers share one small
    // runtime off the data path. It is built here so the clients, built up
    // front, make a bad address fail the start.
    let admin_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the admin runtime")?;
    let xds_address = state.settings.control_plane.xds_address.clone();
    let ca_client = {
        let _in_runtime = admin_rt.enter();
        let observed = state.clone();
        state.settings.control_plane.ca_client(
            &state.settings.node,
            &state.certs,
            mesh_core::ca_client::node_workloads(),
            move |result| {
                observed
                    .metrics
                    .certificate_fetches
                    .get_or_create(&metrics::ResultLabels {
                        result: result.to_string(),
                    })
                    .inc();
            },
        )?
    };

    // Bind everything up front so a port clash fails the start, not a later request.
    let s = &state.settings;
    let bind = |l: Listen,
                transparent: bool,
                what: &str|
     -> anyhow::Result<Option<std::net::TcpListener>> {
        match l {
            Listen::Off => Ok(None),
            Listen::At(addr) => socket::bind_std(addr, transparent)
                .map(Some)
                .with_context(|| format!("binding {what} listener on {addr}")),
        }
    };
    let admin_listeners = [
        (bind(s.admin(), false, "admin")?, Endpoint::Admin),
        (bind(s.metrics(), false, "metrics")?, Endpoint::Metrics),
        (
            bind(s.readiness(), false, "readiness")?,
            Endpoint::Readiness,
        ),
    ];
    let transparent = s.transparent || s.capture;
    let outbound = bind(s.outbound(), transparent, "outbound")?;
    let plaintext = bind(s.inbound_plaintext(), transparent, "inbound plaintext")?;
    let socks5 = bind(s.socks5(), false, "socks5")?;
    if let Some(l) = &socks5 {
        // A SOCKS5 client always speaks first: its connection is handed over
        // with the greeting already there, one wake-up instead of two.
        socket::defer_accept(l, proxy::socks5::HANDSHAKE_TIMEOUT);
    }
    let hbone = match s.hbone_addr {
        HboneListen::At(addr) => bind(Listen::At(addr), transparent, "hbone")?,
        HboneListen::PerWorkload => None,
    };

    let admin_state = state.clone();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            admin_rt.block_on(async move {
                for (listener, kind) in admin_listeners {
                    let Some(l) = listener else { continue };
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(admin::serve(l, kind, admin_state.clone(), log.clone()));
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
                reload::watch(admin_state).await;
                // Control-plane clients and admin servers keep running.
                std::future::pending::<()>().await;
            });
        })
        .context("spawning admin thread")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(state.settings.workers())
        .thread_name("dataplane")
        .enable_all()
        .build()
        .context("building data-plane runtime")?;
    rt.block_on(async move {
        state.init_pool(Pool::new(PoolConfig {
            idle_timeout: state.settings.pool_idle_timeout,
            connect_timeout: state.settings.connect_timeout,
            tuning: state.settings.h2_tuning(),
            ..PoolConfig::default()
        }));
        if let (Some(l), true) = (&outbound, state.settings.capture) {
            use std::os::fd::AsFd;
            let sockets = ebpf_redirect::ListenerSockets {
                outbound: Some(l.as_fd()),
                hbone: hbone.as_ref().map(|l| l.as_fd()),
                plaintext: plaintext.as_ref().map(|l| l.as_fd()),
            };
            capture::start(state.clone(), socket::canonical(l.local_addr()?), sockets)?;
        }
        if let Some(l) = outbound {
            let l = tokio::net::TcpListener::from_std(l)?;
            let listen = socket::canonical(l.local_addr()?);
            proxy::spawn_accept_loop(state.clone(), l, "outbound", move |st, tcp, peer| {
                proxy::outbound::serve_captured(st, tcp, peer, listen)
            });
        }
        if let Some(l) = plaintext {
            let l = tokio::net::TcpListener::from_std(l)?;
            let listen = socket::canonical(l.local_addr()?);
            proxy::spawn_accept_loop(state.clone(), l, "inbound_plaintext", move |st, tcp, peer| {
                proxy::plaintext::serve_connection(st, tcp, peer, listen)
            });
        }
        if let Some(l) = socks5 {
            let l = tokio::net::TcpListener::from_std(l)?;
            proxy::spawn_accept_loop(state.clone(), l, "socks5", proxy::socks5::serve_connection);
        }
        proxy::run_hbone(state.clone(), hbone)?;
        state.ready.store(true, Ordering::Release);
        tracing::info!(node = %state.node(), "ztunnel ready");

        wait_for_signal().await?;
        tracing::info!(deadline = ?state.settings.drain_timeout, "draining: no new connections, waiting for open ones");
        let clean = state.drain.drain(state.settings.drain_timeout).await;
        if clean {
            tracing::info!("drained, exiting");
        } else {
            tracing::warn!("drain deadline passed with connections still open, exiting");
        }
        Ok(())
    })
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

fn warn_missing_certs(state: &ProxyState) {
    let mesh = state.mesh();
    // Waypoints hold their own certificates, not ztunnel.
    for w in mesh
        .local_workloads(state.node())
        .filter(|w| !w.workload.native_tunnel)
    {
        if state.certs.get(&w.identity).is_none() {
            tracing::warn!(workload = %w.key(), identity = %w.identity, "no certificate: its connections will be refused");
        }
    }
}
