//! eBPF capture of this node's enrolled workloads (`--capture`): load the
//! outbound program, route marked packets locally, attach to the host-side
//! veth of every local workload, follow config changes, export counters.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ebpf_redirect::{interface_for, setup_node_routing, Capture, CaptureStats, ListenerSockets};

use crate::metrics::ResultLabels;
use crate::state::ProxyState;

/// Loads capture steering new connections to `outbound` (the 15001 listener;
/// `[::]` takes both families, an IPv4 address only IPv4: the pods' other
/// family then fails closed) and keeps it in step with the config until drain.
/// `sockets` are the listeners themselves, for connections capture hands
/// over from a TIME_WAIT socket.
pub fn start(
    state: Arc<ProxyState>,
    outbound: SocketAddr,
    sockets: ListenerSockets,
) -> anyhow::Result<()> {
    let listener = outbound;
    setup_node_routing().context("setting up capture routing")?;
    let pin_dir = state.settings.bpf_pin_dir.join(state.node());
    let mut capture = Capture::load(listener, &pin_dir).context("loading the capture program")?;
    let plaintext_port = match state.settings.inbound_plaintext() {
        crate::settings::Listen::At(a) => a.port(),
        crate::settings::Listen::Off => 0,
    };
    capture.set_inbound_ports(state.settings.hbone_port, plaintext_port)?;
    capture.set_listener_sockets(sockets)?;
    reconcile(&state, &mut capture);
    tracing::info!(%listener, "capture loaded");
    let mut mesh = state.watch_mesh();
    let mut drain = state.drain.watch();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Interfaces come and go without config changes (a pod sandbox
        // restart recreates its veth; an attach can fail transiently).
        let mut recheck = tokio::time::interval(Duration::from_secs(2));
        let mut last = CaptureStats::default();
        loop {
            tokio::select! {
                changed = mesh.changed() => {
                    if changed.is_err() { break; }
                    reconcile(&state, &mut capture);
                }
                _ = tick.tick() => last = export(&state, &capture, last),
                _ = recheck.tick() => reconcile(&state, &mut capture),
                _ = drain.changed() => break,
            }
        }
        export(&state, &capture, last);
        // Links and maps stay pinned: until a ztunnel is back, enrolled pods
        // fail closed (no listener), and the next one adopts the pins.
        tracing::info!("capture left pinned for the next ztunnel");
    });
    Ok(())
}

/// The local workloads whose traffic is captured: all but those that speak
/// HBONE natively (waypoints), which terminate their own tunnels.
fn captured<'a>(
    mesh: &'a mesh_core::config::MeshState,
    node: &'a str,
) -> impl Iterator<Item = &'a std::sync::Arc<mesh_core::config::WorkloadInfo>> + 'a {
    mesh.local_workloads(node)
        .filter(|w| !w.workload.native_tunnel)
}

/// The host-side interface of a local workload's address, if capture may
/// use it (never the uplink: that would take the node's own traffic).
fn pod_interface(
    state: &ProxyState,
    w: &mesh_core::config::WorkloadInfo,
    ip: IpAddr,
) -> Option<String> {
    match interface_for(ip) {
        Ok(ifname) if Some(&ifname) == state.settings.capture_uplink.as_ref() => {
            tracing::warn!(workload = %w.key(), interface = %ifname, "not capturing: the address routes via the uplink");
            state.metrics.failure("capture", "no_interface");
            None
        }
        Ok(ifname) => Some(ifname),
        Err(e) => {
            tracing::warn!(workload = %w.key(), "cannot capture: {e}");
            state.metrics.failure("capture", "no_interface");
            None
        }
    }
}

