//! Table-driven cases after the Gateway API conformance suite
//! (`conformance/tests/httproute-*`), run against the router directly.

use super::*;
use http::{HeaderValue, Request, Version};
use mesh_core::config::HttpRoute;
use serde::Deserialize;

const WAYPOINT: (&str, &str) = ("infra", "waypoint");

/// Routes from a multi-document YAML stream.
fn routes(yaml: &str) -> Vec<HttpRoute> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| HttpRoute::deserialize(doc).expect("test route YAML"))
        .collect()
}

fn router(yaml: &str) -> Router {
    Router::new(&routes(yaml), WAYPOINT)
}

/// A request: `uri` in origin form (HTTP/1.1, `host` as Host) or absolute
/// form (HTTP/2, host in :authority).
fn req(method: &str, uri: &str, host: Option<&str>, headers: &[(&str, &str)]) -> Parts {
    let mut b = Request::builder().method(method).uri(uri);
    if uri.starts_with("http") {
        b = b.version(Version::HTTP_2);
    }
    if let Some(h) = host {
        b = b.header("host", h);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("test request").into_parts().0
}

fn get(uri: &str) -> Parts {
    req("GET", uri, Some("example.com"), &[])
}

/// What the router does with a request, named like the conformance
/// expectations: the chosen backend's service name, "404" or "none".
fn outcome(r: &Router, service: Option<&str>, port: u16, parts: &Parts) -> String {
    match r.select(service, port, parts) {
        Selection::NoRoutes => "none".into(),
        Selection::NoMatch => "404".into(),
        Selection::Matched(m) => match m.rule.pick_backend() {
            Some(b) => b
                .service()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            None => format!("{}#{}", m.route, m.rule_index),
        },
    }
}

fn check(r: &Router, cases: &[(Parts, &str)]) {
    for (i, (parts, want)) in cases.iter().enumerate() {
        assert_eq!(
            outcome(r, None, 80, parts),
            *want,
            "case {i}: {} {} {:?}",
            parts.method,
            parts.uri,
            parts.headers
        );
    }
}

fn hdr(path: &str, headers: &[(&str, &str)]) -> Parts {
    req("GET", path, Some("example.com"), headers)
}

#[test]
fn matching() {
    let r = router(
        r#"
name: matching
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
  backendRefs: [{name: v2, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            (get("/"), "v1"),
            (get("/example"), "v1"),
            (hdr("/", &[("Version", "one")]), "v1"),
            (get("/v2"), "v2"),
            (get("/v2/example"), "v2"),
            (hdr("/", &[("Version", "two")]), "v2"),
            (get("/v2/"), "v2"),
            (get("/v2example"), "v1"),
            (get("/foo/v2/example"), "v1"),
        ],
    );
}

#[test]
fn matching_across_routes() {
    let r = router(
        r#"
name: matching-part1
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
hostnames: [example.com, example.net]
rules:
- matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
  backendRefs: [{name: v1, port: 8080}]
---
name: matching-part2
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
hostnames: [example.com]
rules:
- matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
  backendRefs: [{name: v2, port: 8080}]
"#,
    );
    let at = |host: &str, path: &str, h: &[(&str, &str)]| req("GET", path, Some(host), h);
    check(
        &r,
        &[
            (at("example.com", "/", &[]), "v1"),
            (at("example.com", "/example", &[]), "v1"),
            (at("example.net", "/example", &[]), "v1"),
            (at("example.com", "/example", &[("Version", "one")]), "v1"),
            (at("example.com", "/v2", &[]), "v2"),
            (at("example.net", "/v2", &[]), "v1"),
            (at("example.com", "/v2/example", &[]), "v2"),
            (at("example.com", "/", &[("Version", "two")]), "v2"),
            // No route names this host: not attached, not a 404.
            (at("example.org", "/", &[]), "none"),
        ],
    );
}

#[test]
fn header_matching() {
    let r = router(
        r#"
name: header-matching
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{headers: [{name: version, value: one}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{headers: [{name: version, value: two}]}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
  backendRefs: [{name: v2, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            (hdr("/", &[("Version", "one")]), "v1"),
            (hdr("/", &[("Version", "two")]), "v2"),
            (hdr("/", &[("Version", "two"), ("Color", "orange")]), "v1"),
            (hdr("/", &[("Version", "two"), ("Color", "blue")]), "v2"),
            (hdr("/", &[("Color", "orange")]), "404"),
            (hdr("/", &[("Some-Other-Header", "one")]), "404"),
            (hdr("/", &[("Color", "blue")]), "v1"),
            (hdr("/", &[("Color", "green")]), "v1"),
            (hdr("/", &[("Color", "red")]), "v2"),
            (hdr("/", &[("Color", "yellow")]), "v2"),
            (hdr("/", &[("Color", "purple")]), "404"),
            // Values compare case-sensitively.
            (hdr("/", &[("Version", "One")]), "404"),
        ],
    );
}

#[test]
fn header_matching_regex_repeats_and_odd_bytes() {
    let r = router(
        r#"
name: header-regex
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{headers: [{type: RegularExpression, name: X-Version, value: "v[0-9]+"}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{headers: [{name: x-list, value: "a,b"}]}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{headers: [{type: RegularExpression, name: cookie, value: ".*session=1.*"}]}]
  backendRefs: [{name: v3, port: 8080}]
- matches:
  # Only the first entry for a name counts.
  - headers: [{name: dup, value: first}, {name: DUP, value: second}]
  backendRefs: [{name: v4, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            (hdr("/", &[("x-version", "v12")]), "v1"),
            // Full match: no partial hits.
            (hdr("/", &[("x-version", "v12-beta")]), "404"),
            (hdr("/", &[("x-version", "xv1")]), "404"),
            // Repeated headers match as their combined value.
            (hdr("/", &[("x-list", "a"), ("x-list", "b")]), "v2"),
            (hdr("/", &[("x-list", "a,b")]), "v2"),
            (hdr("/", &[("x-list", "a"), ("x-list", "c")]), "404"),
            (hdr("/", &[("x-list", "a")]), "404"),
            // HTTP/2 splits cookies; they join with "; ".
            (
                hdr("/", &[("cookie", "a=b"), ("cookie", "session=1")]),
                "v3",
            ),
            (hdr("/", &[("dup", "first")]), "v4"),
            (hdr("/", &[("dup", "second")]), "404"),
        ],
    );
    // Bytes that are not UTF-8 neither match nor panic.
    let mut p = get("/");
    p.headers.insert(
        "x-version",
        HeaderValue::from_bytes(b"v1\xff").expect("obs-text is a valid value"),
    );
    assert_eq!(outcome(&r, None, 80, &p), "404");
}

#[test]
fn query_param_matching() {
    let r = router(
        r#"
name: query-param-matching
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{queryParams: [{name: animal, value: whale}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{queryParams: [{name: animal, value: dolphin}]}]
  backendRefs: [{name: v2, port: 8080}]
- matches:
  - queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]
  - queryParams: [{name: ANIMAL, value: Whale}]
  backendRefs: [{name: v3, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]
  backendRefs: [{name: v2, port: 8080}]
- matches:
  - path: {type: PathPrefix, value: /path2}
    headers: [{name: version, value: two}]
    queryParams: [{name: animal, value: whale}]
  backendRefs: [{name: v3, port: 8080}]
- matches:
  - path: {type: PathPrefix, value: /path3}
    queryParams: [{name: animal, value: shark}]
  - path: {type: PathPrefix, value: /path4}
    headers: [{name: version, value: three}]
    queryParams: [{name: animal, value: kraken}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /path5}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{queryParams: [{name: animal, value: hydra}]}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{headers: [{name: version, value: four}]}]
  backendRefs: [{name: v3, port: 8080}]
- matches: [{queryParams: [{type: RegularExpression, name: id, value: "[0-9]{3}"}]}]
  backendRefs: [{name: v4, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            (get("/?animal=whale"), "v1"),
            (get("/?animal=dolphin"), "v2"),
            (get("/?animal=dolphin&color=blue"), "v3"),
            (get("/?ANIMAL=Whale"), "v3"),
            (get("/?animal=whale&otherparam=irrelevant"), "v1"),
            (get("/?animal=dolphin&color=yellow"), "v2"),
            (get("/?color=blue"), "404"),
            (get("/?animal=dog"), "404"),
            (get("/?animal=whaledolphin"), "404"),
            (get("/"), "404"),
            (get("/path1?animal=whale"), "v1"),
            (hdr("/?animal=whale", &[("version", "one")]), "v2"),
            (hdr("/path2?animal=whale", &[("version", "two")]), "v3"),
            (get("/path3?animal=shark"), "v1"),
            (hdr("/path4?animal=kraken", &[("version", "three")]), "v1"),
            (get("/?animal=shark"), "404"),
            (get("/path4?animal=kraken"), "404"),
            (get("/path5?animal=hydra"), "v1"),
            (hdr("/?animal=hydra", &[("version", "four")]), "v3"),
            // The first occurrence of a repeated parameter decides.
            (get("/?animal=whale&animal=dolphin"), "v1"),
            (get("/?animal=dolphin&animal=whale"), "v2"),
            // Escapes are decoded before comparing.
            (get("/?animal=wh%61le"), "v1"),
            (get("/?id=123"), "v4"),
            (get("/?id=1234"), "404"),
            (get("/?id=%31%32%33"), "v4"),
        ],
    );
}

#[test]
fn method_matching() {
    let r = router(
        r#"
name: method-matching
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{method: POST}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{method: GET}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{headers: [{name: version, value: one}], method: PUT}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /path2}, headers: [{name: version, value: two}], method: POST}]
  backendRefs: [{name: v3, port: 8080}]
- matches:
  - {path: {type: PathPrefix, value: /path3}, method: PATCH}
  - {path: {type: PathPrefix, value: /path4}, headers: [{name: version, value: three}], method: DELETE}
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /path5}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{method: PATCH}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{headers: [{name: version, value: four}]}]
  backendRefs: [{name: v3, port: 8080}]
"#,
    );
    let m =
        |method: &str, path: &str, h: &[(&str, &str)]| req(method, path, Some("example.com"), h);
    check(
        &r,
        &[
            (m("POST", "/", &[]), "v1"),
            (m("GET", "/", &[]), "v2"),
            (m("HEAD", "/", &[]), "404"),
            (m("GET", "/path1", &[]), "v1"),
            (m("PUT", "/", &[("version", "one")]), "v2"),
            (m("POST", "/path2", &[("version", "two")]), "v3"),
            (m("PATCH", "/path3", &[]), "v1"),
            (m("DELETE", "/path4", &[("version", "three")]), "v1"),
            (m("PUT", "/", &[]), "404"),
            (m("DELETE", "/path4", &[]), "404"),
            (m("PATCH", "/path5", &[]), "v1"),
            (m("PATCH", "/", &[("version", "four")]), "v2"),
        ],
    );
}

#[test]
fn path_match_order() {
    let r = router(
        r#"
name: path-matching-order
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: Exact, value: /match}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: Exact, value: /match/exact}}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{path: {type: Exact, value: /match/exact/one}}]
  backendRefs: [{name: v3, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /match/}}]
  backendRefs: [{name: v3, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /match/prefix/}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /match/prefix/one}}]
  backendRefs: [{name: v2, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            (get("/match/exact/one"), "v3"),
            (get("/match/exact"), "v2"),
            (get("/match"), "v1"),
            (get("/match/prefix/one/any"), "v2"),
            (get("/match/prefix/any"), "v1"),
            (get("/match/any"), "v3"),
            // Trailing '/' of a prefix is ignored; elements are whole.
            (get("/match/"), "v3"),
            (get("/match/prefix"), "v1"),
            (get("/matchbox"), "404"),
            (get("/match/exact/"), "v3"),
        ],
    );
}

