//! Inbound plaintext (15006): captured TCP that arrived without HBONE.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::authz::{self, ConnectionAttributes};
use mesh_core::config::MtlsMode;
use tokio::net::TcpStream;

use super::record::{flags, ConnectionRecord};
use crate::metrics::{Reporter, SecurityPolicy};
use crate::socket;
use crate::state::ProxyState;

pub async fn serve_connection(
    state: Arc<ProxyState>,
    client: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
) {
    let dst = match socket::original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%peer, "inbound plaintext: no original destination: {e}");
            state.metrics.failure("inbound", "no_original_destination");
            return;
        }
    };
    let mut record = ConnectionRecord::new(Reporter::destination, peer, dst);
    record.security = SecurityPolicy::none;
    let mesh = state.mesh();
    record.src_workload = mesh.workload_by_ip(peer.ip()).cloned();
    let refuse = |record: ConnectionRecord, reason: &str, flag: &str, msg: String| {
        tracing::warn!(direction = "inbound", %peer, %dst, reason, "plaintext connection refused: {msg}");
        record.refused(&state, reason, flag, &msg);
    };
    if socket::is_listener_itself(dst, listen) {
        return refuse(
            record,
            "no_original_destination",
            flags::NO_ROUTE,
            "connection was not captured (addressed to the listener itself)".into(),
        );
    }
    let Some(workload) = state.local_workload(&mesh, dst.ip()) else {
        let msg = format!("{} is not a workload on node {}", dst.ip(), state.node());
        return refuse(record, "not_local", flags::NO_ROUTE, msg);
    };
    record.dst_identity = Some(workload.identity.clone());
    record.dst_workload = Some(workload.clone());
    if mesh.mtls_mode(&workload) == MtlsMode::Strict {
        return refuse(
            record,
            "mtls_required",
            flags::RBAC,
            format!(
                "{} requires mTLS (PeerAuthentication STRICT)",
                workload.key()
            ),
        );
    }
    if let Err(why) = mesh.waypoint_admission(&workload, None) {
        // Plaintext has no identity, so it cannot be the waypoint's: admitting
        // it would skip the waypoint's L7 policy (PERMISSIVE or not).
        return refuse(record, "waypoint_bypassed", flags::RBAC, why);
    }
    let attrs = ConnectionAttributes {
        source: None,
        source_ip: peer.ip(),
        destination_port: dst.port(),
    };
    let decision = authz::authorize(mesh.policies_for(&workload), &attrs);
    if !decision.is_allowed() {
        return refuse(record, "policy_denied", flags::RBAC, decision.to_string());
    }
    let source = state.settings.upstream_source(peer.ip());
    let upstream =
        match super::outbound::connect_from(dst, source, state.settings.connect_timeout).await {
            Ok(u) => u,
            Err(e) => return refuse(record, "connect_failed", flags::UPSTREAM_FAILURE, e),
        };
    record.via = Some(dst);
    record.opened(&state);
    let policy = super::revoked(state.clone(), dst.ip(), dst.port(), None, peer.ip());
    // A waypoint given to the workload later takes its traffic over: an open
    // plaintext connection now bypasses it and is cut.
    let waypoint = super::inbound::waypoint_revoked(state.clone(), dst.ip(), None);
    let stop = super::inbound::first_of(policy, waypoint);
    let (up, down, err) = super::copy_plain(client, upstream, stop).await;
    let flag = super::flag_for(&err);
    let err = err.as_ref().map(|e| e as &dyn std::fmt::Display);
    record.closed(&state, up, down, flag, err);
}
