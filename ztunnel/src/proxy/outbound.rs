//! Outbound: a local workload's connection leaves through an HBONE tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use mesh_core::config::{Destination, ResolveError, WaypointRoute, WorkloadInfo};
use mesh_core::hbone::{self, copy_tcp_tunnel, HboneError, PoolKey};
use tokio::net::TcpStream;

use super::record::{flags, ActiveEndpoint, ConnectionRecord};
use crate::metrics::{Reporter, SecurityPolicy};
use crate::state::ProxyState;

/// What the client asked to reach.
#[derive(Debug, Clone)]
pub enum Target {
    Addr(SocketAddr),
    /// A service hostname (SOCKS5 clients may name one).
    Host(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

pub enum Upstream {
    Tunnel(hbone::pool::PooledTunnel, ActiveEndpoint),
    Direct(TcpStream),
    /// A workload on this node: no tunnel, ztunnel applies the destination's
    /// policy itself (the source identity is one it holds).
    Local(TcpStream, ActiveEndpoint),
}

/// Why an outbound connection was not established.
pub struct Refusal {
    pub record: ConnectionRecord,
    pub reason: &'static str,
    pub flags: &'static str,
    pub message: String,
    /// Whether the destination said no (policy) rather than being unreachable.
    pub denied: bool,
}

impl Refusal {
    pub fn report(&self, state: &ProxyState) {
        tracing::warn!(
            direction = "outbound",
            src = %self.record.src_addr,
            dst = %self.record.dst_addr,
            reason = self.reason,
            "connection refused: {}",
            self.message
        );
        self.record
            .refused(state, self.reason, self.flags, &self.message);
    }
}

/// Resolves the destination and opens the upstream side.
pub async fn establish(
    state: &Arc<ProxyState>,
    src: SocketAddr,
    target: Target,
) -> Result<(ConnectionRecord, Upstream), Box<Refusal>> {
    let mesh = state.mesh();
    let placeholder_dst = match &target {
        Target::Addr(a) => *a,
        Target::Host(_, p) => SocketAddr::new([0, 0, 0, 0].into(), *p),
    };
    let mut record = ConnectionRecord::new(Reporter::source, src, placeholder_dst);
    let refuse = |record, reason, flags, message: String| {
        Box::new(Refusal {
            record,
            reason,
            flags,
            message,
            denied: false,
        })
    };

    let Some(src_workload) = state.local_workload(&mesh, src.ip()) else {
        let msg = format!(
            "source {} is not a workload on node {}",
            src.ip(),
            state.node()
        );
        return Err(refuse(record, "unknown_source", flags::NO_ROUTE, msg));
    };
    record.src_identity = Some(src_workload.identity.clone());
    record.src_workload = Some(src_workload.clone());

    let resolved = match &target {
        Target::Addr(a) => mesh.resolve(*a),
        Target::Host(h, p) => match mesh.resolve_host(h, *p) {
            Some(r) => r,
            None => {
                let msg = format!("{h} is not a known service hostname");
                return Err(refuse(record, "unknown_host", flags::NO_ROUTE, msg));
            }
        },
    };
    let destination = match resolved {
        Ok(d) => d,
        Err(e) => {
            let flag = match e {
                ResolveError::NoEndpoints(_) => flags::NO_HEALTHY_UPSTREAM,
                ResolveError::NoSuchPort(..) => flags::NO_ROUTE,
            };
            return Err(refuse(record, "no_route", flag, e.to_string()));
        }
    };

    // A waypoint's own connections never go through a waypoint: it is the
    // waypoint (Istio's ztunnel skips it for them too). Capture leaves
    // waypoints alone; this covers one reaching us another way (SOCKS5).
    let waypoint = if src_workload.workload.native_tunnel {
        None
    } else {
        mesh.waypoint_for(&destination)
    };

    match destination {
        Destination::Passthrough(addr) => {
            record.dst_addr = addr;
            record.via = Some(addr);
            record.security = SecurityPolicy::none;
            // Passthrough leaves with the node's address: a non-mesh
            // destination's replies are not guaranteed to pass capture (a
            // non-mesh pod on this node answers straight to the client pod).
            match connect_from(addr, None, state.settings.connect_timeout).await {
                Ok(tcp) => Ok((record, Upstream::Direct(tcp))),
                Err(e) => Err(refuse(record, "connect_failed", flags::UPSTREAM_FAILURE, e)),
            }
        }
        Destination::Workload {
            workload,
            service,
            addr,
        } => {
            // What the client addressed: the VIP (for a hostname, the
            // service's first VIP, as resolution used) or the pod address.
            let original = match &target {
                Target::Addr(a) => *a,
                Target::Host(_, p) => service
                    .as_ref()
                    .and_then(|s| s.service.addresses.first())
                    .map_or(addr, |vip| SocketAddr::new(*vip, *p)),
            };
            record.dst_addr = match &target {
                Target::Addr(a) => *a,
                Target::Host(..) => addr,
            };
            record.dst_identity = Some(workload.identity.clone());
            record.dst_workload = Some(workload.clone());
            record.dst_service = service;
            record.security = SecurityPolicy::mutual_tls;
            match waypoint {
                Some(WaypointRoute::Ready { waypoint, service }) => {
                    let Some(pod) = mesh.pick_waypoint(&service) else {
                        let msg = format!("waypoint {} has no endpoints", waypoint.key());
                        return Err(refuse(
                            record,
                            "waypoint_unavailable",
                            flags::NO_HEALTHY_UPSTREAM,
                            msg,
                        ));
                    };
                    // Istio's attribution for this hop: the waypoint is the
                    // destination workload and principal (it is what TLS
                    // proves), the service stays the one the client meant.
                    record.dst_addr = original;
                    record.dst_identity = Some(pod.identity.clone());
                    record.dst_workload = Some(pod.clone());
                    // Straight to the waypoint pod, never its node's ztunnel
                    // and never the same-node shortcut: it terminates HBONE
                    // itself, and only it may apply the destination's L7 policy.
                    let hbone_addr =
                        SocketAddr::new(pod.address_like(original.ip()), waypoint.hbone_port);
                    let key = PoolKey {
                        src: src_workload.identity.clone(),
                        dst: pod.identity.clone(),
                        dst_addr: hbone_addr,
                    };
                    // The waypoint routes on what the client addressed, so the
                    // authority is the original destination, not an endpoint.
                    open_tunnel(state, src, record, key, original, pod).await
                }
                Some(WaypointRoute::Unavailable { waypoint, reason }) => {
                    let msg = format!(
                        "{original} needs waypoint {}: {reason}; not sent around it",
                        waypoint.key()
                    );
                    Err(refuse(
                        record,
                        "waypoint_unavailable",
                        flags::NO_HEALTHY_UPSTREAM,
                        msg,
                    ))
                }
                None => {
                    // A native-tunnel destination terminates HBONE itself:
                    // the same-node shortcut would bypass it.
                    if workload.workload.node == state.node() && !workload.workload.native_tunnel {
                        return establish_local(state, src, &src_workload, workload, addr, record)
                            .await;
                    }
                    let hbone_addr = SocketAddr::new(addr.ip(), state.settings.hbone_port);
                    let key = PoolKey {
                        src: src_workload.identity.clone(),
                        dst: workload.identity.clone(),
                        dst_addr: hbone_addr,
                    };
                    open_tunnel(state, src, record, key, addr, workload).await
                }
            }
        }
    }
}

/// Opens a pooled HBONE tunnel for `key` to `authority`, counting the
/// connection against `endpoint` (the workload or waypoint pod dialled).
async fn open_tunnel(
    state: &Arc<ProxyState>,
    src: SocketAddr,
    mut record: ConnectionRecord,
    key: PoolKey,
    authority: SocketAddr,
    endpoint: Arc<WorkloadInfo>,
) -> Result<(ConnectionRecord, Upstream), Box<Refusal>> {
    let hbone_addr = key.dst_addr;
    record.via = Some(hbone_addr);
    record.span = crate::telemetry::outbound_span();
    let mut headers = forwarded_header(src);
    headers.extend(mesh_core::telemetry::context::context_headers(&record.span));
    let Some(pool) = state.pool() else {
        return Err(Box::new(Refusal {
            record,
            reason: "not_ready",
            flags: flags::UPSTREAM_FAILURE,
            message: "pool not initialised".into(),
            denied: false,
        }));
    };
    let active = ActiveEndpoint::new(endpoint);
    let tls = || state.client_tls(&key.src, &key.dst);
    match pool.open(&key, authority, &headers, tls).await {
        Ok(tunnel) => Ok((record, Upstream::Tunnel(tunnel, active))),
        Err(e) => {
            let (flag, denied) = match &e {
                HboneError::Status(s) if *s == http::StatusCode::FORBIDDEN => (flags::RBAC, true),
                _ => (flags::UPSTREAM_FAILURE, false),
            };
            Err(Box::new(Refusal {
                record,
                reason: e.reason(),
                flags: flag,
                message: format!("hbone to {hbone_addr}: {e}"),
                denied,
            }))
        }
    }
}

/// Same-node destination: authorize as the destination ztunnel would, then
/// connect straight to the workload (from the client's address under capture).
async fn establish_local(
    state: &Arc<ProxyState>,
    src: SocketAddr,
    src_workload: &Arc<WorkloadInfo>,
    workload: Arc<WorkloadInfo>,
    addr: SocketAddr,
    mut record: ConnectionRecord,
) -> Result<(ConnectionRecord, Upstream), Box<Refusal>> {
    record.via = Some(addr);
    // The checks the remote path gets from TLS: both identities must hold a
    // certificate here, and the HBONE port is never a destination.
    for id in [&src_workload.identity, &workload.identity] {
        if state.certs.get(id).is_none() {
            let message = format!("same-node {}: no certificate for {id}", workload.key());
            return Err(Box::new(Refusal {
                record,
                reason: "no_certificate",
                flags: flags::UPSTREAM_FAILURE,
                message,
                denied: false,
            }));
        }
    }
    if addr.port() == state.settings.hbone_port {
        let message = format!("same-node {addr}: the HBONE port itself");
        return Err(Box::new(Refusal {
            record,
            reason: "self_call",
            flags: flags::NO_ROUTE,
            message,
            denied: false,
        }));
    }
    let mesh = state.mesh();
    let attrs = mesh_core::authz::ConnectionAttributes {
        source: Some(&src_workload.identity),
        source_ip: src.ip(),
        destination_port: addr.port(),
    };
    let decision = mesh_core::authz::authorize(mesh.policies_for(&workload), &attrs);
    if !decision.is_allowed() {
        let message = format!("same-node {}: {decision}", workload.key());
        return Err(Box::new(Refusal {
            record,
            reason: "policy_denied",
            flags: flags::RBAC,
            message,
            denied: true,
        }));
    }
    let active = ActiveEndpoint::new(workload);
    let source = state.settings.upstream_source(src.ip());
    match connect_from(addr, source, state.settings.connect_timeout).await {
        Ok(tcp) => Ok((record, Upstream::Local(tcp, active))),
        Err(e) => Err(Box::new(Refusal {
            record,
            reason: "connect_failed",
            flags: flags::UPSTREAM_FAILURE,
            message: e,
            denied: false,
        })),
    }
}

impl Upstream {
    /// Sends what the client sent before the upstream existed, ahead of the
    /// copy (count it in [`relay`]'s `early`).
    pub async fn send_early(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self {
            Upstream::Tunnel(pooled, _) => pooled.tunnel.send_early(data),
            Upstream::Direct(tcp) | Upstream::Local(tcp, _) => {
                tokio::io::AsyncWriteExt::write_all(tcp, data).await
            }
        }
    }
}

/// Copies until both sides are done, then records the connection. `early`:
/// bytes already sent upstream with [`Upstream::send_early`].
pub async fn relay(
    state: &Arc<ProxyState>,
    client: TcpStream,
    record: ConnectionRecord,
    upstream: Upstream,
    early: u64,
) {
    record.opened(state);
    match upstream {
        Upstream::Local(upstream, _active) => {
            // Same node: this ztunnel is also the destination's, so it reports
            // for both sides and keeps re-checking the destination's policy.
            let mut dst_record = record.clone();
            dst_record.reporter = Reporter::destination;
            dst_record.opened(state);
            let policy = super::revoked(
                state.clone(),
                record.dst_addr_ip(),
                upstream.peer_addr().map_or(0, |a| a.port()),
                record.src_identity.clone(),
                record.src_addr.ip(),
            );
            // A waypoint given to the destination later takes over its
            // traffic: a connection that now bypasses it is cut.
            let waypoint = super::inbound::waypoint_revoked(
                state.clone(),
                record.dst_addr_ip(),
                record.src_identity.clone(),
            );
            let stop = super::inbound::first_of(policy, waypoint);
            let (up, down, err) = super::copy_plain(client, upstream, stop).await;
            let flag = super::flag_for(&err);
            let err = err.as_ref().map(|e| e as &dyn std::fmt::Display);
            dst_record.closed(state, early + up, down, flag, err);
            record.closed(state, early + up, down, flag, err);
        }
        Upstream::Tunnel(pooled, _active) => {
            let outcome = copy_tcp_tunnel(client, pooled.tunnel, std::future::pending()).await;
            drop(pooled.slot);
            let flag = if outcome.error.is_some() {
                flags::RESET
            } else {
                flags::NONE
            };
            let err = outcome.error.as_ref().map(|e| e as &dyn std::fmt::Display);
            record.closed(
                state,
                early + outcome.tcp_to_tunnel,
                outcome.tunnel_to_tcp,
                flag,
                err,
            );
        }
        Upstream::Direct(upstream) => {
            let (up, down, err) = super::copy_plain(client, upstream, std::future::pending()).await;
            let flag = if err.is_some() {
                flags::RESET
            } else {
                flags::NONE
            };
            let err = err.as_ref().map(|e| e as &dyn std::fmt::Display);
            record.closed(state, early + up, down, flag, err);
        }
    }
}

fn forwarded_header(src: SocketAddr) -> Vec<(HeaderName, HeaderValue)> {
    match HeaderValue::from_str(&hbone::forwarded_for(src.ip())) {
        Ok(v) => vec![(HeaderName::from_static(hbone::FORWARDED), v)],
        Err(_) => Vec::new(),
    }
}

/// Connects to `addr`, from `source` if given (IP_TRANSPARENT: the address
/// need not be local; replies come back through capture).
pub(crate) async fn connect_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let attempt = async {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }?;
        if let Some(src) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) {
            let sock = socket2::SockRef::from(&socket);
            match src {
                std::net::IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
                std::net::IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
            }
            socket.bind(SocketAddr::new(src, 0))?;
        }
        socket.connect(addr).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: timed out")),
    }
}

/// Serves one captured connection (15001): the original destination comes from
/// the socket (transparent capture) or `SO_ORIGINAL_DST` (NAT redirect).
pub async fn serve_captured(
    state: Arc<ProxyState>,
    client: TcpStream,
    src: SocketAddr,
    listen: SocketAddr,
) {
    let dst = match crate::socket::original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%src, "outbound: no original destination: {e}");
            state.metrics.failure("outbound", "no_original_destination");
            return;
        }
    };
    if crate::socket::is_listener_itself(dst, listen) {
        tracing::warn!(%src, %dst, "outbound: connection was not captured (addressed to the listener itself)");
        state.metrics.failure("outbound", "no_original_destination");
        return;
    }
    match establish(&state, src, Target::Addr(dst)).await {
        Ok((record, upstream)) => relay(&state, client, record, upstream, 0).await,
        Err(refusal) => refusal.report(&state),
    }
}
