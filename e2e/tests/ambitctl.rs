//! ambitctl against a local network-namespace cluster (as root): istiod-lite
//! in the fabric namespace following a manifests directory, a capturing
//! ztunnel per node, the demo namespace's waypoint in its pod. The harness
//! writes `ambit-local.json` (e2e::local_cluster) and the `ambitctl` binary
//! reads it (`--local`, or `AMBIT_LOCAL`), reaching every endpoint from
//! inside its network namespace.
//!
//! What it must get right here and not in the Kubernetes test: capture is
//! real (eBPF on the pods' veths), and ambitctl reports the interface it is
//! attached to; `waypoint apply` writes into the directory istiod-lite
//! follows, and istiod-lite takes it up.
//!
//! Needs: `cargo build -p ambitctl -p ztunnel -p waypoint -p istiod-lite --bins`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use e2e::cluster::{PodSpec, CONTROL_PLANE_IP};
use e2e::istiod::Istiod;
use e2e::mesh::TempDir;
use e2e::netns::root_or_skip;
use e2e::process::{bin_path, Waypoint};
use e2e::served::ServedCluster;
use serde_json::{json, Value};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 20);
const WAYPOINT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 30);
const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 10);
const CART: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 11);

fn pod(ns: &str, name: &str, node: u8, sa: &str, labels: &str, ip: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: node{node}, serviceAccountName: {sa}, containers: [{{name: app, image: app}}]}}\n\
         status: {{podIP: \"{ip}\"}}\n"
    )
}

