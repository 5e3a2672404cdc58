//! What every tunnel and request of the waypoint reads: the current view of
//! the mesh (with its compiled routes), certificates, resilience state,
//! metrics and drain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mesh_core::config::{MeshConfig, MeshState, WorkloadInfo};
use mesh_core::drain::Drain;
use mesh_core::tls::CertificateStore;
use mesh_core::xds::client::ClientStatus;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::resilience::Resilience;
use crate::route::Router;
use crate::settings::Settings;
use crate::upstream::Upstream;

/// One consistent config: the mesh and the routes compiled from it.
pub struct View {
    pub mesh: Arc<MeshState>,
    pub router: Router,
    /// This waypoint's own workload: the one at its HBONE address. Until the
    /// config names it, the waypoint has no identity and serves nothing.
    pub own: Option<Arc<WorkloadInfo>>,
}

pub struct WaypointState {
    pub settings: Settings,
    /// The Gateway served, as (namespace, name).
    pub gateway: (String, String),
    view: watch::Sender<Arc<View>>,
    pub certs: CertificateStore,
    pub metrics: Metrics,
    pub drain: Drain,
    pub resilience: Resilience,
    ready: AtomicBool,
    upstream: OnceLock<Arc<Upstream>>,
    xds: OnceLock<Arc<Mutex<ClientStatus>>>,
}

impl WaypointState {
    pub fn new(settings: Settings, config: MeshConfig, certs: CertificateStore) -> Self {
        let gateway = settings.gateway().unwrap_or_default();
        let resilience = Resilience::default();
        let view = Self::build_view(&settings, &gateway, &resilience, config);
        WaypointState {
            settings,
            gateway,
            view: watch::channel(Arc::new(view)).0,
            certs,
            metrics: Metrics::default(),
            drain: Drain::default(),
            resilience,
            ready: AtomicBool::new(false),
            upstream: OnceLock::new(),
            xds: OnceLock::new(),
        }
    }

    fn build_view(
        settings: &Settings,
        gateway: &(String, String),
        resilience: &Resilience,
        config: MeshConfig,
    ) -> View {
        let router = Router::new(&config.http_routes, (&gateway.0, &gateway.1));
        resilience.update(&config.traffic_policies);
        let mesh = Arc::new(MeshState::new(config));
        let own = mesh
            .workload_by_ip(settings.hbone_addr.ip())
            .filter(|w| w.workload.native_tunnel)
            .cloned();
        View { mesh, router, own }
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    pub fn watch_mesh(&self) -> watch::Receiver<Arc<MeshState>> {
        // The CA client follows the mesh (which identities are local); a
        // bridge keeps it off the View type.
        let mut views = self.view.subscribe();
        let (tx, rx) = watch::channel(self.view().mesh.clone());
        tokio::spawn(async move {
            while views.changed().await.is_ok() {
                let mesh = views.borrow_and_update().mesh.clone();
                if tx.send(mesh).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Swaps in a new, already validated config.
    pub fn apply(&self, config: MeshConfig) {
        let view = Self::build_view(&self.settings, &self.gateway, &self.resilience, config);
        if view.own.is_none() {
            tracing::warn!(
                addr = %self.settings.hbone_addr,
                "no waypoint (nativeTunnel) workload has this address: tunnels are refused until one does"
            );
        }
        self.view.send_replace(Arc::new(view));
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Listeners up, its own certificate present and, with a control plane,
    /// the first full config applied.
    pub fn is_ready(&self) -> bool {
        let view = self.view();
        let has_cert = view
            .own
            .as_ref()
            .is_some_and(|w| self.certs.get(&w.identity).is_some());
        self.ready.load(Ordering::Acquire)
            && has_cert
            && !self.drain.is_draining()
            && (self.settings.control_plane.xds_address.is_none()
                || self.xds_status().is_some_and(|s| s.synced))
    }

    pub fn init_upstream(&self, upstream: Arc<Upstream>) {
        let _ = self.upstream.set(upstream);
    }

    pub fn upstream(&self) -> Option<&Arc<Upstream>> {
        self.upstream.get()
    }

    pub fn set_xds_status(&self, status: Arc<Mutex<ClientStatus>>) {
        let _ = self.xds.set(status);
    }

    pub fn xds_status(&self) -> Option<ClientStatus> {
        self.xds
            .get()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
