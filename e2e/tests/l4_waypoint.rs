//! Waypoint routing in ztunnel: the source sends a destination's traffic to
//! its waypoint (an L4 stand-in here, `e2e::waypoint_stub`), the destination
//! admits only the waypoint for a workload behind one, and a waypoint that
//! cannot be used means refusal, never the direct path.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use e2e::client::{echo_roundtrip, socks5_connect};
use e2e::mesh::{Addrs, TwoNodes, SERVER_PORT};
use e2e::waypoint_stub::WaypointStub;
use e2e::{servers, Pki};
use mesh_core::config::{parse_mesh_config, MeshState};
use mesh_core::hbone::{HboneError, Pool, PoolConfig, PoolKey, HBONE_PORT};
use mesh_core::tls::{self, TrustRoots, WorkloadCertificate};

/// `ip` with its last octet replaced: more addresses in the test's subnet.
fn sibling(ip: IpAddr, host: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, host))
        }
        IpAddr::V6(_) => unreachable!("the loopback harness is IPv4"),
    }
}

struct Extra {
    plain: IpAddr,
    waypoint: IpAddr,
    plain_vip: IpAddr,
    broken_vip: IpAddr,
}

fn extra(a: &Addrs) -> Extra {
    Extra {
        plain: sibling(a.client, 14),
        waypoint: sibling(a.client, 15),
        plain_vip: sibling(a.vip, 201),
        broken_vip: sibling(a.vip, 203),
    }
}

/// `server` (behind waypoint demo/wp itself, and via service `echo`, which
/// uses it too), `plain` (no waypoint; services `plain`, and `broken`, whose
/// waypoint does not exist), the waypoint pod on node3 (no ztunnel there:
/// it speaks HBONE itself).
fn config(a: &Addrs, policies: &str) -> String {
    config_with_waypoint_on(a, policies, "node3")
}

/// As [`config`], with the waypoint pod on `wp_node`.
fn config_with_waypoint_on(a: &Addrs, policies: &str, wp_node: &str) -> String {
    let Addrs {
        client,
        intruder,
        server,
        vip,
        ..
    } = *a;
    let Extra {
        plain,
        waypoint,
        plain_vip,
        broken_vip,
    } = extra(a);
    let wp_vip = sibling(vip, 202);
    format!(
        r#"workloads:
- {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: ["{client}"]}}
- {{name: intruder, namespace: other, serviceAccount: intruder, node: node1, addresses: ["{intruder}"]}}
- name: server
  namespace: demo
  serviceAccount: server
  node: node2
  addresses: ["{server}"]
  services: [demo/echo]
  waypoint: {{namespace: demo, name: wp}}
- {{name: plain, namespace: demo, serviceAccount: server, node: node2, addresses: ["{plain}"], services: [demo/plain, demo/broken]}}
- {{name: wp-0, namespace: demo, serviceAccount: waypoint, node: {wp_node}, addresses: ["{waypoint}"], services: [demo/wp], nativeTunnel: true}}
services:
- {{name: echo, namespace: demo, addresses: ["{vip}"], ports: [{{port: 80, targetPort: {SERVER_PORT}}}], waypoint: {{namespace: demo, name: wp}}}}
- {{name: plain, namespace: demo, addresses: ["{plain_vip}"], ports: [{{port: 80, targetPort: {SERVER_PORT}}}]}}
- {{name: broken, namespace: demo, addresses: ["{broken_vip}"], ports: [{{port: 80, targetPort: {SERVER_PORT}}}], waypoint: {{namespace: demo, name: missing}}}}
- {{name: wp, namespace: demo, addresses: ["{wp_vip}"], ports: [{{port: 15008}}]}}
policies: {policies}
"#
    )
}

struct Setup {
    mesh: TwoNodes,
    stub: WaypointStub,
    extra: Extra,
    _servers: Vec<tokio::task::JoinHandle<()>>,
}

async fn setup() -> anyhow::Result<Setup> {
    setup_with_waypoint_on("node3").await
}

async fn setup_with_waypoint_on(wp_node: &str) -> anyhow::Result<Setup> {
    let yaml = |a: &Addrs| config_with_waypoint_on(a, "[]", wp_node);
    let mesh = TwoNodes::launch(yaml, &[], &[])?;
    let extra = extra(&mesh.addrs());
    let state = MeshState::new(parse_mesh_config(&yaml(&mesh.addrs()))?);
    let stub = WaypointStub::start(
        SocketAddr::new(extra.waypoint, HBONE_PORT),
        &mesh.pki,
        &Pki::identity("demo", "waypoint"),
        state,
    )
    .await?;
    let servers = vec![
        servers::echo(mesh.server_addr()).await?,
        servers::echo(SocketAddr::new(extra.plain, SERVER_PORT)).await?,
    ];
    Ok(Setup {
        mesh,
        stub,
        extra,
        _servers: servers,
    })
}

