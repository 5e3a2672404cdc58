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
async fn socks5_data_sent_with_the_request_is_not_lost() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    let _srv = servers::read_then_reply(mesh.server_addr(), b"bye").await?;
    // Greeting, request and payload in one write, then EOF: the proxy reads
    // them together and must forward the payload it read with the request.
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::new(mesh.client, 0))?;
    let mut s = sock.connect(mesh.z1.socks5()).await?;
    let std::net::IpAddr::V4(ip) = mesh.server else {
        anyhow::bail!("IPv4 server expected");
    };
    let mut hello = vec![5, 1, 0, 5, 1, 0, 1];
    hello.extend_from_slice(&ip.octets());
    hello.extend_from_slice(&mesh.server_addr().port().to_be_bytes());
    hello.extend_from_slice(b"hello world");
    s.write_all(&hello).await?;
    s.shutdown().await?;
    let mut replies = [0u8; 12];
    s.read_exact(&mut replies).await?;
    assert_eq!(replies[..4], [5, 0, 5, 0], "method choice, then success");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"11:bye");
    mesh.z1.wait_log("bytes_sent=11", Duration::from_secs(5))?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tunnel_does_not_block_others_on_its_connection() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    // Port 9100 accepts and never reads: its tunnel fills every window on the way.
    let stalled_addr = std::net::SocketAddr::new(mesh.server, 9100);
    let stalled_listener = tokio::net::TcpListener::bind(stalled_addr).await?;
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stalled_listener.accept().await {
            held.push(s);
        }
    });
    let _echo = servers::echo(mesh.server_addr()).await?;

    let mut stalled = socks5_connect(mesh.z1.socks5(), mesh.client, stalled_addr).await?;
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 1 << 20];
        let mut written = 0u64;
        // Bounded: stops when blocked for a while or after 64 MiB.
        while written < 64 << 20 {
            match tokio::time::timeout(Duration::from_millis(500), stalled.write_all(&chunk)).await
            {
                Ok(Ok(())) => written += chunk.len() as u64,
                _ => break,
            }
        }
        (written, stalled)
    });
    let (written, _stalled) = writer.await?;
    assert!(
        written < 64 << 20,
        "the stalled tunnel should have stopped accepting data"
    );

    // Same source, destination identity and address: the same pooled connection.
    let mut other = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    let payload = vec![9u8; 8 << 20];
    let t = tokio::time::timeout(Duration::from_secs(20), async {
        let (mut r, mut w) = other.split();
        let send = async {
            w.write_all(&payload).await?;
            w.shutdown().await
        };
        let mut back = Vec::with_capacity(payload.len());
        let recv = r.read_to_end(&mut back);
        let (s, n) = tokio::join!(send, recv);
        s?;
        n?;
        anyhow::Ok(back.len())
    })
    .await??;
    assert_eq!(t, payload.len());
    let dump = mesh.z1.config_dump()?;
    let conns: u64 = dump["hbonePool"].as_array().map_or(0, |p| {
        p.iter()
            .map(|k| k["connections"].as_u64().unwrap_or(0))
            .sum()
    });
    assert_eq!(conns, 1, "both tunnels must share one connection: {dump}");
    Ok(())
}

#[test]
fn admin_changes_log_level_at_runtime() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    let admin = mesh.z1.addr(15000);
    let (status, body) = e2e::client::http_get(admin, "/logging")?;
    assert_eq!((status, body.trim()), (200, "info"));
    let (status, body) = e2e::client::http_request(admin, "POST", "/logging?level=debug")?;
    assert_eq!((status, body.trim()), (200, "debug"));
    let (status, _) = e2e::client::http_request(admin, "POST", "/logging?level=ztunnel=loud")?;
    assert_eq!(status, 400);
    let (_, body) = e2e::client::http_get(admin, "/logging")?;
    assert_eq!(body.trim(), "debug", "a bad filter leaves the current one");
    // GET never changes anything (no cross-site level changes from a browser).
    let (status, body) = e2e::client::http_get(admin, "/logging?level=trace")?;
    assert_eq!((status, body.trim()), (200, "debug"));
    Ok(())
}
