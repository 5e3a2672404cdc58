use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;
use std::thread;

use mesh_core::config::HttpDuration;

use super::*;

fn pool(requests: Option<u32>, pending: Option<u32>, connections: Option<u32>) -> ConnectionPool {
    ConnectionPool {
        max_requests: requests,
        max_pending_requests: pending,
        max_connections: connections,
    }
}

fn outlier(consecutive: u32, base_secs: u64, percent: Option<u32>) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: consecutive,
        base_ejection_time: HttpDuration(Duration::from_secs(base_secs)),
        max_ejection_percent: percent,
    }
}

fn limit(max: u32, per_fill: u32, interval_ms: u64) -> LocalRateLimit {
    LocalRateLimit {
        max_tokens: max,
        tokens_per_fill: per_fill,
        fill_interval: HttpDuration(Duration::from_millis(interval_ms)),
    }
}

fn ep(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 8080))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn request_permits_release_on_drop() {
    let b = CircuitBreaker::new(&pool(Some(2), None, None));
    let p1 = b.try_acquire_request();
    let p2 = b.try_acquire_request();
    assert!(p1.is_some() && p2.is_some());
    assert!(
        b.try_acquire_request().is_none(),
        "third is over maxRequests"
    );
    assert_eq!(b.active_requests(), 2);
    drop(p1);
    let p3 = b.try_acquire_request();
    assert!(p3.is_some(), "a slot freed");
    drop((p2, p3));
    assert_eq!(b.active_requests(), 0);
}

#[test]
fn limits_are_independent_unset_is_unlimited_zero_admits_none() {
    let b = CircuitBreaker::new(&pool(None, Some(1), Some(0)));
    let requests: Vec<_> = (0..10_000).map(|_| b.try_acquire_request()).collect();
    assert!(
        requests.iter().all(Option::is_some),
        "no maxRequests: unlimited"
    );
    let pending = b.enter_pending();
    assert!(pending.is_some());
    assert!(b.enter_pending().is_none());
    assert_eq!(b.pending_requests(), 1);
    assert!(b.try_acquire_connection().is_none(), "maxConnections 0");
    assert_eq!(b.limits(), pool(None, Some(1), Some(0)));
}

#[test]
fn lowered_limits_apply_to_new_permits_only() {
    let b = CircuitBreaker::new(&pool(Some(3), None, None));
    let held: Vec<_> = (0..3).filter_map(|_| b.try_acquire_request()).collect();
    b.set_limits(&pool(Some(1), None, None));
    assert!(b.try_acquire_request().is_none());
    drop(held);
    assert!(b.try_acquire_request().is_some());
}

