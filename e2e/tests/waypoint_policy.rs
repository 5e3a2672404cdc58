//! L7 AuthorizationPolicy and resilience (circuit breaking, outlier
//! ejection, local rate limit) in a real waypoint, each under bounded load.

use e2e::l7::{request, L7Mesh};
use e2e::process::metric_sum;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_authorization_allow_deny_and_audit() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(
        r#"httpPolicies:
- name: allow-get
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Allow
  rules:
  - to: [{methods: [GET], paths: ["/reviews/*"]}]
- name: deny-other
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Deny
  rules:
  - from: [{principals: ["cluster.local/ns/other/sa/other"]}]
- name: audit-admin
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Audit
  rules:
  - to: [{paths: ["/reviews/admin*"]}]
"#,
    )
    .await?;
    let client = mesh.client("demo", "client").await?;
    let other = mesh.client("other", "other").await?;
    let t = mesh.addrs.reviews();

    let r = client.get(t, "/reviews/1", &[]).await?;
    assert_eq!(r.status, 200, "GET allowed: {r:?}");
    let r = client
        .send(t, request("POST", t, "/reviews/1", &[]))
        .await?;
    assert_eq!(r.status, 403, "POST denied: {r:?}");
    assert_eq!(&r.body[..], b"RBAC: access denied");
    let r = client.get(t, "/ratings", &[]).await?;
    assert_eq!(r.status, 403, "no ALLOW rule matches the path");
    let r = other.get(t, "/reviews/1", &[]).await?;
    assert_eq!(r.status, 403, "principal DENY: {r:?}");
    // AUDIT never blocks; it is counted.
    let r = client.get(t, "/reviews/admin", &[]).await?;
    assert_eq!(r.status, 200, "{r:?}");
    // Policies on reviews do not touch ratings' own service (no ALLOW there).
    let r = client
        .get(mesh.addrs.service("ratings"), "/anything", &[])
        .await?;
    assert_eq!(r.status, 200, "{r:?}");

    let m = mesh
        .waypoint
        .wait_for_metric(
            "ambit_authorization_decisions_total",
            &[("policy", "demo/deny-other"), ("action", "deny")],
            1.0,
        )
        .await?;
    assert_eq!(
        metric_sum(
            &m,
            "ambit_authorization_decisions_total",
            &[("policy", "demo/audit-admin"), ("action", "audit")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "istio_requests_total", &[("response_code", "403")]),
        3.0,
        "{m}"
    );
    assert_eq!(mesh.served("reviews-v1") + mesh.served("reviews-v2"), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_rejects_beyond_max_requests_and_max_connections() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(
        r#"trafficPolicies:
- name: ratings-limits
  namespace: demo
  target: {kind: Service, name: ratings}
  connectionPool: {maxRequests: 2}
- name: flaky-connections
  namespace: demo
  target: {kind: Service, name: flaky}
  connectionPool: {maxConnections: 1}
"#,
    )
    .await?;
    let client = std::sync::Arc::new(mesh.client("demo", "client").await?);

    // One upstream connection allowed: concurrent requests that would need
    // a second one overflow; sequential ones reuse it.
    let flaky = mesh.addrs.service("flaky");
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get(flaky, "/", &[("x-echo-delay-ms", "500")]).await })
        })
        .collect();
    let mut codes = Vec::new();
    for task in burst {
        codes.push(task.await??.status.as_u16());
    }
    assert!(codes.contains(&200) && codes.contains(&503), "{codes:?}");
    for _ in 0..3 {
        assert_eq!(
            client.get(flaky, "/", &[]).await?.status,
            200,
            "the one connection is reused"
        );
    }

    let t = mesh.addrs.service("ratings");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.get(t, "/", &[("x-echo-delay-ms", "500")]).await
        }));
    }
    let mut ok = 0;
    let mut overflow = 0;
    for task in tasks {
        match task.await??.status.as_u16() {
            200 => ok += 1,
            503 => overflow += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 2, "{ok} served");
    assert!(
        overflow >= 1,
        "some requests must overflow: {ok} ok, {overflow} 503"
    );
    assert_eq!(ok + overflow, 10);
    assert!(mesh.served("ratings") <= 10 - overflow);
    let m = mesh.waypoint.metrics()?;
    let flaky_overflow = codes.iter().filter(|c| **c == 503).count() as u64;
    assert_eq!(
        metric_sum(&m, "istio_requests_total", &[("response_flags", "UO")]),
        (overflow + flaky_overflow) as f64,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_takes_a_failing_endpoint_out() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(
        r#"trafficPolicies:
- name: reviews-outliers
  namespace: demo
  target: {kind: Service, name: reviews}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}
"#,
    )
    .await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();
    let mut h1 = client.http1(t).await?;
    let mut failures = 0;
    for _ in 0..40 {
        // Only reviews-v1 fails (the header names the backend that must).
        let r = h1
            .send(request("GET", t, "/", &[("x-echo-fail-on", "reviews-v1")]))
            .await?;
        if r.status != 200 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "ejected after 3 consecutive 5xx, never tried again"
    );
    assert_eq!(mesh.served("reviews-v1"), 3);
    assert_eq!(mesh.served("reviews-v2"), 37);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limit_answers_429_when_the_bucket_is_empty() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(
        r#"httpRoutes:
- name: limited
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: ratings, port: 9080}]
  rules:
  - backendRefs: [{name: ratings, port: 9080}]
trafficPolicies:
- name: ratings-rate
  namespace: demo
  target: {kind: HTTPRoute, name: limited}
  rateLimit: {maxTokens: 5, tokensPerFill: 1, fillInterval: 60s}
"#,
    )
    .await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.service("ratings");
    let mut h1 = client.http1(t).await?;
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(h1.send(request("GET", t, "/", &[])).await?.status.as_u16());
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 5, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 7, "{codes:?}");
    assert_eq!(mesh.served("ratings"), 5);
    // Another service's traffic is not limited by this route's bucket.
    for _ in 0..8 {
        assert_eq!(
            client.get(mesh.addrs.reviews(), "/", &[]).await?.status,
            200
        );
    }
    Ok(())
}
