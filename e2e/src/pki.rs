//! Certificates for tests and the demo, in the directory layout ztunnel reads.

use std::path::Path;
use std::time::{Duration, SystemTime};

use mesh_core::ca::CertificateAuthority;
use mesh_core::Identity;

pub struct Pki {
    pub ca: CertificateAuthority,
}

impl Pki {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Pki {
            ca: CertificateAuthority::generate("cluster.local")?,
        })
    }

    pub fn identity(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).expect("test identities are well-formed")
    }

    /// Writes `root-cert.pem` of this CA into `dir`.
    pub fn write_root(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("root-cert.pem"), self.ca.root_pem())?;
        Ok(())
    }

    /// Issues a certificate for `id` (valid for a day) into `dir`.
    pub fn write_cert(&self, dir: &Path, id: &Identity) -> anyhow::Result<()> {
        let now = SystemTime::now();
        self.write_cert_valid(
            dir,
            id,
            now - Duration::from_secs(60),
            now + Duration::from_secs(86400),
        )
    }

    /// Issues a certificate with an explicit validity window (for expired ones).
    pub fn write_cert_valid(
        &self,
        dir: &Path,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<()> {
        let leaf = self.ca.issue_with_validity(id, not_before, not_after)?;
        write_leaf(dir, id, &leaf.chain_pem, &leaf.key_pem)
    }
}

/// Writes a chain and key for `id` under `dir/<ns>/<sa>/`.
pub fn write_leaf(dir: &Path, id: &Identity, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    let d = dir.join(id.namespace()).join(id.service_account());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("cert-chain.pem"), chain_pem)?;
    std::fs::write(d.join("key.pem"), key_pem)?;
    Ok(())
}
