//! Control-plane benchmark: a synthetic cluster (default 10,000 pods, 1,000
//! services, 500 policies on 100 nodes) pushed over delta ADS to 100 clients.
//!
//! Prints: model build time (translate, validate, encode, snapshot), the
//! first full push to one client (time, bytes), one pod change reaching all
//! clients (time, bytes per client), and the RSS of a real `istiod-lite
//! serve` process on the same cluster with the clients connected.
//!
//! The timing phases run istiod-lite's pipeline and xDS server in this
//! process (so the pod change starts at the source event, not at a file
//! write); the RSS phase runs the real binary, since in-process clients
//! would inflate the figure.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use istiod_lite::pipeline::{self, MeshOptions, Outputs, PipelineMetrics};
use istiod_lite::sources::{manifests, ClusterState};
use istiod_lite::xds::{XdsMetrics, XdsServer};
use mesh_core::grpc::ControlPlane;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use mesh_core::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use mesh_core::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

#[derive(Parser)]
#[command(about = "istiod-lite xDS benchmark on a synthetic cluster")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    #[arg(long, default_value_t = 500)]
    policies: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Pod changes to time.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Skip the real-process RSS phase.
    #[arg(long)]
    no_rss: bool,
}

const NAMESPACES: usize = 100;

/// The synthetic cluster as manifests: namespaces `ns-N` (ambient), pods
/// spread over namespaces and nodes, services selecting `app=svc-K` (pods
/// are assigned round robin), half the policies selector-scoped.
fn manifests(a: &Args) -> String {
    let mut y = String::with_capacity(a.pods * 400);
    for n in 0..NAMESPACES {
        let _ = writeln!(
            y,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---"
        );
    }
    let per_ns_services = a.services.div_ceil(NAMESPACES).max(1);
    for p in 0..a.pods {
        let ns = p % NAMESPACES;
        let svc = (p / NAMESPACES) % per_ns_services;
        // Ten namespaces per node, each namespace on many nodes.
        let node = (p / 10) % a.nodes;
        let ip = pod_ip(p, 0);
        let _ = writeln!(
            y,
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: ns-{ns}, labels: {{app: svc-{svc}}}}}\nspec: {{nodeName: node-{node}, serviceAccountName: sa-{svc}, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: \"{ip}\"}}\n---"
        );
    }
    for s in 0..a.services {
        let ns = s % NAMESPACES;
        let k = s / NAMESPACES;
        let vip = format!("198.18.{}.{}", 128 + (s / 250), 1 + s % 250);
        let _ = writeln!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{k}, namespace: ns-{ns}}}\nspec: {{selector: {{app: svc-{k}}}, clusterIP: \"{vip}\", ports: [{{port: 80, targetPort: 8080}}]}}\n---"
        );
    }
    for i in 0..a.policies {
        let ns = i % NAMESPACES;
        let selector = if i % 2 == 0 {
            format!(
                "selector: {{matchLabels: {{app: svc-{}}}}}, ",
                (i / NAMESPACES) % per_ns_services
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            y,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i}, namespace: ns-{ns}}}\nspec: {{{selector}action: ALLOW, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/ns-{ns}/sa/sa-0\"]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}\n---"
        );
    }
    y
}

/// Pod `p`'s address; a later `generation` moves it (a restarted pod) into
/// a range no original pod uses (VIPs are 198.18.128–131.x).
fn pod_ip(p: usize, generation: usize) -> String {
    if generation == 0 {
        format!("198.19.{}.{}", 1 + p / 250 % 250, 1 + p % 250)
    } else {
        format!("198.18.{}.{}", 200 + generation % 50, 1 + p % 250)
    }
}

/// Counts what each client has received until all hold a full state: every
/// address (sent in parts) and their node's authorization policies (one
/// response; nodes are sent only the policies that can apply to them).
struct SyncTracker {
    addresses: Vec<usize>,
    authz: Vec<Option<usize>>,
    n_addr: usize,
}

impl SyncTracker {
    fn new(clients: usize, n_addr: usize) -> Self {
        SyncTracker {
            addresses: vec![0; clients],
            authz: vec![None; clients],
            n_addr,
        }
    }

