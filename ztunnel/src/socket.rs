//! Listener sockets and original-destination recovery for captured connections.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Binds a TCP listener; with `transparent`, sets IP_TRANSPARENT so the socket
/// can accept connections addressed to any IP steered to it (tc/eBPF or TPROXY).
pub fn bind(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, transparent)?)
}

/// As [`bind`], without needing a runtime (so startup can fail before spawning one).
pub fn bind_std(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // A wildcard [::] listener also takes IPv4 (dual stack).
        socket.set_only_v6(false)?;
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    // Accepted sockets inherit it: no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Accepted connections are handed over only once the client has sent
/// something (`TCP_DEFER_ACCEPT`), for protocols where the client speaks
/// first; one that stays silent for `wait` is handed over anyway.
pub fn defer_accept(listener: &std::net::TcpListener, wait: std::time::Duration) {
    let secs = libc::c_int::try_from(wait.as_secs()).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and a pointer to a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(listener),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("TCP_DEFER_ACCEPT: {}", std::io::Error::last_os_error());
    }
}

/// Whether `dst` is the listener's own address, i.e. the connection was made to
/// the proxy port directly rather than captured on its way elsewhere.
pub fn is_listener_itself(dst: SocketAddr, listen: SocketAddr) -> bool {
    dst.port() == listen.port()
        && (listen.ip().is_unspecified() || canonical(listen).ip() == dst.ip())
}

/// The destination the client originally dialled: `SO_ORIGINAL_DST` when a NAT
/// redirect put it here, otherwise the accepted socket's local address (which
/// *is* the original destination for transparent / `bpf_sk_assign` capture).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    // An IPv4 connection on a dual-stack listener shows an IPv4-mapped local
    // address; its NAT record is the IPv4 one.
    let nat = match canonical(local) {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    match nat.ok().and_then(|a| a.as_socket()) {
        Some(addr) => Ok(canonical(addr)),
        None => Ok(canonical(local)),
    }
}

/// Maps IPv4-mapped IPv6 addresses (from dual-stack listeners) back to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop relies on it instead of a setsockopt per connection.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind_std("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
