//! End to end on loopback with istiod-lite as the only source of truth: two
//! ztunnels without static config or certificates follow it over delta ADS
//! (TLS, node bootstrap tokens) and get their workload certificates from its CA.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::client::{echo_roundtrip, socks5_connect};
use e2e::istiod::Istiod;
use e2e::mesh::TempDir;
use e2e::{servers, Subnet, Ztunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_PORT: u16 = 9000;

fn manifests(client: IpAddr, server: IpAddr, vip: IpAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: demo, labels: {{app: client}}}}
spec: {{nodeName: node1, serviceAccountName: client, containers: [{{name: c, image: c}}]}}
status: {{podIP: "{client}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: demo, labels: {{app: server}}}}
spec: {{nodeName: node2, serviceAccountName: server, containers: [{{name: s, image: s}}]}}
status: {{podIP: "{server}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  selector: {{app: server}}
  clusterIP: "{vip}"
  ports: [{{port: 80, targetPort: {SERVER_PORT}}}]
"#
    )
}

const DENY_CLIENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]}]
"#;

fn wait_for_certificate(z: &Ztunnel, identity: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let dump = z.config_dump()?;
        let has = dump["certificates"]
            .as_array()
            .is_some_and(|certs| certs.iter().any(|c| c["identity"] == identity));
        if has {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{identity} never got a certificate on {}:\n{}",
                z.node,
                z.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn refused(z: &Ztunnel, src: IpAddr, dst: SocketAddr) -> bool {
    match socks5_connect(z.socks5(), src, dst).await {
        Err(e) => e.to_string().contains("reply code 2"),
        Ok(_) => false,
    }
}

/// Polls until connections from `src` are refused (`want` true) or admitted;
/// returns how long it took.
async fn until(
    z: &Ztunnel,
    src: IpAddr,
    dst: SocketAddr,
    want: bool,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if refused(z, src, dst).await == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            anyhow::bail!(
                "not {} after {limit:?}",
                if want { "refused" } else { "admitted" }
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    // Write-then-rename: the control plane never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(name))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnels_follow_istiod_lite_for_config_and_certificates() -> anyhow::Result<()> {
    let dir = TempDir::new("ambit-cp")?;
    let subnet = Subnet::random();
    let (client, server, vip) = (subnet.workload(0), subnet.workload(2), subnet.ip(200));
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests_dir)?;
    write(
        &manifests_dir,
        "00-mesh.yaml",
        &manifests(client, server, vip),
    )?;

    let mut istiod = Istiod::spawn(
        dir.path(),
        &manifests_dir,
        subnet.node(5),
        &["node1", "node2"],
    )?;
    let z1 = Ztunnel::spawn_from(
        dir.path(),
        &istiod.source_for("node1")?,
        "node1",
        subnet.node(1),
        &[],
    )?;
    let z2 = Ztunnel::spawn_from(
        dir.path(),
        &istiod.source_for("node2")?,
        "node2",
        subnet.node(2),
        &[],
    )?;
    wait_for_certificate(&z1, "spiffe://cluster.local/ns/demo/sa/client")?;
    wait_for_certificate(&z2, "spiffe://cluster.local/ns/demo/sa/server")?;
    // Node-scoped: node1 holds no certificate of node2's workloads.
    let dump1 = z1.config_dump()?;
    assert_eq!(
        dump1["certificates"].as_array().map(Vec::len),
        Some(1),
        "{dump1:#}"
    );
    assert_eq!(dump1["configSource"]["status"]["synced"], true, "{dump1:#}");
    let m = z1.metrics()?;
    assert!(
        m.contains("ambit_certificate_fetches_total{result=\"issued\"} 1"),
        "{m}"
    );

    let server_addr = SocketAddr::new(server, SERVER_PORT);
    let _echo = servers::echo(server_addr).await?;
    echo_roundtrip(z1.socks5(), client, server_addr).await?;
    echo_roundtrip(z1.socks5(), client, SocketAddr::new(vip, 80)).await?;
    let log = z2.wait_log(
        "spiffe://cluster.local/ns/demo/sa/client",
        Duration::from_secs(5),
    )?;
    assert!(log.contains("mesh config updated from xDS"), "{log}");

    // A policy dropped into the manifests directory is enforced within 2 s.
    write(&manifests_dir, "20-deny.yaml", DENY_CLIENT)?;
    let took = until(&z1, client, server_addr, true, Duration::from_secs(10)).await?;
    println!("policy added → enforced in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    std::fs::remove_file(manifests_dir.join("20-deny.yaml"))?;
    let took = until(&z1, client, server_addr, false, Duration::from_secs(10)).await?;
    println!("policy removed → lifted in {took:?}");

    // Control plane down: open connections and new ones between known
    // workloads keep working on the last config and certificates.
    let mut open = socks5_connect(z1.socks5(), client, server_addr).await?;
    istiod.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    open.write_all(b"still here").await?;
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"still here");
    for _ in 0..5 {
        echo_roundtrip(z1.socks5(), client, server_addr).await?;
    }
    assert!(z1.config_dump()?["configSource"]["status"]["connected"] == false);

    // Changed while it was away; after a restart everyone converges on it.
    write(&manifests_dir, "20-deny.yaml", DENY_CLIENT)?;
    istiod.start()?;
    let took = until(&z1, client, server_addr, true, Duration::from_secs(30)).await?;
    println!("istiod-lite restarted → reconverged in {took:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !istiod.metrics()?.contains("istiod_xds_clients 2") {
        assert!(
            Instant::now() < deadline,
            "both ztunnels reconnect:\n{}",
            istiod.metrics()?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
