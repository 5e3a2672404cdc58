//! Two ztunnels on loopback: traffic through outbound → HBONE → inbound.

use std::time::Duration;

use e2e::client::socks5_connect;
use e2e::mesh::TwoNodes;
use e2e::process::metric_sum;
use e2e::servers::{self, Checksum, PatternGen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_round_trips_with_matching_checksum() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    // Through the service VIP: exercises VIP → endpoint → target port as well.
    let stream = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.vip_addr()).await?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut gen = PatternGen::new(42);
        let mut sum = Checksum::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < GIB {
            gen.fill(&mut buf);
            sum.update(&buf);
            w.write_all(&buf).await?;
            sent += buf.len() as u64;
        }
        w.shutdown().await?;
        anyhow::Ok(sum.finish())
    });
    let mut sum = Checksum::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
    }
    let sent = writer.await??;
    assert_eq!(sent.1, GIB);
    assert_eq!(sum.finish(), sent, "echoed bytes differ from sent bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_both_ways() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    // Client closes first: the server sees EOF, then still replies.
    let _srv = servers::read_then_reply(mesh.server_addr(), b"bye").await?;
    let mut s = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    s.write_all(b"hello world").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"11:bye");

    // Server closes first: the client sees EOF, then still sends, and the server gets it.
    let addr = std::net::SocketAddr::new(mesh.server, 9001);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.write_all(b"greeting").await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        anyhow::Ok(got)
    });
    let mut c = socks5_connect(mesh.z1.socks5(), mesh.client, addr).await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await??;
    assert_eq!(got, b"greeting");
    c.write_all(b"after-eof").await?;
    c.shutdown().await?;
    let server_got = tokio::time::timeout(Duration::from_secs(10), server).await???;
    assert_eq!(server_got, b"after-eof");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_tunnels_share_pooled_connections() -> anyhow::Result<()> {
    const N: usize = 1000;
    let mesh = TwoNodes::start("[]")?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    let mut tasks = Vec::with_capacity(N);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N + 1));
    for i in 0..N {
        let (proxy, src, dst) = (mesh.z1.socks5(), mesh.client, mesh.server_addr());
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = socks5_connect(proxy, src, dst).await?;
            let msg = format!("tunnel {i}");
            s.write_all(msg.as_bytes()).await?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await?;
            anyhow::ensure!(back == msg.as_bytes(), "tunnel {i} echoed wrong bytes");
            // Hold every tunnel open until all are up, so they are truly concurrent.
            barrier.wait().await;
            barrier.wait().await;
            s.shutdown().await?;
            anyhow::Ok(())
        }));
    }
    tokio::time::timeout(Duration::from_secs(60), barrier.wait()).await?;
    let dump = mesh.z1.config_dump()?;
    let pool = dump["hbonePool"].as_array().cloned().unwrap_or_default();
    let total_streams: u64 = pool
        .iter()
        .map(|p| p["streams"].as_u64().unwrap_or(0))
        .sum();
    let conns: u64 = pool
        .iter()
        .map(|p| p["connections"].as_u64().unwrap_or(0))
        .sum();
    barrier.wait().await;
    for t in tasks {
        t.await??;
    }
    assert_eq!(pool.len(), 1, "one pool key expected: {pool:?}");
    assert_eq!(total_streams, N as u64, "{pool:?}");
    assert!(
        conns <= N.div_ceil(100) as u64,
        "{conns} connections for {N} tunnels"
    );
    assert!(conns >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_labels_and_exact_bytes() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    let _srv = servers::read_then_reply(mesh.server_addr(), b"0123456789").await?;
    let payload = vec![7u8; 12345];
    let mut s = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    s.write_all(&payload).await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    assert_eq!(got, b"12345:0123456789");
    let reply_len = got.len() as f64;

    for (z, reporter) in [(&mesh.z1, "source"), (&mesh.z2, "destination")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "demo"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/demo/sa/client",
            ),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "demo"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/demo/sa/server",
            ),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
        ];
        let text = z
            .wait_for_metric("istio_tcp_connections_closed_total", &labels, 1.0)
            .await?;
        assert_eq!(
            metric_sum(&text, "istio_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}:\n{text}"
        );
        assert_eq!(
            metric_sum(&text, "istio_tcp_received_bytes_total", &labels),
            12345.0,
            "{reporter}:\n{text}"
        );
        assert_eq!(
            metric_sum(&text, "istio_tcp_sent_bytes_total", &labels),
            reply_len,
            "{reporter}:\n{text}"
        );
    }
    let log = mesh
        .z2
        .wait_log("bytes_sent=12345", Duration::from_secs(5))?;
    assert!(
        log.contains("src.identity=spiffe://cluster.local/ns/demo/sa/client"),
        "{log}"
    );
    Ok(())
}
