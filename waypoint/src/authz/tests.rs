use super::*;

fn policies(yaml: &str) -> Vec<HttpPolicy> {
    serde_yaml::from_str(yaml).expect("test policies parse")
}

fn id(s: &str) -> Identity {
    s.parse().expect("test identity parses")
}

/// One request; `host` and `headers` default to something bland.
struct Req {
    source: Option<Identity>,
    ip: &'static str,
    port: u16,
    method: Method,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
}

impl Req {
    fn new(method: &str, path: &'static str) -> Self {
        Req {
            source: Some(id("spiffe://cluster.local/ns/demo/sa/sleep")),
            ip: "10.0.0.9",
            port: 8080,
            method: Method::from_bytes(method.as_bytes()).expect("test method"),
            path,
            host: "reviews.demo.svc.cluster.local:8080",
            headers: HeaderMap::new(),
        }
    }
    fn from(mut self, source: Option<&str>) -> Self {
        self.source = source.map(id);
        self
    }
    fn host(mut self, host: &'static str) -> Self {
        self.host = host;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.ip = ip;
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers
            .append(name, http::HeaderValue::from_static(value));
        self
    }
    fn decide(&self, policies: &[HttpPolicy]) -> L7Decision {
        let refs: Vec<&HttpPolicy> = policies.iter().collect();
        let attrs = RequestAttributes {
            source: self.source.as_ref(),
            source_ip: self.ip.parse().expect("test ip"),
            destination_port: self.port,
            method: &self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
        };
        authorize(&refs, &attrs)
    }
}

fn allow() -> L7Decision {
    L7Decision::Allow { audited: vec![] }
}

fn deny(policy: &str) -> L7Decision {
    L7Decision::Deny {
        policy: policy.into(),
        audited: vec![],
    }
}

/// Runs a table: each row is a request, the decision expected and a label.
fn check(policies: &[HttpPolicy], table: Vec<(Req, L7Decision, &str)>) {
    for (req, want, what) in table {
        assert_eq!(req.decide(policies), want, "{what}");
    }
}

