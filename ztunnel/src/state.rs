//! State shared by every listener: the mesh view, certificates, metrics, drain.

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use mesh_core::config::{MeshState, WorkloadInfo};
use mesh_core::hbone::{HboneError, Pool};
use mesh_core::tls::CertificateStore;
use mesh_core::xds::client::ClientStatus;
use mesh_core::Identity;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::settings::Settings;
use mesh_core::drain::Drain;

pub struct ProxyState {
    pub settings: Settings,
    mesh: watch::Sender<Arc<MeshState>>,
    pub certs: CertificateStore,
    pub metrics: Metrics,
    pub drain: Drain,
    pub ready: AtomicBool,
    pool: OnceLock<Pool>,
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

    /// Ready: listeners up and the mesh config in force ([`Self::config_synced`]).
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire) && self.config_synced()
    }

    /// Whether the mesh config is a real one: a static file, or the control
    /// plane's first full config applied (until then it is empty).
    pub fn config_synced(&self) -> bool {
        self.settings.control_plane.xds_address.is_none()
            || self.xds_status().is_some_and(|s| s.synced)
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
        self.certs.server_config(identity)
    }

    /// The mTLS client config for acting as `src` towards `dst`.
    pub fn client_tls(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, HboneError> {
        self.certs.client_config(src, dst)
    }
}
