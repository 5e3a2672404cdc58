//! Certificate issuance: a root CA that signs workload certificates.
//!
//! istiod-lite runs this as the mesh CA; tests and the local demo use it to mint
//! certificates (including deliberately broken ones) without a control plane.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::Identity;
use crate::tls::{CertError, TrustRoots, WorkloadCertificate};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("invalid validity: {0}")]
    Validity(&'static str),
}

/// A self-signed root that issues workload leaf certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

/// A freshly issued leaf in PEM form.
pub struct IssuedCertificate {
    /// Leaf first, then the root.
    pub chain_pem: String,
    pub key_pem: String,
}

impl IssuedCertificate {
    pub fn to_workload_certificate(&self) -> Result<WorkloadCertificate, CertError> {
        WorkloadCertificate::from_pem(self.chain_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

impl CertificateAuthority {
    /// Generates a new root for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "Ambit root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a root from its PEM certificate and key (e.g. persisted by `generate`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority {
            issuer,
            root_pem: cert_pem.to_string(),
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn trust_roots(&self) -> Result<TrustRoots, CertError> {
        TrustRoots::from_pem(self.root_pem.as_bytes())
    }

    /// Issues a leaf for `identity` valid from now (minus clock skew) for `ttl`.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCertificate, CaError> {
        let now = SystemTime::now();
        let not_after = now
            .checked_add(ttl)
            .ok_or(CaError::Validity("ttl too large"))?;
        self.issue_with_validity(identity, now - Duration::from_secs(300), not_after)
    }

    /// Issues a leaf with an explicit validity window (tests use this for expired certs).
    pub fn issue_with_validity(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(identity, not_before, not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            chain_pem: format!("{}{}", cert.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// X.509 times end at year 9999; anything outside 1970..9999 is refused here
/// rather than panicking in the conversion.
fn x509_time(t: SystemTime) -> Result<OffsetDateTime, CaError> {
    const MAX_UNIX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CaError::Validity("time before 1970"))?
        .as_secs();
    if secs > MAX_UNIX {
        return Err(CaError::Validity("time after year 9999"));
    }
    OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|_| CaError::Validity("time out of range"))
}

fn leaf_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    // Identity lives in the URI SAN only; the subject stays empty as SPIFFE asks.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = x509_time(not_before)?;
    params.not_after = x509_time(not_after)?;
    if params.not_after <= params.not_before {
        return Err(CaError::Validity("not_after is not after not_before"));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaf_with_identity_and_reloads_root() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let leaf = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let wc = leaf.to_workload_certificate().unwrap();
        assert_eq!(wc.identity(), &id);
        assert_eq!(wc.chain().len(), 2);
        assert!(wc.refresh_at() < wc.not_after());

        let again = CertificateAuthority::from_pem(ca.root_pem(), &ca.key_pem()).unwrap();
        let leaf2 = again.issue(&id, Duration::from_secs(60)).unwrap();
        assert!(leaf2.to_workload_certificate().is_ok());
    }

    #[test]
    fn key_mismatch_is_rejected() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let a = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let b = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let err = WorkloadCertificate::from_pem(a.chain_pem.as_bytes(), b.key_pem.as_bytes())
            .unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch(_)), "{err}");
    }

    #[test]
    fn absurd_lifetimes_are_errors_not_panics() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        assert!(ca.issue(&id, Duration::MAX).is_err());
        assert!(ca
            .issue(&id, Duration::from_secs(400 * 365 * 86400 * 25))
            .is_err());
        let now = SystemTime::now();
        assert!(ca
            .issue_with_validity(&id, now, now - Duration::from_secs(1))
            .is_err());
    }
}