fn reconcile(state: &ProxyState, capture: &mut Capture) {
    // Before the control plane's first full config the mesh is empty, and
    // reconciling to it would detach every pinned pod a previous ztunnel
    // enrolled: they would run in plaintext, unpoliced, for as long as the
    // control plane is away. Until then what is pinned stays, and its
    // traffic meets this ztunnel, which refuses sources it does not know.
    if !state.config_synced() {
        tracing::debug!("capture: keeping what is pinned until the first config");
        return;
    }
    let mesh = state.mesh();
    let mut want = BTreeSet::new();
    let mut enrolled = BTreeSet::new();
    for w in captured(&mesh, state.node()) {
        for ip in &w.workload.addresses {
            enrolled.insert(*ip);
            want.extend(pod_interface(state, w, *ip));
        }
    }
    // Local pods that are not captured themselves, waypoints (they speak
    // HBONE) and pods outside the mesh, reach enrolled pods here without
    // meeting the uplink program: the inbound program goes on their veths,
    // so a waypoint's HBONE lands on 15008 and a non-mesh pod's plaintext on
    // 15006, where STRICT refuses it, as it would from another node.
    let mut neighbours = BTreeSet::new();
    for w in mesh
        .local_workloads(state.node())
        .filter(|w| w.workload.native_tunnel)
    {
        for ip in &w.workload.addresses {
            neighbours.extend(pod_interface(state, w, *ip));
        }
    }
    if let Some(uplink) = &state.settings.capture_uplink {
        match ebpf_redirect::veth_interfaces() {
            Ok(veths) => neighbours.extend(
                veths
                    .into_iter()
                    .filter(|i| i != uplink && !want.contains(i)),
            ),
            Err(e) => {
                tracing::warn!("listing the node's veths: {e}");
                state.metrics.failure("capture", "no_interface");
            }
        }
    }
    if enrolled.is_empty() {
        // No pod of ours on this node: leave nothing of ours in the kernel.
        if !capture.is_installed() {
            return;
        }
        match capture.remove_all() {
            Ok(()) => tracing::info!("no enrolled workloads: capture removed"),
            Err(e) => tracing::error!("removing capture: {e}"),
        }
        state.metrics.capture_interfaces.set(0);
        return;
    }
    for ifname in capture.drop_stale_links() {
        tracing::info!(interface = %ifname, "interface replaced or gone: capture will re-attach");
    }
    if let Some(uplink) = &state.settings.capture_uplink {
        if !capture.has_uplink(uplink) {
            match capture.attach_uplink(uplink) {
                Ok(()) => {
                    tracing::info!(interface = %uplink, "capturing inbound traffic for enrolled pods")
                }
                Err(e) => {
                    tracing::error!(interface = %uplink, "inbound capture failed: {e}");
                    state.metrics.failure("capture", "attach_failed");
                }
            }
        }
    }
    reconcile_neighbours(state, capture, &neighbours);
    // Links a previous ztunnel pinned for pods that are gone.
    for ifname in capture.pinned_interfaces() {
        if !want.contains(&ifname) {
            if let Err(e) = capture.detach(&ifname) {
                tracing::warn!(interface = %ifname, "removing stale capture: {e}");
            }
        }
    }
    let attached: Vec<String> = capture.attached().map(str::to_string).collect();
    for ifname in attached.iter().filter(|i| !want.contains(*i)) {
        match capture.detach(ifname) {
            Ok(()) => tracing::info!(interface = %ifname, "capture detached from interface"),
            Err(e) => tracing::warn!(interface = %ifname, "detach failed: {e}"),
        }
    }
    for ifname in &want {
        if attached.contains(ifname) {
            continue;
        }
        match capture.attach(ifname) {
            Ok(()) => tracing::info!(interface = %ifname, "capturing"),
            Err(e) => {
                tracing::error!(interface = %ifname, "attach failed: {e}");
                state.metrics.failure("capture", "attach_failed");
            }
        }
    }
    for ip in capture.enrolled() {
        if !enrolled.contains(&ip) {
            if let Err(e) = capture.unenroll(ip) {
                tracing::warn!(%ip, "unenroll failed: {e}");
            }
        }
    }
    // Exclusions first, so a newly enrolled pod never runs on a previous
    // pod's exclusions for the same address; then drop those of pods gone.
    for w in captured(&mesh, state.node()) {
        for ip in &w.workload.addresses {
            let (out, inb) = (
                &w.workload.excluded_outbound_ports,
                &w.workload.excluded_inbound_ports,
            );
            if let Err(e) = capture.set_exclusions(*ip, out, inb) {
                tracing::error!(workload = %w.key(), "setting port exclusions failed: {e}");
                state.metrics.failure("capture", "exclusions_failed");
            }
        }
    }
    let keep: Vec<_> = enrolled.iter().copied().collect();
    if let Err(e) = capture.retain_exclusions(&keep) {
        tracing::warn!("removing stale exclusions: {e}");
    }
    for ip in &enrolled {
        if let Err(e) = capture.enroll(*ip) {
            tracing::error!(%ip, "enroll failed: {e}");
            state.metrics.failure("capture", "enroll_failed");
        }
    }
    state
        .metrics
        .capture_interfaces
        .set(capture.attached().count() as i64);
}

