//! ambitctl against Kubernetes: the fake API server (kube-fake) holds the
//! cluster's objects, and the components are real processes on a loopback
//! subnet of this test's own: istiod-lite following the fake through a
//! kubeconfig (`--source kubernetes`, node authentication by TokenReview),
//! two ztunnels and a waypoint following istiod-lite over xDS with
//! certificates from its CA. Pods carry those processes' addresses as
//! `status.podIP`, so ambitctl reaches them through the fake's pod proxy
//! subresource exactly as it would a real cluster's. The `ambitctl` binary
//! runs as a user would run it, with `--kubeconfig`.
//!
//! Needs the binaries: `cargo build -p ambitctl -p ztunnel -p waypoint -p istiod-lite --bins`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube_fake::FakeApiServer;
use serde_json::{json, Value};

/// The workspace's binaries, next to this test's executable (`target/<profile>/deps/..`).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: cargo build -p ambitctl -p ztunnel -p waypoint -p istiod-lite --bins",
        path.display()
    );
    path
}

/// A child process killed on drop, with its stderr in a log file.
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            child,
            name: name.into(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until GET `addr` `path` answers 200.
    fn wait_ok(&mut self, addr: SocketAddr, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log());
            }
            if http_get(addr, path).is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not answering 200 on {addr}{path} after 30 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

/// The ambitctl binary with `args`, off the runtime's threads (the fake
/// API server must keep serving while it runs).
async fn ambitctl(kubeconfig: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin("ambitctl"));
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    // The test's own environment must not pick the backend.
    cmd.env_remove("AMBIT_LOCAL");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("running ambitctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ip(subnet: (u8, u8), host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, subnet.0, subnet.1, host))
}

/// A UserInfo as the API server gives it for a ztunnel's projected token.
fn ztunnel_user(node: &str) -> Value {
    json!({
        "username": "system:serviceaccount:istio-system:ztunnel",
        "uid": "5d1b7c53-0000-0000-0000-000000000000",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:istio-system", "system:authenticated"],
        "extra": {
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/pod-name": [format!("ztunnel-{node}")],
            "authentication.kubernetes.io/pod-uid": ["1111"],
        },
    })
}

/// The waypoint pod's own projected token, bound to the pod (uid included).
fn waypoint_user(fake: &FakeApiServer) -> Value {
    let pod = fake.get("Pod", "demo", "waypoint-0").expect("waypoint pod");
    json!({
        "username": "system:serviceaccount:demo:waypoint",
        "uid": "6e2c8d64-0000-0000-0000-000000000000",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"],
        "extra": {
            "authentication.kubernetes.io/pod-name": ["waypoint-0"],
            "authentication.kubernetes.io/pod-uid": [pod["metadata"]["uid"]],
        },
    })
}

fn seed(fake: &FakeApiServer, sub: (u8, u8)) {
    let pod = |ns: &str,
               name: &str,
               node: &str,
               sa: &str,
               labels: Value,
               ip: IpAddr,
               ports: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "main", "image": "x", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
        })
    };
    for ns in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo",
            "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}}),
    ] {
        fake.apply(ns);
    }
    for n in 1..=2u8 {
        fake.apply(pod(
            "istio-system",
            &format!("ztunnel-node{n}"),
            &format!("node{n}"),
            "ztunnel",
            // Istio's label on one, Ambit's Helm chart's on the other.
            if n == 1 {
                json!({"app": "ztunnel"})
            } else {
                json!({"app.kubernetes.io/name": "ztunnel"})
            },
            ip(sub, n),
            json!([{"name": "admin", "containerPort": 15000}, {"name": "metrics", "containerPort": 15020}]),
        ));
    }
    fake.apply(pod(
        "istio-system",
        "istiod-lite-0",
        "node1",
        "istiod-lite",
        json!({"app": "istiod-lite"}),
        ip(sub, 5),
        json!([{"name": "grpc-xds", "containerPort": 15012}, {"name": "http-monitoring", "containerPort": 15014}]),
    ));
    fake.apply(pod(
        "demo",
        "client",
        "node1",
        "client",
        json!({"app": "client"}),
        ip(sub, 10),
        json!([]),
    ));
    fake.apply(pod(
        "demo",
        "reviews-v1",
        "node2",
        "reviews",
        json!({"app": "reviews"}),
        ip(sub, 11),
        json!([{"name": "http", "containerPort": 9080}]),
    ));
    fake.apply(pod(
        "demo",
        "waypoint-0",
        "node2",
        "waypoint",
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"}),
        ip(sub, 30),
        json!([{"name": "hbone", "containerPort": 15008}, {"name": "admin", "containerPort": 15000}]),
    ));
    fake.apply(pod(
        "legacy",
        "outsider",
        "node1",
        "default",
        json!({"app": "outsider"}),
        ip(sub, 20),
        json!([]),
    ));
    fake.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "demo"},
        "spec": {"selector": {"app": "reviews"}, "clusterIP": "10.96.0.10",
                 "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]},
    }));
    fake.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": "demo",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
        "spec": {"selector": {"gateway.networking.k8s.io/gateway-name": "waypoint"}, "clusterIP": "10.96.0.20",
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}]},
    }));
    fake.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }));
    fake.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "reviews-viewers", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/waypoint"]}}],
                            "to": [{"operation": {"ports": ["9080"]}}]}]},
    }));
    fake.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "reviews-readers", "namespace": "demo"},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
                            "to": [{"operation": {"methods": ["GET"]}}]}]},
    }));
    fake.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "demo"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }));
}

