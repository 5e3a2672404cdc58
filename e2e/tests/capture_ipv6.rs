//! IPv6 capture with real BPF in network namespaces: a pod's IPv6 TCP reaches
//! the node's dual-stack transparent listener with its original destination,
//! port exclusions apply to IPv6 pods, TCP behind extension headers is dropped
//! (never passed uncaptured), and with no listener the pod fails closed. In a
//! dual-stack cluster, pods talk over IPv6 through both ztunnels (HBONE over
//! IPv6, the client's address kept), STRICT refuses IPv6 plaintext from
//! outside the mesh, and a stopped ztunnel leaves its pods' IPv6 closed.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use e2e::cluster::{Cluster, Pod};
use e2e::mesh::TempDir;
use e2e::netns::{root_or_skip, veth, Netns};
use e2e::process::Ztunnel;
use e2e::sniff::Sniffer;
use e2e::Pki;
use ebpf_redirect::{setup_node_routing, Capture, CaptureStats};
use socket2::{Domain, Socket, Type};

const MARKER: &[u8] = b"AMBIT-CLEARTEXT-MARKER-v6-91c2";

/// A dual-stack transparent listener, as ztunnel binds 15001 under capture.
fn transparent_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_only_v6(false)?;
    s.set_ip_transparent_v6(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

/// Connects to `to` with an IPv6 destination options header on every packet
/// (a sticky socket option; needs CAP_NET_RAW).
fn connect_with_dstopts(to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    // Next header (filled in by the kernel), length 0 (8 bytes), PadN of 4.
    let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: a valid socket and a buffer valid for its length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.connect_timeout(&to.into(), timeout)?;
    Ok(s.into())
}

struct NodeReport {
    captured_local: SocketAddr,
    captured_peer: SocketAddr,
    excluded_local: SocketAddr,
    stats: CaptureStats,
}

#[test]
fn ipv6_pod_tcp_is_captured_excluded_or_dropped() -> anyhow::Result<()> {
    if !root_or_skip("ipv6_pod_tcp_is_captured_excluded_or_dropped") {
        return Ok(());
    }
    let node = Netns::create("node")?;
    let pod = Netns::create("pod")?;
    let (host_if, pod_if) = veth(&node, &pod)?;
    let (node_ip, pod_ip): (Ipv6Addr, Ipv6Addr) =
        ("2001:2:0:1::1".parse()?, "2001:2:0:1::10".parse()?);
    node.ip(&[
        "-6",
        "addr",
        "add",
        "2001:2:0:1::1/64",
        "dev",
        &host_if,
        "nodad",
    ])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    pod.ip(&[
        "-6",
        "addr",
        "add",
        "2001:2:0:1::10/64",
        "dev",
        &pod_if,
        "nodad",
    ])?;
    pod.ip(&["link", "set", &pod_if, "up"])?;
    pod.ip(&["-6", "route", "add", "default", "via", "2001:2:0:1::1"])?;

    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pins = e2e::netns::PinDir::new()?;
    let pin_dir = pins.path().to_path_buf();
    let node_side = node.spawn(move || {
        setup_node_routing()?;
        let listener = transparent_listener("[::]:15001".parse()?)?;
        let plain = TcpListener::bind(SocketAddr::new(node_ip.into(), 81))?;
        let mut capture = Capture::load("[::]:15001".parse()?, &pin_dir)?;
        // Keyed by the pod's own IPv6 address, not the node-wide wildcard.
        capture.set_exclusions(pod_ip.into(), &[81], &[])?;
        capture.attach(&host_if)?;
        ready_tx.send(())?;

        let (mut s, captured_peer) = listener.accept()?;
        let captured_local = s.local_addr()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        let (s81, _) = plain.accept()?;
        let excluded_local = s81.local_addr()?;

        // ztunnel "goes away": no listener any more.
        drop(listener);
        closed_tx.send(())?;
        done_rx.recv_timeout(Duration::from_secs(20))?;
        let stats = capture.stats()?;
        capture.remove_all()?;
        Ok(NodeReport {
            captured_local,
            captured_peer,
            excluded_local,
            stats,
        })
    });
    if let Err(e) = ready_rx.recv_timeout(Duration::from_secs(20)) {
        let why = match node_side.join() {
            Ok(Err(err)) => format!("{err:#}"),
            _ => e.to_string(),
        };
        anyhow::bail!("node side never got ready: {why}");
    }

    let nowhere: SocketAddr = "[2001:2:ff::7]:80".parse()?;
    let (dstopts, fail_closed) = {
        let excluded = SocketAddr::new(node_ip.into(), 81);
        let dstopts = pod.run(move || {
            // An unmodified client dials an address that exists nowhere.
            let mut s = TcpStream::connect_timeout(&nowhere, Duration::from_secs(5))?;
            s.write_all(b"hello")?;
            let mut back = [0u8; 5];
            s.read_exact(&mut back)?;
            anyhow::ensure!(&back == b"hello", "echo mismatch");
            // Excluded port: the node's ordinary listener, not the capture one.
            TcpStream::connect_timeout(&excluded, Duration::from_secs(5))?;
            // TCP behind an extension header: dropped, though a listener is there.
            Ok(connect_with_dstopts(nowhere, Duration::from_millis(1500)).map_err(|e| e.kind()))
        })?;
        closed_rx.recv_timeout(Duration::from_secs(20))?;
        let fail_closed = pod.run(move || {
            Ok(
                TcpStream::connect_timeout(&nowhere, Duration::from_millis(1500))
                    .map_err(|e| e.kind()),
            )
        })?;
        (dstopts, fail_closed)
    };
    done_tx.send(())?;
    let report = match node_side.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("node thread panicked"),
    };

    assert_eq!(
        report.captured_local, nowhere,
        "original destination preserved"
    );
    assert_eq!(
        report.captured_peer.ip(),
        std::net::IpAddr::from(pod_ip),
        "the listener sees the pod's IPv6 address"
    );
    assert_eq!(report.excluded_local, SocketAddr::new(node_ip.into(), 81));
    assert_eq!(
        dstopts.err(),
        Some(std::io::ErrorKind::TimedOut),
        "TCP behind an extension header must be dropped"
    );
    assert_eq!(
        fail_closed.err(),
        Some(std::io::ErrorKind::TimedOut),
        "with no listener an enrolled pod's IPv6 must not connect"
    );
    let s = report.stats;
    assert!(s.captured_new >= 1, "{s:?}");
    assert!(s.captured_established >= 2, "{s:?}");
    assert!(s.excluded >= 1, "{s:?}");
    assert!(s.dropped_ipv6 >= 1, "{s:?}");
    assert!(s.dropped_no_listener >= 1, "{s:?}");
    Ok(())
}