    /// Records `r`; true when its client has just become fully synced.
    fn record(&mut self, r: &Received) -> bool {
        let was = self.synced(r.client);
        let n = r.response.resources.len();
        if r.response.type_url == ADDRESS_TYPE {
            self.addresses[r.client] += n;
        } else {
            *self.authz[r.client].get_or_insert(0) += n;
        }
        !was && self.synced(r.client)
    }

    fn synced(&self, c: usize) -> bool {
        self.addresses[c] >= self.n_addr && self.authz[c].is_some()
    }

    fn mean_authz(&self) -> f64 {
        let v: Vec<usize> = self.authz.iter().flatten().copied().collect();
        v.iter().sum::<usize>() as f64 / v.len().max(1) as f64
    }
}

struct Received {
    client: usize,
    at: Instant,
    bytes: usize,
    response: DeltaDiscoveryResponse,
}

/// A delta client that ACKs everything and reports each response (it keeps
/// nothing, so it costs little memory).
async fn client(
    id: usize,
    node: String,
    addr: SocketAddr,
    report: mpsc::UnboundedSender<Received>,
) -> anyhow::Result<()> {
    let channel = ControlPlane::plaintext(format!("http://{addr}")).channel()?;
    let mut c = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(8);
    for (i, t) in [AUTHORIZATION_TYPE, ADDRESS_TYPE].into_iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: format!("bench~{id}"),
                metadata: Some(prost_types::Struct {
                    fields: [(
                        "NODE_NAME".to_string(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(node.clone())),
                        },
                    )]
                    .into(),
                }),
                ..Default::default()
            }),
            type_url: t.into(),
            ..Default::default()
        })
        .await?;
    }
    let mut stream = c
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(r) = stream.message().await? {
        let at = Instant::now();
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        let bytes = r.encoded_len();
        if report
            .send(Received {
                client: id,
                at,
                bytes,
                response: r,
            })
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Clients `ids`, client `i` on node `i % nodes`.
fn spawn_clients(
    ids: std::ops::Range<usize>,
    nodes: usize,
    addr: SocketAddr,
    report: &mpsc::UnboundedSender<Received>,
) {
    for id in ids {
        tokio::spawn(client(
            id,
            format!("node-{}", id % nodes),
            addr,
            report.clone(),
        ));
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "synthetic cluster: {} pods, {} services, {} policies, {} nodes, {} namespaces; {} xDS clients",
        args.pods, args.services, args.policies, args.nodes, NAMESPACES, args.clients
    );
    let yaml = manifests(&args);
    let t = Instant::now();
    let mut state = ClusterState::default();
    let mut rejected = Vec::new();
    manifests::load_str("synthetic", &yaml, &mut state, &mut rejected);
    if !rejected.is_empty() {
        bail!("synthetic manifests rejected: {}", rejected[0]);
    }
    println!(
        "{:<44} {:>10.1} ms",
        "parse manifests (YAML, not timed below)",
        ms(t.elapsed())
    );

    let options = MeshOptions::new("cluster.local", "istio-system");
    if std::env::var_os("AMBIT_BENCH_PHASES").is_some() {
        let t = Instant::now();
        let tr = istiod_lite::translate::translate(&state, &options);
        let t1 = t.elapsed();
        mesh_core::config::validate_mesh_config(&tr.config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let t2 = t.elapsed();
        let enc = mesh_core::xds::encode(&tr.config);
        let t3 = t.elapsed();
        let snap = istiod_lite::xds::Snapshot::default().next(enc);
        let t4 = t.elapsed();
        println!("phases: translate {:.1} ms, validate {:.1} ms, encode {:.1} ms, snapshot {:.1} ms ({})", ms(t1), ms(t2 - t1), ms(t3 - t2), ms(t4 - t3), snap.is_some());
    }
    let outputs = Arc::new(Outputs::default());
    let mut registry = prometheus_client::registry::Registry::default();
    let pm = PipelineMetrics::register(&mut registry);
    let xm = XdsMetrics::register(&mut registry);
    let t = Instant::now();
    pipeline::publish(&state, Vec::new(), &options, &outputs, &pm).map_err(anyhow::Error::msg)?;
    let build = t.elapsed();
    let snapshot = outputs.snapshots.borrow().clone();
    let (n_addr, n_authz) = (
        snapshot.resources.get(ADDRESS_TYPE).map_or(0, |m| m.len()),
        snapshot
            .resources
            .get(AUTHORIZATION_TYPE)
            .map_or(0, |m| m.len()),
    );
    println!(
        "{:<44} {:>10.1} ms   ({n_addr} addresses, {n_authz} authorizations)",
        "build model (translate+validate+encode)",
        ms(build)
    );

    // What every ztunnel does with a push: decode the whole set, assemble
    // and validate the model, index it.
    let t = Instant::now();
    let td = "cluster.local";
    let addresses = snapshot.resources[ADDRESS_TYPE]
        .values()
        .map(|e| mesh_core::xds::decode_address(&e.resource, td))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let policies = snapshot.resources[AUTHORIZATION_TYPE]
        .values()
        .map(|e| mesh_core::xds::decode_authorization(&e.resource).map(|(p, _)| p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let assembled =
        mesh_core::xds::assemble(td, "istio-system", Some("node-0"), addresses, policies)
            .map_err(anyhow::Error::msg)?;
    let indexed = mesh_core::config::MeshState::new(assembled);
    println!(
        "{:<44} {:>10.1} ms   ({} workloads; decode, assemble, validate, index)",
        "ztunnel: apply the full set once",
        ms(t.elapsed()),
        indexed.config().workloads.len()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = XdsServer::new(outputs.snapshots.subscribe(), None, xm);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                AggregatedDiscoveryServiceServer::new(server).max_encoding_message_size(usize::MAX),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let (report, mut reports) = mpsc::unbounded_channel();
    // First full push to one client.
    let t = Instant::now();
    spawn_clients(0..1, args.nodes, addr, &report);
    let mut tracker = SyncTracker::new(args.clients, n_addr);
    let mut first_bytes = 0;
    let mut responses = 0;
    loop {
        let r = next(&mut reports).await?;
        first_bytes += r.bytes;
        responses += 1;
        if tracker.record(&r) {
            break;
        }
    }
    let first = t.elapsed();
    println!(
        "{:<44} {:>10.1} ms   ({:.1} MiB in {responses} responses)",
        "first full push to one client",
        ms(first),
        first_bytes as f64 / (1 << 20) as f64
    );

    // The other clients, all fully synced before the change.
    let t = Instant::now();
    spawn_clients(1..args.clients, args.nodes, addr, &report);
    let mut synced = 1;
    while synced < args.clients {
        let r = next(&mut reports).await?;
        if tracker.record(&r) {
            synced += 1;
        }
    }
    println!(
        "{:<44} {:>10.1}      (of {n_authz}; each node gets those that can apply to it)",
        "authorization policies per node",
        tracker.mean_authz()
    );
    println!(
        "{:<44} {:>10.1} ms",
        format!("full push to {} more clients", args.clients - 1),
        ms(t.elapsed())
    );

    let mut latencies = Vec::new();
    let mut bytes_per_client = Vec::new();
    let mut build_times = Vec::new();
    for change in 0..args.changes {
        let victim = (change * 7919) % args.pods;
        let key = format!("ns-{}/pod-{victim}", victim % NAMESPACES);
        let pod = state.pods.get_mut(&key).context("victim pod")?;
        if let Some(status) = pod.status.as_mut() {
            status.pod_ip = Some(pod_ip(victim, change + 1));
            status.pod_ips = None;
        }
        let t = Instant::now();
        pipeline::publish(&state, Vec::new(), &options, &outputs, &pm)
            .map_err(anyhow::Error::msg)?;
        build_times.push(t.elapsed());
        if let Some(r) = outputs.rejected.borrow().first() {
            bail!("synthetic change rejected: {r}");
        }
        let mut got = vec![false; args.clients];
        let mut count = 0;
        let mut last = t;
        let mut bytes = 0;
        while count < args.clients {
            let r = next(&mut reports).await?;
            if got[r.client] {
                bail!("client {} got two responses for one change", r.client);
            }
            let n = r.response.resources.len() + r.response.removed_resources.len();
            if n != 1 {
                let names: Vec<_> = r.response.resources.iter().map(|r| &r.name).collect();
                bail!(
                    "a pod change sent {n} resources, expected 1: {names:?} removed {:?}",
                    r.response.removed_resources
                );
            }
            got[r.client] = true;
            count += 1;
            last = last.max(r.at);
            bytes = bytes.max(r.bytes);
        }
        latencies.push(last - t);
        bytes_per_client.push(bytes);
    }
    latencies.sort();
    build_times.sort();
    let median = latencies[latencies.len() / 2];
    let worst = latencies[latencies.len() - 1];
    println!(
        "{:<44} {:>10.1} ms   (median of {}; worst {:.1} ms; model rebuild {:.1} ms of it)",
        format!("one pod change → all {} clients", args.clients),
        ms(median),
        args.changes,
        ms(worst),
        ms(build_times[build_times.len() / 2])
    );
    println!(
        "{:<44} {:>10} B    (1 resource per client)",
        "bytes per client for one pod change",
        bytes_per_client.iter().max().unwrap_or(&0)
    );
    let goal_ok =
        median < Duration::from_millis(100) && *bytes_per_client.iter().max().unwrap_or(&0) < 2048;
    println!(
        "goal (<100 ms to all clients, <2 KiB per client): {}",
        if goal_ok { "met" } else { "NOT met" }
    );

    if !args.no_rss {
        rss_phase(&args, &yaml, n_addr).await?;
    }
    Ok(())
}

/// Runs the real binary on the same cluster and measures its RSS with the
/// clients connected and synced.
async fn rss_phase(args: &Args, yaml: &str, n_addr: usize) -> anyhow::Result<()> {
    let dir = e2e::mesh::TempDir::new("ambit-xds-bench")?;
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests_dir)?;
    std::fs::write(manifests_dir.join("cluster.yaml"), yaml)?;
    std::fs::write(
        dir.path().join("tokens.yaml"),
        "bench: not-used-on-plaintext\n",
    )?;
    let port = |p: u16| -> anyhow::Result<SocketAddr> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = l.local_addr()?;
        drop(l);
        let _ = p;
        Ok(a)
    };
    let (grpc, xds, mon) = (port(0)?, port(0)?, port(0)?);
    let log = std::fs::File::create(dir.path().join("istiod.log"))?;
    let t = Instant::now();
    let mut child = std::process::Command::new(e2e::process::bin_path("istiod-lite")?)
        .arg("serve")
        .arg("--manifests")
        .arg(&manifests_dir)
        .arg("--data-dir")
        .arg(dir.path().join("ca"))
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--xds-plaintext-addr", &xds.to_string()])
        .args(["--monitoring-addr", &mon.to_string()])
        .arg("--bootstrap-tokens")
        .arg(dir.path().join("tokens.yaml"))
        .args(["--log-level", "warn"])
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_")))
        .stderr(log)
        .spawn()
        .context("spawning istiod-lite")?;
    let pid = child.id();
    let outcome = async {
        loop {
            if let Ok((200, _)) = e2e::client::http_get(mon, "/ready") {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("istiod-lite not ready after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let startup = t.elapsed();
        let idle = rss_kib(pid).unwrap_or(0);
        let (report, mut reports) = mpsc::unbounded_channel();
        spawn_clients(0..args.clients, args.nodes, xds, &report);
        let mut tracker = SyncTracker::new(args.clients, n_addr);
        let mut synced = 0;
        while synced < args.clients {
            if tracker.record(&next(&mut reports).await?) {
                synced += 1;
            }
        }
        // Let freed buffers settle before reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = rss_kib(pid).unwrap_or(0);
        println!(
            "{:<44} {:>10.1} ms   (read, parse, build, first snapshot)",
            "istiod-lite process start → ready",
            ms(startup)
        );
        println!(
            "{:<44} {:>10.1} MiB  (idle {:.1} MiB; goal < 300 MiB: {})",
            format!("istiod-lite RSS, {} clients synced", args.clients),
            loaded as f64 / 1024.0,
            idle as f64 / 1024.0,
            if loaded < 300 * 1024 {
                "met"
            } else {
                "NOT met"
            }
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

async fn next(reports: &mut mpsc::UnboundedReceiver<Received>) -> anyhow::Result<Received> {
    tokio::time::timeout(Duration::from_secs(120), reports.recv())
        .await
        .context("no xDS response within 120 s")?
        .context("all clients gone")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
