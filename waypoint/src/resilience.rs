//! Resilience for the requests a waypoint forwards, from Ambit's
//! `TrafficPolicy`: circuit breaking, outlier ejection and local rate limits,
//! after Envoy's (and so Istio's `DestinationRule`) semantics.
//!
//! * [`CircuitBreaker`] (per Service): limits on requests in flight, requests
//!   waiting and upstream connections; beyond one, the caller answers 503
//!   with response flag `UO`. A limit that is not set is unlimited (Istio's
//!   default, 2³²−1; Envoy's own default of 1024 is not used), and a limit of
//!   0 admits nothing, as in Envoy.
//! * [`OutlierDetector`] (per Service): consecutive-5xx ejection of
//!   endpoints.
//! * [`TokenBucket`] (per HTTPRoute, or per route serving a Service): the
//!   caller answers 429 when it is empty.
//! * [`Resilience`]: the registry the request path reads, rebuilt on every
//!   config change without losing state.
//!
//! Time is always passed in (`now`), so the logic is deterministic to test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use mesh_core::config::{
    ConnectionPool, LocalRateLimit, OutlierDetection, TargetKind, TrafficPolicy,
};

#[cfg(test)]
mod tests;

/// Locks, taking the data of a poisoned lock: every critical section here
/// leaves the state consistent, so a panic elsewhere must not wedge traffic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Circuit breaking

const UNLIMITED: u64 = u64::MAX;

/// Envoy's circuit breaker thresholds for one Service, counted with atomics
/// only (every request takes a permit).
#[derive(Debug)]
pub struct CircuitBreaker {
    max: [AtomicU64; 3],
    active: [AtomicU64; 3],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Request = 0,
    Pending = 1,
    Connection = 2,
}

impl CircuitBreaker {
    pub fn new(limits: &ConnectionPool) -> Arc<Self> {
        let breaker = CircuitBreaker {
            max: Default::default(),
            active: Default::default(),
        };
        breaker.set_limits(limits);
        Arc::new(breaker)
    }

    /// New limits apply to the next acquisitions; permits already held stay
    /// counted, so lowering a limit sheds load as requests finish.
    pub fn set_limits(&self, limits: &ConnectionPool) {
        for (slot, limit) in [
            (Slot::Request, limits.max_requests),
            (Slot::Pending, limits.max_pending_requests),
            (Slot::Connection, limits.max_connections),
        ] {
            self.max[slot as usize].store(limit.map_or(UNLIMITED, u64::from), Ordering::Relaxed);
        }
    }

    pub fn limits(&self) -> ConnectionPool {
        let get = |slot: Slot| {
            let max = self.max[slot as usize].load(Ordering::Relaxed);
            (max != UNLIMITED).then(|| u32::try_from(max).unwrap_or(u32::MAX))
        };
        ConnectionPool {
            max_requests: get(Slot::Request),
            max_pending_requests: get(Slot::Pending),
            max_connections: get(Slot::Connection),
        }
    }

    /// A request in flight to the service (`maxRequests`), held until its
    /// response is complete; `None` when the limit is reached.
    pub fn try_acquire_request(self: &Arc<Self>) -> Option<RequestPermit> {
        self.acquire(Slot::Request)
            .map(|_held| RequestPermit { _held })
    }

    /// A request waiting for a connection or a request slot
    /// (`maxPendingRequests`); `None` when the queue is full.
    pub fn enter_pending(self: &Arc<Self>) -> Option<PendingPermit> {
        self.acquire(Slot::Pending)
            .map(|_held| PendingPermit { _held })
    }

    /// An upstream connection (tunnel) open to the service
    /// (`maxConnections`); `None` when the limit is reached.
    pub fn try_acquire_connection(self: &Arc<Self>) -> Option<ConnectionPermit> {
        self.acquire(Slot::Connection)
            .map(|_held| ConnectionPermit { _held })
    }

