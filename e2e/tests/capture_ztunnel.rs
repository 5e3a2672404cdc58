//! ztunnel with eBPF capture in a namespace cluster: an enrolled pod's
//! unmodified TCP client is captured into ztunnel (original destination and
//! source workload identity known); a pod not in the mesh is not captured.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::cluster::{join_peers, Cluster};
use e2e::mesh::TempDir;
use e2e::netns::root_or_skip;
use e2e::process::{metric_sum, Ztunnel};
use e2e::Pki;

#[test]
fn enrolled_pod_is_captured_and_others_are_not() -> anyhow::Result<()> {
    if !root_or_skip("enrolled_pod_is_captured_and_others_are_not") {
        return Ok(());
    }
    let cluster = Cluster::build(2, 2)?;
    let (client, bystander, server) = (cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(2, 0));
    let dir = TempDir::new("ambit-capture")?;
    let config = dir.path().join("mesh.yaml");
    // Only the client is in the mesh: the server is an outside destination
    // (passthrough) and the bystander is not enrolled.
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
    let node1 = cluster.node(1);
    let pins = e2e::netns::PinDir::new()?;
    let pin_arg = pins.path().display().to_string();
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

    let addr = SocketAddr::new(server.ip.into(), 8080);
    let accept = server.echo_peers(8080, 2, 5)?;
    for pod in [client, bystander] {
        pod.echo_to(addr, b"hello")?;
    }
    let peers = join_peers(accept)?;
    // The captured connection left through ztunnel (node address); the
    // bystander's went straight out (its own address).
    assert_eq!(peers[0].ip().to_string(), node1.ip.to_string(), "{peers:?}");
    assert_eq!(
        peers[1].ip().to_string(),
        bystander.ip.to_string(),
        "{peers:?}"
    );

    let log = z1.wait_log(&format!("dst.addr={addr}"), Duration::from_secs(5))?;
    let line = log
        .lines()
        .find(|l| l.contains(" access: ") && l.contains(&format!("dst.addr={addr}")))
        .unwrap_or_default();
    assert!(line.contains("src.workload=demo/client"), "{line}");
    assert!(
        line.contains("src.identity=spiffe://cluster.local/ns/demo/sa/client"),
        "{line}"
    );
    assert!(
        line.contains("bytes_sent=5") && line.contains("bytes_recv=5"),
        "{line}"
    );
    assert!(
        !log.contains(&bystander.ip.to_string()),
        "the bystander must not be captured:\n{log}"
    );
    // Counters are copied from the BPF map once a second.
    let metrics = z1.wait_for_metric_blocking(
        "ambit_capture_packets_total",
        &[("result", "captured_new")],
        1.0,
    )?;
    assert!(
        metric_sum(
            &metrics,
            "ambit_capture_packets_total",
            &[("result", "captured_new")]
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "ambit_capture_packets_total",
            &[("result", "captured_established")]
        ) >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "ambit_capture_interfaces", &[]),
        1.0,
        "{metrics}"
    );
    Ok(())
}
