//! `ambitctl check`: is a pod captured and mTLS, and which policies apply.

use super::*;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Ok => "[ok]  ",
            Level::Info => "[info]",
            Level::Warn => "[warn]",
            Level::Fail => "[FAIL]",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckLine {
    /// `enrolled`, `in-mesh`, `captured`, `certificate`, `mtls`, `waypoint`.
    pub check: String,
    pub level: Level,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    /// `namespace/name`.
    pub policy: String,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: String,
    /// Why it selects the pod.
    pub selects: String,
    /// What it does to the pod's inbound traffic, in one line.
    pub verdict: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub pod: String,
    pub node: Option<String>,
    pub ip: Option<String>,
    pub identity: Option<String>,
    pub captured: bool,
    pub mtls: Option<String>,
    pub waypoints: Vec<WaypointUse>,
    pub checks: Vec<CheckLine>,
    pub l4_policies: Vec<PolicyVerdict>,
    pub l7_policies: Vec<PolicyVerdict>,
    pub summary: String,
}

fn line(check: &str, level: Level, message: impl Into<String>) -> CheckLine {
    CheckLine {
        check: check.into(),
        level,
        message: message.into(),
    }
}

fn sources(from: &[SourceMatch]) -> String {
    let mut parts = Vec::new();
    for s in from {
        let mut p = Vec::new();
        let list =
            |name: &str, v: &[String]| (!v.is_empty()).then(|| format!("{name} {}", v.join(",")));
        p.extend(list("principals", &s.principals));
        p.extend(list("not principals", &s.not_principals));
        p.extend(list("namespaces", &s.namespaces));
        p.extend(list("not namespaces", &s.not_namespaces));
        let cidrs =
            |v: &[mesh_core::config::Cidr]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        p.extend(list("ipBlocks", &cidrs(&s.ip_blocks)));
        p.extend(list("not ipBlocks", &cidrs(&s.not_ip_blocks)));
        parts.push(if p.is_empty() {
            "anyone".into()
        } else {
            p.join(" ")
        });
    }
    parts.join(" or ")
}

