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
#[derive(Clone, Copy, Debug)]
enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest greeting (2 + 255 methods) and request (4 + 1 + 255 + 2).
const MAX_HANDSHAKE: usize = 2 + 255 + 4 + 1 + 255 + 2;

pub async fn serve_connection(state: Arc<ProxyState>, mut client: TcpStream, peer: SocketAddr) {
    let shake = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut client)).await {
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
    match outbound::establish(&state, peer, shake.target).await {
        Ok((record, mut upstream)) => {
            if reply(&mut client, shake.method_owed, Reply::Succeeded)
                .await
                .is_err()
            {
                return;
            }
            if let Err(e) = upstream.send_early(&shake.early).await {
                tracing::debug!(%peer, "socks5: forwarding early data: {e}");
                return;
            }
            outbound::relay(&state, client, record, upstream, shake.early.len() as u64).await;
        }
        Err(refusal) => {
            let code = if refusal.denied {
                Reply::NotAllowed
            } else {
                Reply::HostUnreachable
            };
            refusal.report(&state);
            let _ = reply(&mut client, shake.method_owed, code).await;
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

/// A finished handshake.
#[derive(Debug)]
struct Handshake {
    target: Target,
    /// The client sent its request without waiting for the method choice,
    /// which then leaves with the reply: one write, one wake-up of the client.
    method_owed: bool,
    /// Bytes the client sent after its request, ahead of the reply; they
    /// belong to the connection.
    early: Vec<u8>,
}

/// Reads the greeting and request with as few reads as the client allows:
/// a client that sends both at once costs one read, not one per field.
async fn handshake(c: &mut TcpStream) -> Result<Handshake, SocksError> {
    let mut buf = [0u8; MAX_HANDSHAKE];
    let mut have = 0;
    let greeting = loop {
        if let Some(g) = parse_greeting(&buf[..have])? {
            break g;
        }
        have += read_more(c, &mut buf[have..]).await?;
    };
    if !greeting.no_auth {
        c.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(SocksError::Protocol(
            "client offers no 'no authentication' method",
        ));
    }
    let mut method_owed = true;
    loop {
        match parse_request(&buf[greeting.len..have]) {
            Ok(Some((target, len))) => {
                return Ok(Handshake {
                    target,
                    method_owed,
                    early: buf[greeting.len + len..have].to_vec(),
                })
            }
            Ok(None) => {}
            Err(refused) => {
                reply(c, method_owed, refused.reply).await?;
                return Err(SocksError::Protocol(refused.why));
            }
        }
        // A client that waits for the method choice before its request.
        if method_owed {
            c.write_all(&[VERSION, NO_AUTH]).await?;
            method_owed = false;
        }
        have += read_more(c, &mut buf[have..]).await?;
    }
}

async fn read_more(c: &mut TcpStream, buf: &mut [u8]) -> Result<usize, SocksError> {
    match c.read(buf).await? {
        0 => Err(SocksError::Protocol("client closed during the handshake")),
        n => Ok(n),
    }
}

struct Greeting {
    len: usize,
    no_auth: bool,
}

/// The method offer (RFC 1928 §3), once all of it has arrived.
fn parse_greeting(b: &[u8]) -> Result<Option<Greeting>, SocksError> {
    let Some(&version) = b.first() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(SocksError::Protocol("not SOCKS version 5"));
    }
    let Some(&count) = b.get(1) else {
        return Ok(None);
    };
    let len = 2 + usize::from(count);
    Ok(b.get(2..len).map(|methods| Greeting {
        len,
        no_auth: methods.contains(&NO_AUTH),
    }))
}

/// A request refused with a SOCKS reply.
#[derive(Debug)]
struct Refused {
    reply: Reply,
    why: &'static str,
}

/// The CONNECT request (RFC 1928 §4) and its length, once all of it has
/// arrived.
fn parse_request(b: &[u8]) -> Result<Option<(Target, usize)>, Refused> {
    let Some(head) = b.get(..4) else {
        return Ok(None);
    };
    if head[0] != VERSION {
        return Err(Refused {
            reply: Reply::GeneralFailure,
            why: "bad request version",
        });
    }
    if head[1] != CMD_CONNECT {
        return Err(Refused {
            reply: Reply::CommandNotSupported,
            why: "only CONNECT is supported",
        });
    }
    let port_at = |end: usize| {
        b.get(end..end + 2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
    };
    let parsed = match head[3] {
        ATYP_V4 => b.get(4..8).zip(port_at(8)).map(|(ip, port)| {
            let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
            (Target::Addr(SocketAddr::new(ip.into(), port)), 10)
        }),
        ATYP_V6 => b.get(4..20).zip(port_at(20)).map(|(ip, port)| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(ip);
            (
                Target::Addr(SocketAddr::new(Ipv6Addr::from(octets).into(), port)),
                22,
            )
        }),
        ATYP_DOMAIN => {
            let Some(&len) = b.get(4) else {
                return Ok(None);
            };
            let end = 5 + usize::from(len);
            match b.get(5..end).zip(port_at(end)) {
                None => None,
                Some((name, port)) => {
                    let Ok(name) = std::str::from_utf8(name) else {
                        return Err(Refused {
                            reply: Reply::GeneralFailure,
                            why: "domain is not UTF-8",
                        });
                    };
                    let target = match name.parse() {
                        Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                        Err(_) => Target::Host(name.to_string(), port),
                    };
                    Some((target, end + 2))
                }
            }
        }
        _ => {
            return Err(Refused {
                reply: Reply::AddressTypeNotSupported,
                why: "unsupported address type",
            })
        }
    };
    Ok(parsed)
}

/// The reply, after the method choice when that is still owed. The bound
/// address is not meaningful for a tunnel: 0.0.0.0:0.
async fn reply(c: &mut TcpStream, method_owed: bool, code: Reply) -> std::io::Result<()> {
    let reply = [VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0];
    if method_owed {
        let mut both = [0u8; 12];
        both[..2].copy_from_slice(&[VERSION, NO_AUTH]);
        both[2..].copy_from_slice(&reply);
        return c.write_all(&both).await;
    }
    c.write_all(&reply).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_waits_for_every_method() {
        assert!(parse_greeting(&[]).unwrap().is_none());
        assert!(parse_greeting(&[5]).unwrap().is_none());
        assert!(parse_greeting(&[5, 2, 0]).unwrap().is_none());
        let g = parse_greeting(&[5, 2, 2, 0, 99]).unwrap().unwrap();
        assert_eq!((g.len, g.no_auth), (4, true));
        let g = parse_greeting(&[5, 1, 2]).unwrap().unwrap();
        assert!(!g.no_auth);
        assert!(parse_greeting(&[4, 1, 0]).is_err());
    }

    fn target(b: &[u8]) -> Option<(String, usize)> {
        parse_request(b).unwrap().map(|(t, n)| (t.to_string(), n))
    }

    #[test]
    fn request_parses_each_address_type_and_waits_for_all_of_it() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 1, 0x1f, 0x90];
        for cut in 0..v4.len() {
            assert_eq!(target(&v4[..cut]), None, "cut at {cut}");
        }
        assert_eq!(target(&v4), Some(("10.0.0.1:8080".into(), 10)));
        // Bytes after the request are the client's data, not the request's.
        let mut more = v4.to_vec();
        more.extend_from_slice(b"GET");
        assert_eq!(target(&more), Some(("10.0.0.1:8080".into(), 10)));

        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(target(&v6[..21]), None);
        assert_eq!(target(&v6), Some(("[::1]:80".into(), 22)));

        let mut name = vec![5, 1, 0, 3, 11];
        name.extend_from_slice(b"example.svc");
        name.extend_from_slice(&[0, 80]);
        assert_eq!(target(&name[..16]), None);
        assert_eq!(target(&name), Some(("example.svc:80".into(), 18)));
        let mut literal = vec![5, 1, 0, 3, 8];
        literal.extend_from_slice(b"10.0.0.2");
        literal.extend_from_slice(&[0, 81]);
        assert_eq!(target(&literal), Some(("10.0.0.2:81".into(), 15)));
    }

    #[test]
    fn request_refusals_carry_their_reply() {
        let code = |b: &[u8]| parse_request(b).unwrap_err().reply as u8;
        assert_eq!(code(&[5, 2, 0, 1]), Reply::CommandNotSupported as u8);
        assert_eq!(code(&[5, 1, 0, 9]), Reply::AddressTypeNotSupported as u8);
        assert_eq!(code(&[4, 1, 0, 1]), Reply::GeneralFailure as u8);
        assert_eq!(
            code(&[5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80]),
            Reply::GeneralFailure as u8
        );
    }
}
