//! Which authorization policies each node is sent: those that can apply to
//! a workload on it (mesh-wide ones, namespace-wide ones of namespaces it
//! has workloads in, and the selector policies its workloads name). A node
//! enforces policy only for its own workloads, so the others are none of its
//! business, and a compromised node learns no more than it needs.
//!
//! Addresses are not filtered: any workload may be a destination.

use std::collections::{BTreeSet, HashMap};

use mesh_core::config::{MeshConfig, PolicyScope};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Audience {
    Everyone,
    Namespace(String),
    Selected,
}

#[derive(Debug, Default)]
pub struct Visibility {
    /// Authorization resource name → who may see it. Names not listed (and
    /// every other resource type) are visible to all.
    audience: HashMap<String, Audience>,
    node_namespaces: HashMap<String, BTreeSet<String>>,
    node_selected: HashMap<String, BTreeSet<String>>,
    /// Namespace → its namespace-wide policies.
    by_namespace: HashMap<String, Vec<String>>,
}

impl Visibility {
    pub fn of(config: &MeshConfig) -> Self {
        let mut v = Visibility::default();
        for p in &config.policies {
            let audience = match p.scope {
                PolicyScope::Global => Audience::Everyone,
                PolicyScope::Namespace if p.namespace == config.root_namespace => {
                    Audience::Everyone
                }
                PolicyScope::Namespace => {
                    v.by_namespace
                        .entry(p.namespace.clone())
                        .or_default()
                        .push(p.key());
                    Audience::Namespace(p.namespace.clone())
                }
                PolicyScope::WorkloadSelector => Audience::Selected,
            };
            v.audience.insert(p.key(), audience);
        }
        // Clones only what is new: most workloads share their node's sets.
        for w in &config.workloads {
            if !v.node_namespaces.contains_key(&w.node) {
                v.node_namespaces.insert(w.node.clone(), BTreeSet::new());
                v.node_selected.insert(w.node.clone(), BTreeSet::new());
            }
            if let Some(set) = v.node_namespaces.get_mut(&w.node) {
                if !set.contains(&w.namespace) {
                    set.insert(w.namespace.clone());
                }
            }
            if let Some(set) = v.node_selected.get_mut(&w.node) {
                for p in &w.authorization_policies {
                    if !set.contains(p) {
                        set.insert(p.clone());
                    }
                }
            }
        }
        v
    }

    /// Whether `node` is sent the authorization resource `name`; a client
    /// that did not say which node it is (plaintext test port) sees all.
    pub fn visible(&self, node: Option<&str>, name: &str) -> bool {
        let Some(node) = node else { return true };
        match self.audience.get(name) {
            None | Some(Audience::Everyone) => true,
            Some(Audience::Namespace(ns)) => self
                .node_namespaces
                .get(node)
                .is_some_and(|s| s.contains(ns)),
            Some(Audience::Selected) => self
                .node_selected
                .get(node)
                .is_some_and(|s| s.contains(name)),
        }
    }

    /// Names whose visibility for `node` may differ between `self` and
    /// `other` although the resources themselves did not change.
    pub fn shifted(&self, other: &Visibility, node: Option<&str>) -> Vec<String> {
        let Some(node) = node else { return Vec::new() };
        let empty = BTreeSet::new();
        let mut out = Vec::new();
        let (a, b) = (
            self.node_namespaces.get(node).unwrap_or(&empty),
            other.node_namespaces.get(node).unwrap_or(&empty),
        );
        for ns in a.symmetric_difference(b) {
            for v in [self, other] {
                out.extend(v.by_namespace.get(ns).into_iter().flatten().cloned());
            }
        }
        let (a, b) = (
            self.node_selected.get(node).unwrap_or(&empty),
            other.node_selected.get(node).unwrap_or(&empty),
        );
        out.extend(a.symmetric_difference(b).cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::parse_mesh_config;

    #[test]
    fn nodes_see_what_can_apply_to_their_workloads() {
        let config = parse_mesh_config(
            r#"
workloads:
- {name: a, namespace: red, node: n1, addresses: [198.19.1.2], authorizationPolicies: [red/sel]}
- {name: b, namespace: blue, node: n2, addresses: [198.19.2.2]}
policies:
- {name: all, namespace: istio-system, scope: Global, action: Deny, rules: []}
- {name: ns, namespace: red, scope: Namespace, action: Allow, rules: []}
- {name: sel, namespace: red, scope: WorkloadSelector, action: Allow, rules: []}
- {name: ns, namespace: blue, scope: Namespace, action: Allow, rules: []}
"#,
        )
        .unwrap();
        let v = Visibility::of(&config);
        let sees = |node: &str| -> Vec<&str> {
            ["istio-system/all", "red/ns", "red/sel", "blue/ns"]
                .into_iter()
                .filter(|n| v.visible(Some(node), n))
                .collect()
        };
        assert_eq!(sees("n1"), ["istio-system/all", "red/ns", "red/sel"]);
        assert_eq!(sees("n2"), ["istio-system/all", "blue/ns"]);
        assert_eq!(sees("n9"), ["istio-system/all"]);
        assert!(v.visible(None, "red/sel"));
    }
}