fn ports(p: &[u16]) -> String {
    p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

fn l4_rules(p: &Policy) -> String {
    if p.rules.is_empty() {
        return "no rules: matches nothing".into();
    }
    p.rules
        .iter()
        .map(|r| {
            let from = if r.from.is_empty() {
                "anyone".to_string()
            } else {
                sources(&r.from)
            };
            let to: Vec<String> =
                r.to.iter()
                    .map(|d| match (d.ports.is_empty(), d.not_ports.is_empty()) {
                        (true, true) => "any port".into(),
                        (false, true) => format!("ports {}", ports(&d.ports)),
                        (true, false) => format!("ports other than {}", ports(&d.not_ports)),
                        (false, false) => {
                            format!("ports {} but not {}", ports(&d.ports), ports(&d.not_ports))
                        }
                    })
                    .collect();
            if to.is_empty() {
                format!("from {from}")
            } else {
                format!("from {from} to {}", to.join(" or "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn l7_rules(p: &HttpPolicy) -> String {
    if p.rules.is_empty() {
        return "no rules: matches nothing".into();
    }
    p.rules
        .iter()
        .map(|r| {
            let mut s = if r.from.is_empty() {
                "from anyone".to_string()
            } else {
                format!("from {}", sources(&r.from))
            };
            for o in &r.to {
                let mut p = Vec::new();
                let list = |name: &str, v: &[String]| {
                    (!v.is_empty()).then(|| format!("{name} {}", v.join(",")))
                };
                p.extend(list("methods", &o.methods));
                p.extend(list("not methods", &o.not_methods));
                p.extend(list("paths", &o.paths));
                p.extend(list("not paths", &o.not_paths));
                p.extend(list("hosts", &o.hosts));
                if !o.ports.is_empty() {
                    p.push(format!("ports {}", ports(&o.ports)));
                }
                if !p.is_empty() {
                    s.push_str(&format!(" to {}", p.join(" ")));
                }
            }
            if !r.when.is_empty() {
                let keys: Vec<&str> = r.when.iter().map(|c| c.key.as_str()).collect();
                s.push_str(&format!(" when {}", keys.join(",")));
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// L4 policies that select the workload, as ztunnel applies them.
fn l4_policies(mesh: &MeshConfig, w: &Workload) -> Vec<PolicyVerdict> {
    let key = format!("{}/{}", w.namespace, w.name);
    mesh.policies
        .iter()
        .filter_map(|p| {
            let selects = match p.scope {
                PolicyScope::Global => "mesh-wide".to_string(),
                PolicyScope::Namespace if p.namespace == mesh.root_namespace => {
                    format!("mesh-wide (root namespace {})", mesh.root_namespace)
                }
                PolicyScope::Namespace if p.namespace == w.namespace => {
                    format!("every workload of namespace {}", w.namespace)
                }
                PolicyScope::WorkloadSelector
                    if w.authorization_policies.iter().any(|a| *a == p.key()) =>
                {
                    format!("its selector matches {key}")
                }
                _ => return None,
            };
            let (action, verdict) = match p.action {
                PolicyAction::Allow => (
                    "ALLOW",
                    format!(
                        "allows {}; connections no ALLOW policy matches are refused",
                        l4_rules(p)
                    ),
                ),
                PolicyAction::Deny => ("DENY", format!("refuses {}", l4_rules(p))),
            };
            Some(PolicyVerdict {
                policy: p.key(),
                action: action.into(),
                selects,
                verdict,
            })
        })
        .collect()
}

/// L7 policies a waypoint applies to traffic for the workload.
fn l7_policies(mesh: &MeshConfig, w: &Workload, waypoints: &[WaypointUse]) -> Vec<PolicyVerdict> {
    let mut out = Vec::new();
    for p in &mesh.http_policies {
        let mut why = Vec::new();
        for t in &p.targets {
            match t.kind {
                TargetKind::Service => {
                    let svc = format!("{}/{}", p.namespace, t.name);
                    if w.services.contains(&svc) {
                        match waypoints
                            .iter()
                            .find(|u| u.applies_to == format!("service {svc}"))
                        {
                            Some(u) => why.push(format!("service {svc} (waypoint {})", u.waypoint)),
                            None => why.push(format!(
                                "service {svc}, which has NO waypoint: not enforced"
                            )),
                        }
                    }
                }
                TargetKind::Gateway => {
                    let gw = format!("{}/{}", p.namespace, t.name);
                    if waypoints.iter().any(|u| u.waypoint == gw) {
                        why.push(format!("its waypoint {gw}"));
                    }
                }
                TargetKind::GatewayClass => {
                    if p.namespace == mesh.root_namespace && !waypoints.is_empty() {
                        why.push("every waypoint (GatewayClass istio-waypoint)".into());
                    }
                }
                TargetKind::HttpRoute => {}
            }
        }
        if why.is_empty() {
            continue;
        }
        let (action, verb) = match p.action {
            HttpPolicyAction::Allow => ("ALLOW", "allows"),
            HttpPolicyAction::Deny => ("DENY", "denies (403)"),
            HttpPolicyAction::Audit => ("AUDIT", "logs"),
        };
        let mut verdict = format!("{verb} requests {}", l7_rules(p));
        if p.action == HttpPolicyAction::Allow {
            verdict.push_str("; other requests get 403");
        }
        out.push(PolicyVerdict {
            policy: p.key(),
            action: action.into(),
            selects: why.join(", "),
            verdict,
        });
    }
    out
}

/// The PeerAuthentication in force for a workload and its mode, as
/// [`MeshConfig::mtls_mode`] chooses it.
fn peer_authentication(mesh: &MeshConfig, w: &Workload) -> (MtlsMode, String) {
    let pas = &mesh.peer_authentications;
    let found = pas
        .iter()
        .find(|p| p.namespace == w.namespace && p.workloads.contains(&w.name))
        .map(|p| (p, "for this workload"))
        .or_else(|| {
            pas.iter()
                .find(|p| p.namespace == w.namespace && p.workloads.is_empty())
                .map(|p| (p, "namespace-wide"))
        })
        .or_else(|| {
            pas.iter()
                .find(|p| p.namespace == mesh.root_namespace && p.workloads.is_empty())
                .map(|p| (p, "mesh-wide"))
        });
    match found {
        Some((p, scope)) => (
            p.mode,
            format!("PeerAuthentication {}/{} ({scope})", p.namespace, p.name),
        ),
        None => (MtlsMode::default(), "no PeerAuthentication applies".into()),
    }
}

pub fn check(g: &Gathered, namespace: &str, name: &str, now: u64) -> anyhow::Result<CheckReport> {
    let Some(pod) = g.inventory.pod(namespace, name) else {
        anyhow::bail!("pod {namespace}/{name} not found ({})", g.target);
    };
    let mut checks = Vec::new();
    let (enrolled, why) = inventory::enrollment(&g.inventory, pod);
    checks.push(line(
        "enrolled",
        if enrolled { Level::Ok } else { Level::Info },
        if enrolled {
            format!("enrolled: {why}")
        } else {
            format!("not enrolled: {why}")
        },
    ));
    let mut report = CheckReport {
        pod: format!("{namespace}/{name}"),
        node: inventory::pod_node(pod).map(str::to_string),
        ip: inventory::pod_ip(pod).map(str::to_string),
        identity: None,
        captured: false,
        mtls: None,
        waypoints: Vec::new(),
        checks,
        l4_policies: Vec::new(),
        l7_policies: Vec::new(),
        summary: String::new(),
    };
    let mesh = match &g.mesh {
        Ok(m) => m,
        Err(e) => {
            report.checks.push(line(
                "in-mesh",
                Level::Fail,
                format!("cannot read istiod-lite's model: {e}"),
            ));
            report.summary = "unknown: the control plane could not be asked".into();
            return Ok(report);
        }
    };
    let Some(w) = mesh_workload(mesh, namespace, name) else {
        if enrolled {
            report.checks.push(line(
                "in-mesh",
                Level::Fail,
                "istiod-lite does not serve it as a workload (see /debug/rejected: no node, no address, host network?)",
            ));
            report.summary = "NOT in the mesh although enrolled: its traffic is plaintext".into();
        } else {
            report.summary =
                "not in the mesh: traffic is neither captured nor mTLS; no mesh policy applies"
                    .into();
        }
        return Ok(report);
    };
    let identity = identity_of(mesh, w);
    report.identity = Some(identity.clone());
    report.checks.push(line(
        "in-mesh",
        Level::Ok,
        format!(
            "istiod-lite serves workload {namespace}/{name} on {} as {identity}",
            w.node
        ),
    ));
    let (captured, detail) = capture_state(g, w);
    report.captured = matches!(captured, Captured::Yes | Captured::NativeHbone);
    report.checks.push(line(
        "captured",
        match captured {
            Captured::Yes | Captured::NativeHbone => Level::Ok,
            Captured::Unknown => Level::Warn,
            Captured::NotCaptured | Captured::No => Level::Fail,
        },
        detail,
    ));
    // Whose certificate carries the identity: the node's ztunnel, or the
    // waypoint itself.
    let holder: Option<(&Fetched, Option<u64>)> = if w.native_tunnel {
        g.proxies
            .iter()
            .filter(|f| f.component.kind == ComponentKind::Waypoint)
            .find(|f| {
                f.dump
                    .as_ref()
                    .is_ok_and(|d| d["identity"] == identity.as_str())
            })
            .map(|f| {
                let na = f
                    .dump
                    .as_ref()
                    .ok()
                    .and_then(|d| d["certificate"]["notAfter"].as_u64());
                (f, na)
            })
    } else {
        ztunnel_of(g, &w.node).map(|z| {
            let na = z.dump.as_ref().ok().and_then(|d| {
                d["certificates"]
                    .as_array()?
                    .iter()
                    .find(|c| c["identity"] == identity.as_str())?["notAfter"]
                    .as_u64()
            });
            (z, na)
        })
    };
    report.checks.push(match holder {
        Some((f, Some(na))) => line(
            "certificate",
            if na > now { Level::Ok } else { Level::Fail },
            format!(
                "{} {} holds its certificate, expires in {}",
                f.component.kind.label(),
                f.component.name,
                expiry_text(na, now)
            ),
        ),
        Some((f, None)) => line(
            "certificate",
            Level::Warn,
            format!(
                "{} {} holds no certificate for {identity} (yet)",
                f.component.kind.label(),
                f.component.name
            ),
        ),
        None => line(
            "certificate",
            Level::Warn,
            "no proxy found to hold its certificate",
        ),
    });
    let (mode, source) = peer_authentication(mesh, w);
    let mtls = match mode {
        MtlsMode::Strict => {
            report.checks.push(line(
                "mtls",
                Level::Ok,
                format!("STRICT ({source}): only mTLS (HBONE) reaches it; plaintext is refused"),
            ));
            "STRICT"
        }
        MtlsMode::Permissive => {
            report.checks.push(line(
                "mtls",
                Level::Info,
                format!(
                    "PERMISSIVE ({source}): mesh traffic to it is mTLS (HBONE); plaintext from outside the mesh is still accepted"
                ),
            ));
            "PERMISSIVE"
        }
    };
    report.mtls = Some(mtls.into());
    report.waypoints = waypoints_of(mesh, w);
    if report.waypoints.is_empty() {
        report.checks.push(line(
            "waypoint",
            Level::Info,
            "no waypoint: traffic to it goes ztunnel to ztunnel (L4 only)",
        ));
    }
    for u in &report.waypoints {
        let up = g.proxies.iter().find(|f| {
            f.component.kind == ComponentKind::Waypoint && f.component.name == u.waypoint
        });
        let (level, state) = match up {
            Some(f) if f.dump.is_ok() => (Level::Ok, "running"),
            Some(_) => (Level::Warn, "not answering"),
            None => (Level::Warn, "no pod found for it"),
        };
        report.checks.push(line(
            "waypoint",
            level,
            format!(
                "traffic to the {} goes through waypoint {} ({state})",
                u.applies_to, u.waypoint
            ),
        ));
    }
    report.l4_policies = l4_policies(mesh, w);
    report.l7_policies = l7_policies(mesh, w, &report.waypoints);
    report.summary = match (report.captured, mtls) {
        (true, "STRICT") => {
            "captured, mTLS required: all its mesh traffic is mutually authenticated".into()
        }
        (true, _) => {
            "captured and mTLS between mesh workloads; plaintext still accepted (PERMISSIVE)".into()
        }
        (false, _) => "in the mesh but NOT captured: its own traffic bypasses ztunnel".into(),
    };
    Ok(report)
}

pub fn render_check(r: &CheckReport) -> String {
    let mut out = format!(
        "pod {} on {} ({})\n",
        r.pod,
        r.node.as_deref().unwrap_or("no node"),
        r.ip.as_deref().unwrap_or("no IP")
    );
    if let Some(id) = &r.identity {
        out.push_str(&format!("identity {id}\n"));
    }
    out.push('\n');
    for c in &r.checks {
        out.push_str(&format!(
            "{} {:<12} {}\n",
            c.level.tag(),
            c.check,
            c.message
        ));
    }
    for (title, list) in [
        ("L4 policies (ztunnel)", &r.l4_policies),
        ("L7 policies (waypoint)", &r.l7_policies),
    ] {
        if r.identity.is_none() {
            break;
        }
        out.push_str(&format!("\n{title}:"));
        if list.is_empty() {
            out.push_str(" none select it\n");
            continue;
        }
        out.push('\n');
        for p in list {
            out.push_str(&format!(
                "  {} {} ({})\n    {}\n",
                p.action, p.policy, p.selects, p.verdict
            ));
        }
    }
    out.push_str(&format!("\nverdict: {}\n", r.summary));
    out
}
