//! What waypoints enforce besides routes: Istio AuthorizationPolicies
//! attached with `targetRefs` (→ [`HttpPolicy`]) and Ambit TrafficPolicies
//! (→ [`TrafficPolicy`]).
//!
//! Targets follow Istio: a Gateway (`gateway.networking.k8s.io`, the
//! waypoint) or a core Service, in the policy's namespace. Istio's other
//! kinds, `ServiceEntry` (Ambit has none) and `GatewayClass` (mesh-wide
//! waypoint policy), and anything else, are refused.
//!
//! A targeted policy that cannot be enforced as written fails closed on the
//! targets that can be read, as the L4 path does: ALLOW (or no action)
//! becomes an ALLOW without rules (allows nothing), anything else a DENY of
//! everything. Dropping it would widen access.

use mesh_core::config::{
    validate_mesh_config, Condition, HttpPolicy, HttpPolicyAction, HttpRule, MeshConfig, Operation,
    PolicyTarget, TargetKind, TrafficPolicy, CONDITION_KEYS, HEADER_CONDITION_PREFIX,
    WAYPOINT_GATEWAY_CLASS,
};

use super::{cidrs, ports, source_match, Translator};
use crate::istio_types::{self, AuthorizationPolicy, AuthzRule};
use crate::sources::gateway_api::GROUP as GATEWAY_GROUP;

impl Translator<'_> {
    pub(super) fn http_policies(&mut self) -> Vec<HttpPolicy> {
        let mut out = Vec::new();
        for (key, ap) in &self.state.authorization_policies {
            let refs: Vec<&istio_types::TargetRef> = ap
                .spec
                .target_refs
                .iter()
                .chain(ap.spec.target_ref.as_ref())
                .collect();
            // With a selector too, the L4 path rejects it and enforces it
            // fail-closed on the selected workloads.
            if refs.is_empty() || has_selector(ap) {
                continue;
            }
            let object = format!("AuthorizationPolicy {key}");
            let ns = ap
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = ap.metadata.name.clone().unwrap_or_default();
            let mut targets = Vec::new();
            let mut problem = ap.broken.clone();
            for t in refs {
                match target(t, &ns, self.root_namespace) {
                    Ok(target) => {
                        if !targets.contains(&target) {
                            targets.push(target)
                        }
                    }
                    Err(e) => {
                        problem.get_or_insert(e);
                    }
                }
            }
            let translated = match problem {
                Some(p) => Err(p),
                None => translate_policy(ap).and_then(|(action, rules)| {
                    let policy = HttpPolicy {
                        name: name.clone(),
                        namespace: ns.clone(),
                        targets: targets.clone(),
                        action,
                        rules,
                    };
                    self.check_policy_alone(&policy).map(|()| policy)
                }),
            };
            match translated {
                Ok(p) => out.push(p),
                Err(reason) if targets.is_empty() => self.reject(
                    object,
                    format!("{reason}; not enforced (no target Ambit supports)"),
                ),
                Err(reason) => {
                    self.reject(object, format!("{reason}; enforced as deny-all"));
                    let deny = !matches!(ap.spec.action.as_deref(), None | Some("ALLOW"));
                    out.push(HttpPolicy {
                        name,
                        namespace: ns,
                        targets,
                        action: if deny {
                            HttpPolicyAction::Deny
                        } else {
                            HttpPolicyAction::Allow
                        },
                        rules: if deny {
                            vec![HttpRule::default()]
                        } else {
                            Vec::new()
                        },
                    });
                }
            }
        }
        out
    }

    pub(super) fn traffic_policies(&mut self) -> Vec<TrafficPolicy> {
        let mut out = Vec::new();
        for (key, tp) in &self.state.traffic_policies {
            let object = format!("TrafficPolicy {key}");
            let ns = tp
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let t = &tp.spec.target_ref;
            let kind = match (t.group.as_deref(), t.kind.as_str()) {
                (None | Some(""), "Service") => TargetKind::Service,
                (None | Some(GATEWAY_GROUP), "HTTPRoute") => TargetKind::HttpRoute,
                (group, kind) => {
                    self.reject(
                        object,
                        format!(
                            "targetRef kind {kind:?} of group {:?} is not supported (Service or HTTPRoute)",
                            group.unwrap_or_default()
                        ),
                    );
                    continue;
                }
            };
            let target_key = format!("{ns}/{}", t.name);
            let exists = match kind {
                TargetKind::HttpRoute => self.state.http_routes.contains_key(&target_key),
                _ => self.state.services.contains_key(&target_key),
            };
            if !exists {
                // Kept: it applies as soon as its target appears.
                self.notes.push(format!(
                    "{object}: target {} {target_key} does not exist (yet)",
                    t.kind
                ));
            }
            let policy = TrafficPolicy {
                name: tp.metadata.name.clone().unwrap_or_default(),
                namespace: ns,
                target: PolicyTarget {
                    kind,
                    name: t.name.clone(),
                },
                connection_pool: tp.spec.connection_pool,
                outlier_detection: tp.spec.outlier_detection,
                rate_limit: tp.spec.rate_limit,
            };
            let alone = MeshConfig {
                trust_domain: self.trust_domain.to_string(),
                traffic_policies: vec![policy.clone()],
                ..MeshConfig::default()
            };
            match validate_mesh_config(&alone) {
                Ok(()) => out.push(policy),
                Err(e) => self.reject(
                    object,
                    format!("{}; not applied", strip_prefix(&e.to_string())),
                ),
            }
        }
        out
    }

    fn check_policy_alone(&self, p: &HttpPolicy) -> Result<(), String> {
        let alone = MeshConfig {
            trust_domain: self.trust_domain.to_string(),
            root_namespace: self.root_namespace.to_string(),
            http_policies: vec![p.clone()],
            ..MeshConfig::default()
        };
        validate_mesh_config(&alone).map_err(|e| strip_prefix(&e.to_string()))
    }
}

