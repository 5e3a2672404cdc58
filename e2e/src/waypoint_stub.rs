//! An L4 stand-in for a waypoint, for tests of ztunnel's waypoint routing
//! without the waypoint binary: mesh_core's own HBONE server and pool, real
//! TLS and HTTP/2, no L7.
//!
//! It listens on `<waypoint pod ip>:15008` with the waypoint identity's
//! certificate, records each CONNECT (peer identity, `:authority`,
//! `forwarded`), resolves the authority against a [`MeshState`] as a
//! waypoint would (a VIP picks an endpoint), and tunnels on to that
//! endpoint's ztunnel with its own identity, copying bytes. A refusal from
//! the destination (403) is passed back to the client unchanged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use mesh_core::config::{Destination, MeshState};
use mesh_core::hbone::{
    self, H2Tuning, HboneError, IncomingTunnel, Pool, PoolConfig, PoolKey, TunnelIo,
};
use mesh_core::tls::{self, TrustRoots, WorkloadCertificate};
use mesh_core::Identity;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::Pki;

/// One CONNECT the stub received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The identity the client's certificate proved.
    pub peer: Identity,
    pub authority: String,
    pub forwarded: Option<String>,
}

pub struct WaypointStub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

struct Shared {
    identity: Identity,
    cert: WorkloadCertificate,
    roots: TrustRoots,
    mesh: MeshState,
    pool: Pool,
    hbone_port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl WaypointStub {
    /// Listens on `addr` as `identity` (certificate from `pki`), forwarding
    /// to the ztunnels' HBONE port (15008) of the endpoints `mesh` names.
    pub async fn start(
        addr: SocketAddr,
        pki: &Pki,
        identity: &Identity,
        mesh: MeshState,
    ) -> anyhow::Result<Self> {
        let now = SystemTime::now();
        let issued = pki.ca.issue_with_validity(
            identity,
            now - Duration::from_secs(60),
            now + Duration::from_secs(86400),
        )?;
        let cert =
            WorkloadCertificate::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())?;
        let roots = TrustRoots::from_pem(pki.ca.root_pem().as_bytes())?;
        let server = Arc::new(tls::server_config(&cert, &roots)?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            identity: identity.clone(),
            cert,
            roots,
            mesh,
            pool: Pool::new(PoolConfig::default()),
            hbone_port: hbone::HBONE_PORT,
            seen: seen.clone(),
        });
        let listener = TcpListener::bind(addr).await?;
        let task = tokio::spawn(async move {
            // Kept here: a dropped sender would tell every connection to drain.
            let (_drain_tx, drain_rx) = tokio::sync::watch::channel(false);
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = TlsAcceptor::from(server.clone());
                let shared = shared.clone();
                let drain = drain_rx.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(hbone::transport(tcp)).await else {
                        return;
                    };
                    let Ok(peer) = tls::peer_identity(tls.get_ref().1) else {
                        return;
                    };
                    let _ = hbone::serve_connection(tls, H2Tuning::default(), drain, |incoming| {
                        forward(shared.clone(), peer.clone(), incoming)
                    })
                    .await;
                });
            }
        });
        Ok(WaypointStub { addr, seen, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every CONNECT received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WaypointStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(shared: Arc<Shared>, peer: Identity, incoming: IncomingTunnel) {
    let forwarded = incoming.headers().get(hbone::FORWARDED).cloned();
    let target = incoming.target();
    shared
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Seen {
            peer,
            authority: target
                .as_ref()
                .map_or_else(|e| e.to_string(), |t| t.to_string()),
            forwarded: forwarded
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
    let Ok(target) = target else {
        return incoming.reject(StatusCode::BAD_REQUEST);
    };
    // A waypoint routes on what the client addressed: a VIP picks an endpoint.
    let Ok(Destination::Workload { workload, addr, .. }) = shared.mesh.resolve(target) else {
        return incoming.reject(StatusCode::SERVICE_UNAVAILABLE);
    };
    let key = PoolKey {
        src: shared.identity.clone(),
        dst: workload.identity.clone(),
        dst_addr: SocketAddr::new(addr.ip(), shared.hbone_port),
    };
    // Passed on as received, as a waypoint that copies it would: the
    // destination ztunnel must not take the client's address from it.
    let headers: Vec<_> = forwarded
        .into_iter()
        .map(|v| (http::HeaderName::from_static(hbone::FORWARDED), v))
        .collect();
    let tls = || {
        let cfg = tls::client_config(&shared.cert, &shared.roots, vec![key.dst.clone()])?;
        Ok(Arc::new(cfg))
    };
    let upstream = match shared.pool.open(&key, addr, &headers, tls).await {
        Ok(t) => t,
        Err(HboneError::Status(s)) => return incoming.reject(s),
        Err(_) => return incoming.reject(StatusCode::SERVICE_UNAVAILABLE),
    };
    let Ok(downstream) = incoming.accept() else {
        return;
    };
    let mut down = TunnelIo::new(downstream);
    let mut up = TunnelIo::new(upstream.tunnel);
    if tokio::io::copy_bidirectional(&mut down, &mut up)
        .await
        .is_err()
    {
        down.reset();
        up.reset();
    }
    drop(upstream.slot);
}