#[test]
fn methods_on_the_same_path() {
    let ps = policies(
        r#"
- name: get-only
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Allow
  rules: [{to: [{methods: [GET], paths: [/api/*]}]}]
"#,
    );
    check(
        &ps,
        vec![
            (Req::new("GET", "/api/v1"), allow(), "GET allowed"),
            (Req::new("POST", "/api/v1"), deny(""), "POST not allowed"),
            (
                Req::new("get", "/api/v1"),
                deny(""),
                "methods are case-sensitive",
            ),
            (Req::new("GET", "/other"), deny(""), "other path"),
        ],
    );
}

#[test]
fn principal_deny_beats_allow() {
    let ps = policies(
        r#"
- name: allow-all
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Allow
  rules: [{}]
- name: no-sleep-writes
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Deny
  rules:
  - from: [{principals: ["cluster.local/ns/demo/sa/sleep"]}]
    to: [{notMethods: [GET, HEAD]}]
- name: no-plaintext
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Deny
  rules: [{from: [{notPrincipals: ["*"]}]}]
- name: no-legacy-ns
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Deny
  rules: [{from: [{namespaces: ["legacy-*"]}]}]
"#,
    );
    let other = Some("spiffe://cluster.local/ns/web/sa/front");
    check(
        &ps,
        vec![
            (Req::new("GET", "/"), allow(), "sleep may read"),
            (
                Req::new("DELETE", "/x"),
                deny("demo/no-sleep-writes"),
                "sleep may not write",
            ),
            (
                Req::new("DELETE", "/x").from(other),
                allow(),
                "others may write",
            ),
            (
                Req::new("GET", "/").from(None),
                deny("demo/no-plaintext"),
                "plaintext",
            ),
            (
                Req::new("GET", "/").from(Some("spiffe://cluster.local/ns/legacy-a/sa/x")),
                deny("demo/no-legacy-ns"),
                "namespace wildcard",
            ),
        ],
    );
}

#[test]
fn audit_reports_without_blocking() {
    let ps = policies(
        r#"
- name: audit-admin
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Audit
  rules: [{to: [{paths: ["/admin*"]}]}]
- name: deny-delete
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Deny
  rules: [{to: [{methods: [DELETE]}]}]
"#,
    );
    let audited = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    check(
        &ps,
        vec![
            (
                Req::new("GET", "/admin/users"),
                L7Decision::Allow {
                    audited: audited(&["demo/audit-admin"]),
                },
                "audited, allowed",
            ),
            (
                Req::new("DELETE", "/admin/users"),
                L7Decision::Deny {
                    policy: "demo/deny-delete".into(),
                    audited: audited(&["demo/audit-admin"]),
                },
                "audited, denied by the DENY",
            ),
            (Req::new("GET", "/public"), allow(), "not audited"),
        ],
    );
    // Only AUDIT policies: no default deny.
    let audit_only = &ps[..1];
    assert!(Req::new("POST", "/x").decide(audit_only).is_allowed());
}

#[test]
fn path_forms() {
    let ps = policies(
        r#"
- name: paths
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Allow
  rules:
  - to: [{paths: ["/exact", "/prefix/*", "*.png", "/t/{*}/items", "/files/{**}"]}]
  - to: [{paths: ["*"], notPaths: ["/secret*"], methods: [OPTIONS]}]
"#,
    );
    check(
        &ps,
        vec![
            (Req::new("GET", "/exact"), allow(), "exact"),
            (Req::new("GET", "/exact/"), deny(""), "exact is exact"),
            (Req::new("GET", "/prefix/a/b"), allow(), "prefix"),
            (
                Req::new("GET", "/prefix"),
                deny(""),
                "prefix needs its slash",
            ),
            (Req::new("GET", "/img/logo.png"), allow(), "suffix"),
            (Req::new("GET", "/t/42/items"), allow(), "{*} one segment"),
            (Req::new("GET", "/t/4/2/items"), deny(""), "{*} only one"),
            (Req::new("GET", "/files"), allow(), "{**} zero segments"),
            (Req::new("GET", "/files/a/b/c"), allow(), "{**} many"),
            (Req::new("OPTIONS", "/any"), allow(), "presence"),
            (Req::new("OPTIONS", "/secret/x"), deny(""), "notPaths"),
            (
                Req::new("GET", "/x/../exact"),
                allow(),
                "dot segments resolved",
            ),
            (
                Req::new("GET", "/prefix/%61"),
                allow(),
                "unreserved escapes decoded",
            ),
            (
                Req::new("GET", "/a%2Fb"),
                deny(PATH_REJECTED),
                "escaped slash refused",
            ),
        ],
    );
}

#[test]
fn normalization_cannot_be_used_to_dodge_a_deny() {
    let ps = policies(
        r#"
- name: no-admin
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Deny
  rules: [{to: [{paths: ["/admin*"]}]}]
"#,
    );
    for path in [
        "/admin",
        "//admin",
        "/public/../admin",
        "/./admin",
        "/%61dmin",
        "/public/%2e%2e/admin",
        "/../../admin",
    ] {
        let req = Req::new("GET", path);
        assert_eq!(req.decide(&ps), deny("demo/no-admin"), "{path}");
    }
    for path in ["/admin%2fx", "/a\\admin", "/a%zz", "admin"] {
        assert_eq!(
            Req::new("GET", path).decide(&ps),
            deny(PATH_REJECTED),
            "{path}"
        );
    }
    assert_eq!(Req::new("GET", "/administrator/..").decide(&ps), allow());
}

#[test]
fn normalize_path_forms() {
    for (raw, want) in [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a//b///", "/a/b/"),
        ("/a/./b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/%7euser/%41%2d", "/~user/A-"),
        ("/q%3fx%3a", "/q%3Fx%3A"),
        ("/caf%C3%A9/é", "/caf%C3%A9/é"),
    ] {
        assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
    }
    assert!(matches!(normalize_path("/a/b"), Ok(Cow::Borrowed(_))));
    for (raw, err) in [
        ("", PathError::NotAbsolute),
        ("*", PathError::NotAbsolute),
        ("/a%2", PathError::BadEscape),
        ("/a%g0", PathError::BadEscape),
        ("/a%5cb", PathError::EscapedSeparator),
        ("/a\u{0}b", PathError::ForbiddenCharacter),
        ("/a#b", PathError::ForbiddenCharacter),
    ] {
        assert_eq!(normalize_path(raw), Err(err), "{raw:?}");
    }
}

#[test]
fn hosts_and_ports() {
    let ps = policies(
        r#"
- name: hosts
  namespace: demo
  targets: [{kind: Gateway, name: waypoint}]
  action: Allow
  rules:
  - to: [{hosts: ["reviews.demo.svc.cluster.local", "*.example.com", "api.*"], notHosts: ["internal.example.com"], ports: [8080]}]
  - to: [{hosts: ["pinned.example.org:9090"]}]
"#,
    );
    check(
        &ps,
        vec![
            (Req::new("GET", "/"), allow(), "port stripped"),
            (
                Req::new("GET", "/").host("Reviews.Demo.svc.cluster.local"),
                allow(),
                "case",
            ),
            (
                Req::new("GET", "/").host("shop.EXAMPLE.com"),
                allow(),
                "suffix wildcard",
            ),
            (
                Req::new("GET", "/").host("api.internal"),
                allow(),
                "prefix wildcard",
            ),
            (
                Req::new("GET", "/").host("internal.example.com"),
                deny(""),
                "notHosts",
            ),
            (
                Req::new("GET", "/").host("other.org"),
                deny(""),
                "unlisted host",
            ),
            (Req::new("GET", "/").port(9080), deny(""), "port"),
            (
                Req::new("GET", "/").host("pinned.example.org:9090"),
                allow(),
                "host:port",
            ),
            (
                Req::new("GET", "/").host("pinned.example.org:9091"),
                deny(""),
                "other port",
            ),
        ],
    );
    assert_eq!(strip_port("[::1]:8080"), "[::1]");
    assert_eq!(strip_port("[::1]"), "[::1]");
    assert_eq!(strip_port("a.b:"), "a.b:");
    assert_eq!(strip_port("a.b"), "a.b");
}

#[test]
fn conditions() {
    let ps = policies(
        r#"
- name: when
  namespace: demo
  targets: [{kind: Service, name: reviews}]
  action: Allow
  rules:
  - when:
    - {key: "request.headers[X-Tenant]", values: ["acme", "beta-*"]}
    - {key: "request.headers[x-debug]", notValues: ["*"]}
    - {key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.9.9.9"]}
    - {key: destination.port, values: ["8080", "9080"]}
    - {key: source.namespace, values: ["demo"]}
    - {key: source.principal, values: ["*/sa/sleep"]}
    - {key: request.method, notValues: [DELETE]}
"#,
    );
    let ok = || Req::new("GET", "/").header("x-tenant", "acme");
    check(
        &ps,
        vec![
            (ok(), allow(), "all conditions hold"),
            (Req::new("GET", "/"), deny(""), "header absent"),
            (
                Req::new("GET", "/").header("x-tenant", "beta-7"),
                allow(),
                "header prefix",
            ),
            (
                Req::new("GET", "/").header("x-tenant", "other"),
                deny(""),
                "header value",
            ),
            (ok().header("x-debug", "1"), deny(""), "notValues presence"),
            (
                ok().header("x-tenant", "acme"),
                deny(""),
                "repeated header joined",
            ),
            (ok().ip("10.9.9.9"), deny(""), "ip notValues"),
            (ok().ip("192.168.1.1"), deny(""), "ip outside the block"),
            (ok().port(9080), allow(), "second port"),
            (ok().port(1), deny(""), "port"),
            (
                ok().from(Some("spiffe://cluster.local/ns/x/sa/sleep")),
                deny(""),
                "namespace",
            ),
            (ok().from(None), deny(""), "no identity"),
            (
                Req::new("DELETE", "/").header("x-tenant", "acme"),
                deny(""),
                "method",
            ),
        ],
    );
}

#[test]
fn conditions_that_cannot_be_evaluated_fail_closed() {
    // Validation refuses these; if one slips through it must not widen
    // access either way.
    let ps = |action: &str, key: &str, value: &str| {
        policies(&format!(
            "[{{name: p, namespace: demo, targets: [{{kind: Gateway, name: w}}], action: {action}, \
             rules: [{{when: [{{key: \"{key}\", values: [\"{value}\"]}}]}}]}}]"
        ))
    };
    for (key, value) in [
        ("request.auth.claims[iss]", "x"),
        ("source.ip", "not-an-ip"),
        ("destination.port", "http"),
    ] {
        let req = Req::new("GET", "/");
        assert_eq!(
            req.decide(&ps("Allow", key, value)),
            deny(""),
            "ALLOW {key}"
        );
        assert_eq!(
            req.decide(&ps("Deny", key, value)),
            deny("demo/p"),
            "DENY {key}"
        );
    }
}

#[test]
fn rule_lists() {
    let none =
        policies("[{name: p, namespace: n, targets: [{kind: Gateway, name: w}], action: Allow}]");
    assert_eq!(
        Req::new("GET", "/").decide(&none),
        deny(""),
        "ALLOW, rules: []"
    );
    let all = policies(
        "[{name: p, namespace: n, targets: [{kind: Gateway, name: w}], action: Allow, rules: [{}]}]",
    );
    assert_eq!(
        Req::new("GET", "/").decide(&all),
        allow(),
        "ALLOW, rules: [{{}}]"
    );
    let deny_none =
        policies("[{name: p, namespace: n, targets: [{kind: Gateway, name: w}], action: Deny}]");
    assert_eq!(
        Req::new("GET", "/").decide(&deny_none),
        allow(),
        "DENY, rules: []"
    );
    assert_eq!(Req::new("GET", "/").decide(&[]), allow(), "no policy");
    assert_eq!(
        Req::new("GET", "/%zz").decide(&[]),
        allow(),
        "a bad path is not authz's concern without policies"
    );
}

#[test]
fn targeting() {
    let ps = policies(
        r#"
- {name: on-waypoint, namespace: demo, targets: [{kind: Gateway, name: waypoint}], action: Allow}
- {name: on-other-waypoint, namespace: demo, targets: [{kind: Gateway, name: other}], action: Allow}
- {name: same-name-other-ns, namespace: prod, targets: [{kind: Gateway, name: waypoint}], action: Allow}
- {name: on-reviews, namespace: demo, targets: [{kind: Service, name: reviews}], action: Allow}
- {name: on-reviews-prod, namespace: prod, targets: [{kind: Service, name: reviews}], action: Allow}
- {name: on-route, namespace: demo, targets: [{kind: HTTPRoute, name: reviews-route}], action: Allow}
- {name: mesh-wide, namespace: istio-system, targets: [{kind: GatewayClass, name: istio-waypoint}], action: Allow}
- {name: gateway-named-like-the-class, namespace: istio-system, targets: [{kind: Gateway, name: istio-waypoint}], action: Allow}
- {name: root-other, namespace: istio-system, targets: [{kind: Service, name: reviews}], action: Allow}
- name: two-targets
  namespace: prod
  targets: [{kind: Service, name: ratings}, {kind: Service, name: reviews}]
  action: Allow
"#,
    );
    let keys = |service: Option<&str>, route: Option<&str>| {
        applicable(&ps, "istio-system", ("demo", "waypoint"), service, route)
            .into_iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(None, None), ["on-waypoint", "mesh-wide"]);
    assert_eq!(
        keys(Some("demo/reviews"), None),
        ["on-waypoint", "on-reviews", "mesh-wide"]
    );
    assert_eq!(
        keys(Some("prod/reviews"), Some("demo/reviews-route")),
        [
            "on-waypoint",
            "on-reviews-prod",
            "on-route",
            "mesh-wide",
            "two-targets"
        ]
    );
    assert_eq!(
        keys(Some("malformed"), Some("")),
        ["on-waypoint", "mesh-wide"]
    );
    // A different root namespace: the class target applies nowhere, and a
    // Gateway that happens to share the class's name is just a Gateway.
    let elsewhere = applicable(&ps, "mesh-root", ("demo", "waypoint"), None, None);
    assert_eq!(elsewhere.len(), 1);
}

#[test]
fn tcp_uses_the_l4_part() {
    let ps = policies(
        r#"
- name: allow-get
  namespace: demo
  targets: [{kind: Service, name: db}]
  action: Allow
  rules: [{to: [{methods: [GET]}]}]
- name: allow-front
  namespace: demo
  targets: [{kind: Service, name: db}]
  action: Allow
  rules: [{from: [{principals: ["*/sa/front"]}], to: [{ports: [5432]}], when: [{key: source.ip, values: ["10.0.0.0/8"]}]}]
- name: deny-legacy-writes
  namespace: demo
  targets: [{kind: Service, name: db}]
  action: Deny
  rules: [{from: [{namespaces: [legacy]}], to: [{methods: [POST]}], when: [{key: "request.headers[x]", values: ["y"]}]}]
"#,
    );
    let refs: Vec<&HttpPolicy> = ps.iter().collect();
    let front = id("spiffe://cluster.local/ns/demo/sa/front");
    let sleep = id("spiffe://cluster.local/ns/demo/sa/sleep");
    let legacy_front = id("spiffe://cluster.local/ns/legacy/sa/front");
    let ip = |s: &str| s.parse::<IpAddr>().expect("test ip");
    for (source, addr, port, want, what) in [
        (Some(&front), "10.1.1.1", 5432, true, "L4 ALLOW rule"),
        (Some(&front), "10.1.1.1", 5433, false, "port"),
        (
            Some(&front),
            "192.168.0.1",
            5432,
            false,
            "source.ip condition",
        ),
        (
            Some(&sleep),
            "10.1.1.1",
            5432,
            false,
            "ALLOW rule with methods matches nothing",
        ),
        (None, "10.1.1.1", 5432, false, "plaintext"),
        (
            Some(&legacy_front),
            "10.1.1.1",
            5432,
            false,
            "DENY on its L4 part",
        ),
    ] {
        assert_eq!(authorize_tcp(&refs, source, ip(addr), port), want, "{what}");
    }
    assert!(authorize_tcp(&[], None, ip("10.1.1.1"), 1));
}
