//! A namespace cluster on istiod-lite (manifests) with a real waypoint: two
//! nodes with capturing ztunnels; on node1 an enrolled client pod and the
//! waypoint pod (not captured: it speaks HBONE itself), on node2 the backends.
//! Unmodified curl in the client pod:
//!
//! * reaches service `web` through ztunnel -> waypoint -> ztunnel: the answer
//!   is the backend's, the backend sees the waypoint's address, the
//!   waypoint's `istio_requests_total` counts it, and the HTTPRoute's header
//!   match and header modifiers (request and response) prove L7 processing;
//! * is refused a POST to `web` with 403 `RBAC: access denied` by the L7
//!   AuthorizationPolicy the waypoint enforces;
//! * reaches service `plain` (same namespace, no L7 config) past the waypoint,
//!   which is in `auto` mode: the waypoint's counters do not move and the
//!   backend sees the client's own address.
//!
//! The waypoint pod shares node1 with the client: the client's ztunnel
//! tunnels to a waypoint pod on its own node, and the waypoint's tunnels to
//! the backends cross to node2's uplink. (The demo runs its waypoint beside
//! the backends instead, the other same-node hop.)

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use e2e::cluster::{Pod, PodSpec};
use e2e::mesh::TempDir;
use e2e::netns::root_or_skip;
use e2e::process::{metric_sum, Proxy, Waypoint, Ztunnel};
use e2e::served::ServedCluster;

const CURL: &str = "/usr/bin/curl";
const APP_PORT: u16 = 8080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const WAYPOINT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 30);
const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 10);
const CANARY: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 11);
const PLAIN: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 12);
const WEB_VIP: &str = "198.18.128.10";
const PLAIN_VIP: &str = "198.18.128.12";

fn pod(name: &str, node: u8, sa: &str, labels: &str, ip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: demo, labels: {{{labels}}}}}\n\
         spec: {{nodeName: node{node}, serviceAccountName: {sa}, containers: [{{name: app, image: app, ports: [{{name: http, containerPort: {APP_PORT}}}]}}]}}\n\
         status: {{podIP: \"{ip}\"}}\n"
    )
}

fn service(name: &str, selector: &str, vip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
         spec: {{selector: {{{selector}}}, clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]}}\n"
    )
}

fn manifests_yaml() -> String {
    let mut m = String::from(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
# auto: only services with L7 config (web: a route and an L7 policy) go
# through the waypoint; plain does not.
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: demo
  annotations: {ambit.dev/waypoint-mode: auto}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: demo
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec:
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  clusterIP: 198.18.128.20
  ports: [{name: mesh, port: 15008, targetPort: 15008}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-route, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-ambit-canary, value: "yes"}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-ambit-route, value: canary}]}
    backendRefs: [{name: web-canary, port: 80}]
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-ambit-waypoint, value: web-route}]}
    backendRefs: [{name: web, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: demo}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"#,
    );
    m.push_str(&pod(
        "waypoint-0",
        1,
        "waypoint",
        "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none",
        WAYPOINT,
    ));
    m.push_str(&pod("client", 1, "client", "app: client", CLIENT));
    m.push_str(&pod("web-0", 2, "web", "app: web", WEB));
    m.push_str(&pod("web-canary-0", 2, "web", "app: web-canary", CANARY));
    m.push_str(&pod("plain-0", 2, "plain", "app: plain", PLAIN));
    m.push_str(&service("web", "app: web", WEB_VIP));
    m.push_str(&service("web-canary", "app: web-canary", "198.18.128.11"));
    m.push_str(&service("plain", "app: plain", PLAIN_VIP));
    m
}

