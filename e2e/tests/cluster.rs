//! The netns cluster itself: pods reach pods on their own and other nodes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use e2e::cluster::Cluster;
use e2e::netns::root_or_skip;

#[test]
fn pods_reach_each_other_across_and_within_nodes() -> anyhow::Result<()> {
    if !root_or_skip("pods_reach_each_other_across_and_within_nodes") {
        return Ok(());
    }
    let cluster = Cluster::build(2, 2)?;
    let server = cluster.pod(2, 0);
    let addr = SocketAddr::new(server.ip.into(), 8080);
    let listener = server.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    let accept = std::thread::spawn(move || -> anyhow::Result<Vec<SocketAddr>> {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (mut s, peer) = listener.accept()?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
            peers.push(peer);
        }
        Ok(peers)
    });
    for client in [cluster.pod(1, 0), cluster.pod(2, 1)] {
        client.ns.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.write_all(b"ping")?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b)?;
            anyhow::ensure!(&b == b"ping");
            Ok(())
        })?;
    }
    let peers = accept
        .join()
        .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    let ips: Vec<String> = peers.iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(
        ips,
        ["198.19.1.10", "198.19.2.11"],
        "pods see each other's addresses"
    );
    Ok(())
}
