//! HBONE into the waypoint (15008): terminate mTLS as the waypoint's own
//! identity, take each CONNECT stream, and serve what it carries: HTTP/1.1
//! or HTTP/2 through the L7 proxy, anything else at L4.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::hbone::{self, IncomingTunnel, TunnelIo};
use mesh_core::Identity;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::h2c;
use crate::proxy::{self, Downstream};
use crate::sniff::{self, Protocol, Sniff};
use crate::state::WaypointState;
use crate::telemetry;

/// Accepts HBONE connections until drain starts.
pub async fn serve(state: Arc<WaypointState>, listener: TcpListener) {
    let mut drain = state.drain.watch();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Some(guard) = state.drain.guard() else { break };
                    let _ = tcp.set_nodelay(true);
                    let st = state.clone();
                    tokio::spawn(async move {
                        serve_connection(st, tcp, peer).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    state.metrics.refused("accept_failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.changed() => break,
        }
    }
}

async fn serve_connection(state: Arc<WaypointState>, tcp: TcpStream, peer: SocketAddr) {
    let fail = |reason: &'static str, msg: String| {
        tracing::warn!(%peer, reason, "hbone connection refused: {msg}");
        state.metrics.refused(reason);
    };
    let view = state.view();
    let Some(own) = view.own.clone() else {
        return fail("no_identity", "no waypoint workload at this address".into());
    };
    let tls_config = match state.certs.server_config(&own.identity) {
        Ok(c) => c,
        Err(e) => return fail(e.reason(), e.to_string()),
    };
    let (tls, peer_id) =
        match hbone::server::accept_mtls(tcp, tls_config, state.settings.connect_timeout).await {
            Ok((tls, id)) => (tls, Arc::new(id)),
            Err((reason, msg)) => return fail(reason, msg),
        };
    let st = state.clone();
    let result = hbone::serve_connection(
        tls,
        hbone::H2Tuning::default(),
        state.drain.watch(),
        move |incoming| serve_tunnel(st.clone(), incoming, peer, peer_id.clone()),
    )
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "hbone connection ended with error");
    }
}

async fn serve_tunnel(
    state: Arc<WaypointState>,
    incoming: IncomingTunnel,
    peer: SocketAddr,
    peer_id: Arc<Identity>,
) {
    let target = match incoming.target() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%peer, "tunnel refused: {e}");
            state.metrics.refused("bad_request");
            incoming.reject(http::StatusCode::BAD_REQUEST);
            return;
        }
    };
    // The source L7 policy sees (ipBlocks, source.ip). A ztunnel forwards
    // its workload's address; it is believed only if that address belongs to
    // a workload with the identity the peer just proved, as ztunnel does, or
    // any certificate holder could claim any address.
    let forwarded = incoming
        .headers()
        .get(hbone::FORWARDED)
        .map(|v| v.to_str().ok().and_then(hbone::parse_forwarded_for));
    let client_ip = match forwarded {
        None => peer.ip(),
        Some(Some(ip))
            if state
                .view()
                .mesh
                .workload_by_ip(ip)
                .is_some_and(|w| w.identity == *peer_id) =>
        {
            ip
        }
        Some(claimed) => {
            let claimed = claimed.map_or_else(|| "unparseable".to_string(), |ip| ip.to_string());
            tracing::warn!(%peer, source = %peer_id, "tunnel refused: forwarded source {claimed} is not a workload with the peer's identity");
            state.metrics.refused("forwarded_mismatch");
            incoming.reject(http::StatusCode::BAD_REQUEST);
            return;
        }
    };
    if let Err(why) = served_here(&state, target) {
        tracing::warn!(%peer, %target, source = %peer_id, "tunnel refused: {why}");
        state.metrics.refused("not_served_here");
        incoming.reject(http::StatusCode::FORBIDDEN);
        return;
    }
    let trace = telemetry::extract(incoming.headers());
    let tunnel = match incoming.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%peer, "tunnel closed before it was accepted: {e}");
            return;
        }
    };
    state.metrics.active_tunnels.inc();
    let downstream = Arc::new(Downstream {
        peer_identity: peer_id,
        client_ip,
        target,
        trace,
    });
    let mut io = TunnelIo::new(tunnel);
    let detect = state.settings.protocol_detection_timeout;
    let (protocol, prefix) = detect_protocol(&mut io, detect).await;
    let io = Rewind::new(prefix, io);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => serve_http(&state, downstream, io).await,
        Protocol::Tls | Protocol::Opaque => proxy::pass_through(&state, &downstream, io).await,
    }
    state.metrics.active_tunnels.dec();
}

