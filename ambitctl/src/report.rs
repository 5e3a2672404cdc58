//! The commands' answers, computed from what the backend gathered: the
//! objects, the mesh model istiod-lite serves (`/debug/config`) and each
//! proxy's `/config_dump`. Pure functions of that data, so the same reasoning
//! holds for both backends and is unit-tested without a cluster.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_core::config::{
    HttpPolicy, HttpPolicyAction, MeshConfig, MtlsMode, Policy, PolicyAction, PolicyScope,
    SourceMatch, TargetKind, Workload,
};
use serde::Serialize;
use serde_json::Value;

use crate::backend::{Backend, Component, ComponentKind};
use crate::http::first_line;
use crate::inventory::{self, Inventory};

/// One component and what its HTTP port answered.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub component: Component,
    /// The config dump (proxies) or `/debug/config` (istiod-lite).
    pub dump: Result<Value, String>,
}

/// Everything a command reasons about, gathered once.
pub struct Gathered {
    pub target: String,
    pub inventory: Inventory,
    /// istiod-lite's model, or why it could not be read.
    pub mesh: Result<MeshConfig, String>,
    pub control_plane: Option<Component>,
    pub proxies: Vec<Fetched>,
}

pub async fn gather<B: Backend>(backend: &B) -> anyhow::Result<Gathered> {
    let inventory = backend.inventory().await?;
    let components = backend.components().await?;
    let control_plane = components
        .iter()
        .find(|c| c.kind == ComponentKind::ControlPlane)
        .cloned();
    let mesh = match &control_plane {
        None => Err("no istiod-lite found".to_string()),
        Some(cp) => match backend.get(cp, "/debug/config").await {
            Ok(r) => r
                .json("istiod-lite /debug/config")
                .and_then(|v| Ok(serde_json::from_value::<MeshConfig>(v)?))
                .map_err(|e| format!("{e:#}")),
            Err(e) => Err(format!("istiod-lite at {}: {e:#}", cp.endpoint)),
        },
    };
    let proxies = futures::future::join_all(
        components
            .iter()
            .filter(|c| c.kind != ComponentKind::ControlPlane)
            .map(|c| fetch_dump(backend, c)),
    )
    .await;
    Ok(Gathered {
        target: backend.describe(),
        inventory,
        mesh,
        control_plane,
        proxies,
    })
}

