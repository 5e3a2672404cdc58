//! Inbound HBONE (15008): terminate mTLS, authenticate, authorize, deliver.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::authz::{self, ConnectionAttributes};
use mesh_core::config::WorkloadInfo;
use mesh_core::hbone::{self, copy_tcp_tunnel, IncomingTunnel};
use mesh_core::Identity;
use tokio::net::TcpStream;

use super::record::{flags, ConnectionRecord};
use crate::metrics::{Reporter, SecurityPolicy};
use crate::socket::canonical;
use crate::state::ProxyState;

/// Handles one accepted TCP connection on an HBONE listener.
pub async fn serve_connection(state: Arc<ProxyState>, tcp: TcpStream, peer: SocketAddr) {
    let fail = |reason: &str, msg: String| {
        tracing::warn!(direction = "inbound", %peer, reason, "hbone connection refused: {msg}");
        state.metrics.failure("inbound", reason);
    };
    let local = match tcp.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => return fail("socket_error", e.to_string()),
    };
    let mesh = state.mesh();
    // The connection's destination address selects which workload's certificate
    // we present, exactly as a captured connection to <pod ip>:15008 would.
    let Some(workload) = state.local_workload(&mesh, local.ip()) else {
        return fail(
            "not_local",
            format!("{} is not a workload on node {}", local.ip(), state.node()),
        );
    };
    if workload.workload.native_tunnel {
        // A waypoint terminates its own tunnels; answering for it would put
        // its identity in ztunnel's hands and skip its L7 policy.
        return fail(
            "native_tunnel",
            format!("{} takes HBONE itself", workload.key()),
        );
    }
    let tls_config = match state.server_tls(&workload.identity) {
        Ok(c) => c,
        Err(e) => return fail(e.reason(), e.to_string()),
    };
    let (tls, peer_id) =
        match hbone::server::accept_mtls(tcp, tls_config, state.settings.connect_timeout).await {
            Ok(accepted) => accepted,
            Err((reason, msg)) => return fail(reason, msg),
        };
    let Some(_guard) = state.drain.guard() else {
        return;
    };
    tracing::debug!(%peer, peer_identity = %peer_id, local = %local, "hbone connection established");
    let handler_state = state.clone();
    let served = workload.clone();
    let result = hbone::serve_connection(
        tls,
        state.settings.h2_tuning(),
        state.drain.watch(),
        move |incoming| {
            serve_stream(
                handler_state.clone(),
                incoming,
                peer,
                peer_id.clone(),
                served.clone(),
            )
        },
    )
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "hbone connection ended with error");
    }
}

