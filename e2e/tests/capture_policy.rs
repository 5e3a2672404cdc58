//! Policy under capture: same-node traffic also goes through ztunnel and its
//! policy; a DENY blocks a captured connection; plaintext from a pod outside
//! the mesh reaches an enrolled pod only where mTLS is not required.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use e2e::cluster::{Cluster, Pod};
use e2e::mesh::TempDir;
use e2e::netns::root_or_skip;
use e2e::process::Ztunnel;
use e2e::Pki;

/// Serves `n` connections on `addr` inside `pod`: reads to EOF, answers "ok",
/// reports each peer address.
fn serve(
    pod: &Pod,
    port: u16,
    n: usize,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Vec<SocketAddr>>>> {
    let addr = SocketAddr::new(pod.ip.into(), port);
    let listener = pod.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    Ok(std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..n {
            let (mut s, peer) = listener.accept()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            s.write_all(b"ok")?;
            peers.push(peer);
        }
        Ok(peers)
    }))
}

/// Connects from `pod`, sends a line, half-closes, returns what came back
/// (empty when the mesh closed the connection on us).
fn exchange(pod: &Pod, to: SocketAddr) -> anyhow::Result<Vec<u8>> {
    pod.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(b"hello\n");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        Ok(back)
    })
}

#[test]
fn same_node_deny_and_strict_are_enforced_under_capture() -> anyhow::Result<()> {
    if !root_or_skip("same_node_deny_and_strict_are_enforced_under_capture") {
        return Ok(());
    }
    let cluster = Cluster::build(2, 3)?;
    let (client, web, outsider) = (cluster.pod(1, 0), cluster.pod(1, 1), cluster.pod(1, 2));
    let (server, open) = (cluster.pod(2, 0), cluster.pod(2, 1));
    let dir = TempDir::new("ambit-capture-policy")?;
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            r#"workloads:
- {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: ["{}"]}}
- {{name: web, namespace: demo, serviceAccount: web, node: node1, addresses: ["{}"]}}
- {{name: server, namespace: demo, serviceAccount: server, node: node2, addresses: ["{}"]}}
- {{name: open, namespace: demo, serviceAccount: open, node: node2, addresses: ["{}"]}}
policies:
- name: deny-web
  namespace: demo
  action: Deny
  rules: [{{from: [{{principals: ["cluster.local/ns/demo/sa/web"]}}], to: [{{ports: [8080]}}]}}]