async fn socks_reply(mesh: &TwoNodes, src: IpAddr, dst: SocketAddr) -> Option<String> {
    match socks5_connect(mesh.z1.socks5(), src, dst).await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_a_waypoint_destination_goes_through_the_waypoint() -> anyhow::Result<()> {
    let Setup {
        mesh, stub, extra, ..
    } = setup().await?;
    let client_id = Pki::identity("demo", "client");

    // Via the service VIP: the waypoint sees the client, the VIP and the client's address.
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.vip_addr()).await?;
    let seen = stub.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].peer, client_id);
    assert_eq!(seen[0].authority, mesh.vip_addr().to_string());
    assert_eq!(
        seen[0].forwarded.as_deref(),
        Some(format!("for={}", mesh.client).as_str())
    );

    // Via the pod address: the workload's own waypoint, the pod address as authority.
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    let seen = stub.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].authority, mesh.server_addr().to_string());

    // Source side: the hop is to the waypoint pod, for the real destination.
    let via = format!("dst.via={}", stub.addr());
    let log = mesh.z1.wait_log(&via, Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains(&via)
            && l.contains(&format!("dst.addr={}", mesh.vip_addr()))
            && l.contains("dst.identity=spiffe://cluster.local/ns/demo/sa/waypoint")
            && l.contains("dst.service=echo.demo.svc.cluster.local")),
        "source access log must show the waypoint hop:\n{log}"
    );
    mesh.z1
        .wait_for_metric(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("destination_workload", "wp-0"),
                ("destination_service", "echo.demo.svc.cluster.local"),
            ],
            1.0,
        )
        .await?;
    // Destination side: the waypoint is the peer, and admitted.
    let log = mesh.z2.wait_log(
        "src.identity=spiffe://cluster.local/ns/demo/sa/waypoint",
        Duration::from_secs(5),
    )?;
    assert!(!log.contains("waypoint_bypassed"), "{log}");

    // A service without a waypoint, to a workload without one: straight there.
    let plain_vip = SocketAddr::new(extra.plain_vip, 80);
    echo_roundtrip(mesh.z1.socks5(), mesh.client, plain_vip).await?;
    assert_eq!(
        stub.seen().len(),
        2,
        "the direct path must not touch the waypoint"
    );
    mesh.z2.wait_log(
        "src.identity=spiffe://cluster.local/ns/demo/sa/client",
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_admits_only_the_waypoint_and_still_applies_policy() -> anyhow::Result<()> {
    let Setup {
        mesh, stub, extra, ..
    } = setup().await?;

    // HBONE straight to the workload behind the waypoint, as the client.
    let client_id = Pki::identity("demo", "client");
    let server_id = Pki::identity("demo", "server");
    let issued = mesh.pki.ca.issue(&client_id, Duration::from_secs(3600))?;
    let cert =
        WorkloadCertificate::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())?;
    let roots = TrustRoots::from_pem(mesh.pki.ca.root_pem().as_bytes())?;
    let pool = Pool::new(PoolConfig::default());
    let key = PoolKey {
        src: client_id,
        dst: server_id.clone(),
        dst_addr: SocketAddr::new(mesh.server, HBONE_PORT),
    };
    let tls = || {
        Ok(Arc::new(tls::client_config(
            &cert,
            &roots,
            vec![server_id],
        )?))
    };
    match pool.open(&key, mesh.server_addr(), &[], tls).await {
        Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::FORBIDDEN),
        Err(e) => panic!("expected 403, got {e}"),
        Ok(_) => panic!("a tunnel around the waypoint must be refused"),
    }
    let log = mesh
        .z2
        .wait_log("waypoint_bypassed", Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains("tunnel refused")
            && l.contains("waypoint_bypassed")
            && l.contains("is behind waypoint demo/wp")),
        "{log}"
    );
    let text = mesh.z2.metrics()?;
    let bypassed = e2e::process::metric_sum(
        &text,
        "ambit_connection_failures_total",
        &[("direction", "inbound"), ("reason", "waypoint_bypassed")],
    );
    assert_eq!(bypassed, 1.0, "{text}");

    // The waypoint's own connection is subject to the destination's L4 policy.
    let deny_waypoint = r#"