#[test]
fn regex_paths_full_match_and_rank_below_prefixes() {
    let r = router(
        r#"
name: regex
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: RegularExpression, value: "/api/v[0-9]+/.*"}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /api/v1/admin}}]
  backendRefs: [{name: v2, port: 8080}]
- matches: [{path: {type: RegularExpression, value: "/api/.*"}}]
  backendRefs: [{name: v3, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            (get("/api/v2/users"), "v1"),
            // The query is not part of the path.
            (get("/api/v2/users?x=/y"), "v1"),
            // Istio's order: any PathPrefix before any regex.
            (get("/api/v1/admin/x"), "v2"),
            // Longer pattern first among regexes; full match only.
            (get("/api/vx"), "v3"),
            (get("/x/api/v2/y"), "404"),
        ],
    );
}

#[test]
fn precedence_method_headers_query_then_age_name_rule() {
    let r = router(
        r#"
name: b-young
namespace: infra
creationTimestamp: "2024-05-01T00:00:00Z"
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /same}}]
  backendRefs: [{name: young, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /tie}}]
  backendRefs: [{name: young-tie, port: 8080}]
---
name: z-old
namespace: infra
creationTimestamp: "2024-01-01T00:00:00Z"
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /same}}]
  backendRefs: [{name: old, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /within}}]
  backendRefs: [{name: first-rule, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /within}}]
  backendRefs: [{name: second-rule, port: 8080}]
