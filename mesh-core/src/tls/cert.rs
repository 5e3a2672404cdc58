use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use x509_parser::extensions::GeneralName;

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate found in PEM")]
    NoCertificate,
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoIdentity,
    #[error("certificate has more than one spiffe:// URI SAN")]
    ManyIdentities,
    #[error("certificate URI SAN is not a valid identity: {0}")]
    BadIdentity(#[from] crate::identity::IdentityError),
    #[error("private key does not match certificate: {0}")]
    KeyMismatch(String),
    #[error("no usable trust root: {0}")]
    Roots(String),
}

/// Extracts the SPIFFE identity from a certificate's URI SAN.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<Identity, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?
        .ok_or(CertError::NoIdentity)?;
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if uri.starts_with("spiffe://") {
                if found.is_some() {
                    return Err(CertError::ManyIdentities);
                }
                found = Some(uri.parse::<Identity>()?);
            }
        }
    }
    found.ok_or(CertError::NoIdentity)
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let to_system = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        to_system(cert.validity().not_before.timestamp()),
        to_system(cert.validity().not_after.timestamp()),
    ))
}

/// A leaf certificate (with its chain) and private key for one workload identity.
#[derive(Debug)]
pub struct WorkloadCertificate {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Builds from a PEM chain (leaf first) and a PEM private key. The identity is
    /// read from the leaf, and the key is checked against the leaf.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, CertError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem(e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Pem(e.to_string()))?;
        Self::from_der(chain, key)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::NoCertificate)?;
        let identity = identity_from_cert(leaf)?;
        let (not_before, not_after) = validity(leaf)?;
        let signing_key = super::provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| CertError::KeyMismatch(e.to_string()))?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
        certified
            .keys_match()
            .map_err(|e| CertError::KeyMismatch(e.to_string()))?;
        Ok(WorkloadCertificate {
            identity,
            chain,
            key,
            not_before,
            not_after,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When this certificate should be replaced: half-way through its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// The CA roots that peer certificates must chain to.
#[derive(Clone, Debug)]
pub struct TrustRoots {
    store: Arc<RootCertStore>,
    ders: Arc<Vec<CertificateDer<'static>>>,
}

impl TrustRoots {
    pub fn from_pem(pem: &[u8]) -> Result<Self, CertError> {
        let ders = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem(e.to_string()))?;
        Self::from_der(ders)
    }

    pub fn from_der(ders: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        if ders.is_empty() {
            return Err(CertError::NoCertificate);
        }
        let mut store = RootCertStore::empty();
        for der in &ders {
            store
                .add(der.clone())
                .map_err(|e| CertError::Roots(e.to_string()))?;
        }
        Ok(TrustRoots {
            store: Arc::new(store),
            ders: Arc::new(ders),
        })
    }

    /// Whether `other` is this very set of roots (not merely equal ones).
    pub fn same(&self, other: &TrustRoots) -> bool {
        Arc::ptr_eq(&self.store, &other.store)
    }

    pub fn store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }
}