peerAuthentications:
- {{name: strict-server, namespace: demo, mode: Strict, workloads: [server]}}
- {{name: strict-web, namespace: demo, mode: Strict, workloads: [web]}}
"#,
            client.ip, web.ip, server.ip, open.ip
        ),
    )?;
    let pki = Pki::new()?;
    let pins = e2e::netns::PinDir::new()?;
    let mut ztunnels = Vec::new();
    for (n, sas) in [(1u8, ["client", "web"]), (2u8, ["server", "open"])] {
        let certs = dir.path().join(format!("certs{n}"));
        pki.write_root(&certs)?;
        for sa in sas {
            pki.write_cert(&certs, &Pki::identity("demo", sa))?;
        }
        let node = cluster.node(n);
        let z = Ztunnel::spawn_capturing(node, dir.path(), &config, &certs, pins.path())?;
        ztunnels.push(z);
    }
    let (z1, z2) = (&ztunnels[0], &ztunnels[1]);

    // 1. Same node, client -> web: through ztunnel (access log), allowed, client IP kept.
    let web_srv = serve(web, 8081, 1)?;
    assert_eq!(
        exchange(client, SocketAddr::new(web.ip.into(), 8081))?,
        b"ok"
    );
    let peers = web_srv
        .join()
        .map_err(|_| anyhow::anyhow!("web server panicked"))??;
    assert_eq!(peers[0].ip().to_string(), client.ip.to_string());
    let log = z1.wait_log("dst.workload=demo/web", Duration::from_secs(5))?;
    assert!(
        log.lines().any(|l| l.contains("dst.workload=demo/web")
            && l.contains("src.workload=demo/client")
            && l.contains("result=\"ok\"")),
        "{log}"
    );

    // 2. DENY: web -> server:8080 is captured, tunnelled, refused at node2.
    let server_srv = serve(server, 8080, 1)?;
    assert_eq!(
        exchange(web, SocketAddr::new(server.ip.into(), 8080))?,
        b"",
        "denied connection must get nothing"
    );
    z2.wait_log("denied by demo/deny-web", Duration::from_secs(5))?;

    // 3. STRICT: plaintext from outside the mesh to server:8080 is refused at 15006.
    assert_eq!(
        exchange(outsider, SocketAddr::new(server.ip.into(), 8080))?,
        b"",
        "plaintext to a STRICT pod must be refused"
    );
    z2.wait_log(
        "requires mTLS (PeerAuthentication STRICT)",
        Duration::from_secs(5),
    )?;

    // ...while the client, in the mesh, is allowed to the same server (proves the
    // server was up all along) ...
    assert_eq!(
        exchange(client, SocketAddr::new(server.ip.into(), 8080))?,
        b"ok"
    );
    let peers = server_srv
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    assert_eq!(peers.len(), 1);

    // 4. ...and plaintext to a PERMISSIVE pod is admitted through 15006 with
    // the outsider's address kept.
    let open_srv = serve(open, 8082, 1)?;
    assert_eq!(
        exchange(outsider, SocketAddr::new(open.ip.into(), 8082))?,
        b"ok"
    );
    let peers = open_srv
        .join()
        .map_err(|_| anyhow::anyhow!("open server panicked"))??;
    assert_eq!(peers[0].ip().to_string(), outsider.ip.to_string());
    // 5. Passthrough: client -> a pod outside the mesh goes through ztunnel and
    // leaves with the node's address (replies from non-mesh pods are not
    // guaranteed to pass capture, so the client's is not used).
    let plain = cluster.pod(2, 2);
    let plain_srv = serve(plain, 8083, 1)?;
    assert_eq!(
        exchange(client, SocketAddr::new(plain.ip.into(), 8083))?,
        b"ok"
    );
    let peers = plain_srv
        .join()
        .map_err(|_| anyhow::anyhow!("plain server panicked"))??;
    assert_eq!(
        peers[0].ip().to_string(),
        cluster.node(1).ip.to_string(),
        "passthrough leaves from the node"
    );
    z1.wait_log(
        &format!("dst.addr={}:8083", plain.ip),
        Duration::from_secs(5),
    )?;

    let log = z2.wait_log("dst.workload=demo/open", Duration::from_secs(5))?;
    assert!(
        log.lines()
            .any(|l| l.contains("dst.workload=demo/open") && l.contains("security=none")),
        "{log}"
    );

    // 6. Same node, from outside the mesh: the outsider's plaintext to web
    // (STRICT, on the outsider's own node) never crosses the uplink; it is
    // steered from the outsider's veth to 15006 and refused there...
    let web_strict = serve(web, 8084, 1)?;
    assert_eq!(
        exchange(outsider, SocketAddr::new(web.ip.into(), 8084))?,
        b"",
        "same-node plaintext to a STRICT pod must be refused"
    );
    let log = z1.wait_log(
        "requires mTLS (PeerAuthentication STRICT)",
        Duration::from_secs(5),
    )?;
    assert!(
        log.lines()
            .any(|l| l.contains("requires mTLS") && l.contains(&format!("{}", outsider.ip))),
        "refused by node1's ztunnel for the outsider: {log}"
    );
    // (web was up: the client, in the mesh, gets through.)
    assert_eq!(
        exchange(client, SocketAddr::new(web.ip.into(), 8084))?,
        b"ok"
    );
    web_strict
        .join()
        .map_err(|_| anyhow::anyhow!("web server panicked"))??;
    // ...and to a PERMISSIVE pod on its node it is admitted through 15006,
    // keeping its address, with an access line of node1's ztunnel.
    let client_srv = serve(client, 8085, 1)?;
    assert_eq!(
        exchange(outsider, SocketAddr::new(client.ip.into(), 8085))?,
        b"ok"
    );
    let peers = client_srv
        .join()
        .map_err(|_| anyhow::anyhow!("client server panicked"))??;
    assert_eq!(peers[0].ip().to_string(), outsider.ip.to_string());
    let log = z1.wait_log(
        &format!("dst.addr={}:8085", client.ip),
        Duration::from_secs(5),
    )?;
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("dst.addr={}:8085", client.ip))
                && l.contains("direction=\"inbound\"")
                && l.contains("security=none")),
        "{log}"
    );
    Ok(())
}
