use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use super::{MeshConfig, Policy, PolicyScope, WaypointRef};
use crate::identity::Identity;

/// Why a config was rejected, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line of the offending entry, when it can be located.
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses and validates a mesh config. Any problem rejects the whole document:
/// a proxy keeps its last good config rather than run on a partial one.
pub fn parse_mesh_config(src: &str) -> Result<MeshConfig, ConfigError> {
    let config: MeshConfig = serde_yaml::from_str(src).map_err(|e| ConfigError {
        line: e.location().map(|l| l.line()),
        reason: e.to_string(),
    })?;
    Validator {
        src,
        config: &config,
    }
    .run()?;
    Ok(config)
}

/// Validates a config built in memory (from xDS); errors carry no line numbers.
pub fn validate_mesh_config(config: &MeshConfig) -> Result<(), ConfigError> {
    Validator { src: "", config }.run()
}

struct Validator<'a> {
    src: &'a str,
    config: &'a MeshConfig,
}

impl Validator<'_> {
    fn fail(&self, section: &str, index: usize, reason: String) -> ConfigError {
        ConfigError {
            line: item_line(self.src, section, index),
            reason: format!("{section}[{index}]: {reason}"),
        }
    }

    fn run(&self) -> Result<(), ConfigError> {
        let c = self.config;
        Identity::new(&c.trust_domain, "ns", "sa").map_err(|e| ConfigError {
            line: None,
            reason: format!("trustDomain: {e}"),
        })?;

        let policy_keys = self.unique("policies", c.policies.iter().map(|p| p.key()))?;
        let service_keys = self.unique(
            "services",
            c.services
                .iter()
                .map(|s| format!("{}/{}", s.namespace, s.name)),
        )?;
        self.unique(
            "workloads",
            c.workloads
                .iter()
                .map(|w| format!("{}/{}", w.namespace, w.name)),
        )?;
        self.unique(
            "peerAuthentications",
            c.peer_authentications
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name)),
        )?;

        let selector_policies: HashSet<String> = c
            .policies
            .iter()
            .filter(|p| p.scope == PolicyScope::WorkloadSelector)
            .map(Policy::key)
            .collect();
        let mut owner_of_ip: HashMap<IpAddr, String> = HashMap::new();
        for (i, w) in c.workloads.iter().enumerate() {
            let name = format!("workload {}/{}", w.namespace, w.name);
            if w.name.is_empty() || w.node.is_empty() {
                return Err(self.fail(
                    "workloads",
                    i,
                    format!("{name}: name and node must be set"),
                ));
            }
            Identity::new(&c.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| self.fail("workloads", i, format!("{name}: {e}")))?;
            if w.addresses.is_empty() {
                return Err(self.fail("workloads", i, format!("{name}: no addresses")));
            }
            for ip in &w.addresses {
                if let Some(other) = owner_of_ip.insert(*ip, name.clone()) {
                    return Err(self.fail(
                        "workloads",
                        i,
                        format!("{name}: address {ip} is already used by {other}"),
                    ));
                }
            }
            for s in &w.services {
                if !service_keys.contains(s.as_str()) {
                    return Err(self.fail(
                        "workloads",
                        i,
                        format!("{name}: unknown service {s:?}"),
                    ));
                }
            }
            if let Some(wp) = &w.waypoint {
                if w.native_tunnel {
                    // A waypoint routing through a waypoint would loop.
                    return Err(self.fail(
                        "workloads",
                        i,
                        format!(
                            "{name}: a nativeTunnel workload (a waypoint) cannot have a waypoint"
                        ),
                    ));
                }
                check_waypoint(wp)
                    .map_err(|e| self.fail("workloads", i, format!("{name}: {e}")))?;
            }
            for p in &w.authorization_policies {
                if !selector_policies.contains(p) {
                    return Err(self.fail(
                        "workloads",
                        i,
                        format!("{name}: {p:?} is not a policy with scope WorkloadSelector"),
                    ));
                }
            }
        }

        for (i, s) in c.services.iter().enumerate() {
            let name = format!("service {}/{}", s.namespace, s.name);
            if s.addresses.is_empty() || s.ports.is_empty() {
                return Err(self.fail("services", i, format!("{name}: needs addresses and ports")));
            }
            for ip in &s.addresses {
                if let Some(other) = owner_of_ip.insert(*ip, name.clone()) {
                    return Err(self.fail(
                        "services",
                        i,
                        format!("{name}: address {ip} is already used by {other}"),
                    ));
                }
            }
            if let Some(wp) = &s.waypoint {
                check_waypoint(wp).map_err(|e| self.fail("services", i, format!("{name}: {e}")))?;
                if wp.namespace == s.namespace && wp.name == s.name {
                    return Err(self.fail("services", i, format!("{name}: is its own waypoint")));
                }
            }
            let mut seen = HashSet::new();
            for p in &s.ports {
                if p.port == 0 || p.target() == 0 {
                    return Err(self.fail("services", i, format!("{name}: port 0 is not valid")));
                }
                if !seen.insert(p.port) {
                    return Err(self.fail(
                        "services",
                        i,
                        format!("{name}: port {} listed twice", p.port),
                    ));
                }
            }
        }

        for (i, p) in c.policies.iter().enumerate() {
            let name = format!("policy {}", p.key());
            for rule in &p.rules {
                for from in &rule.from {
                    for pattern in from
                        .principals
                        .iter()
                        .chain(&from.not_principals)
                        .chain(&from.namespaces)
                        .chain(&from.not_namespaces)
                    {
                        let inner = pattern.strip_prefix('*').unwrap_or(pattern);
                        let inner = inner.strip_suffix('*').unwrap_or(inner);
                        let both_ends =
                            pattern.len() > 1 && pattern.starts_with('*') && pattern.ends_with('*');
                        if inner.contains('*') || both_ends {
                            return Err(self.fail(
                                "policies",
                                i,
                                format!(
                                    "{name}: {pattern:?}: '*' is only allowed at the start or end"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        let _ = policy_keys;

        self.unique("httpRoutes", c.http_routes.iter().map(|r| r.key()))?;
        for (i, r) in c.http_routes.iter().enumerate() {
            super::http::check_route(r)
                .map_err(|e| self.fail("httpRoutes", i, format!("route {}: {e}", r.key())))?;
        }
        self.unique("httpPolicies", c.http_policies.iter().map(|p| p.key()))?;
        for (i, p) in c.http_policies.iter().enumerate() {
            super::http::check_policy(p, &c.root_namespace)
                .map_err(|e| self.fail("httpPolicies", i, format!("policy {}: {e}", p.key())))?;
        }
        self.unique(
            "trafficPolicies",
            c.traffic_policies.iter().map(|p| p.key()),
        )?;
        for (i, p) in c.traffic_policies.iter().enumerate() {
            super::http::check_traffic_policy(p)
                .map_err(|e| self.fail("trafficPolicies", i, format!("policy {}: {e}", p.key())))?;
        }

        for (i, pa) in c.peer_authentications.iter().enumerate() {
            for w in &pa.workloads {
                let exists = c
                    .workloads
                    .iter()
                    .any(|x| &x.name == w && x.namespace == pa.namespace);
                if !exists {
                    return Err(self.fail(
                        "peerAuthentications",
                        i,
                        format!(
                            "{}/{}: no workload {w:?} in namespace {}",
                            pa.namespace, pa.name, pa.namespace
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn unique(
        &self,
        section: &str,
        keys: impl Iterator<Item = String>,
    ) -> Result<HashSet<String>, ConfigError> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, key) in keys.enumerate() {
            if let Some(first) = seen.insert(key.clone(), i) {
                return Err(self.fail(
                    section,
                    i,
                    format!("duplicate {key} (first defined at {section}[{first}])"),
                ));
            }
        }
        Ok(seen.into_keys().collect())
    }
}

/// Whether a waypoint reference is well-formed. Whether it resolves is not
/// checked: an unresolved one stands for an unavailable waypoint.
fn check_waypoint(wp: &WaypointRef) -> Result<(), String> {
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    };
    if !dns(&wp.namespace) || !dns(&wp.name) {
        return Err(format!(
            "waypoint {:?}/{:?}: namespace and name must be DNS names",
            wp.namespace, wp.name
        ));
    }
    if wp.hostname.as_deref().is_some_and(|h| !dns(h)) {
        return Err(format!(
            "waypoint {}: hostname {:?} is not a DNS name",
            wp.key(),
            wp.hostname
        ));
    }
    if wp.hbone_port == 0 {
        return Err(format!("waypoint {}: hbonePort 0 is not valid", wp.key()));
    }
    Ok(())
}

/// Finds the 1-based line where item `index` of the top-level block sequence
/// `section` starts. Flow-style sequences (`[...]`) are not located.
fn item_line(src: &str, section: &str, index: usize) -> Option<usize> {
    let header = format!("{section}:");
    let mut lines = src.lines().enumerate();
    lines.find(|(_, l)| l.trim_end() == header)?;
    let mut item_indent = None;
    let mut count = 0;
    for (no, line) in lines {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let is_item = trimmed == "-" || trimmed.starts_with("- ");
        match item_indent {
            None if is_item => item_indent = Some(indent),
            None => return None,
            Some(want) if indent < want || (indent == want && !is_item) => return None,
            _ => {}
        }
        if is_item && Some(indent) == item_indent {
            if count == index {
                return Some(no + 1);
            }
            count += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
- name: client
  namespace: demo
  serviceAccount: sleep
  node: node1
  addresses: [198.19.1.10, "2001:2:1::10"]
- name: server
  namespace: demo
  node: node2
  addresses: [198.19.2.10]
  services: [demo/web]
services:
- name: web
  namespace: demo
  addresses: [198.18.100.1]
  ports: [{port: 80, targetPort: 8080}]
policies:
- name: deny-sleep
  namespace: demo
  action: Deny
  rules:
  - from: [{principals: ["cluster.local/ns/demo/sa/sleep"]}]
"#;

    #[test]
    fn accepts_good_config() {
        let c = parse_mesh_config(GOOD).unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.services[0].ports[0].target(), 8080);
    }

    #[test]
    fn accepts_an_unresolved_waypoint_with_istios_port() {
        let src = GOOD.replacen(
            "  ports: [{port: 80, targetPort: 8080}]\n",
            "  ports: [{port: 80, targetPort: 8080}]\n  waypoint: {namespace: demo, name: gone}\n",
            1,
        );
        let c = parse_mesh_config(&src).unwrap();
        let wp = c.services[0].waypoint.as_ref().unwrap();
        assert_eq!(wp.hbone_port, 15008);
        assert_eq!(
            wp.hostname_in(&c.trust_domain),
            "gone.demo.svc.cluster.local"
        );
    }

    #[test]
    fn rejects_with_line_and_reason() {
        let cases: &[(&str, &str, usize, &str)] = &[
            (
                "unknown field",
                "  serviceAccount: sleep\n",
                5,
                "unknown field `colour`",
            ),
            (
                "bad ip",
                "  addresses: [198.19.1.10, \"2001:2:1::10\"]\n",
                7,
                "invalid IP address",
            ),
        ];
        for (what, anchor, line, want) in cases {
            let bad = match *what {
                "unknown field" => GOOD.replacen(anchor, "  colour: blue\n", 1),
                _ => GOOD.replacen(anchor, "  addresses: [198.19.1.300]\n", 1),
            };
            let err = parse_mesh_config(&bad).unwrap_err();
            assert_eq!(err.line, Some(*line), "{what}: {err}");
            assert!(err.reason.contains(want), "{what}: {err}");
        }
    }

    #[test]
    fn rejects_duplicate_workload_at_its_line() {
        let dup = GOOD.replacen("- name: server", "- name: client", 1);
        let err = parse_mesh_config(&dup).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert!(err.reason.contains("duplicate demo/client"), "{err}");
    }

    #[test]
    fn rejects_semantic_errors() {
        let cases = [
            (
                GOOD.replacen("[198.19.2.10]", "[198.19.1.10]", 1),
                "already used by workload demo/client",
            ),
            (
                GOOD.replacen("[demo/web]", "[demo/nope]", 1),
                "unknown service \"demo/nope\"",
            ),
            (
                GOOD.replacen(
                    "namespace: demo\n  serviceAccount",
                    "namespace: \"a b\"\n  serviceAccount",
                    1,
                ),
                "invalid character",
            ),
            (
                GOOD.replacen("targetPort: 8080", "targetPort: 0", 1),
                "port 0",
            ),
            (
                GOOD.replacen(
                    "  services: [demo/web]\n",
                    "  services: [demo/web]\n  nativeTunnel: true\n  waypoint: {namespace: demo, name: wp}\n",
                    1,
                ),
                "cannot have a waypoint",
            ),
            (
                GOOD.replacen(
                    "  ports: [{port: 80, targetPort: 8080}]\n",
                    "  ports: [{port: 80, targetPort: 8080}]\n  waypoint: {namespace: demo, name: web}\n",
                    1,
                ),
                "is its own waypoint",
            ),
            (
                GOOD.replacen(
                    "  ports: [{port: 80, targetPort: 8080}]\n",
                    "  ports: [{port: 80, targetPort: 8080}]\n  waypoint: {namespace: demo, name: wp, hbonePort: 0}\n",
                    1,
                ),
                "hbonePort 0",
            ),
            (
                GOOD.replacen(
                    "  ports: [{port: 80, targetPort: 8080}]\n",
                    "  ports: [{port: 80, targetPort: 8080}]\n  waypoint: {namespace: Demo, name: wp}\n",
                    1,
                ),
                "must be DNS names",
            ),
            (
                GOOD.replacen("ns/demo/sa/sleep", "ns/*/sa/sleep", 1),
                "only allowed at the start or end",
            ),
            (
                GOOD.replacen("\"cluster.local/ns/demo/sa/sleep\"", "\"*sleep*\"", 1),
                "only allowed at the start or end",
            ),
            (
                // Multi-byte characters at either end must not trip the check.
                GOOD.replacen(
                    "\"cluster.local/ns/demo/sa/sleep\"",
                    "\"ü\", \"é*\", \"*ß*\"",
                    1,
                ),
                "\"*ß*\": '*' is only allowed",
            ),
        ];
        for (src, want) in cases {
            let err = parse_mesh_config(&src).unwrap_err();
            assert!(err.to_string().contains(want), "want {want:?}, got {err}");
            assert!(err.line.is_some(), "{err}");
        }
    }

    #[test]
    fn item_line_handles_indented_sequences() {
        let src =
            "a: 1\nworkloads:\n  # comment\n  - name: x\n    node: n\n  - name: y\nservices: []\n";
        assert_eq!(item_line(src, "workloads", 0), Some(4));
        assert_eq!(item_line(src, "workloads", 1), Some(6));
        assert_eq!(item_line(src, "workloads", 2), None);
    }
}
