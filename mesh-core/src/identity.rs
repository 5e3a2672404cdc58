//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const SCHEME: &str = "spiffe://";

/// A workload identity as carried in the URI SAN of a workload certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    MissingScheme(String),
    #[error("identity {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error("identity {0:?} is not of the form spiffe://<td>/ns/<namespace>/sa/<service-account>")]
    BadPath(String),
    #[error("identity {0:?} has an invalid character in {1}")]
    BadCharacter(String, &'static str),
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        id.validate()?;
        Ok(id)
    }

    fn validate(&self) -> Result<(), IdentityError> {
        if self.trust_domain.is_empty() {
            return Err(IdentityError::EmptyTrustDomain(self.to_string()));
        }
        // SPIFFE trust domains are lowercase letters, digits, '.', '-', '_'.
        let td_ok = self
            .trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !td_ok {
            return Err(IdentityError::BadCharacter(
                self.to_string(),
                "trust domain",
            ));
        }
        for (part, what) in [
            (&self.namespace, "namespace"),
            (&self.service_account, "service account"),
        ] {
            if part.is_empty() {
                return Err(IdentityError::BadPath(self.to_string()));
            }
            let ok = part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !ok {
                return Err(IdentityError::BadCharacter(self.to_string(), what));
            }
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Istio's "principal" form used by authorization policy: the SPIFFE ID without scheme.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme(s.to_string()))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        if td.is_empty() {
            return Err(IdentityError::EmptyTrustDomain(s.to_string()));
        }
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                let id = Identity {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                };
                id.validate().map_err(|e| match e {
                    IdentityError::BadPath(_) => IdentityError::BadPath(s.to_string()),
                    other => other,
                })?;
                Ok(id)
            }
            _ => Err(IdentityError::BadPath(s.to_string())),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/demo/sa/sleep");
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://td/ns/a", "not of the form"),
            ("spiffe://td/ns/a/sa/b/extra", "not of the form"),
            ("spiffe://td/namespace/a/sa/b", "not of the form"),
            ("spiffe://td/ns//sa/b", "not of the form"),
            ("spiffe://TD/ns/a/sa/b", "invalid character in trust domain"),
            ("spiffe://td/ns/a b/sa/b", "invalid character in namespace"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }
}
