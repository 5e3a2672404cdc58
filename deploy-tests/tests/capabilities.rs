//! The capabilities the chart adds to ztunnel, measured rather than assumed:
//! the real `ztunnel --capture` runs in a network-namespace cluster (the e2e
//! harness) as uid 0 with its bounding set cut to exactly the DaemonSet's
//! `capabilities.add` and no_new_privs set — what a container runtime gives
//! the container — and must capture an enrolled pod's connection. Then the
//! same without `CAP_PERFMON`, which must fail where docs/install.md says
//! (the verifier refuses the capture program), so the set stays minimal.
//!
//! One test, so the `AMBIT_BIN_DIR` switches cannot race under `cargo test`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use deploy_tests::chart::Chart;
use deploy_tests::objects::{parse, Object};
use e2e::cluster::{join_peers, Cluster};
use e2e::mesh::TempDir;
use e2e::netns::{root_or_skip, PinDir};
use e2e::process::{bin_path, Ztunnel};
use e2e::Pki;

/// `capabilities.add` of ztunnel's container in the rendered chart.
fn chart_capabilities() -> Vec<String> {
    let chart = Chart::load(&deploy_tests::workspace().join("deploy/helm/ambit")).unwrap();
    let docs = chart
        .render("mesh", "istio-system", &serde_json::json!({}))
        .unwrap();
    for d in &docs {
        if let Object::DaemonSet(ds) = parse(d).unwrap() {
            let pod = ds.spec.unwrap().template.spec.unwrap();
            let sc = pod.containers[0].security_context.clone().unwrap();
            assert_eq!(sc.privileged, Some(false));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            return sc.capabilities.unwrap().add.unwrap_or_default();
        }
    }
    panic!("no DaemonSet in the chart");
}

/// A `ztunnel` in `dir` that execs the real one with only `caps`, and with
/// `/proc/sys` read-only, as a container runtime mounts it in every
/// unprivileged container.
fn confined_ztunnel(dir: &Path, real: &Path, caps: &[String]) {
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    // A mount namespace of its own, so the read-only /proc/sys stays there.
    let script = format!(
        "#!/bin/sh\nexec unshare --mount sh -c 'mount --bind /proc/sys /proc/sys && \
         mount -o remount,bind,ro /proc/sys && \
         exec setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all \
         --bounding-set=-all{}{} -- {} \"$@\"' ztunnel \"$@\"\n",
        if bounding.is_empty() { "" } else { "," },
        bounding.join(","),
        real.display()
    );
    let path = dir.join("ztunnel");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Starts the confined ztunnel capturing for `client` on node 1 and sends
/// one connection from `client` to the pod on node 2: `Ok(true)` when it
/// left through ztunnel (captured), `Err` when ztunnel did not start.
fn captures(cluster: &Cluster, bin_dir: &Path) -> anyhow::Result<bool> {
    std::env::set_var("AMBIT_BIN_DIR", bin_dir);
    let (client, server) = (cluster.pod(1, 0), cluster.pod(2, 0));
    let dir = TempDir::new("ambit-caps")?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n- {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: [\"{}\"]}}\n",
            client.ip
        ),
    )?;
    let pki = Pki::new()?;
    let certs = dir.path().join("certs");
    pki.write_root(&certs)?;
    pki.write_cert(&certs, &Pki::identity("demo", "client"))?;
    let pins = PinDir::new()?;
    let pin_arg = pins.path().display().to_string();
    let node1 = cluster.node(1);
    let z = Ztunnel::spawn_in_netns(
        node1.ns.name(),
        dir.path(),
        &e2e::Source::static_files(&config, &certs),
        "node1",
        node1.ip.into(),
        &["--capture", "--bpf-pin-dir", pin_arg.as_str()],
    )?;
    z.wait_log("capturing", Duration::from_secs(10))?;
    let addr = SocketAddr::new(server.ip.into(), 8080);
    let accept = server.echo_peers(8080, 1, 5)?;
    client.echo_to(addr, b"hello")?;
    let peers = join_peers(accept)?;
    Ok(peers[0].ip().to_string() == node1.ip.to_string())
}

#[test]
fn chart_capabilities_suffice_for_capture_and_perfmon_is_needed() {
    if !root_or_skip("chart_capabilities_suffice_for_capture_and_perfmon_is_needed") {
        return;
    }
    let caps = chart_capabilities();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON"]);
    // Before `captures` points AMBIT_BIN_DIR at a wrapper.
    let real = bin_path("ztunnel").unwrap();
    let cluster = Cluster::build(2, 1).unwrap();

    let with_chart = TempDir::new("ambit-caps-chart").unwrap();
    confined_ztunnel(with_chart.path(), &real, &caps);
    match captures(&cluster, with_chart.path()) {
        Ok(true) => {}
        Ok(false) => panic!("with {caps:?} the connection was not captured"),
        Err(e) => panic!("with {caps:?} ztunnel did not capture: {e:#}"),
    }

    let fewer: Vec<String> = caps.iter().filter(|c| *c != "PERFMON").cloned().collect();
    let without = TempDir::new("ambit-caps-fewer").unwrap();
    confined_ztunnel(without.path(), &real, &fewer);
    match captures(&cluster, without.path()) {
        Ok(captured) => panic!(
            "with {fewer:?} ztunnel started capture (captured: {captured}): CAP_PERFMON may not \
             be needed any more — re-measure and update the chart and docs/install.md"
        ),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("loading the capture program") && msg.contains("Permission denied"),
                "with {fewer:?} ztunnel failed, but not as docs/install.md says: {msg}"
            );
        }
    }
}