/// "httpPolicies[0]: policy ns/name: <reason>" → "<reason>".
fn strip_prefix(e: &str) -> String {
    match e.split_once(": policy ") {
        Some((_, rest)) => rest
            .split_once(": ")
            .map_or(e.to_string(), |(_, r)| r.to_string()),
        None => e.to_string(),
    }
}

fn has_selector(ap: &AuthorizationPolicy) -> bool {
    ap.spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty())
}

fn target(t: &istio_types::TargetRef, ns: &str, root: &str) -> Result<PolicyTarget, String> {
    if t.namespace.as_deref().is_some_and(|n| n != ns) {
        return Err(format!(
            "targetRef {} {:?} is in another namespace (Istio allows only the policy's own)",
            t.kind, t.name
        ));
    }
    if t.name.is_empty() {
        return Err(format!("targetRef {} without a name", t.kind));
    }
    let kind = match (t.group.as_str(), t.kind.as_str()) {
        (GATEWAY_GROUP, "Gateway") => TargetKind::Gateway,
        (GATEWAY_GROUP, "GatewayClass") if ns == root && t.name == WAYPOINT_GATEWAY_CLASS => {
            TargetKind::GatewayClass
        }
        (GATEWAY_GROUP, "GatewayClass") => {
            return Err(format!(
                "a GatewayClass target must be {WAYPOINT_GATEWAY_CLASS:?} on a policy in the root namespace {root:?}"
            ))
        }
        ("" | "core", "Service") => TargetKind::Service,
        (group, kind) => {
            return Err(format!(
                "targetRef kind {kind:?} of group {group:?} is not supported (a Gateway of group {GATEWAY_GROUP:?} or a core Service)"
            ))
        }
    };
    Ok(PolicyTarget {
        kind,
        name: t.name.clone(),
    })
}

fn translate_policy(ap: &AuthorizationPolicy) -> Result<(HttpPolicyAction, Vec<HttpRule>), String> {
    let action = match ap.spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => HttpPolicyAction::Allow,
        "DENY" => HttpPolicyAction::Deny,
        "AUDIT" => HttpPolicyAction::Audit,
        "CUSTOM" => {
            return Err("action CUSTOM (external authorization) is not supported by Ambit".into())
        }
        other => return Err(format!("unknown action {other:?}")),
    };
    let rules = ap
        .spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| http_rule(r).map_err(|e| format!("rules[{i}]: {e}")))
        .collect::<Result<Vec<_>, String>>()?;
    Ok((action, rules))
}

fn http_rule(r: &AuthzRule) -> Result<HttpRule, String> {
    let mut from = Vec::new();
    for f in &r.from {
        let s = &f.source;
        if !(s.request_principals.is_empty() && s.not_request_principals.is_empty()) {
            return Err("requestPrincipals (JWT) is not supported by Ambit".into());
        }
        let source = source_match(s)?;
        for p in source
            .principals
            .iter()
            .chain(&source.not_principals)
            .chain(&source.namespaces)
            .chain(&source.not_namespaces)
        {
            check_pattern(p)?;
        }
        from.push(source);
    }
    let mut to = Vec::new();
    for t in &r.to {
        let o = &t.operation;
        to.push(Operation {
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
            ports: ports(&o.ports)?,
            not_ports: ports(&o.not_ports)?,
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
        });
        for p in o
            .paths
            .iter()
            .chain(&o.not_paths)
            .chain(&o.hosts)
            .chain(&o.not_hosts)
        {
            check_pattern(p)?;
        }
    }
    let mut when = Vec::new();
    for w in &r.when {
        let c: istio_types::Condition =
            serde_yaml::from_value(w.clone()).map_err(|e| format!("when: {e}"))?;
        let header = c.key.starts_with(HEADER_CONDITION_PREFIX) && c.key.ends_with(']');
        if !(header || CONDITION_KEYS.contains(&c.key.as_str())) {
            return Err(format!(
                "condition key {:?} is not supported by Ambit",
                c.key
            ));
        }
        let values = c
            .values
            .iter()
            .chain(&c.not_values)
            .cloned()
            .collect::<Vec<_>>();
        match c.key.as_str() {
            "source.ip" => {
                cidrs(&values)?;
            }
            "destination.port" => {
                ports(&values)?;
            }
            _ => {}
        }
        when.push(Condition {
            key: c.key,
            values: c.values,
            not_values: c.not_values,
        });
    }
    Ok(HttpRule { from, to, when })
}

/// Istio's matching: `*` alone, or once at the start or at the end.
fn check_pattern(p: &str) -> Result<(), String> {
    let inner = p.strip_prefix('*').unwrap_or(p);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    let both_ends = p.len() > 1 && p.starts_with('*') && p.ends_with('*');
    if inner.contains('*') || both_ends {
        return Err(format!("{p:?}: '*' is only allowed at the start or end"));
    }
    Ok(())
}
