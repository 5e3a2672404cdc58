//! The namespace-cluster demo: istiod-lite serving the bundled manifests
//! (examples/demo) over xDS, with its CA signing workload certificates; a
//! capturing ztunnel per node following it; the namespace's waypoint running
//! in its pod (routes and L7 policy over xDS); unmodified curl in the pods,
//! and a report.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::{check_interrupted, field, interrupted, DemoArgs};
use crate::cluster::{Cluster, Pod, PodSpec, CONTROL_PLANE_IP};
use crate::istiod::Istiod;
use crate::mesh::TempDir;
use crate::netns::PinDir;
use crate::otlp::{render_tree, OtlpReceiver, ReceivedSpan};
use crate::process::{metric_sum, Waypoint, Ztunnel};
use crate::sniff::Sniffer;

const MARKER: &str = "ambit-wire-check-7c1d";

/// The bundled OTLP receiver listens here, in the fabric namespace beside
/// istiod-lite (the OTLP/gRPC port).
const OTLP_PORT: u16 = 4317;

/// The bundled manifests (overridable with AMBIT_MANIFESTS).
pub fn manifests_dir() -> PathBuf {
    std::env::var_os("AMBIT_MANIFESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"))
}

/// A Pod of the manifests, as the cluster builds it.
struct ManifestPod {
    spec: PodSpec,
    /// The waypoint Gateway the pod serves (its
    /// `gateway.networking.k8s.io/gateway-name` label), as `namespace/name`.
    gateway: Option<String>,
}

/// The label a waypoint pod carries (Istio deploys waypoint pods with it).
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Every Pod in the manifests (mesh or not): the cluster needs them all.
fn pods_in(dir: &Path) -> anyhow::Result<Vec<ManifestPod>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(f)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)?;
            if v.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
                continue;
            }
            let s = |path: &[&str]| -> Option<String> {
                let mut cur = &v;
                for p in path {
                    cur = cur.get(*p)?;
                }
                cur.as_str().map(str::to_string)
            };
            let (Some(name), Some(node), Some(ip)) = (
                s(&["metadata", "name"]),
                s(&["spec", "nodeName"]),
                s(&["status", "podIP"]),
            ) else {
                bail!(
                    "{}: a Pod without name, spec.nodeName or status.podIP",
                    f.display()
                );
            };
            let ns = s(&["metadata", "namespace"]).unwrap_or_else(|| "default".into());
            let node: u8 = node
                .strip_prefix("node")
                .and_then(|n| n.parse().ok())
                .context("nodeName must be nodeN")?;
            let ip: Ipv4Addr = ip.parse().context("podIP")?;
            let gateway =
                s(&["metadata", "labels", GATEWAY_NAME_LABEL]).map(|gw| format!("{ns}/{gw}"));
            out.push(ManifestPod {
                spec: PodSpec {
                    name: format!("{ns}/{name}"),
                    node,
                    ip,
                },
                gateway,
            });
        }
    }
    Ok(out)
}

