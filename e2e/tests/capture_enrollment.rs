//! Enrollment from manifests (rendered by istiod-lite): a pod in an ambient
//! namespace is captured, one labelled istio.io/dataplane-mode=none is not,
//! and a port excluded by annotation bypasses capture.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use e2e::cluster::{join_peers, Cluster, Pod, PodSpec};
use e2e::mesh::TempDir;
use e2e::netns::{root_or_skip, PinDir};
use e2e::process::{bin_path, Ztunnel};
use e2e::Pki;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  annotations: {ambit.dev/exclude-ports: "8081"}
spec: {nodeName: node1, serviceAccountName: cart, containers: [{name: app}]}
status: {podIP: 198.19.1.10}
---
apiVersion: v1
kind: Pod
metadata:
  name: batch
  namespace: shop
  labels: {istio.io/dataplane-mode: none}
spec: {nodeName: node1, containers: [{name: app}]}
status: {podIP: 198.19.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: default}
spec: {nodeName: node2, containers: [{name: app}]}
status: {podIP: 198.19.2.10}
"#;

/// Who did the server see? One connection per call.
fn peer_seen(from: &Pod, server: &Pod, port: u16) -> anyhow::Result<String> {
    let accepted = server.echo_peers(port, 1, 2)?;
    from.echo_to(SocketAddr::new(server.ip.into(), port), b"hi")?;
    Ok(join_peers(accepted)?[0].ip().to_string())
}

#[test]
fn opt_out_label_and_excluded_port_bypass_capture() -> anyhow::Result<()> {
    if !root_or_skip("opt_out_label_and_excluded_port_bypass_capture") {
        return Ok(());
    }
    let dir = TempDir::new("ambit-enroll")?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("all.yaml"), MANIFESTS)?;
    let out = Command::new(bin_path("istiod-lite")?)
        .arg("render")
        .arg("--manifests")
        .arg(&manifests)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, &out.stdout)?;
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        rendered.contains("excludedOutboundPorts") && !rendered.contains("name: batch"),
        "{rendered}"
    );

    let specs = [
        PodSpec {
            name: "shop/cart".into(),
            node: 1,
            ip: "198.19.1.10".parse()?,
        },
        PodSpec {
            name: "shop/batch".into(),
            node: 1,
            ip: "198.19.1.11".parse()?,
        },
        PodSpec {
            name: "default/db".into(),
            node: 2,
            ip: "198.19.2.10".parse()?,
        },
    ];
    let cluster = Cluster::build_with(2, &specs)?;
    let pki = Pki::new()?;
    let certs = dir.path().join("certs");
    pki.write_root(&certs)?;
    pki.write_cert(&certs, &Pki::identity("shop", "cart"))?;
    let pins = PinDir::new()?;
    let pin_arg = pins.path().display().to_string();
    let node1 = cluster.node(1);
    let args = ["--capture", "--bpf-pin-dir", pin_arg.as_str()];
    let z1 = Ztunnel::spawn_in_netns(
        node1.ns.name(),
        dir.path(),
        &e2e::Source::static_files(&config, &certs),
        "node1",
        node1.ip.into(),
        &args,
    )?;
    z1.wait_log("capturing", Duration::from_secs(10))?;

    let named = |n: &str| {
        cluster
            .pod_named(n)
            .ok_or_else(|| anyhow::anyhow!("no pod {n}"))
    };
    let (cart, batch, db) = (
        named("shop/cart")?,
        named("shop/batch")?,
        named("default/db")?,
    );
    // Captured: leaves through ztunnel (db is outside the mesh: passthrough).
    assert_eq!(peer_seen(cart, db, 8080)?, node1.ip.to_string());
    // Excluded port: straight out with the pod's own address.
    assert_eq!(peer_seen(cart, db, 8081)?, cart.ip.to_string());
    // Opted out: never captured.
    assert_eq!(peer_seen(batch, db, 8080)?, batch.ip.to_string());
    let log = z1.wait_log("dst.addr=198.19.2.10:8080", Duration::from_secs(5))?;
    let access: Vec<_> = log.lines().filter(|l| l.contains(" access: ")).collect();
    assert_eq!(
        access.len(),
        1,
        "only cart's port-8080 connection goes through ztunnel: {access:#?}"
    );
    Ok(())
}