---
name: a-name
namespace: infra
creationTimestamp: "2024-05-01T02:00:00+02:00"
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /tie}}]
  backendRefs: [{name: alpha-tie, port: 8080}]
---
name: no-stamp
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /same}}]
  backendRefs: [{name: unstamped, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /counts}, queryParams: [{name: q, value: "1"}]}]
  backendRefs: [{name: query, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /counts}, headers: [{name: h, value: "1"}]}]
  backendRefs: [{name: header, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /counts}, headers: [{name: h, value: "1"}, {name: i, value: "1"}]}]
  backendRefs: [{name: two-headers, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /counts}, method: GET}]
  backendRefs: [{name: method, port: 8080}]
"#,
    );
    check(
        &r,
        &[
            // The oldest route wins a tie; one without a stamp is newest.
            (get("/same"), "old"),
            // Same instant (offsets differ): `ns/name` order decides.
            (get("/tie"), "alpha-tie"),
            // Within a route, the first rule.
            (get("/within"), "first-rule"),
            (
                req("POST", "/counts", None, &[("h", "1"), ("i", "1")]),
                "two-headers",
            ),
            (
                req("GET", "/counts", None, &[("h", "1"), ("i", "1")]),
                "method",
            ),
            (req("POST", "/counts?q=1", None, &[("h", "1")]), "header"),
            (req("POST", "/counts?q=1", None, &[]), "query"),
            (req("POST", "/counts", None, &[]), "404"),
        ],
    );
}