/// The mesh config of a dual-stack cluster: each workload has both addresses.
fn workload(name: &str, node: u8, pod: &Pod) -> anyhow::Result<String> {
    let ip6 = pod
        .ip6
        .ok_or_else(|| anyhow::anyhow!("{} has no IPv6 address", pod.name))?;
    Ok(format!(
        "- {{name: {name}, namespace: demo, serviceAccount: {name}, node: node{node}, addresses: [\"{}\", \"{ip6}\"]}}\n",
        pod.ip
    ))
}

fn v6(pod: &Pod, port: u16) -> anyhow::Result<SocketAddr> {
    let ip6 = pod
        .ip6
        .ok_or_else(|| anyhow::anyhow!("{} has no IPv6 address", pod.name))?;
    Ok(SocketAddr::new(ip6.into(), port))
}

/// Starts a capturing ztunnel on each node, with certificates for `sas[n-1]`.
fn ztunnels(
    cluster: &Cluster,
    dir: &std::path::Path,
    config: &std::path::Path,
    pins: &std::path::Path,
    sas: &[&[&str]],
) -> anyhow::Result<Vec<Ztunnel>> {
    let pki = Pki::new()?;
    let mut out = Vec::new();
    for (i, names) in sas.iter().enumerate() {
        let n = u8::try_from(i + 1)?;
        let certs = dir.join(format!("certs{n}"));
        pki.write_root(&certs)?;
        for sa in *names {
            pki.write_cert(&certs, &Pki::identity("demo", sa))?;
        }
        out.push(Ztunnel::spawn_capturing(
            cluster.node(n),
            dir,
            config,
            &certs,
            pins,
        )?);
    }
    Ok(out)
}