async fn serve_stream(
    state: Arc<ProxyState>,
    incoming: IncomingTunnel,
    peer: SocketAddr,
    peer_id: Identity,
    served: Arc<WorkloadInfo>,
) {
    let target = incoming.target();
    let dst = target
        .as_ref()
        .copied()
        .unwrap_or(SocketAddr::new([0, 0, 0, 0].into(), 0));
    let mut record =
        ConnectionRecord::new(Reporter::destination, SocketAddr::new(peer.ip(), 0), dst);
    record.security = SecurityPolicy::mutual_tls;
    record.src_identity = Some(peer_id.clone());
    record.span =
        crate::telemetry::inbound_span(mesh_core::telemetry::context::extract(incoming.headers()));
    let mesh = state.mesh();

    let refuse = |record: ConnectionRecord,
                  incoming: IncomingTunnel,
                  status,
                  reason,
                  flag,
                  msg: String| {
        tracing::warn!(direction = "inbound", %peer, src_identity = %peer_id, reason, "tunnel refused: {msg}");
        record.refused(&state, reason, flag, &msg);
        incoming.reject(status);
    };
    let bad = StatusCode::BAD_REQUEST;

    // The source address policy sees. A ztunnel forwards its workload's address;
    // it is believed only if that address belongs to a workload with the
    // identity the peer just proved, so no certificate holder can claim an
    // arbitrary IP to get past ipBlocks rules.
    let forwarded = incoming
        .headers()
        .get(hbone::FORWARDED)
        .map(|v| v.to_str().ok().and_then(hbone::parse_forwarded_for));
    let src_ip = match forwarded {
        None => peer.ip(),
        Some(Some(ip)) => match mesh.workload_by_ip(ip) {
            Some(w) if w.identity == peer_id => {
                record.src_workload = Some(w.clone());
                ip
            }
            // A waypoint may name its own client; that is not believed (the
            // waypoint is the source here, as in Istio's ztunnel, which reads
            // no source from the header), but not refused either.
            _ if mesh.is_waypoint_identity(&peer_id) => {
                record.src_workload = mesh
                    .workload_by_ip(peer.ip())
                    .filter(|w| w.identity == peer_id)
                    .cloned();
                peer.ip()
            }
            _ => {
                let msg =
                    format!("forwarded source {ip} is not a workload with identity {peer_id}");
                return refuse(
                    record,
                    incoming,
                    bad,
                    "forwarded_mismatch",
                    flags::NO_ROUTE,
                    msg,
                );
            }
        },
        Some(None) => {
            let msg = "unparseable forwarded header".to_string();
            return refuse(record, incoming, bad, "bad_request", flags::NO_ROUTE, msg);
        }
    };
    record.src_addr = SocketAddr::new(src_ip, 0);

    let dst = match target {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                record,
                incoming,
                bad,
                "bad_request",
                flags::NO_ROUTE,
                e.to_string(),
            )
        }
    };
    let Some(workload) = state.local_workload(&mesh, dst.ip()) else {
        let msg = format!("CONNECT to {dst}: not a workload on node {}", state.node());
        return refuse(record, incoming, bad, "not_local", flags::NO_ROUTE, msg);
    };
    record.dst_identity = Some(workload.identity.clone());
    record.dst_workload = Some(workload.clone());
    if workload.key() != served.key() {
        // The TLS session was set up for (and proved by) another workload:
        // tunnelling on would reach a workload the peer never dialled.
        let msg = format!(
            "CONNECT to {dst} ({}) over a connection for {}",
            workload.key(),
            served.key()
        );
        return refuse(
            record,
            incoming,
            bad,
            "wrong_workload",
            flags::NO_ROUTE,
            msg,
        );
    }
    if dst.port() == state.settings.hbone_port {
        // A tunnel into our own HBONE port would hide the real source behind us.
        let msg = format!("CONNECT to {dst}: the HBONE port itself");
        return refuse(record, incoming, bad, "self_call", flags::NO_ROUTE, msg);
    }

    if let Err(why) = mesh.waypoint_admission(&workload, Some(&peer_id)) {
        // Traffic for a workload behind a waypoint must come through it, or
        // the waypoint's L7 policy was skipped.
        return refuse(
            record,
            incoming,
            StatusCode::FORBIDDEN,
            "waypoint_bypassed",
            flags::RBAC,
            why,
        );
    }

    let attrs = ConnectionAttributes {
        source: Some(&peer_id),
        source_ip: src_ip,
        destination_port: dst.port(),
    };
    let decision = authz::authorize(mesh.policies_for(&workload), &attrs);
    if !decision.is_allowed() {
        let msg = decision.to_string();
        return refuse(
            record,
            incoming,
            StatusCode::FORBIDDEN,
            "policy_denied",
            flags::RBAC,
            msg,
        );
    }
    tracing::debug!(%dst, %peer_id, "{decision}");

    let source = state.settings.upstream_source(src_ip);
    let upstream =
        match super::outbound::connect_from(dst, source, state.settings.connect_timeout).await {
            Ok(t) => t,
            Err(e) => {
                let unavailable = StatusCode::SERVICE_UNAVAILABLE;
                return refuse(
                    record,
                    incoming,
                    unavailable,
                    "connect_failed",
                    flags::UPSTREAM_FAILURE,
                    e,
                );
            }
        };
    record.via = Some(dst);
    let tunnel = match incoming.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "peer went away before the tunnel was answered");
            return;
        }
    };
    record.opened(&state);
    let policy = super::revoked(
        state.clone(),
        dst.ip(),
        dst.port(),
        Some(peer_id.clone()),
        src_ip,
    );
    let waypoint = waypoint_revoked(state.clone(), dst.ip(), Some(peer_id.clone()));
    let stop = first_of(policy, waypoint);
    let outcome = copy_tcp_tunnel(upstream, tunnel, stop).await;
    let flag = super::flag_for(&outcome.error);
    let err = outcome.error.as_ref().map(|e| e as &dyn std::fmt::Display);
    // Bytes the tunnel delivered to the workload came from the source.
    record.closed(
        &state,
        outcome.tunnel_to_tcp,
        outcome.tcp_to_tunnel,
        flag,
        err,
    );
}

/// Resolves, with the reason, once a config change puts the local workload
/// at `dst_ip` behind a waypoint that `peer` is not (`None`: plaintext).
/// A workload that leaves this node is [`super::revoked`]'s to report.
pub(crate) async fn waypoint_revoked(
    state: Arc<ProxyState>,
    dst_ip: std::net::IpAddr,
    peer: Option<Identity>,
) -> String {
    let mut rx = state.watch_mesh();
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let mesh = rx.borrow_and_update().clone();
        let Some(workload) = state.local_workload(&mesh, dst_ip) else {
            continue;
        };
        if let Err(why) = mesh.waypoint_admission(&workload, peer.as_ref()) {
            return format!("waypoint bypassed: {why}");
        }
    }
}

/// The reason of whichever stop condition fires first.
pub(crate) async fn first_of(
    a: impl std::future::Future<Output = String>,
    b: impl std::future::Future<Output = String>,
) -> String {
    tokio::select! {
        why = a => why,
        why = b => why,
    }
}
