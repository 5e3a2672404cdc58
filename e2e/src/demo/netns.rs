//! The namespace-cluster demo: the bundled manifests (examples/demo) rendered
//! by istiod-lite, certificates from istiod-lite's CA, two nodes with a
//! capturing ztunnel each, unmodified curl in the pods, and a report.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::{field, DemoArgs};
use crate::cluster::{Cluster, Pod, PodSpec};
use crate::mesh::TempDir;
use crate::netns::PinDir;
use crate::process::{bin_path, metric_sum, Ztunnel};
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

fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

    // Control plane, offline: render the manifests, issue certificates.
    let istiod = bin_path("istiod-lite")?;
    let config = dir.path().join("mesh.yaml");
    let rendered = run_tool(
        Command::new(&istiod)
            .arg("render")
            .arg("--manifests")
            .arg(&manifests),
    )?;
    std::fs::write(&config, &rendered)?;
    let pods = pods_in(&manifests)?;
    let mesh = mesh_core::config::parse_mesh_config(&rendered)?;
    let in_mesh = |name: &str| {
        mesh.workloads
            .iter()
            .any(|w| format!("{}/{}", w.namespace, w.name) == name)
    };
    let ca_dir = dir.path().join("ca");
    run_tool(
        Command::new(&istiod)
            .args(["ca", "init", "--data-dir"])
            .arg(&ca_dir),
    )?;
    for (spec, ns, sa) in &pods {
        if in_mesh(&spec.name) {
            let id = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
            let out = dir.path().join(format!("certs-node{}", spec.node));
            run_tool(
                Command::new(&istiod)
                    .args(["ca", "issue", "--data-dir"])
                    .arg(&ca_dir)
                    .args(["--identity", &id, "--out"])
                    .arg(&out),
            )?;
        }
    }
    println!("  istiod-lite rendered {} workloads, {} services, {} policies; CA issued their certificates",
        mesh.workloads.len(), mesh.services.len(), mesh.policies.len());

    // The cluster and one capturing ztunnel per node.
    let specs: Vec<PodSpec> = pods.iter().map(|(s, _, _)| s.clone()).collect();
    let nodes = specs.iter().map(|s| s.node).max().unwrap_or(1).max(2);
    let cluster = Cluster::build_with(nodes, &specs)?;
    let pins = PinDir::new()?;
    let mut ztunnels = Vec::new();
    for n in 1..=nodes {
        let node = cluster.node(n);
        let certs = dir.path().join(format!("certs-node{n}"));
        std::fs::create_dir_all(&certs)?;
        if !certs.join("root-cert.pem").exists() {
            std::fs::copy(ca_dir.join("root-cert.pem"), certs.join("root-cert.pem"))?;
        }
        let z = Ztunnel::spawn_capturing(node, dir.path(), &config, &certs, pins.path())?;
        println!(
            "  node{n} {}: ztunnel up, capturing {} pod(s)",
            node.ip,
            node.pods.iter().filter(|p| in_mesh(&p.name)).count()
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
        .first()
        .and_then(|s| s.addresses.first())
        .context("no service in the manifests")?;
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
            "  logs: {} {}",
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
