//! `ambitctl status`: each component's readiness, version and certificates.

use super::*;
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    pub identity: String,
    /// Unix seconds.
    pub not_after: u64,
    pub expires_in_seconds: i64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    pub kind: ComponentKind,
    pub name: String,
    pub node: Option<String>,
    pub pod: Option<String>,
    pub endpoint: String,
    pub reachable: bool,
    pub ready: Option<bool>,
    pub version: Option<String>,
    pub certificates: Vec<CertificateStatus>,
    /// The soonest `notAfter` of its certificates.
    pub earliest_expiry: Option<u64>,
    pub detail: String,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub target: String,
    pub client_version: String,
    pub components: Vec<ComponentStatus>,
    pub notes: Vec<String>,
}

impl StatusReport {
    /// Every component reachable and ready, and istiod-lite among them.
    pub fn healthy(&self) -> bool {
        self.components
            .iter()
            .any(|c| c.kind == ComponentKind::ControlPlane)
            && self
                .components
                .iter()
                .all(|c| c.reachable && c.ready != Some(false))
    }
}

/// istiod-lite's own answers, for `status`.
pub struct ControlPlaneProbe {
    pub ready: Result<(u16, String), String>,
    pub version: Option<String>,
    pub rejected: Option<usize>,
}

pub async fn probe_control_plane<B: Backend>(backend: &B, cp: &Component) -> ControlPlaneProbe {
    let ready = match backend.get(cp, "/ready").await {
        Ok(r) => Ok((r.status, first_line(&r.body).to_string())),
        Err(e) => Err(format!("{e:#}")),
    };
    let version = match backend.get(cp, "/debug/version").await {
        Ok(r) => r
            .json("version")
            .ok()
            .and_then(|v| v["version"].as_str().map(str::to_string)),
        Err(_) => None,
    };
    let rejected = match backend.get(cp, "/debug/rejected").await {
        Ok(r) => r
            .json("rejected")
            .ok()
            .and_then(|v| v.as_array().map(Vec::len)),
        Err(_) => None,
    };
    ControlPlaneProbe {
        ready,
        version,
        rejected,
    }
}

pub fn status(g: &Gathered, cp_probe: Option<&ControlPlaneProbe>, now: u64) -> StatusReport {
    let mut components = Vec::new();
    let mut notes = g.inventory.notes.clone();
    match (&g.control_plane, cp_probe) {
        (Some(cp), Some(probe)) => {
            let (reachable, ready, mut detail, error) = match &probe.ready {
                Ok((code, text)) => (true, Some(*code == 200), text.clone(), None),
                Err(e) => (false, None, String::new(), Some(e.clone())),
            };
            if let Ok(mesh) = &g.mesh {
                detail = format!(
                    "{detail}; serves {} workloads, {} services, {} L4 and {} L7 policies",
                    mesh.workloads.len(),
                    mesh.services.len(),
                    mesh.policies.len(),
                    mesh.http_policies.len()
                );
            }
            if let Some(n) = probe.rejected.filter(|n| *n > 0) {
                detail.push_str(&format!(
                    "; {n} object{} rejected (/debug/rejected)",
                    if n == 1 { "" } else { "s" }
                ));
            }
            components.push(ComponentStatus {
                kind: cp.kind,
                name: cp.name.clone(),
                node: cp.node.clone(),
                pod: cp.pod.clone(),
                endpoint: cp.endpoint.to_string(),
                reachable,
                ready,
                version: probe.version.clone(),
                certificates: Vec::new(),
                earliest_expiry: None,
                detail: detail.trim_start_matches("; ").to_string(),
                error,
            });
        }
        _ => notes.push("no istiod-lite found".into()),
    }
    let mut proxies: Vec<&Fetched> = g.proxies.iter().collect();
    proxies.sort_by(|a, b| {
        (a.component.kind, &a.component.name).cmp(&(b.component.kind, &b.component.name))
    });
    for f in proxies {
        components.push(proxy_status(f, now));
    }
    StatusReport {
        target: g.target.clone(),
        client_version: env!("CARGO_PKG_VERSION").into(),
        components,
        notes,
    }
}

