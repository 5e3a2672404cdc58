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
    /// Bumped on every failed dial, with the error kept: callers that waited
    /// behind a failed dial fail with it at once instead of each waiting out
    /// their own connect timeout in turn.
    failed_dials: AtomicU64,
    last_dial_error: Mutex<String>,
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
        // Stamp first, so the reaper never sees an idle connection with the
        // stale stamp from before it got busy.
        *lock(&self.conn.idle_since) = Instant::now();
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
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
            // Never exceed what the peer allows (SETTINGS_MAX_CONCURRENT_STREAMS):
            // h2 would queue the excess streams instead of opening them.
            let max = max.min(conn.client.max_send_streams());
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
        let timeout = self.inner.config.connect_timeout;
        let mut tls = Some(tls);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let slot = self.reserve(&entry, key, &mut tls).await?;
            let opened =
                tokio::time::timeout(timeout, slot.conn.client.open(authority, headers)).await;
            let err = match opened {
                Ok(Ok(tunnel)) => return Ok(PooledTunnel { tunnel, slot }),
                Ok(Err(e)) => e,
                Err(_) => {
                    // A peer that stops answering: retire the connection so new
                    // tunnels do not pile onto it.
                    slot.conn.closed.store(true, Ordering::Release);
                    return Err(HboneError::Timeout(key.dst_addr));
                }
            };
            let retry = match &err {
                HboneError::H2(h2e) => {
                    // GOAWAY (the peer is draining), a dead connection, or a stream
                    // the peer refused unprocessed: stop handing the connection out;
                    // the tunnel never started, so one retry on a fresh one is safe.
                    let dead = h2e.is_go_away()
                        || h2e.is_io()
                        || h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
                    if dead {
                        slot.conn.closed.store(true, Ordering::Release);
                    }
                    dead
                }
                _ => false,
            };
            if !retry || attempt >= 2 {
                return Err(err);
            }
        }
    }

    async fn reserve<F>(
        &self,
        entry: &KeyEntry,
        key: &PoolKey,
        tls: &mut Option<F>,
    ) -> Result<StreamSlot, HboneError>
    where
        F: FnOnce() -> Result<Arc<rustls::ClientConfig>, HboneError>,
    {
        let max = self.inner.config.max_streams;
        if let Some(slot) = entry.try_reserve(max) {
            return Ok(slot);
        }
        let failures_before = entry.failed_dials.load(Ordering::Acquire);
        let _dialing = entry.dial.lock().await;
        if let Some(slot) = entry.try_reserve(max) {
            return Ok(slot);
        }
        if entry.failed_dials.load(Ordering::Acquire) != failures_before {
            let why = lock(&entry.last_dial_error).clone();
            return Err(HboneError::DialFailed(key.dst_addr, why));
        }
        let Some(tls) = tls.take() else {
            return Err(HboneError::DialFailed(
                key.dst_addr,
                "no TLS config for a second dial".into(),
            ));
        };
        let closed = Arc::new(AtomicBool::new(false));
        let on_close = {
            let closed = closed.clone();
            move || closed.store(true, Ordering::Release)
        };
        let cfg = self.inner.config;
        let dialed = match tls() {
            // Boxed: the dial (TCP, TLS and HTTP/2 handshakes) is rare, and
            // inline it would make every tunnel's future, which moves with
            // each await and spawn, several KiB larger.
            Ok(tls) => {
                Box::pin(H2Client::connect(
                    key.dst_addr,
                    tls,
                    cfg.tuning,
                    cfg.connect_timeout,
                    on_close,
                ))
                .await
            }
            Err(e) => Err(e),
        };
        let client = match dialed {
            Ok(c) => c,
            Err(e) => {
                *lock(&entry.last_dial_error) = e.to_string();
                entry.failed_dials.fetch_add(1, Ordering::AcqRel);
                return Err(e);
            }
        };
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
            // Someone between looking the entry up and dialing holds a clone:
            // removing it now would orphan the connection they are about to add.
            if Arc::strong_count(entry) > 1 {
                return true;
            }
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
