//! Requests out of the waypoint: an HTTP/1.1 connection inside an HBONE
//! tunnel to the chosen endpoint's ztunnel, made with the waypoint's own
//! identity and verified against the endpoint's.
//!
//! Connections are kept per (endpoint, original client address): the tunnel
//! carries the client's address (`Forwarded`) once, at CONNECT, so the
//! destination ztunnel can hand the application the real client IP; sharing
//! a connection between clients would misattribute their requests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mesh_core::config::WorkloadInfo;
use mesh_core::hbone::{self, HboneError, Pool, PoolKey, TunnelIo};
use mesh_core::tls::CertificateStore;
use mesh_core::Identity;

use crate::resilience::{CircuitBreaker, ConnectionPermit};

/// Every body the waypoint sends or returns.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// A body with nothing in it.
pub fn empty_body() -> Body {
    http_body_util::Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("tunnel to {0}: {1}")]
    Tunnel(SocketAddr, HboneError),
    #[error("HTTP/1.1 handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("request to {0}: {1}")]
    Request(SocketAddr, hyper::Error),
    /// The service's circuit breaker has no room for another connection, or
    /// for another request waiting on one.
    #[error("circuit breaker for {0}: {1}")]
    Overflow(SocketAddr, &'static str),
}

impl UpstreamError {
    /// Whether the request may have reached the application (then only
    /// idempotent retries are safe; a failed connect never reached it).
    pub fn reached_backend(&self) -> bool {
        matches!(self, UpstreamError::Request(..))
    }

    /// Envoy's response flag for this failure.
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Tunnel(..) | UpstreamError::Handshake(..) => "UF",
            UpstreamError::Request(..) => "UC",
            UpstreamError::Overflow(..) => "UO",
        }
    }
}

type ConnKey = (SocketAddr, IpAddr);

/// A tunnel opened for L4 pass-through, holding its pool slot.
pub struct RawTunnel {
    io: TunnelIo,
    _slot: hbone::pool::StreamSlot,
}

impl tokio::io::AsyncRead for RawTunnel {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for RawTunnel {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

pub struct Upstream {
    hbone: Pool,
    certs: CertificateStore,
    idle: Mutex<HashMap<ConnKey, Vec<Idle>>>,
    idle_timeout: Duration,
    hbone_port: u16,
}

/// Idle connections kept per (endpoint, client): enough for bursts of
/// parallel requests from one client, bounded so a burst's leftovers do not
/// pile up.
const MAX_IDLE_PER_KEY: usize = 16;

impl Upstream {
    pub fn new(hbone: Pool, certs: CertificateStore, idle_timeout: Duration) -> Arc<Self> {
        let upstream = Arc::new(Upstream {
            hbone,
            certs,
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            hbone_port: hbone::HBONE_PORT,
        });
        let weak = Arc::downgrade(&upstream);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout.max(Duration::from_secs(1)) / 2);
            loop {
                tick.tick().await;
                let Some(up) = weak.upgrade() else { return };
                up.reap();
            }
        });
        upstream
    }

    /// Sends `req` to `endpoint` (a workload address and target port) as
    /// `src`, on behalf of the client at `client`. A new connection, and
    /// waiting for one, count against `limits` (the backend service's
    /// circuit breaker): `maxConnections`, `maxPendingRequests`.
    pub async fn send(
        self: &Arc<Self>,
        src: &Identity,
        endpoint: &WorkloadInfo,
        addr: SocketAddr,
        client: IpAddr,
        req: Request<Body>,
        limits: Option<&Arc<CircuitBreaker>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = (addr, client);
        let mut sender = match self.take_idle(&key) {
            Some(s) => s,
            None => {
                let (pending, connection) = match limits {
                    Some(b) => (
                        Some(
                            b.enter_pending()
                                .ok_or(UpstreamError::Overflow(addr, "maxPendingRequests"))?,
                        ),
                        Some(
                            b.try_acquire_connection()
                                .ok_or(UpstreamError::Overflow(addr, "maxConnections"))?,
                        ),
                    ),
                    None => (None, None),
                };
                let sender = self
                    .connect(src, endpoint, addr, client, connection)
                    .await?;
                drop(pending);
                sender
            }
        };
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Request(addr, e))?;
        // The connection can carry the next request once this response's
        // body has been read; park it then, not before.
        let up = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                if let Some(up) = up.upgrade() {
                    up.park(key, sender);
                }
            }
        });
        Ok(response)
    }

    /// A raw tunnel to `endpoint` (for bytes the waypoint passes at L4).
    pub async fn open_raw(
        &self,
        src: &Identity,
        endpoint: &WorkloadInfo,
        addr: SocketAddr,
        client: IpAddr,
    ) -> Result<RawTunnel, UpstreamError> {
        let (tunnel, slot) = self.open_tunnel(src, endpoint, addr, client).await?;
        Ok(RawTunnel {
            io: TunnelIo::new(tunnel),
            _slot: slot,
        })
    }

    async fn open_tunnel(
        &self,
        src: &Identity,
        endpoint: &WorkloadInfo,
        addr: SocketAddr,
        client: IpAddr,
    ) -> Result<(hbone::Tunnel, hbone::pool::StreamSlot), UpstreamError> {
        let hbone_addr = SocketAddr::new(addr.ip(), self.hbone_port);
        let key = PoolKey {
            src: src.clone(),
            dst: endpoint.identity.clone(),
            dst_addr: hbone_addr,
        };
        let mut headers = vec![(
            HeaderName::from_static(hbone::FORWARDED),
            HeaderValue::from_str(&hbone::forwarded_for(client))
                .unwrap_or_else(|_| HeaderValue::from_static("for=unknown")),
        )];
        // The request that opens the tunnel is the parent of the destination
        // ztunnel's connection span (later requests reuse the tunnel).
        headers.extend(mesh_core::telemetry::context::context_headers(
            &tracing::Span::current(),
        ));
        let certs = &self.certs;
        let tls = || certs.client_config(&key.src, &key.dst);
        let pooled = self
            .hbone
            .open(&key, addr, &headers, tls)
            .await
            .map_err(|e| UpstreamError::Tunnel(hbone_addr, e))?;
        Ok((pooled.tunnel, pooled.slot))
    }

    async fn connect(
        &self,
        src: &Identity,
        endpoint: &WorkloadInfo,
        addr: SocketAddr,
        client: IpAddr,
        permit: Option<ConnectionPermit>,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        // The pool slot stays taken for as long as the HTTP connection lives.
        let (tunnel, slot) = self.open_tunnel(src, endpoint, addr, client).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(TunnelIo::new(tunnel)))
            .await
            .map_err(|e| UpstreamError::Handshake(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, "upstream connection ended: {e}");
            }
            // The connection counts against the breaker while it lives.
            drop((slot, permit));
        });
        Ok(sender)
    }

    fn take_idle(&self, key: &ConnKey) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.sender.is_ready() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    fn park(&self, key: ConnKey, sender: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn reap(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|c| c.sender.is_ready() && c.since.elapsed() < self.idle_timeout);
            !list.is_empty()
        });
    }

    /// Idle upstream connections, for the config dump.
    pub fn idle_connections(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }
}
