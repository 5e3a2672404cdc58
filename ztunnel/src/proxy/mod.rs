//! The data-plane listeners and what they do with each connection.

pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod record;
pub mod socks5;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::settings::HboneListen;
use crate::socket;
use crate::state::ProxyState;

/// Accepts on `listener` until drain starts, running `handle` per connection
/// under a drain guard.
pub fn spawn_accept_loop<F, Fut>(
    state: Arc<ProxyState>,
    listener: TcpListener,
    name: &'static str,
    handle: F,
) -> JoinHandle<()>
where
    F: Fn(Arc<ProxyState>, TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut drain = state.drain.watch();
    tokio::spawn(async move {
        let local = listener.local_addr().ok();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Some(guard) = state.drain.guard() else { break };
                        // TCP_NODELAY comes from the listener (socket::bind_std).
                        // Boxed where it is made: Tokio moves a task's future
                        // by value (spawn, the task cell, the stage swap at
                        // completion), and so does a wrapping block on its first
                        // poll; a connection's state is kilobytes. Boxed, each
                        // move is a pointer: those copies were 6 % of the
                        // ztunnel's time at a high connection rate.
                        let fut = Box::pin(handle(state.clone(), tcp, socket::canonical(peer)));
                        tokio::spawn(async move {
                            fut.await;
                            drop(guard);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = name, "accept failed: {e}");
                        state.metrics.failure("listener", "accept_failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = drain.changed() => break,
            }
        }
        tracing::info!(listener = name, addr = ?local, "listener closed");
    })
}

/// Plain TCP to TCP with half-close; returns (client→upstream, upstream→client,
/// error). `stop` ends it early with its reason as the error.
pub async fn copy_plain(
    mut client: TcpStream,
    mut upstream: TcpStream,
    stop: impl Future<Output = String>,
) -> (u64, u64, Option<std::io::Error>) {
    let mut up = 0;
    let mut down = 0;
    let result = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let copy = async {
            tokio::try_join!(
                copy_half(&mut cr, &mut uw, &mut up),
                copy_half(&mut ur, &mut cw, &mut down)
            )
        };
        tokio::select! {
            r = copy => r.map(|_| ()),
            why = stop => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why)),
        }
    };
    match result {
        Ok(_) => (up, down, None),
        Err(e) => {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            (up, down, Some(e))
        }
    }
}

/// Resolves, with the reason, once a config change means a connection from
/// `source` (identity and address) to port `port` of the local workload at
/// `dst_ip` is no longer allowed. Established connections are re-checked on
/// every change, as a new one would be; ones still allowed are left alone.
pub async fn revoked(
    state: Arc<ProxyState>,
    dst_ip: IpAddr,
    port: u16,
    source: Option<mesh_core::Identity>,
    source_ip: IpAddr,
) -> String {
    let mut rx = state.watch_mesh();
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let mesh = rx.borrow_and_update().clone();
        let Some(workload) = state.local_workload(&mesh, dst_ip) else {
            return format!("{dst_ip} is no longer a workload on this node");
        };
        if source.is_none() && mesh.mtls_mode(&workload) == mesh_core::config::MtlsMode::Strict {
            return format!("{} now requires mTLS", workload.key());
        }
        let attrs = mesh_core::authz::ConnectionAttributes {
            source: source.as_ref(),
            source_ip,
            destination_port: port,
        };
        let decision = mesh_core::authz::authorize(mesh.policies_for(&workload), &attrs);
        if !decision.is_allowed() {
            return format!("policy changed: {decision}");
        }
    }
}

/// The response flag for a copy that ended with `err`.
pub fn flag_for(err: &Option<std::io::Error>) -> &'static str {
    match err {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => record::flags::RBAC,
        Some(_) => record::flags::RESET,
        None => record::flags::NONE,
    }
}

async fn copy_half<R, W>(r: &mut R, w: &mut W, counter: &mut u64) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        *counter += n as u64;
    }
}

/// Serves HBONE on `listener` (bound at start for `HboneListen::At`), or, in
/// per-workload mode, keeps one listener per local workload address,
/// following config changes.
pub fn run_hbone(
    state: Arc<ProxyState>,
    listener: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    match (&state.settings.hbone_addr, listener) {
        (HboneListen::At(addr), Some(listener)) => {
            let listener = TcpListener::from_std(listener)?;
            tracing::info!(%addr, "hbone listener ready");
            spawn_accept_loop(state, listener, "hbone", inbound::serve_connection);
            Ok(())
        }
        (HboneListen::At(addr), None) => {
            anyhow::bail!("no HBONE listener bound for {addr}")
        }
        (HboneListen::PerWorkload, _) => {
            let mut listeners: HashMap<IpAddr, JoinHandle<()>> = HashMap::new();
            reconcile_per_workload(&state, &mut listeners);
            let mut mesh = state.watch_mesh();
            let mut drain = state.drain.watch();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        changed = mesh.changed() => {
                            if changed.is_err() { break; }
                            reconcile_per_workload(&state, &mut listeners);
                        }
                        _ = drain.changed() => break,
                    }
                }
            });
            Ok(())
        }
    }
}

fn reconcile_per_workload(
    state: &Arc<ProxyState>,
    listeners: &mut HashMap<IpAddr, JoinHandle<()>>,
) {
    let mesh = state.mesh();
    // A waypoint (native tunnel) binds its own <ip>:15008 and terminates its
    // tunnels there; holding that address would keep it from starting.
    let want: Vec<IpAddr> = mesh
        .local_workloads(state.node())
        .filter(|w| !w.workload.native_tunnel)
        .flat_map(|w| w.workload.addresses.iter().copied())
        .collect();
    listeners.retain(|ip, task| {
        let keep = want.contains(ip);
        if !keep {
            task.abort();
            tracing::info!(%ip, "hbone listener removed");
        }
        keep
    });
    for ip in want {
        if listeners.contains_key(&ip) {
            continue;
        }
        let addr = SocketAddr::new(ip, state.settings.hbone_port);
        match socket::bind(addr, false) {
            Ok(l) => {
                tracing::info!(%addr, "hbone listener ready");
                listeners.insert(
                    ip,
                    spawn_accept_loop(state.clone(), l, "hbone", inbound::serve_connection),
                );
            }
            Err(e) => {
                tracing::error!(%addr, "cannot bind hbone listener: {e}");
                state.metrics.failure("listener", "bind_failed");
            }
        }
    }
}
