//! SOCKS5 (RFC 1928) outbound for clients without capture: CONNECT only, no auth.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::outbound::{self, Target};
use crate::state::ProxyState;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

#[repr(u8)]
#[derive(Clone, Copy)]
enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve_connection(state: Arc<ProxyState>, mut client: TcpStream, peer: SocketAddr) {
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut client)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(%peer, "socks5 handshake failed: {e}");
            state.metrics.failure("outbound", "socks5_handshake");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "socks5 handshake timed out");
            state.metrics.failure("outbound", "socks5_handshake");
            return;
        }
    };
    match outbound::establish(&state, peer, target).await {
        Ok((record, upstream)) => {
            if reply(&mut client, Reply::Succeeded).await.is_err() {
                return;
            }
            outbound::relay(&state, client, record, upstream).await;
        }
        Err(refusal) => {
            let code = if refusal.denied {
                Reply::NotAllowed
            } else {
                Reply::HostUnreachable
            };
            refusal.report(&state);
            let _ = reply(&mut client, code).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SocksError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(&'static str),
}

async fn handshake(c: &mut TcpStream) -> Result<Target, SocksError> {
    let mut head = [0u8; 2];
    c.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(SocksError::Protocol("not SOCKS version 5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    c.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        c.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(SocksError::Protocol(
            "client offers no 'no authentication' method",
        ));
    }
    c.write_all(&[VERSION, NO_AUTH]).await?;

    let mut req = [0u8; 4];
    c.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(SocksError::Protocol("bad request version"));
    }
    if req[1] != CMD_CONNECT {
        reply(c, Reply::CommandNotSupported).await?;
        return Err(SocksError::Protocol("only CONNECT is supported"));
    }
    let target = match req[3] {
        ATYP_V4 => {
            let mut b = [0u8; 6];
            c.read_exact(&mut b).await?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Target::Addr(SocketAddr::new(ip.into(), u16::from_be_bytes([b[4], b[5]])))
        }
        ATYP_V6 => {
            let mut b = [0u8; 18];
            c.read_exact(&mut b).await?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[16], b[17]]);
            Target::Addr(SocketAddr::new(Ipv6Addr::from(ip).into(), port))
        }
        ATYP_DOMAIN => {
            let len = c.read_u8().await?;
            let mut name = vec![0u8; usize::from(len)];
            c.read_exact(&mut name).await?;
            let port = c.read_u16().await?;
            let name =
                String::from_utf8(name).map_err(|_| SocksError::Protocol("domain is not UTF-8"))?;
            match name.parse() {
                Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                Err(_) => Target::Host(name, port),
            }
        }
        _ => {
            reply(c, Reply::AddressTypeNotSupported).await?;
            return Err(SocksError::Protocol("unsupported address type"));
        }
    };
    Ok(target)
}

async fn reply(c: &mut TcpStream, code: Reply) -> std::io::Result<()> {
    // The bound address is not meaningful for a tunnel; report 0.0.0.0:0.
    let _ = Reply::GeneralFailure;
    c.write_all(&[VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])
        .await
}