    pub fn active_requests(&self) -> u64 {
        self.active[Slot::Request as usize].load(Ordering::Relaxed)
    }

    pub fn pending_requests(&self) -> u64 {
        self.active[Slot::Pending as usize].load(Ordering::Relaxed)
    }

    pub fn active_connections(&self) -> u64 {
        self.active[Slot::Connection as usize].load(Ordering::Relaxed)
    }

    fn acquire(self: &Arc<Self>, slot: Slot) -> Option<Permit> {
        let max = self.max[slot as usize].load(Ordering::Relaxed);
        // A compare-and-swap loop rather than add-then-undo: an add that
        // overshoots would briefly make concurrent callers fail under the
        // limit.
        self.active[slot as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit {
                breaker: Arc::clone(self),
                slot,
            })
    }
}

#[derive(Debug)]
struct Permit {
    breaker: Arc<CircuitBreaker>,
    slot: Slot,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breaker.active[self.slot as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
#[must_use = "the request is counted only while the permit is held"]
pub struct RequestPermit {
    _held: Permit,
}

/// Counts one waiting request until dropped.
#[derive(Debug)]
#[must_use = "the request is counted only while the permit is held"]
pub struct PendingPermit {
    _held: Permit,
}

/// Counts one upstream connection until dropped.
#[derive(Debug)]
#[must_use = "the connection is counted only while the permit is held"]
pub struct ConnectionPermit {
    _held: Permit,
}

// ---------------------------------------------------------------------------
// Outlier ejection

/// Ambit's default `maxEjectionPercent` (the model's; Istio's and Envoy's is
/// 10).
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
/// Envoy's default `max_ejection_time`, which Istio leaves in place: an
/// ejection never lasts longer than this, or than `baseEjectionTime` when
/// that is longer.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Envoy's and Istio's default analysis `interval`: each one an endpoint
/// spends back in service takes one off its ejection multiplier.
pub const MULTIPLIER_DECAY_INTERVAL: Duration = Duration::from_secs(10);

/// How an attempt at an endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response; 500–599 counts as a failure, anything else as a success.
    Status(u16),
    /// No response: connect failure, reset, timeout. Envoy counts these as
    /// 5xx (its default, not splitting local-origin errors).
    Failure,
}

/// `None` is [`Outcome::Failure`]: no response.
impl From<Option<u16>> for Outcome {
    fn from(status: Option<u16>) -> Self {
        status.map_or(Outcome::Failure, Outcome::Status)
    }
}

impl Outcome {
    fn is_failure(self) -> bool {
        match self {
            Outcome::Status(s) => (500..=599).contains(&s),
            Outcome::Failure => true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct EndpointState {
    consecutive_failures: u32,
    /// The ejection multiplier: times ejected, less decay.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// While in service with `ejections > 0`: decay counts from here.
    decay_from: Instant,
}

impl EndpointState {
    fn new(now: Instant) -> Self {
        EndpointState {
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
            decay_from: now,
        }
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    /// Brings an expired ejection back into service and applies the
    /// multiplier decay earned since.
    fn catch_up(&mut self, now: Instant) {
        if let Some(until) = self.ejected_until {
            if until > now {
                return;
            }
            self.ejected_until = None;
            self.decay_from = until;
        }
        if self.ejections == 0 {
            return;
        }
        let elapsed = now.saturating_duration_since(self.decay_from);
        let steps = elapsed.as_nanos() / MULTIPLIER_DECAY_INTERVAL.as_nanos();
        let steps = u32::try_from(steps).unwrap_or(u32::MAX).min(self.ejections);
        self.ejections -= steps;
        self.decay_from += MULTIPLIER_DECAY_INTERVAL * steps;
    }

    fn is_pristine(&self) -> bool {
        self.consecutive_failures == 0 && self.ejections == 0 && self.ejected_until.is_none()
    }
}

/// Consecutive-5xx outlier ejection for one Service's endpoints (Envoy's
/// `consecutive_5xx` detector).
///
/// * After `consecutive5xx` failures in a row an endpoint is ejected for
///   `baseEjectionTime` × the number of times it has been ejected, at most
///   [`MAX_EJECTION_TIME`] (or `baseEjectionTime` if longer). The multiplier
///   drops by one for every [`MULTIPLIER_DECAY_INTERVAL`] the endpoint then
///   stays in service.
/// * Any other outcome resets the count. Outcomes reported while an
///   endpoint is ejected (requests sent before) are ignored.
/// * At most `maxEjectionPercent` of the service's endpoints (as the
///   caller counts them) are ejected at once, rounding down, but always at
///   least one unless the percentage is 0 (Envoy ejects one even then; here
///   0 turns ejection off). As in Envoy, reaching the threshold when the cap
///   is full resets the count: the endpoint must fail as many times again.
/// * Only endpoints with something to remember are tracked.
#[derive(Debug)]
pub struct OutlierDetector {
    settings: OutlierDetection,
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
}

impl OutlierDetector {
    pub fn new(settings: OutlierDetection) -> Self {
        OutlierDetector {
            settings,
            endpoints: Mutex::default(),
        }
    }

    pub fn settings(&self) -> &OutlierDetection {
        &self.settings
    }

    /// Records how an attempt at `endpoint` ended; `endpoint_count` is the
    /// number of endpoints the service has now. Returns the ejection's
    /// length when this outcome ejected the endpoint.
    pub fn record(
        &self,
        endpoint: SocketAddr,
        outcome: impl Into<Outcome>,
        endpoint_count: usize,
        now: Instant,
    ) -> Option<Duration> {
        let outcome = outcome.into();
        let mut endpoints = lock(&self.endpoints);
        if !outcome.is_failure() {
            if let Some(state) = endpoints.get_mut(&endpoint) {
                state.catch_up(now);
                if !state.is_ejected(now) {
                    state.consecutive_failures = 0;
                }
                if state.is_pristine() {
                    endpoints.remove(&endpoint);
                }
            }
            return None;
        }
        if !endpoints.contains_key(&endpoint) && endpoints.len() > 2 * endpoint_count + 16 {
            // Addresses of endpoints long gone: keep what matters, the
            // ejections in force.
            endpoints.retain(|_, s| s.is_ejected(now));
        }
        let threshold = self.settings.consecutive_5xx.max(1);
        let state = endpoints
            .entry(endpoint)
            .or_insert_with(|| EndpointState::new(now));
        state.catch_up(now);
        if state.is_ejected(now) {
            return None;
        }
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if state.consecutive_failures < threshold {
            return None;
        }
        state.consecutive_failures = 0;
        let ejected = endpoints.values().filter(|s| s.is_ejected(now)).count();
        if ejected >= self.max_ejected(endpoint_count) {
            return None;
        }
        let state = endpoints.get_mut(&endpoint)?;
        let base = self.settings.base_ejection_time.0;
        let cap = MAX_EJECTION_TIME.max(base);
        // The multiplier stops growing once the cap is reached (Envoy), so
        // it also decays back in bounded time.
        if base.saturating_mul(state.ejections) < cap {
            state.ejections += 1;
        }
        let duration = base.saturating_mul(state.ejections).min(cap);
        state.ejected_until = Some(now.checked_add(duration)?);
        Some(duration)
    }

    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        lock(&self.endpoints)
            .get(&endpoint)
            .is_some_and(|s| s.is_ejected(now))
    }

    pub fn ejected_count(&self, now: Instant) -> usize {
        lock(&self.endpoints)
            .values()
            .filter(|s| s.is_ejected(now))
            .count()
    }

    fn max_ejected(&self, endpoint_count: usize) -> usize {
        let percent = self
            .settings
            .max_ejection_percent
            .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT)
            .min(100) as usize;
        if percent == 0 {
            return 0;
        }
        (endpoint_count.saturating_mul(percent) / 100).max(1)
    }
}

// ---------------------------------------------------------------------------
// Local rate limit

/// Envoy's local rate limit token bucket: `maxTokens` deep, full at first
/// use, `tokensPerFill` added at the end of every whole `fillInterval`
/// since then (in steps, as Envoy's timer does, not continuously).
#[derive(Debug)]
pub struct TokenBucket {
    settings: LocalRateLimit,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// The first use: fill intervals count from here.
    origin: Option<Instant>,
    tokens: u64,
    /// Fill intervals since `origin` already credited.
    fills: u64,
}

impl TokenBucket {
    pub fn new(settings: LocalRateLimit) -> Self {
        TokenBucket {
            settings,
            state: Mutex::new(BucketState {
                origin: None,
                tokens: u64::from(settings.max_tokens),
                fills: 0,
            }),
        }
    }

    pub fn settings(&self) -> &LocalRateLimit {
        &self.settings
    }

    /// Takes a token; `false` when the bucket is empty.
    pub fn try_take(&self, now: Instant) -> bool {
        let mut state = lock(&self.state);
        self.refill(&mut state, now);
        if state.tokens == 0 {
            return false;
        }
        state.tokens -= 1;
        true
    }

    /// Tokens left at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        let mut state = lock(&self.state);
        self.refill(&mut state, now);
        state.tokens
    }

    fn refill(&self, state: &mut BucketState, now: Instant) {
        let origin = *state.origin.get_or_insert(now);
        // Validation refuses a zero interval; a nanosecond keeps the
        // division defined if one gets here anyway.
        let interval = self.settings.fill_interval.0.as_nanos().max(1);
        let fills = now.saturating_duration_since(origin).as_nanos() / interval;
        let fills = u64::try_from(fills).unwrap_or(u64::MAX);
        if fills <= state.fills {
            return;
        }
        let added = (fills - state.fills).saturating_mul(u64::from(self.settings.tokens_per_fill));
        state.tokens = state
            .tokens
            .saturating_add(added)
            .min(u64::from(self.settings.max_tokens));
        state.fills = fills;
    }
}

// ---------------------------------------------------------------------------
// The registry

/// The resilience state for the current `TrafficPolicy` set, looked up by
/// Service (`ns/name`) and HTTPRoute (`ns/name`).
///
/// [`update`](Self::update) rebuilds the index on every config change and
/// keeps what is still valid: a Service's circuit breaker always (its
/// counters track permits that are still held; new limits apply at once),
/// outlier state and token buckets when their settings did not change (a
/// changed rate limit starts with a full bucket, as Envoy's does).
///
/// When several policies set the same thing for the same target, the one
/// first in `namespace/name` order wins, field by field, so the outcome does
/// not depend on the order the control plane sent them in.
#[derive(Debug, Default)]
pub struct Resilience {
    tables: RwLock<Arc<Tables>>,
    /// Serializes updates: each reads the previous tables to keep state.
    updating: Mutex<()>,
}

#[derive(Debug, Default)]
struct Tables {
    services: HashMap<String, ServiceEntry>,
    routes: HashMap<String, Arc<TokenBucket>>,
}

#[derive(Debug, Default)]
struct ServiceEntry {
    breaker: Option<Arc<CircuitBreaker>>,
    outliers: Option<Arc<OutlierDetector>>,
    rate_limit: Option<Arc<RouteBuckets>>,
}

/// A Service-targeted rate limit: one bucket per route serving the
/// service, created at the route's first request.
#[derive(Debug)]
struct RouteBuckets {
    settings: LocalRateLimit,
    /// By route key; `""` for requests no route matched.
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
}

#[derive(Default)]
struct Chosen {
    pool: Option<ConnectionPool>,
    outliers: Option<OutlierDetection>,
    rate_limit: Option<LocalRateLimit>,
}

impl Resilience {
    pub fn update(&self, policies: &[TrafficPolicy]) {
        let _updating = lock(&self.updating);
        let mut sorted: Vec<&TrafficPolicy> = policies.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut services: HashMap<String, Chosen> = HashMap::new();
        let mut routes: HashMap<String, LocalRateLimit> = HashMap::new();
        for p in sorted {
            let key = format!("{}/{}", p.namespace, p.target.name);
            match p.target.kind {
                TargetKind::Service => {
                    let c = services.entry(key).or_default();
                    c.pool = c.pool.or(p.connection_pool);
                    c.outliers = c.outliers.or(p.outlier_detection);
                    c.rate_limit = c.rate_limit.or(p.rate_limit);
                }
                TargetKind::HttpRoute => {
                    if let Some(r) = p.rate_limit {
                        routes.entry(key).or_insert(r);
                    }
                }
                // Refused by validation: a waypoint-wide policy has no
                // meaning here.
                TargetKind::Gateway | TargetKind::GatewayClass => {}
            }
        }

        let old = self.snapshot();
        let mut tables = Tables::default();
        for (key, chosen) in services {
            let was = old.services.get(&key);
            let breaker = chosen
                .pool
                .map(|pool| match was.and_then(|w| w.breaker.clone()) {
                    Some(b) => {
                        b.set_limits(&pool);
                        b
                    }
                    None => CircuitBreaker::new(&pool),
                });
            let outliers = chosen.outliers.map(|settings| {
                was.and_then(|w| w.outliers.clone())
                    .filter(|o| o.settings == settings)
                    .unwrap_or_else(|| Arc::new(OutlierDetector::new(settings)))
            });
            let rate_limit = chosen.rate_limit.map(|settings| {
                was.and_then(|w| w.rate_limit.clone())
                    .filter(|r| r.settings == settings)
                    .unwrap_or_else(|| {
                        Arc::new(RouteBuckets {
                            settings,
                            buckets: Mutex::default(),
                        })
                    })
            });
            if breaker.is_some() || outliers.is_some() || rate_limit.is_some() {
                let entry = ServiceEntry {
                    breaker,
                    outliers,
                    rate_limit,
                };
                tables.services.insert(key, entry);
            }
        }
        for (key, settings) in routes {
            let bucket = old
                .routes
                .get(&key)
                .filter(|b| b.settings == settings)
                .cloned()
                .unwrap_or_else(|| Arc::new(TokenBucket::new(settings)));
            tables.routes.insert(key, bucket);
        }
        *self.tables.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tables);
    }