#[test]
fn hostnames_rank_before_matches() {
    let r = router(
        r#"
name: catch-all
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: Exact, value: /x}}]
  backendRefs: [{name: any, port: 8080}]
---
name: wildcard
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
hostnames: ["*.example.com"]
rules:
- matches: [{path: {type: PathPrefix, value: /x}}]
  backendRefs: [{name: wild, port: 8080}]
---
name: deeper-wildcard
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
hostnames: ["*.foo.example.com"]
rules:
- backendRefs: [{name: deeper, port: 8080}]
---
name: exact
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
hostnames: [Foo.Example.com]
rules:
- matches: [{path: {type: PathPrefix, value: /}}]
  backendRefs: [{name: exact, port: 8080}]
---
name: other-gateway
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: not-us}]
rules:
- backendRefs: [{name: never, port: 8080}]
"#,
    );
    let at = |host: &str, path: &str| req("GET", path, Some(host), &[]);
    check(
        &r,
        &[
            // An exact hostname beats a more specific path elsewhere.
            (at("foo.example.com", "/x"), "exact"),
            (at("FOO.example.com:8080", "/x"), "exact"),
            (at("foo.example.com.", "/y"), "exact"),
            (at("bar.example.com", "/x"), "wild"),
            (at("a.b.example.com", "/x/y"), "wild"),
            (at("a.foo.example.com", "/x"), "deeper"),
            // `*.example.com` does not cover the apex.
            (at("example.com", "/x"), "any"),
            (at("bar.example.com", "/y"), "404"),
            (at("other.test", "/x"), "any"),
            (at("other.test", "/y"), "404"),
        ],
    );
    // :authority wins over Host (HTTP/2, absolute form).
    let p = req(
        "GET",
        "http://foo.example.com/x",
        Some("bar.example.com"),
        &[],
    );
    assert_eq!(outcome(&r, None, 80, &p), "exact");
}

#[test]
fn service_parents_take_over_from_the_gateway() {
    let r = router(
        r#"
name: gw
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- backendRefs: [{name: from-gateway, port: 8080}]
---
name: reviews
namespace: bookinfo
parents: [{kind: Service, namespace: bookinfo, name: reviews}]
hostnames: [ignored.example]
rules:
- matches: [{path: {type: PathPrefix, value: /v2}}]
  backendRefs: [{name: reviews-v2, port: 9080}]
---
name: ratings-9080
namespace: bookinfo
parents: [{kind: Service, namespace: bookinfo, name: ratings, port: 9080}]
rules:
- backendRefs: [{name: ratings-v2, namespace: other, port: 9080}]
"#,
    );
    let p = get("/v2/x");
    assert_eq!(
        outcome(&r, Some("bookinfo/reviews"), 9080, &p),
        "reviews-v2"
    );
    // Attached by its Service, the route ignores the Gateway's routes...
    assert_eq!(
        outcome(&r, Some("bookinfo/reviews"), 9080, &get("/v1")),
        "404"
    );
    // ...which still serve other destinations and bare workloads.
    assert_eq!(
        outcome(&r, Some("bookinfo/details"), 9080, &p),
        "from-gateway"
    );
    assert_eq!(outcome(&r, None, 9080, &p), "from-gateway");
    // A port-scoped parent attaches on that port only.
    assert_eq!(
        outcome(&r, Some("bookinfo/ratings"), 9080, &p),
        "ratings-v2"
    );
    assert_eq!(
        outcome(&r, Some("bookinfo/ratings"), 9090, &p),
        "from-gateway"
    );
    let Selection::Matched(m) = r.select(Some("bookinfo/ratings"), 9080, &p) else {
        panic!("ratings must match");
    };
    assert_eq!((m.route, m.rule_index), ("bookinfo/ratings-9080", 0));
    let b = m.rule.pick_backend().expect("a backend");
    assert_eq!((b.service(), b.port()), ("other/ratings-v2", 9080));

    assert!(r.has_routes("bookinfo/reviews", 1));

    let gamma_only = router(
        r#"
name: reviews
namespace: bookinfo
parents: [{kind: Service, namespace: bookinfo, name: reviews, port: 9080}]
rules:
- backendRefs: [{name: reviews-v2, port: 9080}]
"#,
    );
    assert!(gamma_only.has_routes("bookinfo/reviews", 9080));
    assert!(!gamma_only.has_routes("bookinfo/reviews", 9081));
    assert!(!gamma_only.has_routes("bookinfo/ratings", 9080));
    assert_eq!(
        outcome(&gamma_only, Some("bookinfo/reviews"), 9081, &p),
        "none"
    );
    assert_eq!(outcome(&gamma_only, None, 9080, &p), "none");
    assert!(!Router::default().has_routes("a/b", 1));
}