/// A backend: answers each request with its name, the `x-ambit-route`
/// request header it got (`-` if none) and its peer's address.
fn app(pod: &Pod, name: &'static str) -> anyhow::Result<()> {
    let addr = SocketAddr::new(pod.ip.into(), APP_PORT);
    let listener = pod.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    std::thread::spawn(move || {
        while let Ok((mut s, peer)) = listener.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            // The request head, bounded; curl sends no body with GET.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head);
            let route = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-ambit-route"))
                .map_or("-", |(_, v)| v.trim());
            let text = format!("{name} route={route} (you are {})\n", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    Ok(())
}

/// What curl printed: the response head and body (`-D -`), and the status.
struct Reply {
    status: u16,
    text: String,
}

/// Unmodified curl in `pod`'s namespace, `args` before the URL.
fn curl(pod: &Pod, args: &[&str], url: &str) -> anyhow::Result<Reply> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", pod.ns.name()))
        .args(["--", CURL, "-sS", "--max-time", "5", "-D", "-"])
        .args(args)
        .args(["-w", "\n%{http_code}", url])
        .output()
        .context("running curl")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (text, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok(Reply {
        status: status.trim().parse().unwrap_or(0),
        text: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    })
}

/// The waypoint's request and L4 counters, summed.
fn waypoint_counters(w: &Waypoint) -> anyhow::Result<(f64, f64)> {
    let m = w.metrics()?;
    Ok((
        metric_sum(&m, "istio_requests_total", &[("reporter", "waypoint")]),
        metric_sum(&m, "istio_tcp_connections_opened_total", &[]),
    ))
}

/// Polls until the waypoint has counted `want` requests (metrics are
/// recorded once the response is done, which may trail curl's exit).
fn wait_requests(w: &Waypoint, want: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (requests, _) = waypoint_counters(w)?;
        if requests >= want || Instant::now() > deadline {
            return Ok(requests);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Access-log lines of `z` containing every one of `parts`, polled until
/// there are `want` (lines are written in batches, up to 50 ms late) or 5 s
/// have passed.
fn access_lines(z: &Ztunnel, parts: &[&str], want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = z
            .log()
            .lines()
            .filter(|l| l.contains(" access: ") && parts.iter().all(|p| l.contains(p)))
            .count();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_manifests(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("mesh.yaml"), manifests_yaml())?;
    Ok(manifests)
}

fn proxy_logs(procs: &[&Proxy]) -> String {
    procs
        .iter()
        .map(|p| format!("--- {} ---\n{}", p.node, p.log()))
        .collect()
}

#[test]
fn curl_through_ztunnel_waypoint_ztunnel_and_past_an_auto_waypoint() -> anyhow::Result<()> {
    if !root_or_skip("curl_through_ztunnel_waypoint_ztunnel_and_past_an_auto_waypoint") {
        return Ok(());
    }
    if !Path::new(CURL).exists() {
        bail!("{CURL} not found: scripts/setup.sh installs curl");
    }
    let dir = TempDir::new("ambit-cluster-waypoint")?;
    let manifests = write_manifests(dir.path())?;
    let specs = PodSpec::list(&[
        ("demo/waypoint-0", 1, WAYPOINT),
        ("demo/client", 1, CLIENT),
        ("demo/web-0", 2, WEB),
        ("demo/web-canary-0", 2, CANARY),
        ("demo/plain-0", 2, PLAIN),
    ]);
    // Dropped in reverse: processes first, then pins, then the namespaces
    // (the work dir last of all).
    let ServedCluster {
        cluster,
        istiod,
        pins: _pins,
        ztunnels,
    } = ServedCluster::start(dir.path(), &manifests, 2, &specs)?;
    let pod = |name: &str| cluster.pod_named(name).context(name.to_string());
    let waypoint = Waypoint::spawn_waypoint_in_netns(
        pod("demo/waypoint-0")?,
        dir.path(),
        &istiod.source_for_waypoint("demo/waypoint-0")?,
        "demo/waypoint",
        "node1",
        &[],
    )?;
    let logs = || proxy_logs(&[&ztunnels[0], &ztunnels[1], &waypoint]);
    app(pod("demo/web-0")?, "web")?;
    app(pod("demo/web-canary-0")?, "web-canary")?;
    app(pod("demo/plain-0")?, "plain")?;
    let client = pod("demo/client")?;
    let (web, plain) = (format!("http://{WEB_VIP}/"), format!("http://{PLAIN_VIP}/"));
    let (requests0, _) = waypoint_counters(&waypoint)?;

    // 1. web through the waypoint: the default rule, with its response
    //    header, answered by web-0, which sees the waypoint's address.
    let r = curl(client, &[], &web)?;
    assert_eq!(r.status, 200, "GET {web}: {}\n{}", r.text, logs());
    assert!(
        r.text
            .contains(&format!("web route=- (you are {WAYPOINT})")),
        "answered by web-0, reached from the waypoint: {}",
        r.text
    );
    assert!(
        r.text
            .to_ascii_lowercase()
            .contains("x-ambit-waypoint: web-route"),
        "the route's ResponseHeaderModifier: {}",
        r.text
    );

    // 1b. HTTP/2, both ways a plaintext client gets it: prior knowledge, and
    //     curl's HTTP/1.1 `Upgrade: h2c` (101, then the answer on stream 1).
    let r = curl(client, &["--http2-prior-knowledge"], &web)?;
    assert_eq!(r.status, 200, "h2 prior knowledge: {}\n{}", r.text, logs());
    assert!(r.text.starts_with("HTTP/2 200"), "{}", r.text);
    let r = curl(client, &["--http2"], &web)?;
    assert_eq!(r.status, 200, "h2c upgrade: {}\n{}", r.text, logs());
    assert!(
        r.text.starts_with("HTTP/1.1 101") && r.text.contains("HTTP/2 200"),
        "upgraded to HTTP/2: {}",
        r.text
    );
    assert!(
        r.text
            .contains(&format!("web route=- (you are {WAYPOINT})")),
        "the upgrade request itself is served, through the route: {}",
        r.text
    );
    let m = waypoint.metrics()?;
    assert!(
        metric_sum(
            &m,
            "istio_requests_total",
            &[("request_protocol", "http2"), ("response_code", "200")]
        ) >= 2.0,
        "both HTTP/2 requests counted as such:\n{m}"
    );

    // 2. The header match picks the canary rule, whose RequestHeaderModifier
    //    the backend sees.
    let r = curl(client, &["-H", "x-ambit-canary: yes"], &web)?;
    assert_eq!(r.status, 200, "canary GET: {}\n{}", r.text, logs());
    assert!(
        r.text
            .contains(&format!("web-canary route=canary (you are {WAYPOINT})")),
        "header match to web-canary with the request header set: {}",
        r.text
    );
    assert!(
        !r.text.to_ascii_lowercase().contains("x-ambit-waypoint"),
        "the canary rule adds no response header: {}",
        r.text
    );
    let counted = wait_requests(&waypoint, requests0 + 4.0)?;
    assert!(
        counted >= requests0 + 4.0,
        "waypoint istio_requests_total {requests0} -> {counted}\n{}",
        logs()
    );
    let m = waypoint.metrics()?;
    assert!(
        metric_sum(
            &m,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/demo/sa/client"
                ),
                ("destination_service_name", "web-canary"),
                ("route", "demo/web-route"),
                ("response_code", "200"),
            ]
        ) >= 1.0,
        "the waypoint saw the client's identity and served the canary rule:\n{m}"
    );

    // The client's connections were captured on node1 and tunnelled by its
    // ztunnel straight to the waypoint pod, under the client's identity.
    let to_waypoint = access_lines(
        &ztunnels[0],
        &[
            &format!("dst.via={WAYPOINT}:15008"),
            "src.identity=spiffe://cluster.local/ns/demo/sa/client",
        ],
        2,
    );
    assert!(to_waypoint >= 2, "node1 to the waypoint:\n{}", logs());

    // 3. The L7 policy: only GET.
    let r = curl(client, &["-X", "POST", "-d", "x"], &web)?;
    assert_eq!(r.status, 403, "POST {web}: {}", r.text);
    assert!(r.text.contains("RBAC: access denied"), "{}", r.text);
    wait_requests(&waypoint, requests0 + 5.0)?;

    // 4. plain has no L7 config: with an auto waypoint, its traffic goes
    //    ztunnel to ztunnel, and the waypoint sees none of it.
    let before = waypoint_counters(&waypoint)?;
    for _ in 0..3 {
        let r = curl(client, &[], &plain)?;
        assert_eq!(r.status, 200, "GET {plain}: {}\n{}", r.text, logs());
        assert!(
            r.text
                .contains(&format!("plain route=- (you are {CLIENT})")),
            "plain answers the client directly (its own address, no waypoint hop): {}",
            r.text
        );
    }
    // Give a late count the time a counted request would have taken.
    std::thread::sleep(Duration::from_millis(300));
    let after = waypoint_counters(&waypoint)?;
    assert_eq!(
        before,
        after,
        "the waypoint's counters moved for plain\n{}",
        waypoint.metrics()?
    );
    let direct = access_lines(
        &ztunnels[1],
        &[
            &format!("dst.addr={PLAIN}:{APP_PORT}"),
            "src.identity=spiffe://cluster.local/ns/demo/sa/client",
        ],
        3,
    );
    assert!(
        direct >= 3,
        "node2 took plain's connections from the client's identity:\n{}",
        logs()
    );
    drop(waypoint);
    drop(ztunnels);
    Ok(())
}