    pub fn breaker(&self, service: &str) -> Option<Arc<CircuitBreaker>> {
        self.read(|t| t.services.get(service)?.breaker.clone())
    }

    pub fn outliers(&self, service: &str) -> Option<Arc<OutlierDetector>> {
        self.read(|t| t.services.get(service)?.outliers.clone())
    }

    /// The bucket a request takes a token from: its HTTPRoute's own limit if
    /// the route has one, else its Service's limit, where every route
    /// serving the service (and requests no route matched, together) gets a
    /// bucket of its own, so one busy route cannot starve the others.
    pub fn rate_limit(
        &self,
        service: Option<&str>,
        route: Option<&str>,
    ) -> Option<Arc<TokenBucket>> {
        self.read(|t| {
            if let Some(bucket) = route.and_then(|r| t.routes.get(r)) {
                return Some(bucket.clone());
            }
            let limit = t.services.get(service?)?.rate_limit.as_ref()?;
            let route = route.unwrap_or("");
            let mut buckets = lock(&limit.buckets);
            if let Some(bucket) = buckets.get(route) {
                return Some(bucket.clone());
            }
            let bucket = Arc::new(TokenBucket::new(limit.settings));
            buckets.insert(route.to_string(), bucket.clone());
            Some(bucket)
        })
    }

    fn snapshot(&self) -> Arc<Tables> {
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn read<T>(&self, f: impl FnOnce(&Tables) -> Option<T>) -> Option<T> {
        f(&self.tables.read().unwrap_or_else(|e| e.into_inner()))
    }
}
