//! State shared by every listener: the mesh view, certificates, metrics, drain.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use mesh_core::config::{MeshState, WorkloadInfo};
use mesh_core::hbone::{HboneError, Pool};
use mesh_core::tls::{self, CertificateStore, TrustRoots, WorkloadCertificate};
use mesh_core::xds::client::ClientStatus;
use mesh_core::Identity;
use tokio::sync::watch;

use mesh_core::drain::Drain;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// A server config and the certificate and roots it was built from (to notice rotation).
type ServerTls = (
    Arc<WorkloadCertificate>,
    TrustRoots,
    Arc<rustls::ServerConfig>,
);

pub struct ProxyState {
    pub settings: Settings,
    mesh: watch::Sender<Arc<MeshState>>,
    pub certs: CertificateStore,
    pub metrics: Metrics,
    pub drain: Drain,
    pub ready: AtomicBool,
    pool: OnceLock<Pool>,
    /// Server TLS configs per local identity, rebuilt when the certificate changes.
    server_tls: Mutex<HashMap<Identity, ServerTls>>,
    /// The xDS client's view, when the mesh comes from a control plane.
    xds: OnceLock<Arc<Mutex<ClientStatus>>>,
}

impl ProxyState {
    pub fn new(settings: Settings, mesh: MeshState, certs: CertificateStore) -> Self {
        ProxyState {
            settings,
            mesh: watch::channel(Arc::new(mesh)).0,
            certs,
            metrics: Metrics::default(),
            drain: Drain::default(),
            ready: AtomicBool::new(false),
            pool: OnceLock::new(),
            server_tls: Mutex::new(HashMap::new()),
            xds: OnceLock::new(),
        }
    }

    pub fn mesh(&self) -> Arc<MeshState> {
        self.mesh.borrow().clone()
    }

    pub fn set_mesh(&self, mesh: MeshState) {
        self.mesh.send_replace(Arc::new(mesh));
    }

    pub fn watch_mesh(&self) -> watch::Receiver<Arc<MeshState>> {
        self.mesh.subscribe()
    }

    pub fn set_xds_status(&self, status: Arc<Mutex<ClientStatus>>) {
        let _ = self.xds.set(status);
    }

    /// A copy of the xDS client's status, if the mesh comes from a control plane.
    pub fn xds_status(&self) -> Option<ClientStatus> {
        self.xds
            .get()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Ready: listeners up and, with a control plane, its first full config applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
            && (self.settings.xds_address.is_none() || self.xds_status().is_some_and(|s| s.synced))
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// A workload on this node with address `ip`.
    pub fn local_workload(&self, mesh: &MeshState, ip: IpAddr) -> Option<Arc<WorkloadInfo>> {
        mesh.workload_by_ip(ip)
            .filter(|w| w.workload.node == self.settings.node)
            .cloned()
    }

    /// Installs the HBONE pool; must run inside the data-plane runtime.
    pub fn init_pool(&self, pool: Pool) {
        let _ = self.pool.set(pool);
    }

    pub fn pool(&self) -> Option<&Pool> {
        self.pool.get()
    }

    /// The mTLS server config presenting `identity`'s current certificate.
    pub fn server_tls(&self, identity: &Identity) -> Result<Arc<rustls::ServerConfig>, HboneError> {
        let cert = self
            .certs
            .get(identity)
            .ok_or_else(|| HboneError::NoCertificate(identity.to_string()))?;
        let roots = self
            .certs
            .roots()
            .ok_or_else(|| HboneError::NoCertificate("trust roots".into()))?;
        let mut cache = self.server_tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, r, cfg)) = cache.get(identity) {
            if Arc::ptr_eq(c, &cert) && r.same(&roots) {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(tls::server_config(&cert, &roots)?);
        cache.insert(identity.clone(), (cert, roots, cfg.clone()));
        Ok(cfg)
    }

    /// The mTLS client config for acting as `src` towards `dst`.
    pub fn client_tls(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, HboneError> {
        let cert = self
            .certs
            .get(src)
            .ok_or_else(|| HboneError::NoCertificate(src.to_string()))?;
        let roots = self
            .certs
            .roots()
            .ok_or_else(|| HboneError::NoCertificate("trust roots".into()))?;
        Ok(Arc::new(tls::client_config(
            &cert,
            &roots,
            vec![dst.clone()],
        )?))
    }
}
