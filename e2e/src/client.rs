//! Clients: SOCKS5 through a ztunnel, and a tiny HTTP/1.0 GET for admin ports.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects from `src` (a workload address) through the SOCKS5 listener `proxy`
/// to `target`. Fails with the SOCKS reply code if the proxy refuses.
pub async fn socks5_connect(
    proxy: SocketAddr,
    src: IpAddr,
    target: SocketAddr,
) -> anyhow::Result<TcpStream> {
    socks5(proxy, src, target, false).await
}

/// As [`socks5_connect`], sending the method choice and the request in one
/// write (as latency-minded SOCKS clients do), which saves one round trip.
pub async fn socks5_connect_pipelined(
    proxy: SocketAddr,
    src: IpAddr,
    target: SocketAddr,
) -> anyhow::Result<TcpStream> {
    socks5(proxy, src, target, true).await
}

async fn socks5(
    proxy: SocketAddr,
    src: IpAddr,
    target: SocketAddr,
    pipelined: bool,
) -> anyhow::Result<TcpStream> {
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = sock
        .connect(proxy)
        .await
        .with_context(|| format!("connect {proxy}"))?;
    s.set_nodelay(true)?;
    let mut req = vec![5, 1, 0];
    match target.ip() {
        IpAddr::V4(v4) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    let greeting = [5u8, 1, 0];
    if pipelined {
        let mut both = greeting.to_vec();
        both.extend_from_slice(&req);
        s.write_all(&both).await?;
    } else {
        s.write_all(&greeting).await?;
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await?;
    if m != [5, 0] {
        bail!("socks5 method rejected: {m:?}");
    }
    if !pipelined {
        s.write_all(&req).await?;
    }
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        bail!("socks5 connect refused: reply code {}", reply[1]);
    }
    Ok(s)
}

/// Blocking `GET path` (HTTP/1.0): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad HTTP response")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Opens a tunnel through `proxy` from `src` to an echo server at `dst` and checks
/// one message comes back intact.
pub async fn echo_roundtrip(proxy: SocketAddr, src: IpAddr, dst: SocketAddr) -> anyhow::Result<()> {
    let mut s = socks5_connect(proxy, src, dst).await?;
    let msg = b"ping through the mesh";
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await??;
    anyhow::ensure!(back == msg, "echo returned {back:?}");
    Ok(())
}