#[test]
fn permits_hold_under_contention() {
    const THREADS: usize = 16;
    const MAX: u32 = 5;
    let b = CircuitBreaker::new(&pool(Some(MAX), None, Some(MAX)));
    let peak = Arc::new(AtomicUsize::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (b, peak, inside, granted, start) = (
                b.clone(),
                peak.clone(),
                inside.clone(),
                granted.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                start.wait();
                for i in 0..2_000 {
                    if let Some(permit) = b.try_acquire_request() {
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        granted.fetch_add(1, Ordering::SeqCst);
                        thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                    }
                    if i % 100 == 0 {
                        // Permits also move between threads.
                        let c = b.try_acquire_connection();
                        thread::spawn(move || drop(c)).join().ok();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().is_ok());
    }
    assert!(peak.load(Ordering::SeqCst) <= MAX as usize);
    assert!(granted.load(Ordering::SeqCst) > 0);
    assert_eq!(b.active_requests(), 0, "every permit released");
    assert_eq!(b.active_connections(), 0);
}

#[test]
fn consecutive_failures_eject_and_success_resets() {
    let d = OutlierDetector::new(outlier(3, 30, Some(100)));
    let t = Instant::now();
    assert_eq!(d.record(ep(1), Outcome::Status(503), 4, t), None);
    assert_eq!(d.record(ep(1), Outcome::Status(500), 4, t), None);
    assert_eq!(
        d.record(ep(1), Outcome::Status(404), 4, t),
        None,
        "a 4xx is a success"
    );
    assert_eq!(d.record(ep(1), Outcome::Status(502), 4, t), None);
    assert_eq!(d.record(ep(1), Outcome::Failure, 4, t), None);
    assert!(!d.is_ejected(ep(1), t));
    assert_eq!(
        d.record(ep(1), Outcome::Failure, 4, t),
        Some(secs(30)),
        "connect failures count as 5xx"
    );
    assert!(d.is_ejected(ep(1), t));
    assert!(d.is_ejected(ep(1), t + secs(29)));
    assert!(!d.is_ejected(ep(1), t + secs(30)), "ejection expires");
    assert!(!d.is_ejected(ep(2), t));
    assert_eq!(Outcome::from(None), Outcome::Failure);
    assert_eq!(Outcome::from(Some(200)), Outcome::Status(200));
    // A success for an endpoint with nothing to remember leaves no state.
    d.record(ep(3), Outcome::Status(200), 4, t);
    assert_eq!(lock(&d.endpoints).len(), 1);
}

#[test]
fn ejections_grow_then_decay() {
    let d = OutlierDetector::new(outlier(1, 10, Some(100)));
    let mut t = Instant::now();
    // Failing again as soon as it is back: 10s, 20s, 30s, ...
    for n in 1..=3u64 {
        assert_eq!(d.record(ep(1), Outcome::Failure, 2, t), Some(secs(10 * n)));
        assert_eq!(
            d.record(ep(1), Outcome::Failure, 2, t + secs(1)),
            None,
            "outcomes while ejected are ignored"
        );
        t += secs(10 * n);
    }
    // Two decay intervals in service take the multiplier from 3 to 1, five
    // more (of which three are spare) to 0.
    t += MULTIPLIER_DECAY_INTERVAL * 2;
    assert_eq!(d.record(ep(1), Outcome::Failure, 2, t), Some(secs(20)));
    t += secs(20) + MULTIPLIER_DECAY_INTERVAL * 5;
    assert_eq!(d.record(ep(1), Outcome::Failure, 2, t), Some(secs(10)));
}

#[test]
fn ejection_time_is_capped() {
    let d = OutlierDetector::new(outlier(1, 120, Some(100)));
    let mut t = Instant::now();
    let mut lengths = vec![];
    for _ in 0..5 {
        let len = d.record(ep(1), Outcome::Failure, 1, t);
        lengths.push(len.map(|l| l.as_secs()));
        t += len.unwrap_or_default();
    }
    assert_eq!(
        lengths,
        [Some(120), Some(240), Some(300), Some(300), Some(300)]
    );
    // A base above the cap is used as is.
    let long = OutlierDetector::new(outlier(1, 600, Some(100)));
    assert_eq!(long.record(ep(1), Outcome::Failure, 1, t), Some(secs(600)));
}

#[test]
fn max_ejection_percent_caps_on_the_total() {
    let t = Instant::now();
    for (percent, endpoints, ejectable) in [
        (Some(50), 4, 2),
        (None, 4, 2),
        (Some(50), 5, 2),
        (Some(10), 5, 1),
        (Some(34), 3, 1),
        (Some(100), 3, 3),
        (Some(0), 3, 0),
    ] {
        let d = OutlierDetector::new(outlier(1, 30, percent));
        let ejected = (1..=endpoints as u8)
            .filter(|&i| d.record(ep(i), Outcome::Failure, endpoints, t).is_some())
            .count();
        assert_eq!(ejected, ejectable, "{percent:?}% of {endpoints}");
        assert_eq!(d.ejected_count(t), ejectable);
    }
    // Once an ejection expires another endpoint may go.
    let d = OutlierDetector::new(outlier(1, 30, Some(50)));
    assert!(d.record(ep(1), Outcome::Failure, 2, t).is_some());
    assert!(d.record(ep(2), Outcome::Failure, 2, t).is_none(), "capped");
    assert!(d.record(ep(2), Outcome::Failure, 2, t + secs(30)).is_some());
}

#[test]
fn state_of_departed_endpoints_is_bounded() {
    let d = OutlierDetector::new(outlier(5, 30, Some(100)));
    let t = Instant::now();
    for i in 0..=255u8 {
        for port in 0..4u16 {
            let addr = SocketAddr::from(([10, 1, 0, i], port));
            d.record(addr, Outcome::Failure, 2, t);
        }
    }
    assert!(lock(&d.endpoints).len() <= 2 * 2 + 16 + 1);
}

#[test]
fn bucket_starts_full_and_refills_in_steps() {
    let b = TokenBucket::new(limit(3, 2, 1000));
    let t = Instant::now();
    assert!((0..3).all(|_| b.try_take(t)), "full at first use");
    assert!(!b.try_take(t));
    assert!(
        !b.try_take(t + Duration::from_millis(999)),
        "no partial fills"
    );
    assert_eq!(b.available(t + secs(1)), 2);
    assert!(b.try_take(t + secs(1)));
    assert_eq!(b.available(t + Duration::from_millis(1500)), 1);
    assert_eq!(b.available(t + secs(2)), 3, "capped at maxTokens");
    assert_eq!(b.available(t + secs(3600)), 3);
    // Time going backwards (a caller's stale `now`) adds nothing.
    assert_eq!(b.available(t), 3);
}

#[test]
fn bucket_rate_over_time() {
    // 10 tokens per 100ms, 10 deep: 100/s sustained, plus the initial 10.
    let b = TokenBucket::new(limit(10, 10, 100));
    let t = Instant::now();
    let taken = (0..10_000u64)
        .filter(|ms| b.try_take(t + Duration::from_micros(ms * 100)))
        .count();
    // Over one second: the initial 10, then 10 at each of 100ms..900ms.
    assert_eq!(taken, 100);
}

fn policy(yaml: &str) -> TrafficPolicy {
    serde_yaml::from_str(yaml).expect("test policy parses")
}

#[test]
fn registry_looks_up_by_service_and_route() {
    let r = Resilience::default();
    r.update(&[
        policy(
            "{name: reviews, namespace: demo, target: {kind: Service, name: reviews},
              connectionPool: {maxRequests: 1},
              outlierDetection: {consecutive5xx: 2, baseEjectionTime: 30s},
              rateLimit: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1s}}",
        ),
        policy(
            "{name: route, namespace: demo, target: {kind: HTTPRoute, name: reviews-v2},
              rateLimit: {maxTokens: 5, tokensPerFill: 1, fillInterval: 1s}}",
        ),
    ]);
    assert!(r.breaker("demo/reviews").is_some());
    assert!(r.breaker("prod/reviews").is_none());
    assert!(r.outliers("demo/reviews").is_some());
    assert!(r.rate_limit(Some("demo/ratings"), None).is_none());

    let t = Instant::now();
    let route = r.rate_limit(Some("demo/reviews"), Some("demo/reviews-v2"));
    assert_eq!(
        route.map(|b| b.settings().max_tokens),
        Some(5),
        "route wins"
    );
    let v1 = r.rate_limit(Some("demo/reviews"), Some("demo/reviews-v1"));
    let v3 = r.rate_limit(Some("demo/reviews"), Some("demo/reviews-v3"));
    let bare = r.rate_limit(Some("demo/reviews"), None);
    let (Some(v1), Some(v3), Some(bare)) = (v1, v3, bare) else {
        panic!("service limit applies to every route");
    };
    assert!(v1.try_take(t) && !v1.try_take(t));
    assert!(v3.try_take(t), "each route has its own bucket");
    assert!(bare.try_take(t), "unrouted requests too");
    let again = r.rate_limit(Some("demo/reviews"), Some("demo/reviews-v1"));
    assert!(
        again.is_some_and(|b| Arc::ptr_eq(&b, &v1)),
        "same bucket next time"
    );
    // A route-targeted limit with no service.
    assert!(r.rate_limit(None, Some("demo/reviews-v2")).is_some());
}

