//! Capture across ztunnel's life: while ztunnel is down enrolled pods fail
//! closed; a restarted ztunnel takes over the pinned capture in place and
//! traffic resumes without touching the pods; un-enrolling every pod leaves no
//! program, link or pinned map of ours behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use e2e::cluster::{Cluster, Pod};
use e2e::mesh::TempDir;
use e2e::netns::{root_or_skip, PinDir};
use e2e::process::Ztunnel;
use e2e::Pki;
use ebpf_redirect::{ingress_programs, netns_lookup_programs, program_loaded};

fn ping(from: &Pod, to: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    from.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        anyhow::ensure!(&b == b"ping", "bad echo");
        Ok(())
    })
}

#[test]
fn fail_closed_restart_and_clean_unenroll() -> anyhow::Result<()> {
    if !root_or_skip("fail_closed_restart_and_clean_unenroll") {
        return Ok(());
    }
    let cluster = Cluster::build(2, 1)?;
    let (client, server) = (cluster.pod(1, 0), cluster.pod(2, 0));
    let dir = TempDir::new("ambit-capture-life")?;
    let config = dir.path().join("mesh.yaml");
    let enrolled = format!(
        "workloads:\n\
         - {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: [\"{}\"]}}\n\
         - {{name: server, namespace: demo, serviceAccount: server, node: node2, addresses: [\"{}\"]}}\n",
        client.ip, server.ip
    );
    std::fs::write(&config, &enrolled)?;
    let pki = Pki::new()?;
    let pins = PinDir::new()?;
    let start = |n: u8, sa: &str| -> anyhow::Result<Ztunnel> {
        let certs = dir.path().join(format!("certs{n}"));
        pki.write_root(&certs)?;
        pki.write_cert(&certs, &Pki::identity("demo", sa))?;
        let node = cluster.node(n);
        let z = Ztunnel::spawn_capturing(node, dir.path(), &config, &certs, pins.path())?;
        Ok(z)
    };
    let mut z1 = start(1, "client")?;
    let z2 = start(2, "server")?;

    let addr = SocketAddr::new(server.ip.into(), 8080);
    let listener = server.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
    ping(client, addr, Duration::from_secs(5))?;

    // ztunnel on node1 stops: the client pod must not get out, neither around
    // the mesh nor through it.
    z1.terminate();
    z1.wait_exit(Duration::from_secs(10))?;
    assert!(
        ping(client, addr, Duration::from_millis(1500)).is_err(),
        "enrolled pod connected while its ztunnel was down"
    );

    // A new ztunnel adopts the pinned capture: the same pods work again, and
    // the program was swapped in place, not stacked.
    drop(z1);
    let z1 = start(1, "client")?;
    ping(client, addr, Duration::from_secs(5))?;
    let host_if = client.host_if.clone();
    let uplink1 = cluster.node(1).uplink.clone();
    let before = cluster
        .node(1)
        .ns
        .run(move || Ok((ingress_programs(&host_if)?, ingress_programs(&uplink1)?)))?;
    assert_eq!(
        before.0.len(),
        1,
        "one capture program on the pod interface: {:?}",
        before.0
    );
    assert_eq!(
        before.1.len(),
        1,
        "one capture program on the uplink: {:?}",
        before.1
    );
    let mut ours = before.0.clone();
    ours.extend(&before.1);

    // The pod's sandbox restarts: a new veth with the same name (a new
    // interface index). ztunnel notices without a config change and captures it
    // again.
    cluster.recreate_veth(client)?;
    z1.wait_log("interface replaced or gone", Duration::from_secs(10))?;
    let captured_before = z1.log().matches(" access: ").count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let _ = ping(client, addr, Duration::from_secs(2));
        if z1.log().matches(" access: ").count() > captured_before {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the recreated veth was never captured again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let host_if = client.host_if.clone();
    let (reattached, handoff) = cluster
        .node(1)
        .ns
        .run(move || Ok((ingress_programs(&host_if)?, netns_lookup_programs()?)))?;
    assert_eq!(reattached.len(), 1, "{reattached:?}");
    // The TIME_WAIT hand-off, attached to the node's namespace.
    assert_eq!(handoff.len(), 1, "{handoff:?}");
    ours.extend(&reattached);
    ours.extend(&handoff);

    // Un-enroll everything: nothing of ours stays attached or pinned.
    std::fs::write(&config, "workloads: []\n")?;
    for z in [&z1, &z2] {
        z.wait_log(
            "no enrolled workloads: capture removed",
            Duration::from_secs(10),
        )?;
    }
    let host_if = client.host_if.clone();
    let uplink1 = cluster.node(1).uplink.clone();
    let after = cluster.node(1).ns.run(move || {
        Ok((
            ingress_programs(&host_if)?,
            ingress_programs(&uplink1)?,
            netns_lookup_programs()?,
        ))
    })?;
    assert!(
        after.0.is_empty() && after.1.is_empty() && after.2.is_empty(),
        "still attached: {after:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(pins.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "pins left behind: {leftovers:?}");
    drop(z1);
    drop(z2);
    // Programs go once the last reference (ztunnel's own fds) is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ours.iter().any(|id| program_loaded(*id)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let still: Vec<_> = ours.iter().filter(|id| program_loaded(**id)).collect();
    assert!(still.is_empty(), "programs still loaded: {still:?}");
    Ok(())
}

/// A ztunnel restarted while its control plane is away starts with an empty
/// mesh. It must leave the pinned capture in place (the pod fails closed:
/// its traffic meets a ztunnel that knows no such source) instead of
/// detaching it, which would let the pod out in plaintext, unpoliced; once the
/// control plane is back, traffic flows through the mesh again.
#[test]
fn restart_while_control_plane_is_away_keeps_pods_captured() -> anyhow::Result<()> {
    use e2e::cluster::{PodSpec, CONTROL_PLANE_IP};
    use e2e::istiod::Istiod;
    if !root_or_skip("restart_while_control_plane_is_away_keeps_pods_captured") {
        return Ok(());
    }
    let dir = TempDir::new("ambit-capture-cp-away")?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let pod = |name: &str, node: u8, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{nodeName: node{node}, serviceAccountName: {name}}}\n\
             status: {{podIP: {ip}}}\n---\n"
        )
    };
    std::fs::write(
        manifests.join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n{}{}",
            pod("client", 1, "198.19.1.10"),
            pod("server", 2, "198.19.2.10")
        ),
    )?;
    let specs = PodSpec::list(&[
        ("demo/client", 1, [198, 19, 1, 10].into()),
        ("demo/server", 2, [198, 19, 2, 10].into()),
    ]);
    let cluster = Cluster::build_with(2, &specs)?;
    let mut istiod = Istiod::spawn_in(
        Some(cluster.fabric_name()),
        dir.path(),
        &manifests,
        CONTROL_PLANE_IP.into(),
        &["node1", "node2"],
    )?;
    let pins = PinDir::new()?;
    let source1 = istiod.source_for("node1")?;
    let mut z1 = Ztunnel::spawn_capturing_from(cluster.node(1), dir.path(), &source1, pins.path())?;
    let z2 = Ztunnel::spawn_capturing_from(
        cluster.node(2),
        dir.path(),
        &istiod.source_for("node2")?,
        pins.path(),
    )?;
    for z in [&z1, &z2] {
        z.wait_certificates(Duration::from_secs(15))?;
    }
    let (client, server) = (
        cluster.pod_named("demo/client").expect("built"),
        cluster.pod_named("demo/server").expect("built"),
    );
    let addr = SocketAddr::new(server.ip.into(), 8080);
    let listener = server.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
    ping(client, addr, Duration::from_secs(5))?;
    let host_if = client.host_if.clone();
    let node1 = &cluster.node(1).ns;
    let attached = |host_if: String| node1.run(move || Ok(ingress_programs(&host_if)?));
    assert!(
        !attached(host_if.clone())?.is_empty(),
        "client not captured"
    );

    // The control plane goes away, then node1's ztunnel restarts.
    istiod.kill();
    z1.terminate();
    z1.wait_exit(Duration::from_secs(10))?;
    let mut z1 =
        Ztunnel::start_capturing_unready(cluster.node(1), dir.path(), &source1, pins.path())?;
    // Longer than the capture loop's periodic recheck (2 s).
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !attached(host_if.clone())?.is_empty(),
        "a ztunnel without config detached the pinned capture:\n{}",
        z1.log()
    );
    assert!(
        ping(client, addr, Duration::from_millis(1500)).is_err(),
        "the enrolled pod got out while its ztunnel had no config"
    );

    // The control plane is back: the config arrives, traffic flows again.
    istiod.start()?;
    z1.wait_until_ready(Duration::from_secs(30))?;
    z1.wait_certificates(Duration::from_secs(15))?;
    ping(client, addr, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("after the control plane came back: {e}\n{}", z1.log()))?;
    Ok(())
}
