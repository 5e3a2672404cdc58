//! The CA's root, persisted in the data directory: generated on first start,
//! loaded afterwards, so every restart signs with the same root.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use mesh_core::ca::CertificateAuthority;
use mesh_core::Identity;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";

pub struct CaStore {
    dir: PathBuf,
}

impl CaStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaStore { dir: dir.into() }
    }

    /// Loads the root from the data directory, generating and persisting it if
    /// neither file exists. Returns the CA and whether it was created now.
    pub fn load_or_create(
        &self,
        trust_domain: &str,
    ) -> anyhow::Result<(CertificateAuthority, bool)> {
        let (cert, key) = (self.dir.join(ROOT_CERT), self.dir.join(ROOT_KEY));
        match (cert.exists(), key.exists()) {
            (true, true) => {
                let cert_pem = fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
                let key_pem = fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
                let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem)
                    .with_context(|| format!("loading CA from {}", self.dir.display()))?;
                Ok((ca, false))
            }
            (false, false) => {
                fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
                let ca = CertificateAuthority::generate(trust_domain)?;
                write_private(&key, ca.key_pem().as_bytes())?;
                fs::write(&cert, ca.root_pem()).with_context(|| format!("writing {}", cert.display()))?;
                Ok((ca, true))
            }
            _ => bail!(
                "{} holds only one of {ROOT_CERT} and {ROOT_KEY}: refusing to guess; restore the pair or remove both",
                self.dir.display()
            ),
        }
    }
}

/// Writes a secret readable by its owner only, never world-readable even briefly.
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Issues a certificate for `identity` into `out/<ns>/<sa>/{cert-chain,key}.pem`
/// (the layout ztunnel's static certificate source reads) plus `out/root-cert.pem`.
pub fn issue_into(
    ca: &CertificateAuthority,
    identity: &Identity,
    ttl: Duration,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let leaf = ca.issue(identity, ttl)?;
    let dir = out
        .join(identity.namespace())
        .join(identity.service_account());
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join("cert-chain.pem"), &leaf.chain_pem)?;
    let key = dir.join("key.pem");
    let _ = fs::remove_file(&key);
    write_private(&key, leaf.key_pem.as_bytes())?;
    fs::write(out.join(ROOT_CERT), ca.root_pem())?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!(
            "istiod-ca-{:x}",
            std::process::id() as u64 * 7919 + line!() as u64
        ))
    }

    #[test]
    fn root_persists_across_restarts_and_key_is_private() {
        let dir = tmp().join("persist");
        let _ = fs::remove_dir_all(&dir);
        let store = CaStore::new(&dir);
        let (ca1, created) = store.load_or_create("cluster.local").unwrap();
        assert!(created);
        let (ca2, created) = store.load_or_create("cluster.local").unwrap();
        assert!(!created);
        assert_eq!(ca1.root_pem(), ca2.root_pem());
        let mode = fs::metadata(dir.join(ROOT_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_file(dir.join(ROOT_KEY)).unwrap();
        let err = store
            .load_or_create("cluster.local")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("only one of"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn issued_files_load_as_workload_certificates() {
        let dir = tmp().join("issue");
        let _ = fs::remove_dir_all(&dir);
        let (ca, _) = CaStore::new(dir.join("ca"))
            .load_or_create("cluster.local")
            .unwrap();
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let leaf_dir = issue_into(&ca, &id, Duration::from_secs(3600), &dir.join("certs")).unwrap();
        let wc = mesh_core::tls::WorkloadCertificate::from_pem(
            &fs::read(leaf_dir.join("cert-chain.pem")).unwrap(),
            &fs::read(leaf_dir.join("key.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(wc.identity(), &id);
        assert!(dir.join("certs").join(ROOT_CERT).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
