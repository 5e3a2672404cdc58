//! Certificate issuance: a root CA that signs workload certificates.
//!
//! istiod-lite runs this as the mesh CA; tests and the local demo use it to mint
//! certificates (including deliberately broken ones) without a control plane.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
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
    #[error("CSR rejected: {0}")]
    Csr(String),
    #[error("CSR names {found:?}, but it must name exactly {expected}")]
    CsrIdentity {
        expected: String,
        found: Vec<String>,
    },
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
        self.issue_with_validity(identity, now - CLOCK_SKEW, not_after)
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

impl CertificateAuthority {
    /// Signs a certificate signing request for `identity` (validity as [`Self::issue`]).
    /// Returns the PEM chain, leaf first, then the root.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<String, CaError> {
        Ok(format!(
            "{}{}",
            self.sign_csr_leaf(csr_pem, identity, ttl)?,
            self.root_pem
        ))
    }

    /// Like [`Self::sign_csr`] but returns only the leaf PEM (the CA API sends
    /// chain elements as separate strings).
    ///
    /// Only the CSR's public key is used: the leaf gets the same names and
    /// extensions as an [`Self::issue`]d one whatever else the CSR asks for, so a
    /// requester cannot obtain a CA certificate or extra names. The SANs must
    /// still name exactly `identity`, so a confused or malicious client is told
    /// rather than silently given a different certificate than it asked for.
    pub fn sign_csr_leaf(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<String, CaError> {
        // Parsing also verifies the CSR's self-signature (proof of key possession).
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let expected = identity.to_string();
        let found: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(describe_san)
            .collect();
        if found != [format!("URI:{expected}")] {
            return Err(CaError::CsrIdentity { expected, found });
        }
        let now = SystemTime::now();
        let not_after = now
            .checked_add(ttl)
            .ok_or(CaError::Validity("ttl too large"))?;
        csr.params = leaf_params(identity, now - CLOCK_SKEW, not_after)?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// A serving certificate for the control plane itself: DNS and IP SANs,
    /// server authentication only.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = dns_names
            .iter()
            .map(|d| Ok(SanType::DnsName(d.clone().try_into()?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
        if params.subject_alt_names.is_empty() {
            return Err(CaError::Validity("a server certificate needs a name"));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        let not_after = now
            .checked_add(ttl)
            .ok_or(CaError::Validity("ttl too large"))?;
        params.not_before = x509_time(now - CLOCK_SKEW)?;
        params.not_after = x509_time(not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            chain_pem: format!("{}{}", cert.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh ECDSA P-256 key and a CSR for `identity` signed with it, as
/// `(csr_pem, key_pem)`. The key never leaves the requester.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

/// Leaves start this far in the past so peers with slightly slow clocks accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

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
    use rustls::pki_types::pem::PemObject;

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

    fn web() -> Identity {
        "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap()
    }

    #[test]
    fn signs_csr_with_only_the_identity_and_chains_to_root() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (csr, key) = generate_csr(&web()).unwrap();
        let chain = ca
            .sign_csr(&csr, &web(), Duration::from_secs(3600))
            .unwrap();
        let wc = WorkloadCertificate::from_pem(chain.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(wc.identity(), &web());
        assert_eq!(wc.chain().len(), 2);
        let life = wc.not_after().duration_since(wc.not_before()).unwrap();
        assert_eq!(life, Duration::from_secs(3600) + CLOCK_SKEW);

        // Same extensions as issue(): not a CA, both EKUs, one URI SAN.
        let (_, leaf) = x509_parser::parse_x509_certificate(wc.chain()[0].as_ref()).unwrap();
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let eku = leaf.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        let roots = ca.trust_roots().unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.store(),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(
                &wc.chain()[0],
                &wc.chain()[1..],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn csr_for_another_identity_is_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other: Identity = "spiffe://cluster.local/ns/demo/sa/db".parse().unwrap();
        let (csr, _) = generate_csr(&other).unwrap();
        let err = ca
            .sign_csr(&csr, &web(), Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, CaError::CsrIdentity { .. }), "{err}");
        assert!(err.to_string().contains("ns/demo/sa/db"), "{err}");
    }

    #[test]
    fn csr_with_extra_names_is_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(web().to_string().try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca
            .sign_csr(&csr, &web(), Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("DNS:evil.example"), "{err}");

        let no_san = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let err = ca
            .sign_csr(&no_san, &web(), Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, CaError::CsrIdentity { .. }), "{err}");
    }

    #[test]
    fn garbage_and_tampered_csrs_are_errors() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        for bad in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = ca
                .sign_csr(bad, &web(), Duration::from_secs(60))
                .unwrap_err();
            assert!(matches!(err, CaError::Csr(_)), "{err}");
        }
        // Change the requested name after signing: still well-formed DER, but the
        // self-signature no longer matches, so this must not be signed.
        let (csr, _) = generate_csr(&web()).unwrap();
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap();
        let mut bytes = der.as_ref().to_vec();
        let at = bytes.windows(6).position(|w| w == b"sa/web").unwrap();
        bytes[at + 5] = b'x';
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let err = ca
            .sign_csr(&tampered, &web(), Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
    }

    /// Base64 PEM armour; no PEM writer is among mesh-core's dependencies.
    fn pem_encode(tag: &str, der: &[u8]) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        format!(
            "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn server_certificate_verifies_for_its_names() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let issued = ca
            .issue_server(
                &["istiod.istio-system.svc".to_string()],
                &[ip],
                Duration::from_secs(3600),
            )
            .unwrap();
        let chain: Vec<_> =
            rustls::pki_types::CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let roots = ca.trust_roots().unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.store(),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        for name in ["istiod.istio-system.svc", "127.0.0.1"] {
            let name = rustls::pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(
                    &chain[0],
                    &chain[1..],
                    &name,
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap();
        }
        let wrong = rustls::pki_types::ServerName::try_from("other.svc").unwrap();
        assert!(verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &wrong,
                &[],
                rustls::pki_types::UnixTime::now()
            )
            .is_err());
        assert!(ca.issue_server(&[], &[], Duration::from_secs(60)).is_err());
    }
}