fn component<'a>(status: &'a Value, kind: &str, name: &str) -> &'a Value {
    status["components"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["kind"] == kind && c["name"] == name))
        .unwrap_or_else(|| panic!("no {kind} {name} in {status:#}"))
}

fn row<'a>(rows: &'a Value, ns: &str, name: &str) -> &'a Value {
    rows.as_array()
        .and_then(|l| l.iter().find(|r| r["namespace"] == ns && r["name"] == name))
        .unwrap_or_else(|| panic!("no {ns}/{name} in {rows:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambitctl_against_kubernetes() {
    let sub = (
        rand::random_range(100..=250u8),
        rand::random_range(1..=250u8),
    );
    let dir = std::env::temp_dir().join(format!(
        "ambitctl-kube-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = FakeApiServer::start().await;
    seed(&fake, sub);
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: tester, user: {{token: test}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: tester}}}}]\n",
            fake.addr()
        ),
    )
    .unwrap();

    // The control plane, following the fake.
    let cp = ip(sub, 5);
    let mut istiod = Proc::spawn(
        "istiod-lite",
        &dir,
        Command::new(bin("istiod-lite"))
            .args(["serve", "--source", "kubernetes", "--allow-loopback-pods"])
            .arg("--data-dir")
            .arg(dir.join("ca"))
            .args(["--grpc-addr", &format!("{cp}:15012")])
            .args(["--monitoring-addr", &format!("{cp}:15014")])
            .args(["--serving-ip", &cp.to_string()])
            .env("KUBECONFIG", &kubeconfig)
            .env("AMBIT_LOG", "info"),
    );
    istiod.wait_ok(SocketAddr::new(cp, 15014), "/ready");

    // Node proxies: each presents a token TokenReview says is its node's ztunnel.
    // Node proxies present a token TokenReview says is their node's ztunnel;
    // the waypoint one of its own service account, bound to its pod (it may
    // not hold its node's: the CA would sign every identity there for it).
    let source = |name: &str, user: Value| -> Vec<String> {
        let token = format!("token-{name}-{:08x}", rand::random::<u32>());
        fake.add_token(&token, &["istio-ca"], user);
        let file = dir.join(format!("token-{name}"));
        std::fs::write(&file, &token).unwrap();
        vec![
            "--xds-address".into(),
            format!("https://{cp}:15012"),
            "--ca-root-cert".into(),
            dir.join("ca/root-cert.pem").display().to_string(),
            "--token-file".into(),
            file.display().to_string(),
        ]
    };
    let mut ztunnels = Vec::new();
    for n in 1..=2u8 {
        let node = format!("node{n}");
        let zip = ip(sub, n);
        let mut z = Proc::spawn(
            &format!("ztunnel-{node}"),
            &dir,
            Command::new(bin("ztunnel"))
                .args(source(&node, ztunnel_user(&node)))
                .args(["--node", &node, "--bind-ip", &zip.to_string()])
                .args(["--hbone-addr", "per-workload", "--reload-interval", "200ms"])
                .args(["--drain-timeout", "1s"])
                .env("RUST_LOG", "info"),
        );
        z.wait_ok(SocketAddr::new(zip, 15021), "/healthz/ready");
        ztunnels.push(z);
    }
    let wip = ip(sub, 30);
    let at = |port: u16| SocketAddr::new(wip, port).to_string();
    let mut waypoint = Proc::spawn(
        "waypoint",
        &dir,
        Command::new(bin("waypoint"))
            .args(source("waypoint-0", waypoint_user(&fake)))
            .args(["--gateway", "demo/waypoint", "--node", "node2"])
            .args(["--hbone-addr", &at(15008), "--admin-addr", &at(15000)])
            .args(["--metrics-addr", &at(15020), "--readiness-addr", &at(15021)])
            .args(["--reload-interval", "200ms", "--drain-timeout", "1s"])
            .env("RUST_LOG", "info"),
    );
    waypoint.wait_ok(SocketAddr::new(wip, 15021), "/healthz/ready");

    // Certificates arrive after the config: wait until node2's ztunnel holds reviews'.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dump = http_get(SocketAddr::new(ip(sub, 2), 15000), "/config_dump")
            .map(|(_, b)| b)
            .unwrap_or_default();
        if dump.contains("spiffe://cluster.local/ns/demo/sa/reviews") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reviews certificate on node2:\n{dump}\n{}",
            ztunnels[1].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // status: every component through the pod proxy, versions and expiry.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = ambitctl(&kubeconfig, &["status", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let s = r.json();
    let version = env!("CARGO_PKG_VERSION");
    let c = component(&s, "control-plane", "istio-system/istiod-lite-0");
    assert_eq!(
        (c["ready"].clone(), c["version"].clone()),
        (json!(true), json!(version)),
        "{c:#}"
    );
    assert!(
        c["endpoint"]
            .as_str()
            .unwrap()
            .contains("istiod-lite-0:15014"),
        "{c:#}"
    );
    for node in ["node1", "node2"] {
        let z = component(&s, "ztunnel", node);
        assert_eq!(
            (z["ready"].clone(), z["version"].clone()),
            (json!(true), json!(version)),
            "{z:#}"
        );
        let expiry = z["earliestExpiry"]
            .as_u64()
            .unwrap_or_else(|| panic!("no certificate: {z:#}"));
        assert!(expiry > now + 3600, "{z:#}");
    }
    let node2 = component(&s, "ztunnel", "node2");
    let ids: Vec<&str> = node2["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://cluster.local/ns/demo/sa/reviews"],
        "node2 holds reviews' only (not the waypoint's)"
    );
    let w = component(&s, "waypoint", "demo/waypoint");
    assert_eq!(w["ready"], true, "{w:#}");
    assert_eq!(
        w["certificates"][0]["identity"], "spiffe://cluster.local/ns/demo/sa/waypoint",
        "{w:#}"
    );
    let table = ambitctl(&kubeconfig, &["status"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    let line = |text: &str, starts: &str| {
        text.lines()
            .find(|l| l.starts_with(starts))
            .unwrap_or_else(|| panic!("no line starting {starts:?} in:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line(&table.stdout, "COMPONENT")[..6],
        [
            "COMPONENT",
            "NAME",
            "NODE",
            "READY",
            "VERSION",
            "CERTIFICATES"
        ]
    );
    let z1 = line(&table.stdout, "ztunnel       node1");
    assert_eq!(
        z1[..6],
        ["ztunnel", "node1", "node1", "yes", version, "1"],
        "{}",
        table.stdout
    );
    let wline = line(&table.stdout, "waypoint");
    assert_eq!(
        wline[..5],
        ["waypoint", "demo/waypoint", "node2", "yes", version],
        "{}",
        table.stdout
    );

    // workloads: identities, enrollment, capture (these ztunnels run without
    // --capture, which ambitctl must say), waypoints.
    let r = ambitctl(&kubeconfig, &["workloads", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rows = r.json();
    let client = row(&rows, "demo", "client");
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(
        (client["inMesh"].clone(), client["captured"].clone()),
        (json!(true), json!("not-captured")),
        "{client:#}"
    );
    assert!(
        client["captureDetail"]
            .as_str()
            .unwrap()
            .contains("without --capture"),
        "{client:#}"
    );
    let reviews = row(&rows, "demo", "reviews-v1");
    assert!(
        reviews["waypoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["waypoint"] == "demo/waypoint" && w["appliesTo"] == "service demo/reviews"),
        "{reviews:#}"
    );
    assert_eq!(row(&rows, "demo", "waypoint-0")["captured"], "native-hbone");
    let outsider = row(&rows, "legacy", "outsider");
    assert_eq!(
        (
            outsider["enrolled"].clone(),
            outsider["captured"].clone(),
            outsider["identity"].clone()
        ),
        (json!(false), json!("no"), Value::Null)
    );
    assert_eq!(row(&rows, "istio-system", "ztunnel-node1")["inMesh"], false);
    let table = ambitctl(&kubeconfig, &["workloads", "-n", "demo"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    let client_line = line(&table.stdout, "demo        client");
    assert_eq!(
        client_line,
        [
            "demo",
            "client",
            "node1",
            &ip(sub, 10).to_string(),
            "spiffe://cluster.local/ns/demo/sa/client",
            "NO",
            "demo/waypoint"
        ],
        "{}",
        table.stdout
    );
    assert!(
        !table.stdout.contains("outsider"),
        "-n demo lists demo only:\n{}",
        table.stdout
    );

    // check: mTLS mode, certificate, policies with verdicts.
    let r = ambitctl(&kubeconfig, &["check", "demo/reviews-v1", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let c = r.json();
    assert_eq!(c["mtls"], "STRICT", "{c:#}");
    assert_eq!(c["captured"], false, "{c:#}");
    let level = |check: &str| {
        c["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["check"] == check)
            .map(|l| l["level"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(level("certificate"), "ok", "{c:#}");
    assert_eq!(level("captured"), "fail", "{c:#}");
    let l4: Vec<&str> = c["l4Policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(l4, ["demo/reviews-viewers"], "{c:#}");
    assert!(
        c["l4Policies"][0]["verdict"]
            .as_str()
            .unwrap()
            .contains("cluster.local/ns/demo/sa/waypoint to ports 9080"),
        "{c:#}"
    );
    let l7: Vec<&str> = c["l7Policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(l7, ["demo/reviews-readers"], "{c:#}");
    assert!(
        c["l7Policies"][0]["selects"]
            .as_str()
            .unwrap()
            .contains("waypoint demo/waypoint"),
        "{c:#}"
    );
    let table = ambitctl(&kubeconfig, &["check", "reviews-v1", "-n", "demo"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(
        table
            .stdout
            .contains("[ok]   mtls         STRICT (PeerAuthentication demo/strict"),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("ALLOW demo/reviews-readers"),
        "{}",
        table.stdout
    );
    let r = ambitctl(&kubeconfig, &["check", "legacy/outsider", "-o", "json"]).await;
    let c = r.json();
    assert_eq!(
        (c["identity"].clone(), c["mtls"].clone()),
        (Value::Null, Value::Null),
        "{c:#}"
    );
    assert!(
        c["summary"]
            .as_str()
            .unwrap()
            .starts_with("not in the mesh"),
        "{c:#}"
    );

    // config-dump: the proxy's own dump, through the pod proxy.
    let r = ambitctl(
        &kubeconfig,
        &["config-dump", "ztunnel", "node1", "-o", "json"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = r.json();
    assert_eq!(d["node"], "node1");
    assert_eq!(d["localWorkloads"], json!(["demo/client"]), "{d:#}");
    assert_eq!(d["capture"]["enabled"], false);
    let table = ambitctl(&kubeconfig, &["config-dump", "ztunnel", "node1"]).await;
    assert!(
        table
            .stdout
            .starts_with("ztunnel node1 (pod istio-system/ztunnel-node1:15000"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains("spiffe://cluster.local/ns/demo/sa/client"),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("demo/client   off (no --capture)"),
        "{}",
        table.stdout
    );
    let r = ambitctl(&kubeconfig, &["config-dump", "waypoint", "-o", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["gateway"], "demo/waypoint");

    // Mistakes are errors with a reason, never panics.
    let r = ambitctl(&kubeconfig, &["check", "demo/nope"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("ambitctl: pod demo/nope not found"),
        "{}",
        r.stderr
    );
    let r = ambitctl(&kubeconfig, &["config-dump", "ztunnel"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("which ztunnel? one of: node1, node2"),
        "{}",
        r.stderr
    );
    let r = ambitctl(&kubeconfig, &["config-dump", "ztunnel", "node9"]).await;
    assert!(
        r.code == 1 && r.stderr.contains("no ztunnel named node9"),
        "{}",
        r.stderr
    );

    // waypoint apply: the Gateway istioctl would create, and the namespace label.
    let r = ambitctl(
        &kubeconfig,
        &["waypoint", "apply", "-n", "legacy", "--enroll-namespace"],
    )
    .await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("waypoint legacy/waypoint created"),
        "{}",
        r.stdout
    );
    let gw = fake
        .get("Gateway", "legacy", "waypoint")
        .expect("Gateway created");
    assert_eq!(gw["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(
        gw["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    let ns = fake.get("Namespace", "", "legacy").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/use-waypoint"], "waypoint",
        "{ns:#}"
    );
    let again = ambitctl(
        &kubeconfig,
        &["waypoint", "apply", "-n", "legacy", "-o", "json"],
    )
    .await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json()["gateway"], "unchanged");

    // A component that stops answering turns status unhealthy (exit 2), with
    // the API server's reason.
    drop(ztunnels.pop());
    let r = ambitctl(&kubeconfig, &["status", "-o", "json"]).await;
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let z2 = component(&r.json(), "ztunnel", "node2").clone();
    assert_eq!(z2["reachable"], false, "{z2:#}");
    assert!(
        z2["error"]
            .as_str()
            .unwrap()
            .contains("error trying to reach service"),
        "{z2:#}"
    );

    drop(waypoint);
    drop(ztunnels);
    drop(istiod);
    let _ = std::fs::remove_dir_all(&dir);
}
