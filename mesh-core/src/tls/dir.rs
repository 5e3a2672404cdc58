//! Static certificate source: a directory laid out like Istio's mounted secrets.
//!
//! ```text
//! DIR/root-cert.pem
//! DIR/<namespace>/<service-account>/cert-chain.pem   (leaf first)
//! DIR/<namespace>/<service-account>/key.pem
//! ```
//! The control-plane CA client replaces this source later; both fill the same
//! [`CertificateStore`].

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;

use super::{CertificateStore, TrustRoots, WorkloadCertificate};

/// Everything found in the directory, ready to be swapped into the store.
pub struct LoadedCerts {
    pub roots: TrustRoots,
    pub certs: Vec<WorkloadCertificate>,
}

pub fn load_dir(dir: &Path) -> anyhow::Result<LoadedCerts> {
    let root_path = dir.join("root-cert.pem");
    let roots_pem =
        std::fs::read(&root_path).with_context(|| format!("reading {}", root_path.display()))?;
    let roots = TrustRoots::from_pem(&roots_pem)
        .with_context(|| format!("parsing {}", root_path.display()))?;
    let mut certs = Vec::new();
    for (chain_path, key_path) in cert_files(dir)? {
        let chain = std::fs::read(&chain_path)
            .with_context(|| format!("reading {}", chain_path.display()))?;
        let key =
            std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let cert = WorkloadCertificate::from_pem(&chain, &key)
            .with_context(|| format!("loading {}", chain_path.display()))?;
        certs.push(cert);
    }
    Ok(LoadedCerts { roots, certs })
}

fn cert_files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for ns in read_dirs(dir)? {
        for sa in read_dirs(&ns)? {
            let chain = sa.join("cert-chain.pem");
            if chain.exists() {
                out.push((chain, sa.join("key.pem")));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_dirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    Ok(dirs)
}

/// A cheap change detector: modification times and sizes of every file involved.
pub fn stamp(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut files = vec![dir.join("root-cert.pem")];
    if let Ok(pairs) = cert_files(dir) {
        for (c, k) in pairs {
            files.push(c);
            files.push(k);
        }
    }
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, mtime, len)
        })
        .collect()
}

/// Replaces the store's contents with `loaded` (identities no longer present are removed).
pub fn apply(store: &CertificateStore, loaded: LoadedCerts) {
    store.set_roots(loaded.roots);
    let keep: Vec<_> = loaded.certs.iter().map(|c| c.identity().clone()).collect();
    for old in store.all() {
        if !keep.contains(old.identity()) {
            store.remove(old.identity());
        }
    }
    for cert in loaded.certs {
        store.insert(cert);
    }
}
