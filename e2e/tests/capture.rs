//! eBPF capture in real network namespaces: a pod's TCP reaches the node's
//! transparent listener with its original destination; excluded ports bypass
//! capture; with no listener the pod fails closed.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use e2e::netns::{root_or_skip, veth, Netns};
use ebpf_redirect::{setup_node_routing, Capture, CaptureStats};
use socket2::{Domain, Socket, Type};

fn transparent_listener(addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_ip_transparent_v4(true)?;
    s.bind(&SocketAddr::V4(addr).into())?;
    s.listen(128)?;
    Ok(s.into())
}

struct NodeReport {
    captured_local: SocketAddr,
    captured_peer: SocketAddr,
    excluded_local: SocketAddr,
    stats: CaptureStats,
}

#[test]
fn pod_tcp_is_captured_with_original_destination_and_fails_closed() -> anyhow::Result<()> {
    if !root_or_skip("pod_tcp_is_captured_with_original_destination_and_fails_closed") {
        return Ok(());
    }
    let node = Netns::create("node")?;
    let pod = Netns::create("pod")?;
    let (host_if, pod_if) = veth(&node, &pod)?;
    node.ip(&["addr", "add", "198.19.1.1/24", "dev", &host_if])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    pod.ip(&["addr", "add", "198.19.1.10/24", "dev", &pod_if])?;
    pod.ip(&["link", "set", &pod_if, "up"])?;
    pod.ip(&["route", "add", "default", "via", "198.19.1.1"])?;
    // IPv6 on the same link: the listener takes IPv4 only, so the pod's new
    // IPv6 connections have no listener and must be dropped, not pass.
    node.ip(&[
        "-6",
        "addr",
        "add",
        "2001:2::1/64",
        "dev",
        &host_if,
        "nodad",
    ])?;
    pod.ip(&[
        "-6",
        "addr",
        "add",
        "2001:2::10/64",
        "dev",
        &pod_if,
        "nodad",
    ])?;

    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pins = e2e::netns::PinDir::new()?;
    let pin_dir = pins.path().to_path_buf();
    let node_side = node.spawn(move || {
        setup_node_routing()?;
        let listener = transparent_listener("0.0.0.0:15001".parse()?)?;
        let plain = TcpListener::bind("198.19.1.1:81")?;
        let mut capture = Capture::load("0.0.0.0:15001".parse()?, &pin_dir)?;
        capture.exclude_port(None, 81, ebpf_redirect::Direction::Outbound)?;
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
    ready_rx.recv_timeout(Duration::from_secs(20))?;

    // An unmodified client in the pod dials an address that exists nowhere.
    pod.run(|| {
        let mut s =
            TcpStream::connect_timeout(&"198.18.200.7:80".parse()?, Duration::from_secs(5))?;
        s.write_all(b"hello")?;
        let mut back = [0u8; 5];
        s.read_exact(&mut back)?;
        anyhow::ensure!(&back == b"hello", "echo mismatch");
        // Excluded port: reaches the node's ordinary listener, not the capture one.
        TcpStream::connect_timeout(&"198.19.1.1:81".parse()?, Duration::from_secs(5))?;
        Ok(())
    })?;
    closed_rx.recv_timeout(Duration::from_secs(20))?;
    let fail_closed = pod.run(|| {
        Ok(
            TcpStream::connect_timeout(&"198.18.200.7:80".parse()?, Duration::from_millis(1500))
                .is_err(),
        )
    })?;
    // Without the drop the node would answer at once (RST: nothing listens
    // there); dropped, the SYN gets no answer at all.
    let ipv6 = pod.run(|| {
        Ok(
            TcpStream::connect_timeout(&"[2001:2::1]:80".parse()?, Duration::from_millis(1500))
                .map_err(|e| e.kind()),
        )
    })?;
    done_tx.send(())?;
    let report = match node_side.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("node thread panicked"),
    };

    assert_eq!(
        report.captured_local,
        "198.18.200.7:80".parse::<SocketAddr>()?,
        "original destination preserved"
    );
    assert_eq!(
        report.captured_peer.ip().to_string(),
        "198.19.1.10",
        "the listener sees the pod's address"
    );
    assert_eq!(
        report.excluded_local,
        "198.19.1.1:81".parse::<SocketAddr>()?
    );
    assert!(
        fail_closed,
        "with no listener an enrolled pod must not connect"
    );
    let s = report.stats;
    assert!(s.captured_new >= 1, "{s:?}");
    assert!(s.captured_established >= 2, "{s:?}");
    assert!(s.excluded >= 1, "{s:?}");
    assert!(s.dropped_no_listener >= 1, "{s:?}");
    assert_eq!(
        ipv6.err(),
        Some(std::io::ErrorKind::TimedOut),
        "an enrolled pod's IPv6 TCP without an IPv6 listener must be dropped"
    );
    assert!(s.dropped_no_listener >= 2, "{s:?}");
    Ok(())
}
