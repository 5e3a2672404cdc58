use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{TrustRoots, WorkloadCertificate};
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
}

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
        self.write().certs.remove(identity);
    }

    pub fn get(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        self.read().certs.get(identity).cloned()
    }

    pub fn all(&self) -> Vec<Arc<WorkloadCertificate>> {
        let mut v: Vec<_> = self.read().certs.values().cloned().collect();
        v.sort_by(|a, b| a.identity().cmp(b.identity()));
        v
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
