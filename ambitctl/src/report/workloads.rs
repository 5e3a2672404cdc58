//! `ambitctl workloads`: each workload's node, identity, capture and waypoint.

use super::*;
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

pub(super) fn mesh_workload<'a>(
    mesh: &'a MeshConfig,
    ns: &str,
    name: &str,
) -> Option<&'a Workload> {
    mesh.workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
}

pub(super) fn identity_of(mesh: &MeshConfig, w: &Workload) -> String {
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        mesh.trust_domain, w.namespace, w.service_account
    )
}

pub(super) fn waypoints_of(mesh: &MeshConfig, w: &Workload) -> Vec<WaypointUse> {
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

pub(super) fn ztunnel_of<'a>(g: &'a Gathered, node: &str) -> Option<&'a Fetched> {
    g.proxies.iter().find(|f| {
        f.component.kind == ComponentKind::Ztunnel && f.component.node.as_deref() == Some(node)
    })
}

/// Whether the pod's node's ztunnel captures it, and why (not).
pub(super) fn capture_state(g: &Gathered, w: &Workload) -> (Captured, String) {
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
