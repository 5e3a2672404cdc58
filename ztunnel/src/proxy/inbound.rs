//! Inbound HBONE (15008): terminate mTLS, authenticate, authorize, deliver.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::authz::{self, ConnectionAttributes};
use mesh_core::hbone::{self, copy_tcp_tunnel, IncomingTunnel};
use mesh_core::tls;
use mesh_core::Identity;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

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
    let tls_config = match state.server_tls(&workload.identity) {
        Ok(c) => c,
        Err(e) => return fail(e.reason(), e.to_string()),
    };
    let accept = TlsAcceptor::from(tls_config).accept(hbone::transport(tcp));
    let tls = match tokio::time::timeout(state.settings.connect_timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let why = tls::describe_io_error(&e);
            return fail("tls_handshake_failed", format!("TLS handshake: {why}"));
        }
        Err(_) => return fail("tls_handshake_failed", "TLS handshake timed out".into()),
    };
    let peer_id = match tls::peer_identity(tls.get_ref().1) {
        Ok(id) => id,
        Err(e) => return fail("no_peer_identity", format!("client certificate: {e}")),
    };
    let Some(_guard) = state.drain.guard() else {
        return;
    };
    tracing::debug!(%peer, peer_identity = %peer_id, local = %local, "hbone connection established");
    let handler_state = state.clone();
    let served_identity = workload.identity.clone();
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
                served_identity.clone(),
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
    served_identity: Identity,
) {
    let src_ip = incoming
        .headers()
        .get(hbone::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(hbone::parse_forwarded_for)
        .unwrap_or(peer.ip());
    let target = incoming.target();
    let dst = target
        .as_ref()
        .copied()
        .unwrap_or(SocketAddr::new([0, 0, 0, 0].into(), 0));
    let mut record = ConnectionRecord::new(Reporter::destination, SocketAddr::new(src_ip, 0), dst);
    record.security = SecurityPolicy::mutual_tls;
    record.src_identity = Some(peer_id.clone());
    let mesh = state.mesh();
    record.src_workload = mesh
        .workload_by_ip(src_ip)
        .filter(|w| w.identity == peer_id)
        .cloned();

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

    let dst = match target {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                record,
                incoming,
                StatusCode::BAD_REQUEST,
                "bad_request",
                flags::NO_ROUTE,
                e.to_string(),
            )
        }
    };
    let Some(workload) = state.local_workload(&mesh, dst.ip()) else {
        let msg = format!("CONNECT to {dst}: not a workload on node {}", state.node());
        return refuse(
            record,
            incoming,
            StatusCode::BAD_REQUEST,
            "not_local",
            flags::NO_ROUTE,
            msg,
        );
    };
    record.dst_identity = Some(workload.identity.clone());
    record.dst_workload = Some(workload.clone());
    if workload.identity != served_identity {
        // The TLS session proved a different identity than the target's: tunnelling
        // on would let a peer reach a workload it never verified.
        let msg = format!(
            "CONNECT to {dst} ({}) over a connection for {served_identity}",
            workload.identity
        );
        return refuse(
            record,
            incoming,
            StatusCode::BAD_REQUEST,
            "identity_mismatch",
            flags::NO_ROUTE,
            msg,
        );
    }

    let attrs = ConnectionAttributes {
        source: Some(&peer_id),
        source_ip: src_ip,
        destination_port: dst.port(),
    };
    let decision = authz::authorize(mesh.policies_for(&workload), &attrs);
    if !decision.is_allowed() {
        return refuse(
            record,
            incoming,
            StatusCode::FORBIDDEN,
            "policy_denied",
            flags::RBAC,
            decision.to_string(),
        );
    }
    tracing::debug!(%dst, %peer_id, "{decision}");

    let upstream = match super::outbound::connect(dst, state.settings.connect_timeout).await {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                record,
                incoming,
                StatusCode::SERVICE_UNAVAILABLE,
                "connect_failed",
                flags::UPSTREAM_FAILURE,
                e,
            )
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
    let outcome = copy_tcp_tunnel(upstream, tunnel).await;
    let flag = if outcome.error.is_some() {
        flags::RESET
    } else {
        flags::NONE
    };
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