/// `demo` uses its waypoint; `shop` asks for one that is not declared yet
/// (the test declares it with `ambitctl waypoint apply`); `legacy` is not in
/// the mesh.
fn manifests_yaml() -> String {
    let mut m = String::from(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
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
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  clusterIP: 198.18.128.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-waypoint, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/waypoint"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: demo}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"#,
    );
    m.push_str(&pod(
        "demo",
        "waypoint-0",
        1,
        "waypoint",
        "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none",
        WAYPOINT,
    ));
    m.push_str(&pod("demo", "client", 1, "client", "app: client", CLIENT));
    m.push_str(&pod(
        "legacy",
        "outsider",
        1,
        "default",
        "app: outsider",
        OUTSIDER,
    ));
    m.push_str(&pod("demo", "web-0", 2, "web", "app: web", WEB));
    m.push_str(&pod("shop", "cart", 2, "cart", "app: cart", CART));
    m
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

fn ambitctl(local: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new(bin_path("ambitctl")?)
        .arg("--local")
        .arg(local)
        .args(args)
        .output()
        .context("running ambitctl")?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn find(list: &Value, pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    list.as_array()?.iter().find(|v| pred(v))
}

/// istiod-lite's `/debug/rejected`, from inside the fabric namespace.
fn rejected(fabric: &str) -> anyhow::Result<String> {
    let addr = std::net::SocketAddr::new(CONTROL_PLANE_IP.into(), 15014);
    let (code, body) = e2e::netns::run_in(fabric, move || {
        e2e::client::http_get(addr, "/debug/rejected")
    })?;
    anyhow::ensure!(code == 200, "/debug/rejected answered {code}");
    Ok(body)
}

/// The waypoint pod's own token where istiod-lite issues one
/// (`<data dir>/waypoint-tokens/<namespace>/<pod>`: a node's token may not
/// obtain a waypoint's identity), else its node's, as before waypoint tokens.
fn waypoint_source(istiod: &Istiod, dir: &Path) -> anyhow::Result<e2e::process::Source> {
    let node = istiod.source_for("node1")?;
    let token = dir.join("ca/waypoint-tokens/demo/waypoint-0");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !token.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !token.exists() {
        return Ok(node);
    }
    let mut args = node.0;
    let at = args
        .iter()
        .position(|a| a == "--token-file")
        .context("no --token-file in the node's source")?;
    args[at + 1] = token.into();
    Ok(e2e::process::Source(args))
}

#[test]
fn ambitctl_against_the_namespace_cluster() -> anyhow::Result<()> {
    if !root_or_skip("ambitctl_against_the_namespace_cluster") {
        return Ok(());
    }
    let dir = TempDir::new("ambit-ambitctl")?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("mesh.yaml"), manifests_yaml())?;
    let specs = PodSpec::list(&[
        ("demo/waypoint-0", 1, WAYPOINT),
        ("demo/client", 1, CLIENT),
        ("legacy/outsider", 1, OUTSIDER),
        ("demo/web-0", 2, WEB),
        ("shop/cart", 2, CART),
    ]);
    // Dropped in reverse: processes first, then pins, then the namespaces
    // (the work dir last of all).
    let ServedCluster {
        cluster,
        istiod,
        pins,
        mut ztunnels,
    } = ServedCluster::start(dir.path(), &manifests, 2, &specs)?;
    let waypoint_pod = cluster
        .pod_named("demo/waypoint-0")
        .context("waypoint pod")?;
    let waypoint = Waypoint::spawn_waypoint_in_netns(
        waypoint_pod,
        dir.path(),
        &waypoint_source(&istiod, dir.path())?,
        "demo/waypoint",
        "node1",
        &[],
    )?;
    let local = e2e::local_cluster::write(dir.path(), &cluster, istiod.monitoring(), &manifests)?;
    let client_if = cluster
        .pod_named("demo/client")
        .context("client")?
        .host_if
        .clone();
    let web_if = cluster
        .pod_named("demo/web-0")
        .context("web")?
        .host_if
        .clone();

    // The file names every component where the harness put it.
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&local)?)?;
    assert_eq!(file["controlPlane"]["netns"], cluster.fabric_name());
    assert_eq!(file["nodes"][1]["ztunnelAdmin"], "198.18.0.2:15000");
    assert_eq!(
        file["waypoints"],
        json!([{"name": "waypoint", "namespace": "demo", "pod": "demo/waypoint-0", "node": "node1",
                "netns": waypoint_pod.ns.name(), "admin": "198.19.1.30:15000"}])
    );

    // status: everything up, from inside each namespace.
    let r = ambitctl(&local, &["status", "-o", "json"])?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let s = r.json();
    let version = env!("CARGO_PKG_VERSION");
    let comp = |kind: &str, name: &str| {
        find(&s["components"], |c| c["kind"] == kind && c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} {name}: {s:#}"))
    };
    let cp = comp("control-plane", "istiod-lite");
    assert_eq!(
        (cp["ready"].clone(), cp["version"].clone()),
        (json!(true), json!(version))
    );
    assert_eq!(
        cp["endpoint"],
        format!("198.18.0.254:15014 in netns {}", cluster.fabric_name())
    );
    for node in ["node1", "node2"] {
        let z = comp("ztunnel", node);
        assert_eq!(
            (z["ready"].clone(), z["version"].clone()),
            (json!(true), json!(version)),
            "{z:#}"
        );
        assert!(z["earliestExpiry"].as_u64().is_some(), "{z:#}");
    }
    // node2 captures both of its pods; capture attached to both.
    assert!(
        comp("ztunnel", "node2")["detail"]
            .as_str()
            .unwrap()
            .contains("capturing 2/2"),
        "{s:#}"
    );
    let w = comp("waypoint", "demo/waypoint");
    assert_eq!(
        w["certificates"][0]["identity"], "spiffe://cluster.local/ns/demo/sa/waypoint",
        "{w:#}"
    );
    // The undeclared shop/waypoint is one of istiod-lite's rejections (for
    // the namespace asking for it; no Gateway of that name exists).
    let before = rejected(cluster.fabric_name())?;
    assert!(
        before.contains("shop/waypoint") && !before.contains("\"Gateway shop/waypoint\""),
        "{before}"
    );
    assert!(
        cp["detail"].as_str().unwrap().contains("rejected"),
        "{cp:#}"
    );

    // The tables, for people (and for this test's log).
    let table = ambitctl(&local, &["status"])?;
    assert_eq!(table.code, 0, "{}", table.stderr);
    println!("$ ambitctl status\n{}", table.stdout);
    assert!(
        table.stdout.lines().any(|l| l
            .split_whitespace()
            .take(5)
            .eq(["ztunnel", "node2", "node2", "yes", version])),
        "{}",
        table.stdout
    );

    // workloads: captured on the veth ztunnel attached to, read back from the kernel.
    let r = ambitctl(&local, &["workloads", "-o", "json"])?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rows = r.json();
    let row = |ns: &str, name: &str| {
        find(&rows, |r| r["namespace"] == ns && r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {ns}/{name}: {rows:#}"))
    };
    let client = row("demo", "client");
    assert_eq!(client["captured"], "yes", "{client:#}");
    assert!(
        client["captureDetail"]
            .as_str()
            .unwrap()
            .ends_with(&format!("on interface {client_if}")),
        "{client:#}"
    );
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(row("demo", "web-0")["captured"], "yes");
    assert_eq!(row("demo", "waypoint-0")["captured"], "native-hbone");
    assert_eq!(row("legacy", "outsider")["captured"], "no");
    let table = ambitctl(&local, &["workloads"])?;
    println!("$ ambitctl workloads\n{}", table.stdout);
    let line = table
        .stdout
        .lines()
        .find(|l| l.starts_with("demo        client"))
        .with_context(|| format!("no client line:\n{}", table.stdout))?;
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [
            "demo",
            "client",
            "node1",
            "198.19.1.10",
            "spiffe://cluster.local/ns/demo/sa/client",
            "yes",
            "demo/waypoint"
        ]
    );

    // check: captured, STRICT, the policies that select web-0.
    let r = ambitctl(&local, &["check", "demo/web-0", "-o", "json"])?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let c = r.json();
    assert_eq!(
        (c["captured"].clone(), c["mtls"].clone()),
        (json!(true), json!("STRICT")),
        "{c:#}"
    );
    assert_eq!(
        c["l4Policies"][0]["policy"], "demo/web-from-waypoint",
        "{c:#}"
    );
    assert_eq!(c["l7Policies"][0]["policy"], "demo/web-get-only", "{c:#}");
    assert!(
        find(&c["checks"], |l| l["check"] == "certificate"
            && l["level"] == "ok")
        .is_some(),
        "{c:#}"
    );
    let table = ambitctl(&local, &["check", "client", "-n", "demo"])?;
    println!("$ ambitctl check client -n demo\n{}", table.stdout);
    assert!(
        table.stdout.contains(&format!(
            "[ok]   captured     node1's ztunnel captures it on interface {client_if}"
        )),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("verdict: captured, mTLS required"),
        "{}",
        table.stdout
    );

    // config-dump through the node's namespace: capture state per workload.
    let r = ambitctl(&local, &["config-dump", "ztunnel", "node2", "-o", "json"])?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = r.json();
    let web = find(&d["capture"]["workloads"], |e| {
        e["workload"] == "demo/web-0"
    })
    .cloned();
    assert_eq!(
        web,
        Some(
            json!({"workload": "demo/web-0", "address": "198.19.2.10", "interface": web_if,
                    "attached": true, "error": null})
        ),
        "{d:#}"
    );
    let table = ambitctl(&local, &["config-dump", "waypoint"])?;
    println!("$ ambitctl config-dump waypoint\n{}", table.stdout);
    assert!(
        table
            .stdout
            .starts_with("waypoint demo/waypoint (198.19.1.30:15000 in netns"),
        "{}",
        table.stdout
    );

    // Errors: a file that is not there; a namespace that is gone.
    let r = ambitctl(Path::new("/nonexistent/ambit-local.json"), &["status"])?;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("reading local cluster file /nonexistent/ambit-local.json"),
        "{}",
        r.stderr
    );

    // waypoint apply: the Gateway lands in the manifests directory, and
    // istiod-lite takes it up: the reference resolves to the Gateway, which
    // now waits only for its Service and pods (no controller deploys them in
    // a local cluster).
    let r = ambitctl(&local, &["waypoint", "apply", "-n", "shop"])?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let written = manifests.join("waypoint-shop-waypoint.yaml");
    assert!(
        r.stdout.starts_with(&format!(
            "waypoint shop/waypoint written ({})",
            written.canonicalize()?.display()
        )),
        "{}",
        r.stdout
    );
    let gw: Value = serde_yaml::from_str(&std::fs::read_to_string(&written)?)?;
    assert_eq!(gw["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(
        gw["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rejected(cluster.fabric_name())?.contains(
        "{\"object\":\"Gateway shop/waypoint\",\"origin\":\"translation\",\"reason\":\"waypoint has no Service shop/waypoint in the mesh",
    ) {
        if Instant::now() > deadline {
            bail!(
                "istiod-lite did not take up Gateway shop/waypoint:\n{}",
                rejected(cluster.fabric_name())?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = ambitctl(&local, &["waypoint", "apply", "-n", "shop", "-o", "json"])?;
    assert_eq!(again.json()["gateway"], "unchanged");
    let r = ambitctl(
        &local,
        &["waypoint", "apply", "-n", "shop", "--enroll-namespace"],
    )?;
    assert!(
        r.code == 1 && r.stderr.contains("--enroll-namespace is for Kubernetes"),
        "{}",
        r.stderr
    );

    // A ztunnel that is gone is reported as such, and status exits 2.
    drop(ztunnels.pop());
    let r = ambitctl(&local, &["status", "-o", "json"])?;
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let z2 = find(&r.json()["components"], |c| c["name"] == "node2")
        .cloned()
        .unwrap_or_default();
    assert_eq!(z2["reachable"], false, "{z2:#}");
    assert!(
        z2["error"]
            .as_str()
            .unwrap_or("")
            .contains("198.18.0.2:15000"),
        "{z2:#}"
    );

    drop(waypoint);
    drop(ztunnels);
    drop(istiod);
    drop(pins);
    Ok(())
}
