//! L4 authorization at the destination ztunnel: DENY and ALLOW policies.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::client::{echo_roundtrip, socks5_connect};
use e2e::mesh::TwoNodes;
use e2e::servers;

const DENY_INTRUDER: &str = r#"
- name: deny-intruder
  namespace: demo
  action: Deny
  rules:
  - from: [{principals: ["cluster.local/ns/other/sa/intruder"]}]
"#;

const ALLOW_CLIENT_9000: &str = r#"
- name: allow-client
  namespace: demo
  action: Allow
  rules:
  - from: [{principals: ["cluster.local/ns/demo/sa/client"]}]
    to: [{ports: [9000]}]
"#;

async fn refused(mesh: &TwoNodes, src: std::net::IpAddr, dst: SocketAddr) -> bool {
    match socks5_connect(mesh.z1.socks5(), src, dst).await {
        // SOCKS reply 2: "connection not allowed by ruleset".
        Err(e) => e.to_string().contains("reply code 2"),
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_blocks_named_principal_and_allow_admits_only_what_it_names() -> anyhow::Result<()> {
    let mesh = TwoNodes::start(DENY_INTRUDER)?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    let other_port = SocketAddr::new(mesh.server, 9001);
    let _echo2 = servers::echo(other_port).await?;

    // DENY: the named principal is blocked, everyone else passes.
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    assert!(
        refused(&mesh, mesh.intruder, mesh.server_addr()).await,
        "intruder must be denied"
    );
    let log = mesh
        .z2
        .wait_log("denied by demo/deny-intruder", Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains("src.identity=spiffe://cluster.local/ns/other/sa/intruder")
            && l.contains("result=\"RBAC\"")),
        "access log must show the denial:\n{log}"
    );
    let denied = [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/other/sa/intruder",
        ),
        ("destination_workload", "server"),
        ("response_flags", "RBAC"),
    ];
    mesh.z2
        .wait_for_metric("istio_tcp_connections_closed_total", &denied, 1.0)
        .await?;
    let src_side = [
        ("reporter", "source"),
        ("source_workload", "intruder"),
        ("response_flags", "RBAC"),
    ];
    mesh.z1
        .wait_for_metric("istio_tcp_connections_closed_total", &src_side, 1.0)
        .await?;

    // ALLOW: only the named principal, only on the named port.
    mesh.set_policies(ALLOW_CLIENT_9000)?;
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    assert!(
        refused(&mesh, mesh.intruder, mesh.server_addr()).await,
        "intruder is not named by the ALLOW policy"
    );
    assert!(
        refused(&mesh, mesh.client, other_port).await,
        "port 9001 is not named by the ALLOW policy"
    );
    let log = mesh
        .z2
        .wait_log("denied: no ALLOW policy matched", Duration::from_secs(5))?;
    assert!(log.contains("dst.addr="), "{log}");
    let text = mesh.z2.metrics()?;
    let rbac = e2e::process::metric_sum(
        &text,
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("response_flags", "RBAC")],
    );
    assert_eq!(rbac, 3.0, "three denials in all:\n{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_tunnel_is_closed_when_policy_stops_allowing_it() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = TwoNodes::start("[]")?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    let mut kept = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    let mut cut = socks5_connect(mesh.z1.socks5(), mesh.intruder, mesh.server_addr()).await?;
    for s in [&mut kept, &mut cut] {
        s.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await?;
    }
    mesh.set_policies(DENY_INTRUDER)?;
    // The intruder's open tunnel is cut...
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), cut.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the denied tunnel must be closed");
    mesh.z2.wait_log(
        "policy changed: denied by demo/deny-intruder",
        Duration::from_secs(5),
    )?;
    // ...and the client's, still allowed, carries on.
    kept.write_all(b"still here").await?;
    let mut b = [0u8; 10];
    kept.read_exact(&mut b).await?;
    assert_eq!(&b, b"still here");
    Ok(())
}
