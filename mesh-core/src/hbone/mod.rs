//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS (port 15008).
//!
//! * [`client`]: dial an HBONE peer and open CONNECT streams on the connection.
//! * [`pool`]: share connections per (source identity, destination identity,
//!   destination address), at most [`MAX_STREAMS_PER_CONNECTION`] streams each.
//! * [`server`]: accept CONNECT streams on an mTLS connection.
//! * [`io`]: a tunnel as a byte stream, for protocols spoken inside it.
//! * [`tunnel`]: one CONNECT stream and the byte copy between it and a TCP socket.

pub mod client;
pub mod io;
pub mod pool;
pub mod server;
pub mod tunnel;

pub use client::H2Client;
pub use io::TunnelIo;
pub use pool::{Pool, PoolConfig, PoolKey};
pub use server::{serve_connection, IncomingTunnel};
pub use tunnel::{copy_tcp_tunnel, CopyOutcome, Tunnel};

use std::net::SocketAddr;

pub const HBONE_PORT: u16 = 15008;

/// Istio's limit; a new connection is opened once every pooled one carries this many.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

/// rustls reads the socket 4 KiB at a time; a buffer below it turns the several
/// reads per 16 KiB TLS record into one syscall.
pub const SOCKET_READ_BUFFER: usize = 64 * 1024;

/// The transport under HBONE's TLS: a TCP stream with a read buffer.
pub type HboneTransport = tokio::io::BufReader<tokio::net::TcpStream>;

pub fn transport(tcp: tokio::net::TcpStream) -> HboneTransport {
    tokio::io::BufReader::with_capacity(SOCKET_READ_BUFFER, tcp)
}

/// TCP keepalive on tunnel sockets, so a peer that vanished without a FIN (node
/// crash, partition) is noticed in about a minute rather than never.
pub fn set_keepalive(tcp: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}

/// Header carrying the original client address across the tunnel (RFC 7239).
pub const FORWARDED: &str = "forwarded";

/// HTTP/2 flow-control and framing settings, the same on both ends.
///
/// The connection window is the sum of all stream windows, so one stalled stream
/// (a destination that stops reading) can never starve the others sharing its
/// connection: no head-of-line blocking between tunnels.
#[derive(Clone, Copy, Debug)]
pub struct H2Tuning {
    pub stream_window: u32,
    pub max_frame_size: u32,
}

impl Default for H2Tuning {
    fn default() -> Self {
        H2Tuning {
            stream_window: 2 * 1024 * 1024,
            // One frame per 64 KiB read of the tunnel copy. h2 writes a
            // frame at a time and tokio-rustls writes out what each write
            // encrypted, so the frame size bounds the bytes per `writev` (and
            // per wake-up of the peer): a bulk stream took one per 18 KB at
            // 16 KiB frames, one per 32 KB at 64 KiB. Bulk through two
            // ztunnels: 0.28-0.31 of direct at 16 KiB, 0.32-0.36 at 64 KiB
            // (ambit-bench, alternating runs).
            max_frame_size: 64 * 1024,
        }
    }
}

impl H2Tuning {
    pub fn connection_window(&self) -> u32 {
        let total = u64::from(self.stream_window) * MAX_STREAMS_PER_CONNECTION as u64;
        // HTTP/2 windows are at most 2^31 - 1.
        total.min((1u64 << 31) - 1) as u32
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0} failed: {why}", why = crate::tls::describe_io_error(.1))]
    Tls(SocketAddr, std::io::Error),
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    #[error("tunnel refused with status {0}")]
    Status(http::StatusCode),
    #[error("timed out connecting to {0}")]
    Timeout(SocketAddr),
    #[error("connecting to {0} failed just before: {1}")]
    DialFailed(SocketAddr, String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no certificate for {0}")]
    NoCertificate(String),
    #[error("TLS config: {0}")]
    TlsConfig(#[from] rustls::Error),
}

impl HboneError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Connect(..) => "connect_failed",
            HboneError::Tls(..) => "tls_handshake_failed",
            HboneError::H2(_) => "http2_error",
            HboneError::Status(_) => "tunnel_refused",
            HboneError::Timeout(_) => "connect_timeout",
            HboneError::DialFailed(..) => "connect_failed",
            HboneError::BadRequest(_) => "bad_request",
            HboneError::NoCertificate(_) => "no_certificate",
            HboneError::TlsConfig(_) => "tls_config",
        }
    }
}

/// `Forwarded: for=...` value for `addr`'s IP (IPv6 quoted and bracketed per RFC 7239).
pub fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// Parses the first `for=` node of a `Forwarded` header, if it is an IP address.
pub fn parse_forwarded_for(value: &str) -> Option<std::net::IpAddr> {
    let first = value.split(',').next()?;
    for pair in first.split(';') {
        let pair = pair.trim();
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if !k.eq_ignore_ascii_case("for") {
            continue;
        }
        let v = v.trim_matches('"');
        let v = v
            .strip_prefix('[')
            .map_or(v, |s| s.split(']').next().unwrap_or(s));
        return v.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip() {
        for ip in ["198.18.0.1", "2001:2::1"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(
            parse_forwarded_for("proto=http;For=\"[::1]:80\""),
            Some("::1".parse().unwrap())
        );
    }

    #[test]
    fn connection_window_covers_all_streams() {
        let t = H2Tuning::default();
        assert!(t.connection_window() as u64 >= t.stream_window as u64 * 100);
    }
}