fn header_values(h: &http::HeaderMap, name: &str) -> String {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<bytes>"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs select + apply_request; returns the forwarded request or panics.
fn forward(r: &Router, mut parts: Parts) -> Parts {
    let Selection::Matched(m) = r.select(None, 80, &parts) else {
        panic!("{} must match", parts.uri);
    };
    let backend = m.rule.pick_backend();
    match m.rule.apply_request(&m, backend, &mut parts) {
        RequestAction::Forward => parts,
        RequestAction::Respond(resp) => panic!("unexpected response {:?}", resp.status()),
    }
}

const REQUEST_HEADER_MODIFIER: &str = r#"
name: request-header-modifier
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /set}}]
  filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /add}}]
  filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /remove}}]
  filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [X-Header-Remove]}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /multiple}}]
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
      add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, {name: X-Header-Add-3, value: header-add-3}]
      remove: [X-Header-Remove-1, X-Header-Remove-2]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{name: X-Header-Set, value: header-set}]
      add: [{name: X-Header-Add, value: header-add}]
      remove: [X-Header-Remove]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /backend}}]
  filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-order, value: rule}]}}]
  backendRefs:
  - name: v1
    port: 8080
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-order, value: backend}], add: [{name: x-backend, value: v1}]}}]
"#;

#[test]
fn request_header_modifier() {
    let r = router(REQUEST_HEADER_MODIFIER);
    // (path, request headers, expected headers, absent headers)
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a [(&'a str, &'a str)],
        &'a [&'a str],
    );
    let cases: &[Case<'_>] = &[
        (
            "/set",
            &[("Some-Other-Header", "val")],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            &[],
        ),
        (
            "/set",
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "some-other-value"),
            ],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            &[],
        ),
        (
            "/add",
            &[("Some-Other-Header", "val")],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "add-appends-values"),
            ],
            &[],
        ),
        (
            "/add",
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value"),
            ],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value,add-appends-values"),
            ],
            &[],
        ),
        (
            "/remove",
            &[("X-Header-Remove", "val")],
            &[],
            &["X-Header-Remove"],
        ),
        (
            "/multiple",
            &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
            &["X-Header-Remove-1", "X-Header-Remove-2"],
        ),
        (
            "/case-insensitivity",
            &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
            &["x-header-remove"],
        ),
        // The backend's filters run after the rule's.
        (
            "/backend",
            &[],
            &[("x-order", "backend"), ("x-backend", "v1")],
            &[],
        ),
    ];
    for (path, sent, want, absent) in cases {
        let out = forward(&r, hdr(path, sent));
        for (name, value) in *want {
            assert_eq!(header_values(&out.headers, name), *value, "{path}: {name}");
        }
        for name in *absent {
            assert!(
                !out.headers.contains_key(*name),
                "{path}: {name} must be gone"
            );
        }
    }
}

#[test]
fn response_header_modifier() {
    let r = router(
        r#"
name: response-header-modifier
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /multiple}}]
  filters:
  - type: ResponseHeaderModifier
    responseHeaderModifier:
      set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
      add: [{name: X-Header-Add-1, value: header-add-1}, {name: x-HEADER-add-2, value: header-add-2}]
      remove: [X-Header-Remove-1, x-header-REMOVE-2]
  - type: RequestHeaderModifier
    requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}
  backendRefs:
  - name: v1
    port: 8080
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-backend, value: v1}]}}]
"#,
    );
    let parts = get("/multiple");
    let Selection::Matched(m) = r.select(None, 80, &parts) else {
        panic!("must match");
    };
    let backend = m.rule.pick_backend();
    let mut resp = http::Response::builder()
        .header("X-Header-Set-2", "set-val-2")
        .header("X-Header-Add-2", "add-val-2")
        .header("X-Header-Remove-1", "x")
        .header("X-Header-Remove-2", "y")
        .header("Another-Header", "another-header-val")
        .body(())
        .expect("test response")
        .into_parts()
        .0;
    m.rule.apply_response(backend, &mut resp);
    for (name, value) in [
        ("X-Header-Set-1", "header-set-1"),
        ("X-Header-Set-2", "header-set-2"),
        ("X-Header-Add-1", "header-add-1"),
        ("X-Header-Add-2", "add-val-2,header-add-2"),
        ("Another-Header", "another-header-val"),
        ("x-backend", "v1"),
    ] {
        assert_eq!(header_values(&resp.headers, name), value, "{name}");
    }
    assert!(!resp.headers.contains_key("x-header-remove-1"));
    assert!(!resp.headers.contains_key("x-header-remove-2"));
    // Request modifiers do not touch responses.
    assert!(!resp.headers.contains_key("x-header-set"));
}

/// select + apply_request for a redirect: (status, Location).
fn redirect(r: &Router, port: u16, mut parts: Parts) -> (u16, String) {
    let Selection::Matched(m) = r.select(None, port, &parts) else {
        panic!("{} must match", parts.uri);
    };
    assert!(
        m.rule.pick_backend().is_none(),
        "redirect rules have no backends"
    );
    match m.rule.apply_request(&m, None, &mut parts) {
        RequestAction::Respond(resp) => (
            resp.status().as_u16(),
            resp.headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("<none>")
                .to_owned(),
        ),
        RequestAction::Forward => panic!("{} must redirect", parts.uri),
    }
}