fn proxy_status(f: &Fetched, now: u64) -> ComponentStatus {
    let c = &f.component;
    let mut s = ComponentStatus {
        kind: c.kind,
        name: c.name.clone(),
        node: c.node.clone(),
        pod: c.pod.clone(),
        endpoint: c.endpoint.to_string(),
        reachable: false,
        ready: None,
        version: None,
        certificates: Vec::new(),
        earliest_expiry: None,
        detail: String::new(),
        error: None,
    };
    let dump = match &f.dump {
        Ok(d) => d,
        Err(e) => {
            s.error = Some(e.clone());
            return s;
        }
    };
    s.reachable = true;
    s.version = dump["version"].as_str().map(str::to_string);
    let synced = dump["configSource"]["status"]["synced"].as_bool();
    s.ready = dump["ready"].as_bool().or(synced);
    let cert = |identity: &str, v: &Value| {
        v["notAfter"].as_u64().map(|na| CertificateStatus {
            identity: identity.to_string(),
            not_after: na,
            expires_in_seconds: na as i64 - now as i64,
        })
    };
    let mut detail = Vec::new();
    match c.kind {
        ComponentKind::Ztunnel => {
            s.certificates = dump["certificates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| cert(v["identity"].as_str().unwrap_or("?"), v))
                .collect();
            let local = dump["localWorkloads"].as_array().map_or(0, Vec::len);
            detail.push(format!("{local} local workloads"));
            match dump["capture"]["enabled"].as_bool() {
                Some(true) => {
                    let list = dump["capture"]["workloads"].as_array();
                    let attached = list
                        .into_iter()
                        .flatten()
                        .filter(|w| w["attached"] == true)
                        .count();
                    let total = list.map_or(0, Vec::len);
                    detail.push(format!("capturing {attached}/{total}"));
                }
                Some(false) => detail.push("no capture".into()),
                None => {}
            }
        }
        ComponentKind::Waypoint => {
            let identity = dump["identity"].as_str().unwrap_or("?");
            s.certificates = cert(identity, &dump["certificate"]).into_iter().collect();
            if let Some(w) = dump["workload"].as_str() {
                detail.push(format!("as {w}"));
            }
            let routes = dump["httpRoutes"].as_array().map_or(0, Vec::len);
            let policies = dump["httpPolicies"].as_array().map_or(0, Vec::len);
            detail.push(format!("{routes} routes, {policies} L7 policies"));
        }
        ComponentKind::ControlPlane => {}
    }
    if dump["draining"] == true {
        detail.push("draining".into());
    }
    if synced == Some(false) {
        detail.push("xDS not synced".into());
    }
    if let Some(e) = dump["configSource"]["status"]["lastError"].as_str() {
        detail.push(format!("last xDS error: {e}"));
    }
    s.earliest_expiry = s.certificates.iter().map(|c| c.not_after).min();
    s.detail = detail.join(", ");
    s
}

pub fn render_status(r: &StatusReport, now: u64) -> String {
    let mut t = crate::table::Table::new(&[
        "COMPONENT",
        "NAME",
        "NODE",
        "READY",
        "VERSION",
        "CERTIFICATES",
        "DETAIL",
    ]);
    for c in &r.components {
        let ready = match (c.reachable, c.ready) {
            (false, _) => "unreachable",
            (true, Some(true)) => "yes",
            (true, Some(false)) => "no",
            (true, None) => "?",
        };
        let certs = match c.earliest_expiry {
            _ if c.kind == ComponentKind::ControlPlane => "-".to_string(),
            None if c.reachable => "none".into(),
            None => "-".into(),
            Some(na) => format!(
                "{} expire{} in {}",
                c.certificates.len(),
                if c.certificates.len() == 1 { "s" } else { "" },
                human_duration(na as i64 - now as i64)
            ),
        };
        let detail = match &c.error {
            Some(e) => e.clone(),
            None => c.detail.clone(),
        };
        t.row([
            c.kind.label().to_string(),
            c.name.clone(),
            c.node.clone().unwrap_or_else(|| "-".into()),
            ready.to_string(),
            c.version.clone().unwrap_or_else(|| "-".into()),
            certs,
            detail,
        ]);
    }
    let mut out = format!("{} (ambitctl {})\n\n", r.target, r.client_version);
    out.push_str(&t.render());
    if let Some(first) = r
        .components
        .iter()
        .filter_map(|c| c.earliest_expiry.map(|e| (e, c)))
        .min_by_key(|(e, _)| *e)
    {
        out.push_str(&format!(
            "\nfirst certificate to expire: {} {} in {}\n",
            first.1.kind.label(),
            first.1.name,
            expiry_text(first.0, now)
        ));
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