/// Makes the inbound program's neighbour attachments exactly `want`.
fn reconcile_neighbours(state: &ProxyState, capture: &mut Capture, want: &BTreeSet<String>) {
    let attached: BTreeSet<String> = capture.attached_neighbours().map(str::to_string).collect();
    // Links a previous ztunnel pinned for pods that are gone, too.
    let mut stale = attached.clone();
    stale.extend(capture.pinned_neighbour_interfaces());
    for ifname in stale.iter().filter(|i| !want.contains(*i)) {
        match capture.detach_neighbour(ifname) {
            Ok(()) => tracing::info!(interface = %ifname, "neighbour capture detached"),
            Err(e) => tracing::warn!(interface = %ifname, "neighbour detach failed: {e}"),
        }
    }
    for ifname in want.iter().filter(|i| !attached.contains(*i)) {
        match capture.attach_neighbour(ifname) {
            Ok(()) => {
                tracing::info!(interface = %ifname, "capturing a local uncaptured pod's traffic to enrolled pods")
            }
            Err(e) => {
                tracing::error!(interface = %ifname, "neighbour attach failed: {e}");
                state.metrics.failure("capture", "attach_failed");
            }
        }
    }
}

fn export(state: &ProxyState, capture: &Capture, last: CaptureStats) -> CaptureStats {
    let Ok(now) = capture.stats() else {
        return last;
    };
    let pairs = [
        ("captured_new", now.captured_new, last.captured_new),
        (
            "captured_established",
            now.captured_established,
            last.captured_established,
        ),
        ("passed", now.passed, last.passed),
        ("excluded", now.excluded, last.excluded),
        (
            "dropped_no_listener",
            now.dropped_no_listener,
            last.dropped_no_listener,
        ),
        (
            "dropped_assign_failed",
            now.dropped_assign_failed,
            last.dropped_assign_failed,
        ),
        ("inbound_hbone", now.inbound_hbone, last.inbound_hbone),
        (
            "inbound_plaintext",
            now.inbound_plaintext,
            last.inbound_plaintext,
        ),
        (
            "dropped_malformed",
            now.dropped_malformed,
            last.dropped_malformed,
        ),
        ("dropped_ipv6", now.dropped_ipv6, last.dropped_ipv6),
        (
            "time_wait_handoff",
            now.time_wait_handoffs,
            last.time_wait_handoffs,
        ),
        (
            "dropped_handoff_no_listener",
            now.dropped_handoff_no_listener,
            last.dropped_handoff_no_listener,
        ),
    ];
    for (result, n, before) in pairs {
        let labels = ResultLabels {
            result: result.to_string(),
        };
        state
            .metrics
            .capture_packets
            .get_or_create(&labels)
            .inc_by(n.saturating_sub(before));
    }
    now
}
