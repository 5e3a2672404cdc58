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
- {{name: wp-0, namespace: demo, serviceAccount: waypoint, node: node3, addresses: ["{waypoint}"], services: [demo/wp], nativeTunnel: true}}
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
    let mesh = TwoNodes::launch(|a| config(a, "[]"), &[], &[])?;
    let extra = extra(&mesh.addrs());
    let state = MeshState::new(parse_mesh_config(&config(&mesh.addrs(), "[]"))?);
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