#[test]
fn registry_keeps_state_across_updates() {
    let r = Resilience::default();
    let base = "{name: p, namespace: demo, target: {kind: Service, name: reviews}, \
                connectionPool: {maxRequests: 2}, \
                outlierDetection: {consecutive5xx: 1, baseEjectionTime: 30s}, \
                rateLimit: {maxTokens: 2, tokensPerFill: 1, fillInterval: 1h}}";
    r.update(&[policy(base)]);
    let t = Instant::now();
    let held = r
        .breaker("demo/reviews")
        .and_then(|b| b.try_acquire_request());
    assert!(held.is_some());
    let outliers = r.outliers("demo/reviews");
    assert!(outliers.is_some_and(|o| o.record(ep(1), Outcome::Failure, 2, t).is_some()));
    assert!(r
        .rate_limit(Some("demo/reviews"), None)
        .is_some_and(|b| b.try_take(t) && b.try_take(t)));

    // Unrelated change: everything kept.
    r.update(&[
        policy(base),
        policy("{name: q, namespace: demo, target: {kind: Service, name: other}, connectionPool: {maxRequests: 9}}"),
    ]);
    assert_eq!(
        r.breaker("demo/reviews").map(|b| b.active_requests()),
        Some(1)
    );
    assert!(r
        .outliers("demo/reviews")
        .is_some_and(|o| o.is_ejected(ep(1), t)));
    assert!(r
        .rate_limit(Some("demo/reviews"), None)
        .is_some_and(|b| !b.try_take(t)));

    // Changed settings: the breaker keeps counting held permits under its
    // new limit; outlier state and buckets start over.
    r.update(&[policy(
        "{name: p, namespace: demo, target: {kind: Service, name: reviews}, \
         connectionPool: {maxRequests: 1}, \
         outlierDetection: {consecutive5xx: 2, baseEjectionTime: 30s}, \
         rateLimit: {maxTokens: 3, tokensPerFill: 1, fillInterval: 1h}}",
    )]);
    let b = r.breaker("demo/reviews");
    assert!(b.as_ref().is_some_and(|b| b.active_requests() == 1));
    assert!(b
        .as_ref()
        .is_some_and(|b| b.try_acquire_request().is_none()));
    drop(held);
    assert!(b.is_some_and(|b| b.active_requests() == 0 && b.try_acquire_request().is_some()));
    assert!(r
        .outliers("demo/reviews")
        .is_some_and(|o| !o.is_ejected(ep(1), t)));
    assert!(r
        .rate_limit(Some("demo/reviews"), None)
        .is_some_and(|b| b.available(t) == 3));

    // Removed: gone.
    r.update(&[]);
    assert!(r.breaker("demo/reviews").is_none());
    assert!(r.rate_limit(Some("demo/reviews"), None).is_none());
}

#[test]
fn conflicting_policies_resolve_by_key_per_field() {
    let r = Resilience::default();
    r.update(&[
        policy("{name: b, namespace: demo, target: {kind: Service, name: s}, connectionPool: {maxRequests: 2}, rateLimit: {maxTokens: 7, tokensPerFill: 1, fillInterval: 1s}}"),
        policy("{name: a, namespace: demo, target: {kind: Service, name: s}, connectionPool: {maxRequests: 1}}"),
    ]);
    assert_eq!(
        r.breaker("demo/s").and_then(|b| b.limits().max_requests),
        Some(1)
    );
    assert_eq!(
        r.rate_limit(Some("demo/s"), None)
            .map(|b| b.settings().max_tokens),
        Some(7)
    );
}
