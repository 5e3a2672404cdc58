//! Hostile clients against a real waypoint: malformed HTTP, oversized
//! headers, a slowloris, an HTTP/2 rapid-reset burst. Each gets an error and
//! bounded resources; a well-behaved client keeps being served throughout.

use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::l7::{L7Client, L7Mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until EOF or `limit`, whichever first; returns what arrived.
async fn read_some(io: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

async fn still_served(client: &L7Client, mesh: &L7Mesh) -> anyhow::Result<()> {
    let r = client.get(mesh.addrs.reviews(), "/", &[]).await?;
    anyhow::ensure!(r.status == 200, "a good client was not served: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_errors() -> anyhow::Result<()> {
    let mesh = L7Mesh::start_with("", &["--max-header-bytes", "16384"]).await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();

    let mut io = client.tunnel(t).await?;
    io.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .await?;
    io.flush().await?;
    let answer = read_some(&mut io, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    still_served(&client, &mesh).await?;

    let mut io = client.tunnel(t).await?;
    let big = "a".repeat(64 * 1024);
    io.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await?;
    io.flush().await?;
    let answer = read_some(&mut io, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    still_served(&client, &mesh).await?;
    assert_eq!(mesh.served("reviews-v1") + mesh.served("reviews-v2"), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_cut_off_while_others_are_served() -> anyhow::Result<()> {
    let mesh = L7Mesh::start_with("", &["--header-read-timeout", "1s"]).await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();
    let io = client.tunnel(t).await?;
    let (mut rx, mut tx) = tokio::io::split(io);
    let start = Instant::now();
    tx.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
    tx.flush().await?;
    // Trickle a header byte at a time, never finishing the head, until the
    // waypoint ends the stream (seen as end of input on our side).
    let trickle = async {
        for _ in 0..50 {
            if tx.write_all(b"x").await.is_err() || tx.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let cut_off = async {
        let rest = read_some(&mut rx, Duration::from_secs(6)).await;
        (start.elapsed(), rest)
    };
    let served = async {
        for _ in 0..5 {
            still_served(&client, &mesh).await?;
        }
        anyhow::Ok(())
    };
    let (closed, (), served) = tokio::select! {
        r = async { tokio::join!(cut_off, served) } => (r.0, (), r.1),
        () = trickle => panic!("the slow client was never cut off"),
    };
    served?;
    let (closed_after, rest) = closed;
    assert!(
        closed_after < Duration::from_secs(4),
        "the slow client was not cut off ({closed_after:?}, got {:?})",
        String::from_utf8_lossy(&rest)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_burst_ends_that_connection_only() -> anyhow::Result<()> {
    let mesh = L7Mesh::start("").await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();
    let io = client.tunnel(t).await?;
    let (mut h2, conn) = h2::client::handshake(io).await?;
    let driver = tokio::spawn(conn);
    // Held to the end, so only the server can end the connection.
    let keep = h2.clone();
    let mut sent = 0;
    for i in 0..2000 {
        let req = http::Request::builder()
            .uri(format!("http://reviews/{i}"))
            .header("x-echo-delay-ms", "200")
            .body(())?;
        let ready = match tokio::time::timeout(Duration::from_secs(2), h2.ready()).await {
            Ok(Ok(r)) => r,
            _ => break,
        };
        h2 = ready;
        let Ok((_resp, mut stream)) = h2.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        let _ = stream.send_data(Bytes::new(), true);
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    let outcome = match ended {
        Ok(joined) => joined?,
        Err(_) => panic!("the connection survived {sent} rapid resets"),
    };
    // Ended by the server: GOAWAY, or the tunnel closed under the client
    // while it was still writing. Never a clean end.
    let err = outcome.expect_err("the connection must end in an error, not cleanly");
    mesh.waypoint
        .wait_log("excessive load generating behavior", Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("client saw {err:?} after {sent} resets; {e}"))?;
    drop(keep);
    let backend_work = mesh.served("reviews-v1") + mesh.served("reviews-v2");
    assert!(
        backend_work < 1000,
        "{backend_work} of {sent} reset requests reached a backend"
    );
    still_served(&client, &mesh).await?;
    Ok(())
}

/// A peer may name its client's address (`Forwarded`) only if that address
/// is a workload with the identity it proved: otherwise any certificate
/// holder could pose as any source to L7 policy's ipBlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_source_of_another_identity_is_refused() -> anyhow::Result<()> {
    let mesh = L7Mesh::start("").await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();
    // addrs.other is a workload, but not demo/client's.
    let refused = client.tunnel_from(t, mesh.addrs.other).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("400")),
        "a tunnel claiming another identity's address was accepted"
    );
    // Its own address, and no claim at all, are fine.
    let mut own = client.tunnel_from(t, mesh.addrs.client).await?;
    own.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
        .await?;
    own.flush().await?;
    let answer = read_some(&mut own, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    still_served(&client, &mesh).await?;
    Ok(())
}