/// The waypoint only serves destinations that name it: anything else asked
/// of it would be a detour around that destination's own waypoint.
fn served_here(state: &WaypointState, target: SocketAddr) -> Result<(), String> {
    let view = state.view();
    let (ns, name) = (&state.gateway.0, &state.gateway.1);
    let names_us = |wp: Option<&mesh_core::config::WaypointRef>| {
        wp.is_some_and(|w| &w.namespace == ns && &w.name == name)
    };
    if let Some(svc) = view.mesh.service_by_ip(target.ip()) {
        return if names_us(svc.service.waypoint.as_ref()) {
            Ok(())
        } else {
            Err(format!(
                "service {} does not use waypoint {ns}/{name}",
                svc.key()
            ))
        };
    }
    match view.mesh.workload_by_ip(target.ip()) {
        Some(w) if names_us(w.workload.waypoint.as_ref()) => Ok(()),
        Some(w) => Err(format!(
            "workload {} does not use waypoint {ns}/{name}",
            w.key()
        )),
        None => Err(format!("{target} is not a mesh destination")),
    }
}

/// Reads the first bytes until the protocol is known, the stream ends, or
/// `timeout` passes (a server-first protocol sends nothing: opaque).
async fn detect_protocol(io: &mut TunnelIo, timeout: Duration) -> (Protocol, Bytes) {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match sniff::sniff(&buf) {
            Sniff::Known(p) => return (p, buf.freeze()),
            Sniff::NeedMore if buf.len() >= sniff::MAX_SNIFF => {
                return (Protocol::Opaque, buf.freeze())
            }
            Sniff::NeedMore => {}
        }
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return (Protocol::Opaque, buf.freeze()),
        }
    }
}

async fn serve_http(state: &Arc<WaypointState>, downstream: Arc<Downstream>, io: Rewind<TunnelIo>) {
    let s = &state.settings;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        .max_buf_size(s.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.max_concurrent_streams)
        .max_header_list_size(s.max_header_bytes as u32)
        // CVE-2023-44487 (rapid reset): a client resetting streams faster
        // than they are served is cut off instead of costing us work.
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .keep_alive_interval(Some(H2_KEEPALIVE))
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    let downstream_id = downstream.peer_identity.clone();
    let st = state.clone();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let st = st.clone();
        let ds = downstream.clone();
        async move {
            if h2c::wants_upgrade(&req) {
                if let Some(switching) = upgrade_to_h2(&st, &ds, &mut req) {
                    return Ok::<_, Infallible>(switching);
                }
            }
            Ok(proxy::handle(st, ds, req).await)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut drain = state.drain.watch();
    let started = Instant::now();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                // Once per connection, and what an operator needs to see a
                // misbehaving (or attacking) client.
                tracing::info!(source = %downstream_id, after = ?started.elapsed(), "HTTP connection ended with an error: {}", chain(&*e));
            }
            return;
        }
        _ = drain.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

const MAX_PENDING_RESETS: usize = 64;
const MAX_LOCAL_RESETS: usize = 256;
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers an h2c upgrade request with 101 and serves the connection as
/// HTTP/2 from then on, the request itself as stream 1 (see [`h2c`]).
/// `None`: not upgraded (the request is served over HTTP/1.1).
fn upgrade_to_h2(
    state: &Arc<WaypointState>,
    downstream: &Arc<Downstream>,
    req: &mut Request<Incoming>,
) -> Option<http::Response<crate::upstream::Body>> {
    let stream_one = h2c::stream_one(req)?;
    let on_upgrade = hyper::upgrade::on(req);
    let (state, downstream) = (state.clone(), downstream.clone());
    let guard = state.drain.guard()?;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => return tracing::debug!("h2c upgrade did not complete: {e}"),
        };
        let mut io = TokioIo::new(upgraded);
        let limit = state.settings.header_read_timeout;
        let start = match tokio::time::timeout(limit, h2c::client_start(&mut io, stream_one)).await
        {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => return tracing::info!("h2c upgrade: {e}"),
            Err(_) => return tracing::info!("h2c upgrade: no HTTP/2 preface in {limit:?}"),
        };
        let s = &state.settings;
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_bytes as u32)
            .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
            .keep_alive_interval(Some(H2_KEEPALIVE))
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
        let st = state.clone();
        let svc = service_fn(move |req| {
            let st = st.clone();
            let ds = downstream.clone();
            async move { Ok::<_, Infallible>(proxy::handle(st, ds, req).await) }
        });
        let conn = h2.serve_connection(TokioIo::new(Rewind::new(start, io)), svc);
        tokio::pin!(conn);
        let mut drain = state.drain.watch();
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::info!("upgraded HTTP/2 connection ended with an error: {}", chain(&e));
                }
                return;
            }
            _ = drain.changed() => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
        drop(guard);
    });
    let mut switching = http::Response::new(crate::upstream::empty_body());
    *switching.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = switching.headers_mut();
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    h.insert(http::header::UPGRADE, http::HeaderValue::from_static("h2c"));
    Some(switching)
}

/// An error and its causes, `: `-separated (hyper's Display shows only the
/// outermost, e.g. "http2 error" without the GOAWAY reason).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A stream whose first bytes were already read (to detect the protocol)
/// and are handed out again before the rest.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