#[test]
fn redirect_host_status_and_path() {
    let r = router(
        r#"
name: redirect
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /hostname-redirect}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
- matches: [{path: {type: PathPrefix, value: /host-and-status}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]
- matches: [{path: {type: PathPrefix, value: /original-prefix}}]
  filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
- matches: [{path: {type: PathPrefix, value: /full}}]
  filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}}]
- matches: [{path: {type: PathPrefix, value: /path-and-host}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
- matches: [{path: {type: PathPrefix, value: /path-and-status}}]
  filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]
- matches: [{path: {type: PathPrefix, value: /with-headers}}]
  filters:
  - {type: RequestRedirect, requestRedirect: {hostname: example.org}}
  - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-redirected, value: "yes"}]}}
"#,
    );
    let cases = [
        (
            get("/hostname-redirect"),
            (302, "http://example.org/hostname-redirect"),
        ),
        (
            get("/host-and-status"),
            (301, "http://example.org/host-and-status"),
        ),
        (
            get("/original-prefix/lemon"),
            (302, "http://example.com/replacement-prefix/lemon"),
        ),
        (
            get("/full/path/original"),
            (302, "http://example.com/full-path-replacement"),
        ),
        (
            get("/path-and-host"),
            (302, "http://example.org/replacement-prefix"),
        ),
        (
            get("/path-and-status"),
            (301, "http://example.com/replacement-prefix"),
        ),
        // The query string survives; the request's port does not decide.
        (
            req(
                "GET",
                "/original-prefix/a?b=c",
                Some("example.com:9999"),
                &[],
            ),
            (302, "http://example.com/replacement-prefix/a?b=c"),
        ),
        // No host at all: a relative reference.
        (
            req("GET", "/full", None, &[]),
            (302, "/full-path-replacement"),
        ),
    ];
    for (parts, (status, location)) in cases {
        let uri = parts.uri.clone();
        assert_eq!(
            redirect(&r, 80, parts),
            (status, location.to_owned()),
            "{uri}"
        );
    }
    let mut parts = get("/with-headers");
    let Selection::Matched(m) = r.select(None, 80, &parts) else {
        panic!("must match");
    };
    let RequestAction::Respond(resp) = m.rule.apply_request(&m, None, &mut parts) else {
        panic!("must redirect");
    };
    assert_eq!(header_values(resp.headers(), "x-redirected"), "yes");
}

#[test]
fn redirect_port_and_scheme() {
    let r = router(
        r#"
name: redirect-port-and-scheme
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /scheme-nil-and-port-nil}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
- matches: [{path: {type: PathPrefix, value: /scheme-nil-and-port-80}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, port: 80}}]
- matches: [{path: {type: PathPrefix, value: /scheme-nil-and-port-8080}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, port: 8080}}]
- matches: [{path: {type: PathPrefix, value: /scheme-https-and-port-nil}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, scheme: https}}]
- matches: [{path: {type: PathPrefix, value: /scheme-https-and-port-443}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, scheme: https, port: 443}}]
- matches: [{path: {type: PathPrefix, value: /scheme-https-and-port-8443}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, scheme: https, port: 8443}}]
- matches: [{path: {type: PathPrefix, value: /scheme-http-and-port-nil}}]
  filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, scheme: http}}]
"#,
    );
    // (destination port, path, Location)
    let cases = [
        (
            80,
            "/scheme-nil-and-port-nil",
            "http://example.org/scheme-nil-and-port-nil",
        ),
        (
            80,
            "/scheme-nil-and-port-80",
            "http://example.org/scheme-nil-and-port-80",
        ),
        (
            80,
            "/scheme-nil-and-port-8080",
            "http://example.org:8080/scheme-nil-and-port-8080",
        ),
        (
            80,
            "/scheme-https-and-port-nil",
            "https://example.org/scheme-https-and-port-nil",
        ),
        (
            80,
            "/scheme-https-and-port-443",
            "https://example.org/scheme-https-and-port-443",
        ),
        (
            80,
            "/scheme-https-and-port-8443",
            "https://example.org:8443/scheme-https-and-port-8443",
        ),
        // Listener (destination) port 8080.
        (
            8080,
            "/scheme-nil-and-port-nil",
            "http://example.org:8080/scheme-nil-and-port-nil",
        ),
        (
            8080,
            "/scheme-nil-and-port-80",
            "http://example.org/scheme-nil-and-port-80",
        ),
        (
            8080,
            "/scheme-https-and-port-nil",
            "https://example.org/scheme-https-and-port-nil",
        ),
        (
            8080,
            "/scheme-http-and-port-nil",
            "http://example.org/scheme-http-and-port-nil",
        ),
    ];
    for (port, path, location) in cases {
        assert_eq!(
            redirect(&r, port, get(path)),
            (302, location.to_owned()),
            "{port} {path}"
        );
    }
}