/// Serves `n` connections on `addr` inside `pod`: reads to EOF, answers
/// "thanks", reports each peer and what it sent. Gives up after 15 s, so a
/// connection that never arrives fails the test instead of hanging it.
type Served = std::thread::JoinHandle<anyhow::Result<Vec<(SocketAddr, Vec<u8>)>>>;

fn serve(pod: &Pod, addr: SocketAddr, n: usize) -> anyhow::Result<Served> {
    let listener = pod.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while seen.len() < n {
            let (mut s, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "no connection reached {addr}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            s.write_all(b"thanks")?;
            seen.push((peer, got));
        }
        Ok(seen)
    }))
}

fn joined(h: Served) -> anyhow::Result<Vec<(SocketAddr, Vec<u8>)>> {
    h.join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?
}

/// From `pod`, sends `msg` `times` times to `to`, half-closes, returns the
/// answer (empty when the mesh closed the connection on us).
fn exchange(
    pod: &Pod,
    to: SocketAddr,
    msg: &'static [u8],
    times: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    pod.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        for _ in 0..times {
            let _ = s.write_all(msg);
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        Ok(back)
    })
}

#[test]
fn ipv6_pod_to_pod_across_nodes_is_mtls_and_keeps_the_client_ip() -> anyhow::Result<()> {
    if !root_or_skip("ipv6_pod_to_pod_across_nodes_is_mtls_and_keeps_the_client_ip") {
        return Ok(());
    }
    let cluster = Cluster::build_dual_stack(2, 2)?;
    let (client, web, server) = (cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(2, 0));
    let dir = TempDir::new("ambit-capture-ipv6")?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n{}{}{}",
            workload("client", 1, client)?,
            workload("web", 1, web)?,
            workload("server", 2, server)?
        ),
    )?;
    let pins = e2e::netns::PinDir::new()?;
    let zs = ztunnels(
        &cluster,
        dir.path(),
        &config,
        pins.path(),
        &[&["client", "web"], &["server"]],
    )?;

    let addr = v6(server, 8080)?;
    let served = serve(server, addr, 1)?;
    let sniffer = Sniffer::start(cluster.fabric_name())?;
    let reply = exchange(client, addr, MARKER, 100, Duration::from_secs(5))?;
    let seen = joined(served)?;
    let wire = sniffer.stop()?;

    assert_eq!(reply, b"thanks");
    let (peer, got) = &seen[0];
    assert_eq!(got.len(), MARKER.len() * 100);
    let client6 = v6(client, 0)?.ip();
    assert_eq!(
        peer.ip(),
        client6,
        "the server sees the client pod's IPv6 address"
    );
    assert!(
        !wire.contains(MARKER),
        "the marker crossed the wire in cleartext"
    );
    assert!(wire.ipv6_tcp_frames() > 0, "no IPv6 TCP between the nodes");
    let ports = wire.tcp_ports();
    assert!(
        ports.iter().all(|(s, d)| *s == 15008 || *d == 15008),
        "non-HBONE TCP between nodes: {ports:?}"
    );

    let want_src = "src.identity=spiffe://cluster.local/ns/demo/sa/client";
    let want_dst = "dst.identity=spiffe://cluster.local/ns/demo/sa/server";
    let want_addr = format!("src.addr=[{client6}]:");
    for z in &zs {
        let log = z.wait_log("bytes_recv=6", Duration::from_secs(5))?;
        let line = log
            .lines()
            .find(|l| l.contains(" access: "))
            .unwrap_or_default();
        assert!(
            line.contains(want_src)
                && line.contains(want_dst)
                && line.contains(&want_addr)
                && line.contains("security=mutual_tls"),
            "{line}"
        );
    }
    for z in &zs {
        let metrics = z.metrics()?;
        let dropped = e2e::process::metric_sum(
            &metrics,
            "ambit_capture_packets_total",
            &[("result", "dropped_ipv6")],
        );
        assert_eq!(dropped, 0.0, "IPv6 was dropped: {metrics}");
    }

    // A reused IPv6 source port after node1's ztunnel closed first: handed
    // from its TIME_WAIT socket to its listener, no SYN sent twice.
    let reuse = e2e::port_reuse::reuse_source_port(
        client,
        SocketAddr::new(client6, 41000),
        server,
        v6(server, 8082)?,
        3,
    )?;
    assert_eq!(reuse.syn_retransmits, 0, "{reuse:?}");
    assert_eq!(e2e::port_reuse::handoffs(&zs[0], 2.0)?, 2.0, "{reuse:?}");

    // Same node: through node1's ztunnel, the client's IPv6 address kept.
    let served = serve(web, v6(web, 8081)?, 1)?;
    let reply = exchange(client, v6(web, 8081)?, b"hi", 1, Duration::from_secs(5))?;
    assert_eq!(reply, b"thanks");
    assert_eq!(joined(served)?[0].0.ip(), client6);
    let log = zs[0].wait_log("dst.workload=demo/web", Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains("dst.workload=demo/web")
            && l.contains("src.workload=demo/client")
            && l.contains(&want_addr)),
        "{log}"
    );
    Ok(())
}

