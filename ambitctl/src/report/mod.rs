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

mod check;
mod config_dump;
mod status;
mod workloads;

pub use check::*;
pub use config_dump::*;
pub use status::*;
pub use workloads::*;

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
