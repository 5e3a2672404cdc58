//! From a source to what is served: read the manifests directory when it
//! changes, translate, validate, encode, and publish a new snapshot (for xDS)
//! and the model (for the CA's node checks). A read or validation failure
//! keeps the last good state in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::config::{validate_mesh_config, MeshConfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::sources::{manifests, ClusterState, Rejected};
use crate::translate::routes::{self, RouteStatus};
use crate::translate::translate;
pub use crate::translate::MeshOptions;
use crate::xds::visibility::Visibility;
use crate::xds::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Default)]
pub struct PipelineMetrics {
    builds: Family<ResultLabels, Counter>,
    rejected_objects: Gauge,
    snapshot_version: Gauge,
}

impl PipelineMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = PipelineMetrics::default();
        registry.register(
            "model_builds",
            "Rebuilds of the mesh model from the source, by result",
            m.builds.clone(),
        );
        registry.register(
            "rejected_objects",
            "Source objects currently rejected (see the log or /debug/rejected)",
            m.rejected_objects.clone(),
        );
        registry.register(
            "snapshot_version",
            "Version of the snapshot being served",
            m.snapshot_version.clone(),
        );
        m
    }

    fn build(&self, result: &str) {
        self.builds
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }
}

/// The published state: subscribe to the senders' receivers.
pub struct Outputs {
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    pub mesh: watch::Sender<Arc<MeshConfig>>,
    pub rejected: watch::Sender<Arc<Vec<Rejected>>>,
    /// HTTPRoute conditions of the latest build (written back as status in
    /// Kubernetes, shown at `/debug/routes`).
    pub route_status: watch::Sender<Arc<Vec<RouteStatus>>>,
}

impl Default for Outputs {
    fn default() -> Self {
        Outputs {
            snapshots: watch::channel(Arc::new(Snapshot::default())).0,
            mesh: watch::channel(Arc::new(MeshConfig::default())).0,
            rejected: watch::channel(Arc::new(Vec::new())).0,
            route_status: watch::channel(Arc::new(Vec::new())).0,
        }
    }
}

/// One rebuild from the directory. Errors leave `outputs` untouched.
pub fn rebuild(
    dir: &Path,
    options: &MeshOptions,
    outputs: &Outputs,
    metrics: &PipelineMetrics,
) -> Result<(), String> {
    match manifests::load_dir(dir) {
        Ok((state, rejected)) => publish(&state, rejected, options, outputs, metrics),
        Err(e) => {
            metrics.build("failed");
            Err(format!("reading {}: {e}", dir.display()))
        }
    }
}

/// Translates a source's view of the cluster and publishes it: the shared
/// back half of every source. Errors leave `outputs` untouched.
pub fn publish(
    state: &ClusterState,
    mut rejected: Vec<Rejected>,
    options: &MeshOptions,
    outputs: &Outputs,
    metrics: &PipelineMetrics,
) -> Result<(), String> {
    let t = translate(state, options);
    rejected.extend(t.rejected);
    for n in &t.notes {
        tracing::debug!("note: {n}");
    }
    // A translation bug must not reach the proxies, which would refuse it anyway.
    if let Err(e) = validate_mesh_config(&t.config) {
        metrics.build("failed");
        return Err(format!("translated config does not validate (bug): {e}"));
    }
    let config = t.config;
    for r in &rejected {
        tracing::warn!(object = %r.object, origin = %r.origin, "rejected: {}", r.reason);
    }
    metrics.rejected_objects.set(rejected.len() as i64);
    outputs.rejected.send_replace(Arc::new(rejected));
    for line in routes::changes(&outputs.route_status.borrow(), &t.route_status) {
        tracing::info!("route status: {line}");
    }
    outputs.route_status.send_replace(Arc::new(t.route_status));
    let encoded = mesh_core::xds::encode(&config);
    let l7 = mesh_core::xds::encode_l7(&config);
    let current = outputs.snapshots.borrow().clone();
    let visible = |s: Snapshot| s.with_visibility(Visibility::of(&config));
    match current.next_with_l7(encoded, l7).map(visible) {
        Some(next) => {
            let changed: usize = next.changed.values().map(Vec::len).sum();
            tracing::info!(
                version = next.version,
                workloads = config.workloads.len(),
                services = config.services.len(),
                policies = config.policies.len(),
                changed,
                "publishing mesh snapshot"
            );
            metrics.snapshot_version.set(next.version as i64);
            // The model before the snapshot, so a proxy that sees a new pod
            // can already get its certificate; the old ones (10k pods:
            // milliseconds to free) are dropped once the push is on its way.
            let old_mesh = outputs.mesh.send_replace(Arc::new(config));
            let old_snapshot = outputs.snapshots.send_replace(Arc::new(next));
            drop((old_snapshot, old_mesh));
            metrics.build("published");
        }
        None => metrics.build("unchanged"),
    }
    Ok(())
}

type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// Modification times and sizes of the manifest files: cheap to poll.
fn stamp(dir: &Path) -> Option<Stamp> {
    let mut out: Stamp = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            (p, mtime, meta.map_or(0, |m| m.len()))
        })
        .collect();
    out.sort();
    Some(out)
}

/// Follows `dir` forever: polls every `interval`, waits for a burst of
/// writes to settle (debounce), then rebuilds.
pub async fn follow_manifests(
    dir: PathBuf,
    options: MeshOptions,
    outputs: Arc<Outputs>,
    metrics: PipelineMetrics,
    interval: Duration,
) {
    let mut last = stamp(&dir);
    loop {
        tokio::time::sleep(interval).await;
        let now = stamp(&dir);
        if now == last {
            continue;
        }
        // Debounce: an editor or `kubectl apply`-like tool writes in bursts.
        let mut settled = now;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again = stamp(&dir);
            if again == settled {
                break;
            }
            settled = again;
        }
        last = settled;
        let (dir2, options2, outputs2, metrics2) = (
            dir.clone(),
            options.clone(),
            outputs.clone(),
            metrics.clone(),
        );
        let done =
            tokio::task::spawn_blocking(move || rebuild(&dir2, &options2, &outputs2, &metrics2))
                .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("manifests not applied, keeping the last good state: {e}")
            }
            Err(e) => tracing::error!("rebuild task failed, keeping the last good state: {e}"),
        }
    }
}