#[test]
fn ipv6_strict_refuses_plaintext_and_a_stopped_ztunnel_fails_closed() -> anyhow::Result<()> {
    if !root_or_skip("ipv6_strict_refuses_plaintext_and_a_stopped_ztunnel_fails_closed") {
        return Ok(());
    }
    let cluster = Cluster::build_dual_stack(2, 2)?;
    let (client, outsider, server) = (cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(2, 0));
    let dir = TempDir::new("ambit-capture-ipv6-strict")?;
    let config = dir.path().join("mesh.yaml");
    // The outsider runs on node1 but is not in the mesh.
    std::fs::write(
        &config,
        format!(
            "workloads:\n{}{}peerAuthentications:\n- {{name: strict-server, namespace: demo, mode: Strict, workloads: [server]}}\n",
            workload("client", 1, client)?,
            workload("server", 2, server)?
        ),
    )?;
    let pins = e2e::netns::PinDir::new()?;
    let mut zs = ztunnels(
        &cluster,
        dir.path(),
        &config,
        pins.path(),
        &[&["client"], &["server"]],
    )?;

    // Plaintext from outside the mesh to the STRICT server's IPv6 address is
    // taken to node2's 15006 and refused: the server never sees it.
    let addr = v6(server, 8080)?;
    let served = serve(server, addr, 1)?;
    let refused = exchange(outsider, addr, b"hello\n", 1, Duration::from_secs(5))?;
    assert_eq!(refused, b"", "STRICT must refuse IPv6 plaintext");
    let outsider6 = v6(outsider, 0)?.ip();
    let log = zs[1].wait_log("plaintext connection refused", Duration::from_secs(5))?;
    assert!(
        log.lines()
            .any(|l| l.contains("plaintext connection refused")
                && l.contains(&outsider6.to_string())),
        "{log}"
    );
    // The mesh client gets through, and is the server's first peer.
    let reply = exchange(client, addr, b"hello\n", 1, Duration::from_secs(5))?;
    assert_eq!(reply, b"thanks");
    let seen = joined(served)?;
    assert_eq!(seen[0].0.ip(), v6(client, 0)?.ip());

    // ztunnel on node1 stops: the pinned capture stays, and the client's
    // IPv6 connections have no listener: dropped, neither around the mesh
    // nor through it.
    zs[0].terminate();
    zs[0].wait_exit(Duration::from_secs(10))?;
    // A listener the server's kernel would complete handshakes for, were the
    // SYN let through.
    let other = v6(server, 8081)?;
    let _listening = server.ns.run(move || Ok(TcpListener::bind(other)?))?;
    let down = client.ns.run(move || {
        Ok(TcpStream::connect_timeout(&other, Duration::from_millis(1500)).map_err(|e| e.kind()))
    })?;
    assert_eq!(
        down.err(),
        Some(std::io::ErrorKind::TimedOut),
        "an enrolled pod's IPv6 connected while its ztunnel was down"
    );
    drop(zs);
    Ok(())
}