- name: deny-waypoint
  namespace: demo
  action: Deny
  rules:
  - from: [{principals: ["cluster.local/ns/demo/sa/waypoint"]}]
"#;
    mesh.rewrite_config(&config(&mesh.addrs(), deny_waypoint), "config reloaded")?;
    let reply = socks_reply(&mesh, mesh.client, mesh.vip_addr()).await;
    assert!(
        reply.as_deref().is_some_and(|r| r.contains("reply code 2")),
        "the destination's denial reaches the client through the waypoint: {reply:?}"
    );
    mesh.z2
        .wait_log("denied by demo/deny-waypoint", Duration::from_secs(5))?;
    // The plain workload is not behind the waypoint: the client reaches it directly.
    echo_roundtrip(
        mesh.z1.socks5(),
        mesh.client,
        SocketAddr::new(extra.plain, SERVER_PORT),
    )
    .await?;
    assert_eq!(stub.seen().len(), 1, "{:?}", stub.seen());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_waypoint_refuses_and_never_goes_direct() -> anyhow::Result<()> {
    let Setup {
        mesh, stub, extra, ..
    } = setup().await?;
    let broken = SocketAddr::new(extra.broken_vip, 80);
    let reply = socks_reply(&mesh, mesh.client, broken).await;
    assert!(
        reply.as_deref().is_some_and(|r| r.contains("reply code 4")),
        "{reply:?}"
    );
    let log = mesh
        .z1
        .wait_log("waypoint_unavailable", Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains("connection refused")
            && l.contains("needs waypoint demo/missing")
            && l.contains("not sent around it")),
        "{log}"
    );
    mesh.z1
        .wait_for_metric(
            "istio_tcp_connections_closed_total",
            &[("reporter", "source"), ("response_flags", "UH")],
            1.0,
        )
        .await?;
    // Neither the waypoint stand-in nor the endpoint's ztunnel saw anything.
    assert!(stub.seen().is_empty(), "{:?}", stub.seen());
    let z2 = mesh.z2.log();
    assert!(
        !z2.contains(&format!("dst.addr={}:{SERVER_PORT}", extra.plain)),
        "{z2}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_leaves_a_local_waypoints_hbone_port_to_it() -> anyhow::Result<()> {
    // TwoNodes::launch returns once both ztunnels are ready, so node2's
    // per-workload HBONE listeners are bound before anything below.
    let mesh = TwoNodes::launch(|a| config_with_waypoint_on(a, "[]", "node2"), &[], &[])?;
    let extra = extra(&mesh.addrs());
    let wp_hbone = SocketAddr::new(extra.waypoint, HBONE_PORT);
    mesh.z2.wait_log(
        &format!("hbone listener ready addr={}:{HBONE_PORT}", mesh.server),
        Duration::from_secs(5),
    )?;
    let free = std::net::TcpListener::bind(wp_hbone);
    assert!(
        free.is_ok(),
        "{wp_hbone} must be left to the waypoint: {free:?}\n{}",
        mesh.z2.log()
    );
    drop(free);
    assert!(
        !mesh.z2.log().contains(&format!("addr={wp_hbone}")),
        "{}",
        mesh.z2.log()
    );

    // The waypoint takes its port, and a client on the destination's own
    // node still goes through it (never the same-node shortcut): `plain`
    // (node2, identity demo/server) to `server`, which is behind it.
    let state = MeshState::new(parse_mesh_config(&config_with_waypoint_on(
        &mesh.addrs(),
        "[]",
        "node2",
    ))?);
    let stub = WaypointStub::start(
        wp_hbone,
        &mesh.pki,
        &Pki::identity("demo", "waypoint"),
        state,
    )
    .await?;
    let _servers = [servers::echo(mesh.server_addr()).await?];
    echo_roundtrip(mesh.z2.socks5(), extra.plain, mesh.server_addr()).await?;
    let seen = stub.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].peer, Pki::identity("demo", "server"));
    assert_eq!(seen[0].authority, mesh.server_addr().to_string());
    mesh.z2
        .wait_log(&format!("dst.via={wp_hbone}"), Duration::from_secs(5))?;
    // The waypoint's tunnel on to the server still ends at node2's ztunnel.
    mesh.z2.wait_log(
        "src.identity=spiffe://cluster.local/ns/demo/sa/waypoint",
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// Plaintext (15006) to a workload behind a waypoint: refused, and an open
/// plaintext connection is cut once its workload is put behind one. Needs
/// capture to reach 15006 with the original destination, so it runs in a
/// namespace cluster as root: `outsider` (node1, not in the mesh) to
/// `server` and `open` on node2.
#[test]
fn plaintext_to_a_workload_behind_a_waypoint_is_refused() -> anyhow::Result<()> {
    use e2e::cluster::Cluster;
    use std::io::{Read, Write};

    if !e2e::netns::root_or_skip("plaintext_to_a_workload_behind_a_waypoint_is_refused") {
        return Ok(());
    }
    let cluster = Cluster::build(2, 2)?;
    let outsider = cluster.pod(1, 0);
    let (server, open) = (cluster.pod(2, 0), cluster.pod(2, 1));
    let yaml = |open_waypoint: &str| {
        format!(
            r#"workloads:
- {{name: server, namespace: demo, serviceAccount: server, node: node2, addresses: ["{server}"], waypoint: {{namespace: demo, name: wp}}}}
- {{name: open, namespace: demo, serviceAccount: open, node: node2, addresses: ["{open}"]{open_waypoint}}}
- {{name: wp-0, namespace: demo, serviceAccount: waypoint, node: node3, addresses: ["198.19.3.10"], services: [demo/wp], nativeTunnel: true}}
services:
- {{name: wp, namespace: demo, addresses: ["198.18.100.9"], ports: [{{port: 15008}}]}}
"#,
            server = server.ip,
            open = open.ip,
        )
    };
    let dir = e2e::mesh::TempDir::new("ambit-waypoint-plaintext")?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, yaml(""))?;
    let pki = Pki::new()?;
    let certs = dir.path().join("certs2");
    pki.write_root(&certs)?;
    for sa in ["server", "open"] {
        pki.write_cert(&certs, &Pki::identity("demo", sa))?;
    }
    let pins = e2e::netns::PinDir::new()?;
    let z2 =
        e2e::Ztunnel::spawn_capturing(cluster.node(2), dir.path(), &config, &certs, pins.path())?;

    // 1. Refused at 15006, though the workload is PERMISSIVE and no policy
    // denies it. An echo server shows whether anything got through.
    let _echo = server.echo_peers(8080, 1, 1)?;
    let to = SocketAddr::new(server.ip.into(), 8080);
    let got = outsider.ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(b"x");
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        Ok(back)
    })?;
    assert!(got.is_empty(), "plaintext around the waypoint: {got:?}");
    let log = z2.wait_log("waypoint_bypassed", Duration::from_secs(5))?;
    assert!(
        log.lines()
            .any(|l| l.contains("plaintext connection refused")
                && l.contains("demo/server is behind waypoint demo/wp")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(" access: ")
            && l.contains("dst.workload=demo/server")
            && l.contains("result=\"RBAC\"")),
        "{log}"
    );
    let text = z2.metrics()?;
    let refused = e2e::process::metric_sum(
        &text,
        "ambit_connection_failures_total",
        &[("direction", "inbound"), ("reason", "waypoint_bypassed")],
    );
    assert_eq!(refused, 1.0, "{text}");

    // 2. An open plaintext connection to `open` (no waypoint yet) is cut
    // when `open` is put behind one.
    let addr = SocketAddr::new(open.ip.into(), 8081);
    let listener = open
        .ns
        .run(move || Ok(std::net::TcpListener::bind(addr)?))?;
    let _server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        }
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = outsider.ns.spawn(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"a")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        let _ = ready_tx.send(());
        let _ = go_rx.recv();
        // Cut: EOF or a reset, never a timeout.
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => Ok(rest),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(rest),
            Err(e) => Err(e.into()),
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("plaintext to open never established:\n{}", z2.log()))?;
    std::fs::write(&config, yaml(", waypoint: {namespace: demo, name: wp}"))?;
    z2.wait_log("waypoint bypassed:", Duration::from_secs(10))?;
    let _ = go_tx.send(());
    let rest = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    assert!(rest.is_empty(), "{rest:?}");
    let log = z2.log();
    assert!(
        log.lines().any(|l| l.contains(" access: ")
            && l.contains("dst.workload=demo/open")
            && l.contains("result=\"RBAC\"")
            && l.contains("waypoint bypassed: demo/open is behind waypoint demo/wp")),
        "{log}"
    );
    Ok(())
}