/// A stand-in application: answers every HTTP request with `body` and the peer address.
fn http_app(pod: &Pod, port: u16, body: &'static str) -> anyhow::Result<()> {
    let addr = SocketAddr::new(pod.ip.into(), port);
    let listener = pod.ns.run(move || Ok(TcpListener::bind(addr)?))?;
    std::thread::spawn(move || {
        while let Ok((mut s, peer)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut buf);
            let text = format!("{body} (you are {})\n", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    Ok(())
}

/// What curl got: exit status, HTTP status (0 when there was no response)
/// and the body or curl's error.
struct Curl {
    ok: bool,
    status: u16,
    body: String,
}

/// Unmodified curl inside a pod's namespace; `method` None is a GET.
fn curl(pod: &Pod, method: Option<&str>, url: &str) -> Curl {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", pod.ns.name()))
        .args(["--", "curl", "-sS", "--max-time", "3"]);
    if let Some(m) = method {
        cmd.args(["-X", m]);
    }
    // The status on a line of its own after the body.
    let out = match cmd.args(["-w", "\n%{http_code}", url]).output() {
        Ok(o) => o,
        Err(e) => {
            return Curl {
                ok: false,
                status: 0,
                body: format!("curl not runnable: {e}"),
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        ok: out.status.success(),
        status: status.trim().parse().unwrap_or(0),
        // curl's own error, if any, after what the server sent.
        body: format!("{body}{}", String::from_utf8_lossy(&out.stderr))
            .trim()
            .to_string(),
    }
}

/// The peer address the stand-in app reported ("... (you are IP)").
fn seen_as(body: &str) -> &str {
    body.rsplit("you are ")
        .next()
        .unwrap_or("")
        .trim_end_matches(')')
}

/// Prints the flows in `log`'s access lines, one line per distinct (source,
/// destination, mTLS, source IP, result) with its count, in order of first
/// appearance.
fn flows(log: &str) {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for line in log.lines().filter(|l| l.contains(" access: ")) {
        let src = field(line, "src.addr");
        // The IP only: every connection has a port of its own.
        let src_ip = src.rsplit_once(':').map_or(src, |(ip, _)| ip);
        let flow = format!(
            "{} -> {}  mTLS={}  src={src_ip}  result={}",
            field(line, "src.identity"),
            field(line, "dst.identity"),
            if field(line, "security") == "mutual_tls" {
                "yes"
            } else {
                "no"
            },
            field(line, "result"),
        );
        match seen.iter_mut().find(|(f, _)| *f == flow) {
            Some((_, n)) => *n += 1,
            None => seen.push((flow, 1)),
        }
    }
    for (flow, n) in seen {
        println!(
            "  {flow}  ({n} connection{})",
            if n == 1 { "" } else { "s" }
        );
    }
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let manifests = args.manifests.clone().unwrap_or_else(manifests_dir);
    let pods = pods_in(&manifests)?;
    let specs: Vec<PodSpec> = pods.iter().map(|p| p.spec.clone()).collect();
    let nodes = specs.iter().map(|s| s.node).max().unwrap_or(1).max(2);
    println!(
        "Ambit demo: {nodes} nodes in network namespaces, eBPF capture, a waypoint, manifests from {}",
        manifests.display()
    );
    let dir = TempDir::new("ambit-demo")?;

    // The cluster, then the control plane in the fabric namespace (reached
    // by every node and pod at CONTROL_PLANE_IP), then one capturing ztunnel
    // per node following it over xDS, with certificates from its CA.
    let cluster = Cluster::build_with(nodes, &specs)?;
    let node_names: Vec<String> = (1..=nodes).map(|n| format!("node{n}")).collect();
    let names: Vec<&str> = node_names.iter().map(String::as_str).collect();
    let istiod = Istiod::spawn_in(
        Some(cluster.fabric_name()),
        dir.path(),
        &manifests,
        CONTROL_PLANE_IP.into(),
        &names,
    )?;
    let mesh = istiod.mesh_config()?;
    let native = |name: &str| {
        mesh.workloads
            .iter()
            .find(|w| format!("{}/{}", w.namespace, w.name) == name)
            .map(|w| w.native_tunnel)
    };
    println!(
        "  istiod-lite at {CONTROL_PLANE_IP}:15012 serves {} workloads, {} services, {} L4 and {} L7 policies, {} HTTPRoutes over xDS; its CA signs each node's workload certificates",
        mesh.workloads.len(),
        mesh.services.len(),
        mesh.policies.len(),
        mesh.http_policies.len(),
        mesh.http_routes.len()
    );
    println!("  work dir {} (removed at exit)", dir.path().display());
    // Every proxy exports its spans to the bundled receiver.
    let otlp_addr = SocketAddr::new(CONTROL_PLANE_IP.into(), OTLP_PORT);
    let otlp_listener = crate::netns::run_in(cluster.fabric_name(), move || {
        Ok(TcpListener::bind(otlp_addr)?)
    })?;
    let otlp = OtlpReceiver::from_listener(otlp_listener)?;
    let otlp_endpoint = otlp.endpoint();
    let traced = |node: &str| -> anyhow::Result<crate::process::Source> {
        Ok(istiod
            .source_for(node)?
            .with_args(&["--otlp-endpoint", &otlp_endpoint]))
    };
    println!("  OTLP receiver at {otlp_addr}: ztunnels and the waypoint export their spans to it");
    check_interrupted()?;
    let pins = PinDir::new()?;
    let mut ztunnels = Vec::new();
    for n in 1..=nodes {
        check_interrupted()?;
        let node = cluster.node(n);
        let source = traced(&format!("node{n}"))?;
        let captured = node
            .pods
            .iter()
            .filter(|p| native(&p.name) == Some(false))
            .count();
        // A node running only a waypoint pod has nothing to capture yet.
        let z = if captured > 0 {
            Ztunnel::spawn_capturing_from(node, dir.path(), &source, pins.path())?
        } else {
            Ztunnel::spawn_capturing_idle(node, dir.path(), &source, pins.path())?
        };
        z.wait_certificates(Duration::from_secs(15))?;
        println!(
            "  node{n} {}: ztunnel up (config and certificates from istiod-lite), capturing {captured} pod(s)",
            node.ip,
        );
        ztunnels.push(z);
    }

    // Each waypoint pod runs the waypoint in its own namespace: HBONE on
    // <pod ip>:15008 as the pod's identity, config (routes, L7 policies) over
    // xDS and its certificate from the CA with the token istiod-lite issued
    // that pod (never its node's: that would give it its neighbours'
    // identities).
    let mut waypoints = Vec::new();
    for p in pods.iter().filter(|p| native(&p.spec.name) == Some(true)) {
        let Some(gateway) = &p.gateway else { continue };
        let pod = cluster
            .pod_named(&p.spec.name)
            .with_context(|| format!("pod {} not built", p.spec.name))?;
        let node = format!("node{}", p.spec.node);
        let source = istiod
            .source_for_waypoint(&p.spec.name)?
            .with_args(&["--otlp-endpoint", &otlp_endpoint]);
        let w = Waypoint::spawn_waypoint_in_netns(pod, dir.path(), &source, gateway, &node, &[])?;
        println!(
            "  {node}: waypoint {gateway} up in pod {} ({}:15008; routes, L7 policy and certificate from istiod-lite)",
            p.spec.name, pod.ip
        );
        waypoints.push((pod.ip, w));
    }
    let (waypoint_ip, waypoint) = waypoints
        .first()
        .context("the manifests declare no waypoint pod (a pod labelled gateway.networking.k8s.io/gateway-name of a Gateway of class istio-waypoint)")?;
    // For `ambitctl --local`: where each component answers, in which namespace.
    let local = crate::local_cluster::write(dir.path(), &cluster, istiod.monitoring(), &manifests)?;

    let pod = |name: &str| {
        cluster
            .pod_named(name)
            .with_context(|| format!("pod {name} not in the manifests"))
    };
    let (client, outsider) = (pod("demo/client")?, pod("legacy/outsider")?);
    http_app(pod("demo/reviews-v1")?, 9080, "reviews v1")?;
    http_app(pod("demo/reviews-v2")?, 9080, "reviews v2")?;
    let vip = mesh
        .services
        .iter()
        .find(|s| s.namespace == "demo" && s.name == "reviews")
        .and_then(|s| s.addresses.first())
        .context("no demo/reviews service in the manifests")?;
    let route = mesh
        .http_routes
        .iter()
        .find(|r| r.namespace == "demo" && r.name == "reviews-split")
        .map(|r| r.key())
        .unwrap_or_else(|| "-".into());
    let url = format!("http://{vip}:9080/");
    println!();

    // Traffic: each request a curl of its own, so each is a new connection;
    // the split is the waypoint's choice per request, not L4 balancing.
    let (mut v1, mut v2, mut ok, mut seen) = (0usize, 0usize, 0usize, String::new());
    let mut failures = Vec::new();
    println!(
        "sending {} requests with curl from demo/client to {url} ...",
        args.requests
    );
    for _ in 0..args.requests {
        check_interrupted()?;
        let r = curl(client, None, &url);
        if r.ok && r.status == 200 {
            ok += 1;
            v1 += usize::from(r.body.contains("reviews v1"));
            v2 += usize::from(r.body.contains("reviews v2"));
            seen = seen_as(&r.body).to_string();
        } else if failures.len() < 3 {
            failures.push(format!("{} {}", r.status, r.body));
        }
    }
    let pct = |n: usize| 100.0 * n as f64 / ok.max(1) as f64;
    println!(
        "demo/client -> {url}: {ok}/{} requests answered; v1 {v1}, v2 {v2} ({:.0}% / {:.0}%)",
        args.requests,
        pct(v1),
        pct(v2)
    );
    for f in &failures {
        println!("  failed: {f}");
    }
    println!("  split by HTTPRoute {route} (weights 90/10), applied per request by the waypoint");
    println!(
        "  reviews saw the caller as {seen} (the waypoint pod: it opens its own tunnel to reviews; demo/client is {})",
        client.ip
    );
    let denied = curl(client, Some("POST"), &url);
    println!(
        "demo/client -> POST {url}: {} {} (L7 policy demo/reviews-readers allows only GET, enforced by the waypoint)",
        denied.status, denied.body
    );
    let direct = format!("http://{}:9080/", pod("demo/reviews-v1")?.ip);
    let outsider_r = curl(outsider, None, &direct);
    println!(
        "legacy/outsider -> {direct}: {}",
        if outsider_r.ok {
            format!("ANSWERED (unexpected!): {}", outsider_r.body)
        } else {
            "refused: plaintext to a STRICT mTLS namespace".into()
        }
    );

    // Wire check: a marker in the request must never cross between nodes in
    // clear, whichever hops (client -> waypoint -> reviews) cross them.
    let sniffer = Sniffer::start(cluster.fabric_name())?;
    let _ = curl(client, None, &format!("{url}{MARKER}"));
    let wire = sniffer.stop()?;
    // The proxies' own traffic to the fabric (xDS and the CA on 15012,
    // spans on 4317) shares the wire with the pods'; only the pods' counts.
    let control = [15012, OTLP_PORT];
    let ports: std::collections::BTreeSet<u16> = wire
        .tcp_ports()
        .into_iter()
        .filter(|(s, d)| !control.contains(s) && !control.contains(d))
        .map(|(s, d)| if s == 15008 { s } else { d })
        .collect();
    println!(
        "wire between the nodes: pod traffic on TCP ports {ports:?} (control plane and span export aside); marker in cleartext: {}",
        if wire.contains(MARKER.as_bytes()) {
            "YES (unexpected!)"
        } else {
            "no"
        }
    );

    // Capture counters are copied from the BPF map once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    println!("\nflows seen by node1's ztunnel (source side: straight to the waypoint):");
    flows(&ztunnels[0].log());
    println!("flows seen by node2's ztunnel (destination side: from the waypoint):");
    flows(&ztunnels[1].log());
    let m1 = ztunnels[0].metrics()?;
    let m2 = ztunnels[1].metrics()?;
    let mw = waypoint.metrics()?;
    let requests = |labels: &[(&str, &str)]| {
        let mut all = vec![("reporter", "waypoint")];
        all.extend_from_slice(labels);
        metric_sum(&mw, "istio_requests_total", &all)
    };
    println!("\nkey metrics:");
    println!(
        "  waypoint istio_requests_total{{reporter=\"waypoint\"}}                {}",
        requests(&[])
    );
    println!(
        "  waypoint   destination_service_name=\"reviews-v1\", response_code=\"200\" {}",
        requests(&[
            ("destination_service_name", "reviews-v1"),
            ("response_code", "200")
        ])
    );
    println!(
        "  waypoint   destination_service_name=\"reviews-v2\", response_code=\"200\" {}",
        requests(&[
            ("destination_service_name", "reviews-v2"),
            ("response_code", "200")
        ])
    );
    println!(
        "  waypoint   response_code=\"403\" (RBAC)                               {}",
        requests(&[("response_code", "403")])
    );
    println!(
        "  node1 istio_tcp_connections_opened_total{{reporter=\"source\"}}       {}",
        metric_sum(
            &m1,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("response_flags", "-")]
        )
    );
    println!(
        "  node2 istio_tcp_connections_opened_total{{reporter=\"destination\"}}  {}",
        metric_sum(
            &m2,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("response_flags", "-")]
        )
    );
    println!(
        "  node2 refused plaintext (mtls_required)                          {}",
        metric_sum(
            &m2,
            "ambit_connection_failures_total",
            &[("reason", "mtls_required")]
        )
    );
    println!(
        "  node1 ambit_capture_packets_total{{result=\"captured_new\"}}          {}",
        metric_sum(
            &m1,
            "ambit_capture_packets_total",
            &[("result", "captured_new")]
        )
    );

    // One request's trace, end to end: the client's ztunnel's tunnel span,
    // the waypoint's request span under it, and reviews' ztunnel's span under
    // that (the waypoint names its request on the CONNECT it opens).
    let trace = otlp
        .wait_for(|spans| full_trace(spans).is_some(), Duration::from_secs(15))
        .await
        .map(|spans| full_trace(&spans).unwrap_or_default())
        .unwrap_or_else(|e| {
            println!("\nno complete trace: {e:#}");
            Vec::new()
        });
    if let Some(first) = trace.first() {
        let mut services: Vec<&str> = Vec::new();
        for s in &trace {
            if !services.contains(&s.service_name.as_str()) {
                services.push(&s.service_name);
            }
        }
        println!(
            "\none request's trace, as the bundled OTLP receiver got it ({} spans in all):",
            otlp.spans().len()
        );
        println!(
            "  trace {}: {} spans from {}",
            first.trace_id,
            trace.len(),
            services.join(", ")
        );
        for line in render_tree(&trace).lines().skip(1) {
            println!("  {line}");
        }
    }

    // What capture attached, so the test can see it all go at teardown.
    let (programs, links) = attached(&cluster)?;
    println!(
        "\neBPF: programs {programs:?} at tc ingress of {} links: {}",
        links.len(),
        links.join(" ")
    );

    if args.keep {
        println!("\nthe mesh is up; try, as root:");
        println!("  export AMBIT_LOCAL={}", local.display());
        let ambitctl = crate::process::bin_path("ambitctl")
            .map_or_else(|_| "ambitctl".into(), |p| p.display().to_string());
        println!("  {ambitctl} status    (also: workloads, check demo/client, config-dump ztunnel node1)");
        println!("  nsenter --net=/run/netns/{} curl {url}", client.ns.name());
        println!(
            "  nsenter --net=/run/netns/{} curl http://{waypoint_ip}:15020/metrics",
            pod_of(&cluster, *waypoint_ip)?
        );
        println!(
            "  nsenter --net=/run/netns/{} curl http://{}:15020/metrics",
            cluster.node(1).ns.name(),
            cluster.node(1).ip
        );
        println!(
            "  nsenter --net=/run/netns/{} curl http://{CONTROL_PLANE_IP}:15014/debug/config",
            cluster.fabric_name()
        );
        println!(
            "  logs: {} {} {} {}",
            istiod.log_path.display(),
            waypoint.log_path.display(),
            ztunnels[0].log_path.display(),
            ztunnels[1].log_path.display()
        );
        println!("Ctrl-C tears everything down.");
        while !interrupted() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    anyhow::ensure!(
        ok == args.requests,
        "only {ok}/{} client requests were answered",
        args.requests
    );
    anyhow::ensure!(
        v1 + v2 == ok,
        "answers from neither reviews-v1 nor reviews-v2"
    );
    anyhow::ensure!(
        seen == waypoint_ip.to_string(),
        "reviews saw {seen}, not the waypoint {waypoint_ip}"
    );
    anyhow::ensure!(
        denied.status == 403 && denied.body.contains("RBAC: access denied"),
        "the POST was not denied by the waypoint: {} {}",
        denied.status,
        denied.body
    );
    anyhow::ensure!(!outsider_r.ok, "the outsider was not refused");
    anyhow::ensure!(
        !wire.contains(MARKER.as_bytes()) && ports == [15008].into(),
        "traffic between nodes was not only HBONE"
    );
    anyhow::ensure!(
        !trace.is_empty(),
        "no trace crossed ztunnel, waypoint and ztunnel"
    );
    println!("\ndemo OK; tearing down");
    drop(waypoints);
    drop(ztunnels);
    Ok(())
}

/// The namespace of the pod at `ip`.
fn pod_of(cluster: &Cluster, ip: Ipv4Addr) -> anyhow::Result<&str> {
    cluster
        .nodes
        .iter()
        .flat_map(|n| &n.pods)
        .find(|p| p.ip == ip)
        .map(|p| p.ns.name())
        .with_context(|| format!("no pod at {ip}"))
}

/// The spans of the first trace in `spans` that crossed the client's
/// ztunnel (outbound), the waypoint (a request answered 200) and the
/// destination's ztunnel (inbound), in start order.
fn full_trace(spans: &[ReceivedSpan]) -> Option<Vec<ReceivedSpan>> {
    let mut traces: std::collections::BTreeMap<&str, Vec<&ReceivedSpan>> = Default::default();
    for s in spans {
        traces.entry(s.trace_id.as_str()).or_default().push(s);
    }
    let complete = |t: &Vec<&ReceivedSpan>| {
        let has = |service: &str, pred: &dyn Fn(&ReceivedSpan) -> bool| {
            t.iter()
                .any(|s| s.service_name.starts_with(service) && pred(s))
        };
        has("ztunnel.", &|s| s.name == "outbound")
            && has("waypoint.", &|s| {
                s.attr("http.response.status_code") == Some("200")
            })
            && has("ztunnel.", &|s| s.name == "inbound")
    };
    let mut trace: Vec<ReceivedSpan> = traces
        .into_values()
        .filter(complete)
        .min_by_key(|t| t.iter().map(|s| s.start).min())?
        .into_iter()
        .cloned()
        .collect();
    trace.sort_by_key(|s| s.start);
    Some(trace)
}

/// The ids of the BPF programs at tc ingress of the cluster's pod veths and
/// node uplinks, and those links' names.
fn attached(cluster: &Cluster) -> anyhow::Result<(Vec<u32>, Vec<String>)> {
    let mut programs = std::collections::BTreeSet::new();
    let mut links = Vec::new();
    for node in &cluster.nodes {
        let ifs: Vec<String> = node
            .pods
            .iter()
            .map(|p| p.host_if.clone())
            .chain([node.uplink.clone()])
            .collect();
        let found = {
            let ifs = ifs.clone();
            node.ns.run(move || {
                let mut ids = Vec::new();
                for i in &ifs {
                    ids.extend(ebpf_redirect::ingress_programs(i)?);
                }
                Ok(ids)
            })?
        };
        programs.extend(found);
        links.extend(ifs);
    }
    Ok((programs.into_iter().collect(), links))
}
