//! L4 authorization: Istio's evaluation order, on connection attributes.
//!
//! A matching DENY policy denies. Otherwise, if any ALLOW policy applies to the
//! workload, one of them must match. With no ALLOW policy, the connection is allowed.

use std::net::IpAddr;

use crate::config::{DestinationMatch, Policy, PolicyAction, Rule, SourceMatch};
use crate::identity::Identity;

/// What policy can see of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAttributes<'a> {
    /// The authenticated peer; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; names the ALLOW policy that matched, if one had to.
    Allow(Option<String>),
    /// Denied by the named DENY policy.
    DeniedBy(String),
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow(Some(p)) => write!(f, "allowed by {p}"),
            Decision::Allow(None) => f.write_str("allowed (no ALLOW policy applies)"),
            Decision::DeniedBy(p) => write!(f, "denied by {p}"),
            Decision::NotAllowed => f.write_str("denied: no ALLOW policy matched"),
        }
    }
}

pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    conn: &ConnectionAttributes<'_>,
) -> Decision {
    let mut allow_applies = false;
    let mut allowed_by = None;
    for p in policies {
        let matched = p.rules.iter().any(|r| rule_matches(r, conn));
        match p.action {
            PolicyAction::Deny if matched => return Decision::DeniedBy(p.key()),
            PolicyAction::Deny => {}
            PolicyAction::Allow => {
                allow_applies = true;
                if matched && allowed_by.is_none() {
                    allowed_by = Some(p.key());
                }
            }
        }
    }
    match (allow_applies, allowed_by) {
        (false, _) => Decision::Allow(None),
        (true, Some(p)) => Decision::Allow(Some(p)),
        (true, None) => Decision::NotAllowed,
    }
}

fn rule_matches(rule: &Rule, conn: &ConnectionAttributes<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, conn)))
        && (rule.to.is_empty() || rule.to.iter().any(|d| destination_matches(d, conn)))
}

/// Whether an L4 `source` clause matches the connection (shared with the
/// waypoint's L7 evaluator).
pub fn source_matches(m: &SourceMatch, conn: &ConnectionAttributes<'_>) -> bool {
    let principal = conn.source.map(|id| id.principal());
    let namespace = conn.source.map(|id| id.namespace());
    positive(&m.principals, principal.as_deref())
        && negative(&m.not_principals, principal.as_deref())
        && positive(&m.namespaces, namespace)
        && negative(&m.not_namespaces, namespace)
        && (m.ip_blocks.is_empty() || m.ip_blocks.iter().any(|c| c.contains(conn.source_ip)))
        && !m.not_ip_blocks.iter().any(|c| c.contains(conn.source_ip))
}

fn destination_matches(m: &DestinationMatch, conn: &ConnectionAttributes<'_>) -> bool {
    (m.ports.is_empty() || m.ports.contains(&conn.destination_port))
        && !m.not_ports.contains(&conn.destination_port)
}

/// An empty list matches anything; otherwise the value must be present and match.
pub fn positive(patterns: &[String], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| pattern_matches(p, v)))
}

/// Matches unless the value is present and matches one of the patterns.
pub fn negative(patterns: &[String], value: Option<&str>) -> bool {
    !value.is_some_and(|v| patterns.iter().any(|p| pattern_matches(p, v)))
}

/// Istio string matching: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
pub fn pattern_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_mesh_config;

    fn policies(yaml: &str) -> Vec<Policy> {
        parse_mesh_config(yaml).unwrap().policies
    }

    fn conn<'a>(id: Option<&'a Identity>, ip: &str, port: u16) -> ConnectionAttributes<'a> {
        ConnectionAttributes {
            source: id,
            source_ip: ip.parse().unwrap(),
            destination_port: port,
        }
    }

    #[test]
    fn deny_beats_allow_and_allow_restricts() {
        let ps = policies(
            r#"
policies:
- name: allow-sleep
  namespace: demo
  action: Allow
  rules: [{from: [{principals: ["cluster.local/ns/demo/sa/sleep"]}], to: [{ports: [8080]}]}]
- name: deny-v6
  namespace: demo
  action: Deny
  rules: [{from: [{ipBlocks: ["2001:2::/48"]}]}]
"#,
        );
        let sleep: Identity = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
        let other: Identity = "spiffe://cluster.local/ns/other/sa/x".parse().unwrap();
        assert_eq!(
            authorize(&ps, &conn(Some(&sleep), "198.19.1.1", 8080)),
            Decision::Allow(Some("demo/allow-sleep".into()))
        );
        assert_eq!(
            authorize(&ps, &conn(Some(&sleep), "198.19.1.1", 9090)),
            Decision::NotAllowed
        );
        assert_eq!(
            authorize(&ps, &conn(Some(&other), "198.19.1.1", 8080)),
            Decision::NotAllowed
        );
        assert_eq!(
            authorize(&ps, &conn(None, "198.19.1.1", 8080)),
            Decision::NotAllowed
        );
        assert_eq!(
            authorize(&ps, &conn(Some(&sleep), "2001:2::9", 8080)),
            Decision::DeniedBy("demo/deny-v6".into())
        );
    }

    #[test]
    fn wildcards_and_negations() {
        let ps = policies(
            r#"
policies:
- name: plaintext-deny
  namespace: demo
  action: Deny
  rules: [{from: [{notPrincipals: ["*"]}]}]
- name: ns-allow
  namespace: demo
  action: Allow
  rules: [{from: [{namespaces: ["prod-*"], notNamespaces: ["prod-legacy"]}]}]
"#,
        );
        let prod: Identity = "spiffe://cluster.local/ns/prod-web/sa/x".parse().unwrap();
        let legacy: Identity = "spiffe://cluster.local/ns/prod-legacy/sa/x"
            .parse()
            .unwrap();
        assert!(authorize(&ps, &conn(Some(&prod), "198.19.1.1", 1)).is_allowed());
        assert_eq!(
            authorize(&ps, &conn(Some(&legacy), "198.19.1.1", 1)),
            Decision::NotAllowed
        );
        assert_eq!(
            authorize(&ps, &conn(None, "198.19.1.1", 1)),
            Decision::DeniedBy("demo/plaintext-deny".into())
        );
    }

    #[test]
    fn empty_rules_match_nothing_empty_rule_matches_all() {
        let none = policies("policies: [{name: p, namespace: n, action: Allow}]");
        assert_eq!(
            authorize(&none, &conn(None, "198.18.0.1", 1)),
            Decision::NotAllowed
        );
        let all = policies("policies: [{name: p, namespace: n, action: Allow, rules: [{}]}]");
        assert!(authorize(&all, &conn(None, "198.18.0.1", 1)).is_allowed());
        assert!(authorize(&[], &conn(None, "198.18.0.1", 1)).is_allowed());
    }
}