pub async fn fetch_dump<B: Backend>(backend: &B, c: &Component) -> Fetched {
    let dump = match backend.get(c, "/config_dump").await {
        Ok(r) => r
            .json(&format!("{} {} /config_dump", c.kind.label(), c.name))
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("{e:#}")),
    };
    Fetched {
        component: c.clone(),
        dump,
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2d3h`, `5h12m`, `4m10s`; `expired` for the past.
pub fn human_duration(secs: i64) -> String {
    if secs <= 0 {
        return "expired".into();
    }
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else {
        format!("{m}m{s}s")
    }
}

/// RFC 3339 in UTC, for a Unix time.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let rem = unix % 86400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn expiry_text(not_after: u64, now: u64) -> String {
    format!(
        "{} ({})",
        human_duration(not_after as i64 - now as i64),
        rfc3339(not_after)
    )
}

// ---------------------------------------------------------------- status

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

// ------------------------------------------------------------- workloads

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Captured {
    /// Its node's ztunnel has capture attached to its interface.
    Yes,
    /// Not in the mesh.
    No,
    /// A waypoint: it speaks HBONE itself, nothing captures it.
    NativeHbone,
    /// In the mesh, but its ztunnel does not capture it (no `--capture`,
    /// not attached, or it has not received the workload yet).
    NotCaptured,
    /// Its node's ztunnel could not be asked.
    Unknown,
}

impl Captured {
    fn word(self) -> &'static str {
        match self {
            Captured::Yes => "yes",
            Captured::No => "no",
            Captured::NativeHbone => "hbone",
            Captured::NotCaptured => "NO",
            Captured::Unknown => "?",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointUse {
    /// `namespace/name` of the Gateway.
    pub waypoint: String,
    /// `workload` (addressed directly) or `service <ns/name>`.
    pub applies_to: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRow {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ip: Option<String>,
    pub identity: Option<String>,
    pub enrolled: bool,
    pub enrollment: String,
    /// istiod-lite serves it as a workload.
    pub in_mesh: bool,
    pub captured: Captured,
    pub capture_detail: String,
    pub waypoints: Vec<WaypointUse>,
}

fn mesh_workload<'a>(mesh: &'a MeshConfig, ns: &str, name: &str) -> Option<&'a Workload> {
    mesh.workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
}

fn identity_of(mesh: &MeshConfig, w: &Workload) -> String {
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        mesh.trust_domain, w.namespace, w.service_account
    )
}

fn waypoints_of(mesh: &MeshConfig, w: &Workload) -> Vec<WaypointUse> {
    let mut out = Vec::new();
    if let Some(wp) = &w.waypoint {
        out.push(WaypointUse {
            waypoint: wp.key(),
            applies_to: "workload".into(),
        });
    }
    for key in &w.services {
        if let Some(wp) = mesh
            .services
            .iter()
            .find(|s| &s.key() == key)
            .and_then(|s| s.waypoint.as_ref())
        {
            out.push(WaypointUse {
                waypoint: wp.key(),
                applies_to: format!("service {key}"),
            });
        }
    }
    out
}

fn ztunnel_of<'a>(g: &'a Gathered, node: &str) -> Option<&'a Fetched> {
    g.proxies.iter().find(|f| {
        f.component.kind == ComponentKind::Ztunnel && f.component.node.as_deref() == Some(node)
    })
}

/// Whether the pod's node's ztunnel captures it, and why (not).
fn capture_state(g: &Gathered, w: &Workload) -> (Captured, String) {
    if w.native_tunnel {
        return (
            Captured::NativeHbone,
            "a waypoint: it terminates HBONE itself, nothing captures it".into(),
        );
    }
    let key = format!("{}/{}", w.namespace, w.name);
    let Some(z) = ztunnel_of(g, &w.node) else {
        return (
            Captured::Unknown,
            format!("no ztunnel found on node {}", w.node),
        );
    };
    let dump = match &z.dump {
        Ok(d) => d,
        Err(e) => return (Captured::Unknown, format!("ztunnel on {}: {e}", w.node)),
    };
    let known = dump["localWorkloads"]
        .as_array()
        .is_some_and(|l| l.iter().any(|k| k == key.as_str()));
    if !known {
        return (
            Captured::NotCaptured,
            format!(
                "{}'s ztunnel has not received it from istiod-lite yet",
                w.node
            ),
        );
    }
    match dump["capture"]["enabled"].as_bool() {
        None => (
            Captured::Unknown,
            format!("{}'s ztunnel serves it but reports no capture state", w.node),
        ),
        Some(false) => (
            Captured::NotCaptured,
            format!(
                "{}'s ztunnel serves it but runs without --capture (reachable through its SOCKS5/explicit listeners only)",
                w.node
            ),
        ),
        Some(true) => {
            let entry = dump["capture"]["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["workload"] == key.as_str());
            match entry {
                Some(e) if e["attached"] == true => (
                    Captured::Yes,
                    format!(
                        "{}'s ztunnel captures it on interface {}",
                        w.node,
                        e["interface"].as_str().unwrap_or("?")
                    ),
                ),
                Some(e) => (
                    Captured::NotCaptured,
                    format!(
                        "{}'s ztunnel is not capturing it: {}",
                        w.node,
                        e["error"].as_str().unwrap_or("capture not attached")
                    ),
                ),
                None => (
                    Captured::NotCaptured,
                    format!("{}'s ztunnel lists no capture for it", w.node),
                ),
            }
        }
    }
}

pub fn workloads(g: &Gathered) -> Vec<WorkloadRow> {
    let mut rows = Vec::new();
    let mesh = g.mesh.as_ref().ok();
    for pod in &g.inventory.pods {
        let (ns, name) = (inventory::namespace(pod), inventory::name(pod));
        let (enrolled, enrollment) = inventory::enrollment(&g.inventory, pod);
        let w = mesh.and_then(|m| mesh_workload(m, ns, name));
        let (captured, capture_detail) = match (w, mesh) {
            (Some(w), _) => capture_state(g, w),
            (None, Some(_)) if enrolled => (
                Captured::NotCaptured,
                "enrolled, but istiod-lite does not serve it (see /debug/rejected)".into(),
            ),
            (None, None) if enrolled => (
                Captured::Unknown,
                format!(
                    "istiod-lite's model unavailable: {}",
                    g.mesh.as_ref().err().map_or("", String::as_str)
                ),
            ),
            (None, _) => (Captured::No, enrollment.clone()),
        };
        rows.push(WorkloadRow {
            namespace: ns.to_string(),
            name: name.to_string(),
            node: inventory::pod_node(pod).map(str::to_string),
            ip: inventory::pod_ip(pod).map(str::to_string),
            identity: match (w, mesh) {
                (Some(w), Some(m)) => Some(identity_of(m, w)),
                _ => None,
            },
            enrolled,
            enrollment,
            in_mesh: w.is_some(),
            captured,
            capture_detail,
            waypoints: match (w, mesh) {
                (Some(w), Some(m)) => waypoints_of(m, w),
                _ => Vec::new(),
            },
        });
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    rows
}

pub fn render_workloads(rows: &[WorkloadRow]) -> String {
    let mut t = crate::table::Table::new(&[
        "NAMESPACE",
        "NAME",
        "NODE",
        "IP",
        "IDENTITY",
        "CAPTURED",
        "WAYPOINT",
    ]);
    for r in rows {
        let wps: BTreeSet<&str> = r.waypoints.iter().map(|w| w.waypoint.as_str()).collect();
        t.row([
            r.namespace.clone(),
            r.name.clone(),
            r.node.clone().unwrap_or_else(|| "-".into()),
            r.ip.clone().unwrap_or_else(|| "-".into()),
            r.identity.clone().unwrap_or_else(|| "-".into()),
            r.captured.word().to_string(),
            if wps.is_empty() {
                "-".to_string()
            } else {
                wps.into_iter().collect::<Vec<_>>().join(",")
            },
        ]);
    }
    t.render()
}

// ----------------------------------------------------------------- check

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

// ----------------------------------------------------------- config-dump

/// A readable summary of a proxy's config dump; `-o json` gives the dump itself.
pub fn render_dump(c: &Component, dump: &Value, now: u64) -> String {
    let mut out = format!("{} {} ({})\n", c.kind.label(), c.name, c.endpoint);
    let field = |k: &str| match &dump[k] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    };
    for k in [
        "version", "node", "gateway", "workload", "identity", "ready", "draining",
    ] {
        if let Some(v) = field(k) {
            out.push_str(&format!("  {k:<10} {v}\n"));
        }
    }
    let src = &dump["configSource"];
    if let Some(x) = src["xds"].as_str() {
        let st = &src["status"];
        out.push_str(&format!(
            "  config     xDS {x}: {}, {} responses, {} NACKs{}\n",
            if st["synced"] == true {
                "synced"
            } else {
                "NOT synced"
            },
            st["responses"],
            st["nacks"],
            st["lastError"]
                .as_str()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ));
    } else if let Some(f) = src["file"].as_str() {
        out.push_str(&format!("  config     file {f}\n"));
    }
    let mut certs =
        crate::table::Table::new(&["IDENTITY", "NOT AFTER", "EXPIRES IN", "REFRESH AT"]);
    let mut cert_row = |identity: &str, v: &Value| {
        let na = v["notAfter"].as_u64().unwrap_or(0);
        let refresh = v["refreshAt"].as_u64().unwrap_or(0);
        certs.row([
            identity.to_string(),
            rfc3339(na),
            human_duration(na as i64 - now as i64),
            rfc3339(refresh),
        ]);
    };
    for v in dump["certificates"].as_array().into_iter().flatten() {
        cert_row(v["identity"].as_str().unwrap_or("?"), v);
    }
    if dump["certificate"].is_object() {
        cert_row(
            dump["identity"].as_str().unwrap_or("?"),
            &dump["certificate"],
        );
    }
    if !certs.is_empty() {
        out.push_str("\ncertificates:\n");
        out.push_str(&indent(&certs.render()));
    }
    if let Some(local) = dump["localWorkloads"].as_array() {
        let captures = dump["capture"]["workloads"].as_array();
        let mut t = crate::table::Table::new(&["WORKLOAD", "CAPTURE"]);
        for w in local.iter().filter_map(Value::as_str) {
            let cap = match (dump["capture"]["enabled"].as_bool(), captures) {
                (Some(false), _) => "off (no --capture)".to_string(),
                (Some(true), Some(list)) => match list.iter().find(|e| e["workload"] == w) {
                    Some(e) if e["attached"] == true => {
                        format!("attached on {}", e["interface"].as_str().unwrap_or("?"))
                    }
                    Some(e) => format!("NOT attached: {}", e["error"].as_str().unwrap_or("-")),
                    None => "- (speaks HBONE itself)".into(),
                },
                _ => "?".into(),
            };
            t.row([w.to_string(), cap]);
        }
        out.push_str(&format!("\nlocal workloads ({}):\n", local.len()));
        if !t.is_empty() {
            out.push_str(&indent(&t.render()));
        }
    }
    if let Some(pool) = dump["hbonePool"].as_array() {
        out.push_str(&format!("\nHBONE pool ({} destinations):\n", pool.len()));
        let mut t =
            crate::table::Table::new(&["SOURCE", "DESTINATION", "ADDRESS", "CONNS", "STREAMS"]);
        for p in pool {
            let s = |k: &str| match &p[k] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            t.row([
                s("source"),
                s("destination"),
                s("address"),
                s("connections"),
                s("streams"),
            ]);
        }
        if !t.is_empty() {
            out.push_str(&indent(&t.render()));
        }
    }
    let config = if dump["config"].is_object() {
        &dump["config"]
    } else {
        dump
    };
    let count = |k: &str| config[k].as_array().map(Vec::len);
    let counts: Vec<String> = [
        ("workloads", "workloads"),
        ("services", "services"),
        ("policies", "L4 policies"),
        ("peerAuthentications", "peer authentications"),
        ("httpRoutes", "HTTP routes"),
        ("httpPolicies", "L7 policies"),
        ("trafficPolicies", "traffic policies"),
    ]
    .iter()
    .filter_map(|(k, label)| count(k).map(|n| format!("{n} {label}")))
    .collect();
    if !counts.is_empty() {
        out.push_str(&format!("\nconfig: {}\n", counts.join(", ")));
    }
    out
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(human_duration(86400 + 7200), "1d2h");
        assert_eq!(human_duration(3 * 3600 + 5 * 60), "3h5m");
        assert_eq!(human_duration(61), "1m1s");
        assert_eq!(human_duration(-5), "expired");
    }
}
