//! The namespace-cluster demo: istiod-lite serving the bundled manifests
//! (examples/demo) over xDS, with its CA signing workload certificates; two
//! nodes with a capturing ztunnel each following it; unmodified curl in the
//! pods, and a report.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::{field, DemoArgs};
use crate::cluster::{Cluster, Pod, PodSpec, CONTROL_PLANE_IP};
use crate::istiod::Istiod;
use crate::mesh::TempDir;
use crate::netns::PinDir;
use crate::process::{metric_sum, Ztunnel};
use crate::sniff::Sniffer;

const MARKER: &str = "ambit-wire-check-7c1d";

/// The bundled manifests (overridable with AMBIT_MANIFESTS).
pub fn manifests_dir() -> PathBuf {
    std::env::var_os("AMBIT_MANIFESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"))
}

/// Every Pod in the manifests (mesh or not): the cluster needs them all.
fn pods_in(dir: &Path) -> anyhow::Result<Vec<(PodSpec, String, String)>> {
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
            let sa = s(&["spec", "serviceAccountName"]).unwrap_or_else(|| "default".into());
            let node: u8 = node
                .strip_prefix("node")
                .and_then(|n| n.parse().ok())
                .context("nodeName must be nodeN")?;
            let ip: Ipv4Addr = ip.parse().context("podIP")?;
            out.push((
                PodSpec {
                    name: format!("{ns}/{name}"),
                    node,
                    ip,
                },
                ns,
                sa,
            ));
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

/// Unmodified curl inside a pod's namespace.
fn curl(pod: &Pod, url: &str) -> (bool, String) {
    super::run_client(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", pod.ns.name()))
            .args(["--", "curl", "-sS", "--max-time", "3", url]),
    )
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let manifests = args.manifests.clone().unwrap_or_else(manifests_dir);
    println!(
        "Ambit demo: two nodes in network namespaces, eBPF capture, manifests from {}",
        manifests.display()
    );
    let dir = TempDir::new("ambit-demo")?;

    // The cluster, then the control plane in the fabric namespace (reached
    // by every node at CONTROL_PLANE_IP), then one capturing ztunnel per node
    // following it over xDS, with certificates from its CA.
    let pods = pods_in(&manifests)?;
    let specs: Vec<PodSpec> = pods.iter().map(|(s, _, _)| s.clone()).collect();
    let nodes = specs.iter().map(|s| s.node).max().unwrap_or(1).max(2);
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
    // Waypoints speak HBONE themselves: in the mesh, not captured.
    let captured = |name: &str| {
        mesh.workloads
            .iter()
            .any(|w| !w.native_tunnel && format!("{}/{}", w.namespace, w.name) == name)
    };
    println!(
        "  istiod-lite at {CONTROL_PLANE_IP}:15012 serves {} workloads, {} services, {} policies over xDS; its CA signs each node's workload certificates",
        mesh.workloads.len(),
        mesh.services.len(),
        mesh.policies.len()
    );
    let pins = PinDir::new()?;
    let mut ztunnels = Vec::new();
    for n in 1..=nodes {
        let node = cluster.node(n);
        let source = istiod.source_for(&format!("node{n}"))?;
        let z = Ztunnel::spawn_capturing_from(node, dir.path(), &source, pins.path())?;
        z.wait_certificates(Duration::from_secs(15))?;
        println!(
            "  node{n} {}: ztunnel up (config and certificates from istiod-lite), capturing {} pod(s)",
            node.ip,
            node.pods.iter().filter(|p| captured(&p.name)).count()
        );
        ztunnels.push(z);
    }
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
    let url = format!("http://{vip}:9080/");
    println!();

    // Traffic.
    let (mut v1, mut v2, mut ok, mut seen_as) = (0, 0, 0, String::new());
    for _ in 0..args.requests {
        let (success, out) = curl(client, &url);
        if success {
            ok += 1;
            v1 += usize::from(out.contains("reviews v1"));
            v2 += usize::from(out.contains("reviews v2"));
            seen_as = out
                .rsplit("you are ")
                .next()
                .unwrap_or("")
                .trim_end_matches(')')
                .to_string();
        }
    }
    println!(
        "demo/client -> {url}: {ok}/{} requests answered; v1 {v1}, v2 {v2}",
        args.requests
    );
    println!("  (L4 round robin; the 90/10 HTTPRoute in the manifests needs the waypoint)");
    println!(
        "  reviews saw the caller as {seen_as} (demo/client is {}: source IP preserved)",
        client.ip
    );
    let direct = format!("http://{}:9080/", pod("demo/reviews-v1")?.ip);
    let (outsider_ok, outsider_out) = curl(outsider, &direct);
    println!(
        "legacy/outsider -> {direct}: {}",
        if outsider_ok {
            format!("ANSWERED (unexpected!): {outsider_out}")
        } else {
            "refused: plaintext to a STRICT mTLS namespace".into()
        }
    );

    // Wire check: a marker in the request must never cross between nodes in clear.
    let sniffer = Sniffer::start(cluster.fabric_name())?;
    let _ = curl(client, &format!("{url}{MARKER}"));
    let wire = sniffer.stop()?;
    let ports: std::collections::BTreeSet<u16> = wire
        .tcp_ports()
        .into_iter()
        .map(|(s, d)| if s == 15008 { s } else { d })
        .collect();
    println!(
        "wire between the nodes: TCP ports {ports:?}; marker in cleartext: {}",
        if wire.contains(MARKER.as_bytes()) {
            "YES (unexpected!)"
        } else {
            "no"
        }
    );

    // Capture counters are copied from the BPF map once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    println!("\nflows seen by node2's ztunnel (destination side):");
    let log2 = ztunnels[1].log();
    let mut shown = 0;
    for line in log2.lines().filter(|l| l.contains(" access: ")) {
        let refused = !line.contains("result=\"ok\"");
        if shown < 2 || refused {
            println!(
                "  {} -> {}  mTLS={}  src={}  result={}",
                field(line, "src.identity"),
                field(line, "dst.identity"),
                if field(line, "security") == "mutual_tls" {
                    "yes"
                } else {
                    "no"
                },
                field(line, "src.addr"),
                field(line, "result"),
            );
            shown += 1;
        }
    }
    let m1 = ztunnels[0].metrics()?;
    let m2 = ztunnels[1].metrics()?;
    println!("\nkey metrics:");
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
    println!("\n(traces and the L7 split arrive with the waypoint; see docs/status.md)");

    if args.keep {
        println!("\nthe mesh is up; try, as root:");
        println!("  nsenter --net=/run/netns/{} curl {url}", client.ns.name());
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
            "  logs: {} {} {}",
            istiod.log_path.display(),
            ztunnels[0].log_path.display(),
            ztunnels[1].log_path.display()
        );
        println!("Ctrl-C tears everything down.");
        tokio::signal::ctrl_c().await?;
    }
    anyhow::ensure!(
        ok == args.requests,
        "only {ok}/{} client requests were answered",
        args.requests
    );
    anyhow::ensure!(
        seen_as == client.ip.to_string(),
        "the server did not see the client's address"
    );
    anyhow::ensure!(!outsider_ok, "the outsider was not refused");
    anyhow::ensure!(
        !wire.contains(MARKER.as_bytes()) && ports == [15008].into(),
        "traffic between nodes was not only HBONE"
    );
    println!("\ndemo OK; tearing down");
    drop(ztunnels);
    Ok(())
}