#[test]
fn replace_prefix_match_table() {
    // The table in the Gateway API's HTTPPathModifier docs.
    let cases = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/bar", "/foo", "/", "/bar"),
        ("/x", "/", "/bar", "/bar/x"),
        ("/", "/", "/bar", "/bar"),
    ];
    for (path, prefix, with, want) in cases {
        assert_eq!(
            filters::replace_prefix(path, prefix, with).as_deref(),
            Some(want),
            "{path} {prefix} {with}"
        );
    }
    assert_eq!(filters::replace_prefix("/foobar", "/foo", "/x"), None);
}

#[test]
fn rewrite_path() {
    let r = router(
        r#"
name: rewrite-path
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /prefix/one}}]
  filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
  filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /full/one}}]
  filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}]
  filters:
  - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /test}}}
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{name: X-Header-Set, value: set-overwrites-values}]
      add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
      remove: [X-Header-Remove]
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}]
  filters:
  - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}}
  backendRefs: [{name: v1, port: 8080}]
- matches: [{path: {type: RegularExpression, value: /re/.*}}]
  filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]
  backendRefs: [{name: v1, port: 8080}]
"#,
    );
    let cases = [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
        ("/prefix/one/two?a=b&c", "/one/two?a=b&c"),
        ("/full/one?q=1", "/one?q=1"),
        // A regex match has no prefix to replace: the path stays.
        ("/re/a", "/re/a"),
    ];
    for (path, want) in cases {
        let out = forward(&r, get(path));
        assert_eq!(out.uri.to_string(), want, "{path}");
    }
    let out = forward(
        &r,
        hdr(
            "/full/rewrite-path-and-modify-headers/test",
            &[
                ("X-Header-Remove", "remove-val"),
                ("X-Header-Add-Append", "append-val-1"),
                ("X-Header-Set", "set-val"),
            ],
        ),
    );
    assert_eq!(header_values(&out.headers, "x-header-add"), "header-val-1");
    assert_eq!(
        header_values(&out.headers, "x-header-add-append"),
        "append-val-1,header-val-2"
    );
    assert_eq!(
        header_values(&out.headers, "x-header-set"),
        "set-overwrites-values"
    );
    assert!(!out.headers.contains_key("x-header-remove"));
}

#[test]
fn rewrite_host() {
    let r = router(
        r#"
name: rewrite-host
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
hostnames: [rewrite.example]
rules:
- matches: [{path: {type: PathPrefix, value: /one}}]
  filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]
  backendRefs: [{name: v1, port: 8080}]
- filters: [{type: URLRewrite, urlRewrite: {hostname: example.org}}]
  backendRefs: [{name: v2, port: 8080}]
"#,
    );
    let out = forward(&r, req("GET", "/one", Some("rewrite.example"), &[]));
    assert_eq!(header_values(&out.headers, "host"), "one.example.org");
    assert_eq!(out.uri, "/one");
    let out = forward(
        &r,
        req("GET", "/two?x=1", Some("rewrite.example:8080"), &[]),
    );
    assert_eq!(header_values(&out.headers, "host"), "example.org");
    assert_eq!(out.uri, "/two?x=1");
    // HTTP/2: the authority moves; no Host header appears.
    let out = forward(
        &r,
        req("GET", "http://rewrite.example:8080/one?q", None, &[]),
    );
    assert_eq!(out.uri.to_string(), "http://one.example.org/one?q");
    assert!(!out.headers.contains_key("host"));
}

#[test]
fn weights_split_traffic() {
    let r = router(
        r#"
name: weight
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /split}}]
  backendRefs: [{name: v1, port: 8080, weight: 90}, {name: v2, port: 8080, weight: 10}, {name: v3, port: 8080, weight: 0}]
- matches: [{path: {type: PathPrefix, value: /zero}}]
  backendRefs: [{name: v1, port: 8080, weight: 0}, {name: v2, port: 8080, weight: 0}]
- matches: [{path: {type: PathPrefix, value: /none}}]
"#,
    );
    let Selection::Matched(m) = r.select(None, 80, &get("/split")) else {
        panic!("must match");
    };
    let mut counts = [0u32; 3];
    for _ in 0..2000 {
        match m.rule.pick_backend().map(|b| b.service()) {
            Some("infra/v1") => counts[0] += 1,
            Some("infra/v2") => counts[1] += 1,
            other => panic!("picked {other:?}"),
        }
    }
    // 90/10 within ±5 points of 2000 picks.
    assert!((1700..=1900).contains(&counts[0]), "{counts:?}");
    assert!((100..=300).contains(&counts[1]), "{counts:?}");
    assert_eq!(counts[0] + counts[1], 2000);
    // The draw itself is exact at the boundaries.
    let name = |roll| m.rule.backend_at(roll).map(|b| b.service());
    assert_eq!(
        (name(0), name(89), name(90), name(99), name(100)),
        (
            Some("infra/v1"),
            Some("infra/v1"),
            Some("infra/v2"),
            Some("infra/v2"),
            None
        )
    );
    for path in ["/zero", "/none"] {
        let Selection::Matched(m) = r.select(None, 80, &get(path)) else {
            panic!("{path} must match");
        };
        assert!(m.rule.pick_backend().is_none(), "{path}");
        let mut parts = get(path);
        assert!(matches!(
            m.rule.apply_request(&m, None, &mut parts),
            RequestAction::Forward
        ));
    }
}

