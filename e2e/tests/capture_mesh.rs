//! Two nodes, both ztunnels capturing with eBPF: an unmodified client in a pod
//! on node1 reaches a server pod on node2 through both ztunnels over HBONE; the
//! server sees the client pod's address; the wire between nodes carries only
//! TLS on port 15008.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use e2e::cluster::Cluster;
use e2e::mesh::TempDir;
use e2e::netns::root_or_skip;
use e2e::port_reuse;
use e2e::process::Ztunnel;
use e2e::sniff::Sniffer;
use e2e::Pki;

const MARKER: &[u8] = b"AMBIT-CLEARTEXT-MARKER-7f3a";

/// Two nodes with a pod each (client on node1, server on node2), both
/// enrolled, each node's ztunnel capturing. Destructure it in field order so
/// the parts drop in reverse: processes, pins, files, namespaces.
struct Mesh {
    cluster: Cluster,
    _dir: TempDir,
    _pins: e2e::netns::PinDir,
    ztunnels: Vec<Ztunnel>,
}

impl Mesh {
    fn start(name: &str) -> anyhow::Result<Self> {
        let cluster = Cluster::build(2, 1)?;
        let (client, server) = (cluster.pod(1, 0), cluster.pod(2, 0));
        let dir = TempDir::new(name)?;
        let config = dir.path().join("mesh.yaml");
        std::fs::write(
            &config,
            format!(
                "workloads:\n\
                 - {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: [\"{}\"]}}\n\
                 - {{name: server, namespace: demo, serviceAccount: server, node: node2, addresses: [\"{}\"]}}\n",
                client.ip, server.ip
            ),
        )?;
        let pki = Pki::new()?;
        let pins = e2e::netns::PinDir::new()?;
        let mut ztunnels = Vec::new();
        for (n, sa) in [(1u8, "client"), (2u8, "server")] {
            let certs = dir.path().join(format!("certs{n}"));
            pki.write_root(&certs)?;
            pki.write_cert(&certs, &Pki::identity("demo", sa))?;
            let node = cluster.node(n);
            ztunnels.push(Ztunnel::spawn_capturing(
                node,
                dir.path(),
                &config,
                &certs,
                pins.path(),
            )?);
        }
        Ok(Mesh {
            cluster,
            _dir: dir,
            _pins: pins,
            ztunnels,
        })
    }
}

#[test]
fn pod_to_pod_across_nodes_is_mtls_and_keeps_the_client_ip() -> anyhow::Result<()> {
    if !root_or_skip("pod_to_pod_across_nodes_is_mtls_and_keeps_the_client_ip") {
        return Ok(());
    }
    let Mesh {
        cluster,
        _dir,
        _pins,
        ztunnels,
    } = Mesh::start("ambit-capture-mesh")?;
    let (client, server) = (cluster.pod(1, 0), cluster.pod(2, 0));

    let addr = SocketAddr::new(server.ip.into(), 8080);
    let listener = server.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    let accept = std::thread::spawn(move || -> anyhow::Result<(SocketAddr, Vec<u8>)> {
        let (mut s, peer) = listener.accept()?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(b"thanks")?;
        Ok((peer, got))
    });
    let sniffer = Sniffer::start(cluster.fabric_name())?;
    let reply = client.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        for _ in 0..100 {
            s.write_all(MARKER)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        Ok(reply)
    })?;
    let (peer, got) = accept
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let wire = sniffer.stop()?;

    assert_eq!(reply, b"thanks");
    assert_eq!(got.len(), MARKER.len() * 100);
    assert_eq!(
        peer.ip().to_string(),
        client.ip.to_string(),
        "the server sees the client pod's IP"
    );
    assert!(
        !wire.contains(MARKER),
        "the marker crossed the wire in cleartext"
    );
    let ports = wire.tcp_ports();
    assert!(!ports.is_empty(), "the sniffer saw no TCP at all");
    assert!(
        ports.iter().all(|(s, d)| *s == 15008 || *d == 15008),
        "non-HBONE TCP between nodes: {ports:?}"
    );

    let want_src = "src.identity=spiffe://cluster.local/ns/demo/sa/client";
    let want_dst = "dst.identity=spiffe://cluster.local/ns/demo/sa/server";
    for z in &ztunnels {
        let log = z.wait_log("bytes_recv=6", Duration::from_secs(5))?;
        let line = log
            .lines()
            .find(|l| l.contains(" access: "))
            .unwrap_or_default();
        assert!(
            line.contains(want_src)
                && line.contains(want_dst)
                && line.contains("security=mutual_tls"),
            "{line}"
        );
    }
    Ok(())
}

/// A client that reuses its source port right after a connection the mesh
/// closed first (node1's ztunnel holds that tuple in TIME_WAIT) connects at
/// once. The SYN goes to the TIME_WAIT socket, and capture's sk_lookup
/// program answers the kernel's listener lookup with ztunnel's listener
/// (assigning the SYN to the listener directly, tried once, broke the
/// handshake: the TIME_WAIT socket made it a duplicate).
#[test]
fn a_reused_source_port_connects_at_once() -> anyhow::Result<()> {
    if !root_or_skip("a_reused_source_port_connects_at_once") {
        return Ok(());
    }
    let Mesh {
        cluster,
        _dir,
        _pins,
        ztunnels,
    } = Mesh::start("ambit-capture-tw")?;
    let (client, server) = (cluster.pod(1, 0), cluster.pod(2, 0));
    const ROUNDS: usize = 4;
    // A node service on node1 listening on the server's port: the kernel
    // would give it a SYN that meets a TIME_WAIT socket, were capture not to
    // answer that lookup with ztunnel's listener.
    let node_service = cluster.node(1).ns.run(|| {
        let l = TcpListener::bind("0.0.0.0:8080")?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let reuse = port_reuse::reuse_source_port(
        client,
        SocketAddr::new(client.ip.into(), 41000),
        server,
        SocketAddr::new(server.ip.into(), 8080),
        ROUNDS,
    )?;
    // The first connect has no TIME_WAIT to meet; every later one does, and
    // is handed from node1's TIME_WAIT socket to its listener: the client
    // never has to send its SYN twice (without the hand-off each reuse is
    // answered with an ACK, reset, and the SYN sent again ~10 ms to 1 s later).
    assert!(
        reuse
            .connects
            .iter()
            .all(|t| *t < Duration::from_millis(500)),
        "{reuse:?}\n{}",
        ztunnels[0].log()
    );
    assert_eq!(reuse.syn_retransmits, 0, "{reuse:?}");
    let reuses = (ROUNDS - 1) as f64;
    assert_eq!(
        port_reuse::handoffs(&ztunnels[0], reuses)?,
        reuses,
        "TIME_WAIT hand-offs on node1"
    );
    assert!(
        matches!(node_service.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "node1's own service on :8080 was given a pod's connection"
    );
    Ok(())
}
