//! HTTPRoute behaviour of the waypoint, end to end: a real waypoint process,
//! real HBONE in and out, a real ztunnel in front of the backends. Cases are
//! modelled on the Gateway API conformance tests for HTTPRoute.

use std::time::{Duration, Instant};

use e2e::l7::{request, L7Mesh};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Method, path, headers, and the backend that must serve it.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

fn route(rules: &str) -> String {
    format!(
        r#"httpRoutes:
- name: reviews
  namespace: demo
  parents: [{{kind: Service, namespace: demo, name: reviews, port: 9080}}]
  rules:
{rules}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_routes_requests_reach_the_service_over_http1_and_http2() -> anyhow::Result<()> {
    let mesh = L7Mesh::start("").await?;
    let client = mesh.client("demo", "client").await?;
    let target = mesh.addrs.reviews();
    let mut h1 = client.http1(target).await?;
    let mut h2 = client.http2(target).await?;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..6 {
        let r1 = h1
            .send(request("GET", target, &format!("/h1/{i}"), &[]))
            .await?;
        assert_eq!(r1.status, 200, "{r1:?}");
        assert_eq!(r1.echo()["path"], format!("/h1/{i}"));
        seen.insert(r1.backend());
        let r2 = h2.send(request("GET", target, "/h2", &[])).await?;
        assert_eq!(r2.status, 200, "{r2:?}");
        // The backend speaks HTTP/1.1 and is given a Host header.
        assert_eq!(r2.echo()["host"], "reviews.demo.svc.cluster.local:9080");
        seen.insert(r2.backend());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["reviews-v1", "reviews-v2"],
        "both endpoints of reviews serve"
    );
    let metrics = mesh
        .waypoint
        .wait_for_metric(
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("response_code", "200"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/demo/sa/client",
                ),
                ("destination_service_name", "reviews"),
            ],
            12.0,
        )
        .await?;
    assert!(metrics.contains("request_protocol=\"http2\""), "{metrics}");
    assert!(
        metrics.contains("istio_request_duration_milliseconds_bucket"),
        "{metrics}"
    );
    // One access line per request, with its fields (the log format writes
    // only ztunnel's preformatted lines as they are).
    let log = mesh
        .waypoint
        .wait_log("path=\"/h1/5\"", Duration::from_secs(5))?;
    let line = log
        .lines()
        .find(|l| l.contains(" INFO access: request ") && l.contains("path=\"/h1/5\""))
        .ok_or_else(|| anyhow::anyhow!("no access line for /h1/5:\n{log}"))?;
    for field in [
        "src_identity=spiffe://cluster.local/ns/demo/sa/client",
        "method=GET",
        "status=200",
        "attempts=1",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_follows_gateway_api_precedence() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(&(route(
        r#"  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: Exact, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /ratings}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /ratings/x}, method: POST}]
    backendRefs: [{name: flaky, port: 9080}]
"#,
    ) + r#"- name: ratings
  namespace: demo
  parents: [{kind: Service, namespace: demo, name: ratings}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}, queryParams: [{name: view, value: full}]}]
    backendRefs: [{name: flaky, port: 9080}]
"#))
    .await?;
    let client = mesh.client("demo", "client").await?;
    let target = mesh.addrs.reviews();
    let cases: &[Case] = &[
        ("GET", "/", &[], "reviews-v1"),
        ("GET", "/v2", &[], "reviews-v2"),
        ("GET", "/v2/", &[], "reviews-v1"),
        ("GET", "/other", &[("version", "two")], "reviews-v2"),
        ("GET", "/other", &[("Version", "two")], "reviews-v2"),
        ("GET", "/other", &[("version", "Two")], "reviews-v1"),
        ("GET", "/ratings", &[], "ratings"),
        ("GET", "/ratings/1", &[], "ratings"),
        ("GET", "/ratingsX", &[], "reviews-v1"),
        ("POST", "/ratings/x/1", &[], "flaky"),
        ("GET", "/ratings/x/1", &[], "ratings"),
    ];
    let mut h1 = client.http1(target).await?;
    for (method, path, headers, want) in cases {
        let r = h1.send(request(method, target, path, headers)).await?;
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
        assert_eq!(&r.backend(), want, "{method} {path} {headers:?}");
    }
    // Regular expressions match the whole path; query parameters exactly.
    let ratings = mesh.addrs.service("ratings");
    let mut h1 = client.http1(ratings).await?;
    for (path, want) in [
        ("/items/42?view=full", 200),
        ("/items/42?view=short", 404),
        ("/items/4x?view=full", 404),
        ("/items/42/x?view=full", 404),
    ] {
        let r = h1.send(request("GET", ratings, path, &[])).await?;
        assert_eq!(r.status, want, "{path}: {r:?}");
        if want == 200 {
            assert_eq!(r.backend(), "flaky");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_within_five_percent() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(&route(
        r#"  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    - {name: ratings, port: 9080, weight: 0}
"#,
    ))
    .await?;
    let client = mesh.client("demo", "client").await?;
    let target = mesh.addrs.reviews();
    let mut h1 = client.http1(target).await?;
    let total = 2000;
    for _ in 0..total {
        let r = h1.send(request("GET", target, "/", &[])).await?;
        assert_eq!(r.status, 200);
    }
    let (v1, v2, zero) = (
        mesh.served("reviews-v1"),
        mesh.served("reviews-v2"),
        mesh.served("ratings"),
    );
    assert_eq!(v1 + v2, total, "every request served once");
    assert_eq!(zero, 0, "weight 0 takes nothing");
    let share = v2 as f64 / total as f64;
    assert!(
        (0.05..=0.15).contains(&share),
        "v2 share {share:.3} not within 10% ± 5%"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers_redirects_and_rewrites() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(&route(
        r#"  - matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: set-by-route}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-backend, value: hidden}]
        add: [{name: x-resp-add, value: "1"}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
  - matches: [{path: {type: Exact, value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.com}
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}
    backendRefs: [{name: ratings, port: 9080}]
"#,
    ))
    .await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();

    let r = client
        .get(
            t,
            "/headers",
            &[
                ("x-set", "client"),
                ("x-add", "client"),
                ("x-remove", "gone"),
            ],
        )
        .await?;
    assert_eq!(r.status, 200);
    let h = &r.echo()["headers"];
    assert_eq!(h["x-set"], "set-by-route");
    assert_eq!(h["x-add"], "client,added", "{h}");
    assert!(h.get("x-remove").is_none(), "{h}");
    assert_eq!(r.headers["x-backend"], "hidden");
    assert_eq!(r.headers["x-resp-add"], "1");

    let r = client.get(t, "/old/page?q=1", &[]).await?;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.headers["location"],
        "http://reviews.demo.svc.cluster.local:9080/new/page?q=1"
    );
    let r = client.get(t, "/secure", &[]).await?;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "https://example.com/secure");

    let r = client.get(t, "/api/v1/items?x=1", &[]).await?;
    assert_eq!(r.backend(), "ratings");
    assert_eq!(r.echo()["path"], "/items");
    assert_eq!(r.echo()["query"], "x=1");
    assert_eq!(r.echo()["host"], "internal.example");
    let r = client.get(t, "/api/v1", &[]).await?;
    assert_eq!(r.echo()["path"], "/");
    let r = client.get(t, "/full/a/b", &[]).await?;
    assert_eq!(r.echo()["path"], "/replaced");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_and_retries_stop_at_the_limit() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(&route(
        r#"  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /per-try}}]
    timeouts: {request: 5s, backendRequest: 200ms}
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    retry: {codes: [503], attempts: 2, backoff: 10ms}
    backendRefs: [{name: flaky, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /slow-body}}]
    timeouts: {request: 300ms}
    retry: {codes: [503], attempts: 1}
    backendRefs: [{name: ratings, port: 9080}]
"#,
    ))
    .await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();

    let start = Instant::now();
    let r = client
        .get(t, "/slow", &[("x-echo-delay-ms", "3000")])
        .await?;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "the timeout, not the backend, ended it: {:?}",
        start.elapsed()
    );
    let r = client.get(t, "/slow", &[("x-echo-delay-ms", "10")]).await?;
    assert_eq!(r.status, 200, "within the timeout");
    let r = client
        .get(t, "/per-try", &[("x-echo-delay-ms", "1000")])
        .await?;
    assert_eq!(r.status, 504, "{r:?}");

    // The request timeout covers the body too: a body that never finishes
    // (kept for a retry) ends in 504, not in a held request.
    let mut io = client.tunnel(t).await?;
    let start = Instant::now();
    io.write_all(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await?;
    io.flush().await?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut head)).await??;
    assert_eq!(&head, b"HTTP/1.1 504", "{}", String::from_utf8_lossy(&head));
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );

    // Two failures, two retries allowed: the third attempt succeeds.
    let r = client
        .get(
            t,
            "/flaky",
            &[("x-echo-fail-first", "2"), ("x-echo-key", "recovers")],
        )
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echo()["attempt"], 3);
    // Five failures: three attempts, then the last failure is returned.
    let r = client
        .get(
            t,
            "/flaky",
            &[("x-echo-fail-first", "5"), ("x-echo-key", "gives-up")],
        )
        .await?;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.echo()["attempt"], 3, "1 try + 2 retries, no more");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_copy_requests_and_unknown_backends_answer_500() -> anyhow::Result<()> {
    let mesh = L7Mesh::start(&route(
        r#"  - matches: [{path: {type: PathPrefix, value: /mirrored}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings, port: 9080}}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: no-such-service, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /nowhere}}]
"#,
    ))
    .await?;
    let client = mesh.client("demo", "client").await?;
    let t = mesh.addrs.reviews();
    for _ in 0..5 {
        let r = client.get(t, "/mirrored", &[]).await?;
        assert_eq!(r.backend(), "reviews-v1");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.served("ratings") < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mesh.served("ratings"), 5, "every request mirrored once");
    assert_eq!(client.get(t, "/missing", &[]).await?.status, 500);
    assert_eq!(client.get(t, "/nowhere", &[]).await?.status, 500);
    // Routes attach to reviews: a path no rule matches is a 404.
    assert_eq!(client.get(t, "/elsewhere", &[]).await?.status, 404);
    Ok(())
}