#[test]
fn mirrors_timeouts_and_retry() {
    let r = router(
        r#"
name: mirror
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: PathPrefix, value: /m}}]
  filters:
  - {type: RequestMirror, requestMirror: {backendRef: {name: always, port: 8081}}}
  - {type: RequestMirror, requestMirror: {backendRef: {name: never, namespace: other, port: 8082}, percent: 0}}
  - {type: RequestMirror, requestMirror: {backendRef: {name: full, namespace: other, port: 8083}, percent: 100}}
  backendRefs: [{name: v1, port: 8080}]
  timeouts: {request: 2s, backendRequest: 500ms}
  retry: {codes: [503], attempts: 2}
- matches: [{path: {type: PathPrefix, value: /plain}}]
  backendRefs: [{name: v1, port: 8080}]
"#,
    );
    let Selection::Matched(m) = r.select(None, 80, &get("/m")) else {
        panic!("must match");
    };
    for _ in 0..50 {
        assert_eq!(
            m.rule.mirrors(),
            vec![
                ("infra/always".to_owned(), 8081),
                ("other/full".to_owned(), 8083)
            ]
        );
    }
    let t = m.rule.timeouts();
    assert_eq!(t.request.map(|d| d.0.as_millis()), Some(2000));
    assert_eq!(t.backend_request.map(|d| d.0.as_millis()), Some(500));
    assert_eq!(
        m.rule.retry().map(|r| (r.codes.clone(), r.attempts)),
        Some((vec![503], Some(2)))
    );
    // Mirroring leaves the request alone.
    let mut parts = get("/m");
    assert!(matches!(
        m.rule.apply_request(&m, m.rule.pick_backend(), &mut parts),
        RequestAction::Forward
    ));
    assert_eq!(parts.uri, "/m");

    let Selection::Matched(m) = r.select(None, 80, &get("/plain")) else {
        panic!("must match");
    };
    assert!(m.rule.mirrors().is_empty());
    assert_eq!(m.rule.timeouts(), RouteTimeouts::default());
    assert!(m.rule.retry().is_none());
}

#[test]
fn broken_rules_are_skipped_not_fatal() {
    // Built in code: validation would refuse these.
    let routes = routes(
        r#"
name: broken
namespace: infra
parents: [{kind: Gateway, namespace: infra, name: waypoint}]
rules:
- matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
  backendRefs: [{name: bad-regex, port: 8080}]
- matches: [{path: {type: RegularExpression, value: "a)|(b"}}]
  backendRefs: [{name: bad-group, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /filter}}]
  filters: [{type: URLRewrite}]
  backendRefs: [{name: bad-filter, port: 8080}]
- matches: [{headers: [{name: "bad header", value: x}]}]
  backendRefs: [{name: bad-header, port: 8080}]
- matches: [{path: {type: PathPrefix, value: /}}]
  backendRefs: [{name: good, port: 8080}]
"#,
    );
    let r = Router::new(&routes, WAYPOINT);
    check(
        &r,
        &[
            (get("/filter"), "good"),
            (get("/b"), "good"),
            (get("/a)"), "good"),
        ],
    );
    let Selection::Matched(m) = r.select(None, 80, &get("/x")) else {
        panic!("must match");
    };
    // The configured position, not the position among the survivors.
    assert_eq!(m.rule_index, 4);
}

#[test]
fn odd_requests_do_not_panic() {
    let r = router(REQUEST_HEADER_MODIFIER);
    for uri in [
        "*",
        "/%ff%00?%zz=%",
        "/set?&&==&",
        "http://[::1]:8080/set",
        "/add%2F..%2F",
    ] {
        let method = if uri == "*" { "OPTIONS" } else { "GET" };
        let mut parts = req(method, uri, Some("[::1]:80"), &[]);
        parts.headers.insert(
            "x-header-add",
            HeaderValue::from_bytes(b"\xfe\xff").expect("obs-text"),
        );
        if let Selection::Matched(m) = r.select(Some("a/b"), 80, &parts) {
            let _ = m.rule.apply_request(&m, m.rule.pick_backend(), &mut parts);
        }
    }
    assert_eq!(
        matching::request_host(&req("GET", "/", Some("[::1]:80"), &[])),
        Some("[::1]")
    );
    assert_eq!(
        matching::request_host(&req("GET", "/", Some("Example.com:80"), &[])),
        Some("Example.com")
    );
    assert_eq!(matching::request_host(&req("GET", "/", None, &[])), None);
}
