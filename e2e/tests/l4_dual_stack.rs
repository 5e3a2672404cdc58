//! IPv6 in config, tunnels and policy. Loopback has one IPv6 address (::1), so
//! each test gives it to one workload and uses free ports for everything on it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use e2e::client::echo_roundtrip;
use e2e::mesh::{Addrs, TwoNodes};
use e2e::servers;

const V6_LOOPBACK: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

fn free_port_v6() -> u16 {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("::1 is available")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_destination_over_ipv6_tunnel_and_vip() -> anyhow::Result<()> {
    let (hbone_port, app_port) = (free_port_v6(), free_port_v6());
    let hp = hbone_port.to_string();
    let mesh = TwoNodes::launch(
        |a: &Addrs| {
            let base =
                TwoNodes::config_with_server(a, &format!("[\"{}\", \"::1\"]", a.server), "[]");
            // A second, IPv6-only service in front of the same server.
            base.replacen(
                "services:\n",
                &format!("services:\n- name: echo6\n  namespace: demo\n  addresses: [\"2001:2::200\"]\n  ports: [{{port: 80, targetPort: {app_port}}}]\n"),
                1,
            )
            .replace("  services: [demo/echo]", "  services: [demo/echo, demo/echo6]")
        },
        &["--hbone-port", &hp],
        &[],
    )?;
    let app = SocketAddr::new(V6_LOOPBACK, app_port);
    let _echo = servers::echo(app).await?;
    // Straight to the IPv6 workload address, then through the IPv6 VIP.
    echo_roundtrip(mesh.z1.socks5(), mesh.client, app).await?;
    echo_roundtrip(mesh.z1.socks5(), mesh.client, "[2001:2::200]:80".parse()?).await?;
    let log = mesh.z1.wait_log(
        "dst.service=echo6.demo.svc.cluster.local",
        Duration::from_secs(5),
    )?;
    let via = format!("dst.via=[::1]:{hbone_port}");
    assert_eq!(
        log.lines().filter(|l| l.contains(&via)).count(),
        2,
        "both tunnels run over IPv6:\n{log}"
    );
    mesh.z2.wait_log(
        &format!("dst.addr=[::1]:{app_port}"),
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_source_is_seen_by_policy() -> anyhow::Result<()> {
    let (hbone_port, socks_port) = (free_port_v6(), free_port_v6());
    let (hp, socks) = (hbone_port.to_string(), format!("[::1]:{socks_port}"));
    let deny_v6_on_9001 = r#"
- name: deny-v6-9001
  namespace: demo
  action: Deny
  rules:
  - from: [{ipBlocks: ["::1/128"]}]
    to: [{ports: [9001]}]
"#;
    let mesh = TwoNodes::launch(
        |a: &Addrs| {
            TwoNodes::config(a, deny_v6_on_9001).replacen(
                &format!("  addresses: [\"{}\"]", a.client),
                &format!("  addresses: [\"{}\", \"::1\"]", a.client),
                1,
            )
        },
        &["--hbone-port", &hp],
        &["--socks5-addr", &socks],
    )?;
    let _e1 = servers::echo(mesh.server_addr()).await?;
    let port_9001 = SocketAddr::new(mesh.server, 9001);
    let _e2 = servers::echo(port_9001).await?;
    let z1_socks: SocketAddr = socks.parse()?;
    // The IPv6 source reaches 9000...
    echo_roundtrip(z1_socks, V6_LOOPBACK, mesh.server_addr()).await?;
    // ...is denied on 9001 by its IPv6 block, while its IPv4 address is not.
    assert!(echo_roundtrip(z1_socks, V6_LOOPBACK, port_9001)
        .await
        .is_err());
    let log = mesh
        .z2
        .wait_log("denied by demo/deny-v6-9001", Duration::from_secs(5))?;
    assert!(
        log.contains("src.addr=[::1]:0"),
        "the destination sees the IPv6 source:\n{log}"
    );
    Ok(())
}
