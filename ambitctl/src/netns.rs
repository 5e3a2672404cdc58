//! TCP connections opened from inside another network namespace.
//!
//! The components of a local (network-namespace) cluster listen on
//! 198.18.0.0/15 addresses that exist only inside their node's or pod's
//! namespace. A socket belongs to the namespace it was created in for its
//! whole life, so the socket is created and connected on a short-lived thread
//! that has entered the namespace, then handed to tokio on the caller's
//! thread. The thread is never reused (not a blocking-pool thread): setns(2)
//! would otherwise leak the namespace into unrelated work.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpStream;

/// `/run/netns/<name>` for a name as `ip netns` knows it; a path is taken as is.
pub fn netns_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    }
}

/// Connects to `addr` from network namespace `netns` (the caller's own when
/// `None`), within `timeout`.
pub async fn connect(
    netns: Option<&str>,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let Some(name) = netns else {
        return tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out after {timeout:?}"))?
            .with_context(|| format!("connecting to {addr}"));
    };
    let path = netns_path(name);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ambitctl-netns".into())
        .spawn(move || {
            let _ = tx.send(connect_in(&path, addr, timeout));
        })
        .context("starting a thread to enter the network namespace")?;
    let std = rx
        .await
        .context("the network namespace thread ended without an answer")?
        .with_context(|| format!("connecting to {addr} in network namespace {name}"))?;
    std.set_nonblocking(true)?;
    Ok(TcpStream::from_std(std)?)
}

/// Runs on a thread of its own: enters the namespace for good, then connects.
fn connect_in(
    path: &std::path::Path,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<std::net::TcpStream> {
    let ns = File::open(path).with_context(|| {
        format!(
            "opening {} (does the namespace exist? reading it needs root)",
            path.display()
        )
    })?;
    // SAFETY: setns(2) with a valid namespace descriptor changes only the
    // calling thread, which is this dedicated one.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::PermissionDenied {
            bail!(
                "entering {}: {err} (a local cluster is reached as root)",
                path.display()
            );
        }
        bail!("entering {}: {err}", path.display());
    }
    Ok(std::net::TcpStream::connect_timeout(&addr, timeout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_in_own_namespace_and_reports_missing_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = connect(None, addr, Duration::from_secs(2)).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), addr);

        let err = connect(
            Some("ambitctl-no-such-namespace"),
            addr,
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/run/netns/ambitctl-no-such-namespace"),
            "{msg}"
        );
    }
}
