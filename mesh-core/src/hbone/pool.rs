use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};

use super::{H2Client, H2Tuning, HboneError, Tunnel, MAX_STREAMS_PER_CONNECTION};
use crate::identity::Identity;

/// Connections are shared only between tunnels with the same source identity
/// (the client certificate), destination identity (what the server must prove)
/// and destination address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub dst: Identity,
    pub dst_addr: SocketAddr,
}

#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub tuning: H2Tuning,
    pub max_streams: usize,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            tuning: H2Tuning::default(),
            max_streams: MAX_STREAMS_PER_CONNECTION,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Pool of HBONE connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: PoolConfig,
    keys: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct KeyEntry {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Serializes dialing per key, so a burst of tunnels to a new destination
    /// fills one connection before opening the next instead of dialing N times.
    dial: tokio::sync::Mutex<()>,
}

struct PooledConn {
    id: u64,
    client: H2Client,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

/// Holds one stream slot of a pooled connection; released on drop.
pub struct StreamSlot {
    conn: Arc<PooledConn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
        }
    }
}

impl StreamSlot {
    pub fn connection_id(&self) -> u64 {
        self.conn.id
    }
}

/// A tunnel plus the pool slot it occupies; drop both together.
pub struct PooledTunnel {
    pub tunnel: Tunnel,
    pub slot: StreamSlot,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain field update: a poisoned lock still
    // holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyEntry {
    fn try_reserve(&self, max: usize) -> Option<StreamSlot> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        for conn in conns.iter() {
            let mut cur = conn.active.load(Ordering::Acquire);
            while cur < max {
                match conn.active.compare_exchange_weak(
                    cur,
                    cur + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(StreamSlot { conn: conn.clone() }),
                    Err(actual) => cur = actual,
                }
            }
        }
        None
    }
}

impl Pool {
    /// Creates a pool and starts its idle reaper on the current tokio runtime.
    pub fn new(config: PoolConfig) -> Self {
        let pool = Pool {
            inner: Arc::new(PoolInner {
                config,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let period = (config.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.reap_idle();
            }
        });
        pool
    }

    /// Opens a tunnel to `authority` over a pooled connection for `key`, dialing a
    /// new connection (with the TLS config from `tls`) when none has a free slot.
    pub async fn open(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &[(HeaderName, HeaderValue)],
        tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, HboneError>,
    ) -> Result<PooledTunnel, HboneError> {
        let entry = {
            let mut keys = lock(&self.inner.keys);
            keys.entry(key.clone()).or_default().clone()
        };
        let slot = self.reserve(&entry, key, tls).await?;
        match slot.conn.client.open(authority, headers).await {
            Ok(tunnel) => Ok(PooledTunnel { tunnel, slot }),
            Err(e) => {
                if let HboneError::H2(h2e) = &e {
                    // GOAWAY or a dead connection: stop handing it out.
                    if h2e.is_go_away() || h2e.is_io() {
                        slot.conn.closed.store(true, Ordering::Release);
                    }
                }
                Err(e)
            }
        }
    }

    async fn reserve(
        &self,
        entry: &KeyEntry,
        key: &PoolKey,
        tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, HboneError>,
    ) -> Result<StreamSlot, HboneError> {
        let max = self.inner.config.max_streams;
        if let Some(slot) = entry.try_reserve(max) {
            return Ok(slot);
        }
        let _dialing = entry.dial.lock().await;
        if let Some(slot) = entry.try_reserve(max) {
            return Ok(slot);
        }
        let closed = Arc::new(AtomicBool::new(false));
        let on_close = {
            let closed = closed.clone();
            move || closed.store(true, Ordering::Release)
        };
        let cfg = self.inner.config;
        let client = H2Client::connect(
            key.dst_addr,
            tls()?,
            cfg.tuning,
            cfg.connect_timeout,
            on_close,
        )
        .await?;
        let conn = Arc::new(PooledConn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            client,
            active: AtomicUsize::new(1),
            closed,
            idle_since: Mutex::new(Instant::now()),
        });
        lock(&entry.conns).push(conn.clone());
        tracing::debug!(src = %key.src, dst = %key.dst, addr = %key.dst_addr, conn = conn.id, "new hbone connection");
        Ok(StreamSlot { conn })
    }

    /// Live connections per key (for tests, config dump and metrics).
    pub fn connections(&self) -> Vec<(PoolKey, usize, usize)> {
        let keys = lock(&self.inner.keys);
        let mut out: Vec<_> = keys
            .iter()
            .map(|(k, e)| {
                let conns = lock(&e.conns);
                let live: Vec<_> = conns
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .collect();
                let streams = live.iter().map(|c| c.active.load(Ordering::Acquire)).sum();
                (k.clone(), live.len(), streams)
            })
            .collect();
        out.sort_by_key(|e| e.0.dst_addr);
        out
    }
}

impl PoolInner {
    fn reap_idle(&self) {
        let now = Instant::now();
        let mut keys = lock(&self.keys);
        keys.retain(|_, entry| {
            let mut conns = lock(&entry.conns);
            conns.retain(|c| {
                if c.closed.load(Ordering::Acquire) {
                    return false;
                }
                c.active.load(Ordering::Acquire) > 0
                    || now.duration_since(*lock(&c.idle_since)) < self.config.idle_timeout
            });
            // Keep an entry that is mid-dial even if it has no connection yet.
            !conns.is_empty() || entry.dial.try_lock().is_err()
        });
    }
}
