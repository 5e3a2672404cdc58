//! Capture of a waypoint's traffic to an enrolled pod on its own node. The
//! waypoint pod is not captured (it speaks HBONE itself), and its connection
//! to a pod beside it never crosses the node uplink, where inbound capture
//! sits. Its HBONE must still end at the node's ztunnel (the destination pod
//! has no 15008 of its own), and its plaintext must not reach the pod around
//! ztunnel.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use e2e::cluster::{join_peers, Cluster};
use e2e::mesh::TempDir;
use e2e::netns::root_or_skip;
use e2e::process::Ztunnel;
use e2e::Pki;
use mesh_core::hbone::{self, H2Client, H2Tuning, TunnelIo, HBONE_PORT};
use mesh_core::tls::{client_config, TrustRoots};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MSG: &[u8] = b"through-the-waypoint";

#[test]
fn waypoint_hbone_to_a_pod_on_its_node_ends_at_that_nodes_ztunnel() -> anyhow::Result<()> {
    if !root_or_skip("waypoint_hbone_to_a_pod_on_its_node_ends_at_that_nodes_ztunnel") {
        return Ok(());
    }
    let cluster = Cluster::build(1, 2)?;
    let (wp, server) = (cluster.pod(1, 0), cluster.pod(1, 1));
    let dir = TempDir::new("ambit-capture-waypoint")?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            r#"workloads:
- {{name: wp-0, namespace: demo, serviceAccount: waypoint, node: node1, addresses: ["{wp}"], services: [demo/wp], nativeTunnel: true}}
- {{name: server, namespace: demo, serviceAccount: server, node: node1, addresses: ["{server}"], waypoint: {{namespace: demo, name: wp}}}}
services:
- {{name: wp, namespace: demo, addresses: ["198.18.100.9"], ports: [{{port: 15008}}]}}
"#,
            wp = wp.ip,
            server = server.ip
        ),
    )?;
    let pki = Pki::new()?;
    let pins = e2e::netns::PinDir::new()?;
    // ztunnel holds the server's key only: the waypoint's stays in its pod.
    let certs = dir.path().join("certs1");
    pki.write_root(&certs)?;
    pki.write_cert(&certs, &Pki::identity("demo", "server"))?;
    let z = Ztunnel::spawn_capturing(cluster.node(1), dir.path(), &config, &certs, pins.path())?;

    // 1. HBONE from the waypoint pod to server:15008, as the waypoint.
    let echo = server.echo_peers(8080, 1, MSG.len())?;
    let waypoint_id = Pki::identity("demo", "waypoint");
    let cert = pki
        .ca
        .issue(&waypoint_id, Duration::from_secs(3600))?
        .to_workload_certificate()?;
    let roots = TrustRoots::from_pem(pki.ca.root_pem().as_bytes())?;
    let tls = client_config(&cert, &roots, vec![Pki::identity("demo", "server")])?;
    let hbone_addr = SocketAddr::new(server.ip.into(), HBONE_PORT);
    let target = SocketAddr::new(server.ip.into(), 8080);
    let back = wp.ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let h2 = H2Client::connect(
                hbone_addr,
                Arc::new(tls),
                H2Tuning::default(),
                Duration::from_secs(5),
                || {},
            )
            .await?;
            let forwarded = [(
                http::HeaderName::from_static(hbone::FORWARDED),
                http::HeaderValue::from_str(&hbone::forwarded_for(hbone_addr.ip()))?,
            )];
            let mut io = TunnelIo::new(h2.open(target, &forwarded).await?);
            io.write_all(MSG).await?;
            io.flush().await?;
            let mut back = vec![0u8; MSG.len()];
            tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back)).await??;
            Ok(back)
        })
    });
    let back = back.map_err(|e| anyhow::anyhow!("{e:#}\nztunnel log:\n{}", z.log()))?;
    assert_eq!(back, MSG);
    let peers = join_peers(echo)?;
    assert_eq!(
        peers[0].ip().to_string(),
        wp.ip.to_string(),
        "the server sees the waypoint pod's address"
    );
    let log = z.wait_log("dst.workload=demo/server", Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains(" access: ")
            && l.contains("src.identity=spiffe://cluster.local/ns/demo/sa/waypoint")
            && l.contains("dst.workload=demo/server")
            && l.contains("security=mutual_tls")),
        "{log}"
    );
    // The program's counters are exported once a second.
    z.wait_for_metric_blocking(
        "ambit_capture_packets_total",
        &[("result", "inbound_hbone")],
        1.0,
    )?;

    // 2. Plaintext from the waypoint pod to the server does not slip past
    // ztunnel: it is taken to 15006 and refused (the server is behind the
    // waypoint, and plaintext cannot be the waypoint's).
    // An echo server answers if the plaintext reaches the pod directly.
    let _echo = server.echo_peers(8081, 1, 1)?;
    let to = SocketAddr::new(server.ip.into(), 8081);
    let got = wp.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(b"x");
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        Ok(back)
    })?;
    assert!(got.is_empty(), "plaintext around the waypoint: {got:?}");
    z.wait_log("waypoint_bypassed", Duration::from_secs(5))?;
    Ok(())
}
