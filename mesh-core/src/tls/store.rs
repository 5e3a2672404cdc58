use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{TrustRoots, WorkloadCertificate};
use crate::hbone::HboneError;
use crate::identity::Identity;

/// Certificates of the workload identities this proxy acts for, keyed by identity.
///
/// Readers take a cheap `Arc` snapshot; the CA client (or a static loader) replaces
/// entries as certificates rotate. Connections already established keep the
/// certificate they were made with.
#[derive(Clone, Default)]
pub struct CertificateStore {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    roots: Option<TrustRoots>,
    certs: HashMap<Identity, Arc<WorkloadCertificate>>,
    /// Server configs per identity with the certificate and roots they were
    /// built from: rebuilt only when either rotates, not per connection.
    server_configs: HashMap<Identity, ServerTls>,
}

type ServerTls = (
    Arc<WorkloadCertificate>,
    TrustRoots,
    Arc<rustls::ServerConfig>,
);

impl CertificateStore {
    pub fn new(roots: TrustRoots) -> Self {
        let store = Self::default();
        store.set_roots(roots);
        store
    }

    pub fn set_roots(&self, roots: TrustRoots) {
        self.write().roots = Some(roots);
    }

    pub fn roots(&self) -> Option<TrustRoots> {
        self.read().roots.clone()
    }

    pub fn insert(&self, cert: WorkloadCertificate) -> Arc<WorkloadCertificate> {
        let cert = Arc::new(cert);
        self.write()
            .certs
            .insert(cert.identity().clone(), cert.clone());
        cert
    }

    pub fn remove(&self, identity: &Identity) {
        let mut inner = self.write();
        inner.certs.remove(identity);
        inner.server_configs.remove(identity);
    }

    pub fn get(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        self.read().certs.get(identity).cloned()
    }

    pub fn all(&self) -> Vec<Arc<WorkloadCertificate>> {
        let mut v: Vec<_> = self.read().certs.values().cloned().collect();
        v.sort_by(|a, b| a.identity().cmp(b.identity()));
        v
    }

    /// The mTLS server config presenting `identity`'s current certificate.
    pub fn server_config(
        &self,
        identity: &Identity,
    ) -> Result<Arc<rustls::ServerConfig>, HboneError> {
        let (cert, roots) = self.cert_and_roots(identity)?;
        if let Some((c, r, cfg)) = self.read().server_configs.get(identity) {
            if Arc::ptr_eq(c, &cert) && r.same(&roots) {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(super::server_config(&cert, &roots)?);
        self.write()
            .server_configs
            .insert(identity.clone(), (cert, roots, cfg.clone()));
        Ok(cfg)
    }

    /// The mTLS client config for acting as `src` towards a peer that must
    /// prove to be `dst`.
    pub fn client_config(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, HboneError> {
        let (cert, roots) = self.cert_and_roots(src)?;
        Ok(Arc::new(super::client_config(
            &cert,
            &roots,
            vec![dst.clone()],
        )?))
    }

    fn cert_and_roots(
        &self,
        identity: &Identity,
    ) -> Result<(Arc<WorkloadCertificate>, TrustRoots), HboneError> {
        let inner = self.read();
        let cert = inner
            .certs
            .get(identity)
            .cloned()
            .ok_or_else(|| HboneError::NoCertificate(identity.to_string()))?;
        let roots = inner
            .roots
            .clone()
            .ok_or_else(|| HboneError::NoCertificate("trust roots".into()))?;
        Ok((cert, roots))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated (every
        // write is a single insert/remove), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}
