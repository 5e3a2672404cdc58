//! The netns cluster itself: pods reach pods on their own and other nodes.

use std::net::SocketAddr;

use e2e::cluster::{join_peers, Cluster};
use e2e::netns::root_or_skip;

#[test]
fn pods_reach_each_other_across_and_within_nodes() -> anyhow::Result<()> {
    if !root_or_skip("pods_reach_each_other_across_and_within_nodes") {
        return Ok(());
    }
    let cluster = Cluster::build(2, 2)?;
    let server = cluster.pod(2, 0);
    let addr = SocketAddr::new(server.ip.into(), 8080);
    let accept = server.echo_peers(8080, 2, 4)?;
    for client in [cluster.pod(1, 0), cluster.pod(2, 1)] {
        client.echo_to(addr, b"ping")?;
    }
    let peers = join_peers(accept)?;
    let ips: Vec<String> = peers.iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(
        ips,
        ["198.19.1.10", "198.19.2.11"],
        "pods see each other's addresses"
    );
    Ok(())
}
