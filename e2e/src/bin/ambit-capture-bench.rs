//! Capture benchmark (root): in a two-node namespace cluster, one run each of
//! direct pod-to-pod, the mesh with eBPF capture, and the same mesh with
//! iptables TPROXY capture (the sidecar-era mechanism). Prints throughput,
//! connections/s, 1 KiB echo latency and machine CPU per GB with ratios.
//!
//! A second section, steering only, takes ztunnel out: the bench's own
//! transparent splice proxy on the client's node, fed by eBPF or by iptables
//! TPROXY, so the capture mechanism is most of what differs from direct.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use e2e::cluster::{Cluster, Pod};
use e2e::mesh::TempDir;
use e2e::netns::{is_root, PinDir};
use e2e::process::Ztunnel;
use e2e::Pki;

#[derive(Parser)]
#[command(
    name = "ambit-capture-bench",
    about = "direct vs eBPF capture vs iptables TPROXY, in namespaces"
)]
struct Args {
    /// Seconds per throughput and connection-rate measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent clients for connections/s.
    #[arg(long, default_value_t = 8)]
    conn_clients: usize,
    /// Round trips for the latency figures.
    #[arg(long, default_value_t = 10_000)]
    echo_requests: usize,
    /// Rounds of (direct, eBPF, iptables); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Which sections run: the full mesh, steering only, or both.
    #[arg(long, value_enum, default_value_t = Section::All)]
    section: Section,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Mesh,
    Steering,
    All,
}

#[derive(Clone, Copy, Default)]
struct Figures {
    mb_s: f64,
    conns_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_s_per_gb: f64,
}

/// Busy CPU time of the whole machine, in seconds (from /proc/stat).
fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (total - idle) / hz.max(1.0)
}

/// Servers in the server pod: 9000 sink (replies with the byte count), 9001
/// echo, 9002 one-byte echo then close.
fn start_servers(server: &Pod, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    for port in [9000u16, 9001, 9002] {
        let addr = SocketAddr::new(server.ip.into(), port);
        let listener = server.ns.run(move || Ok(TcpListener::bind(addr)?))?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    break;
                };
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut buf = vec![0u8; 256 * 1024];
                    match port {
                        9000 => {
                            let mut n = 0u64;
                            while let Ok(k) = s.read(&mut buf) {
                                if k == 0 {
                                    break;
                                }
                                n += k as u64;
                            }
                            let _ = s.write_all(&n.to_be_bytes());
                        }
                        9001 => {
                            while let Ok(k) = s.read(&mut buf) {
                                if k == 0 || s.write_all(&buf[..k]).is_err() {
                                    break;
                                }
                            }
                        }
                        _ => {
                            if let Ok(k) = s.read(&mut buf[..1]) {
                                let _ = s.write_all(&buf[..k]);
                            }
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

fn measure(client: &Pod, server: &Pod, args: &Args) -> anyhow::Result<Figures> {
    let ip = server.ip;
    let secs = args.seconds;
    // (a) bulk, one stream; machine CPU over the same interval.
    let cpu0 = busy_cpu_seconds();
    let (bytes, elapsed) = client.ns.run(move || {
        let start = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(ip.into(), 9000), Duration::from_secs(5))?;
        let buf = vec![0x5au8; 256 * 1024];
        while start.elapsed().as_secs_f64() < secs {
            s.write_all(&buf)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut n = [0u8; 8];
        s.read_exact(&mut n)?;
        Ok((u64::from_be_bytes(n), start.elapsed().as_secs_f64()))
    })?;
    let cpu = busy_cpu_seconds() - cpu0;
    let gb = bytes as f64 / 1e9;

    // (c) connections per second.
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..args.conn_clients {
        let done = done.clone();
        let path = format!("/run/netns/{}", client.ns.name());
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            enter(&path)?;
            while start.elapsed().as_secs_f64() < secs {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::new(ip.into(), 9002),
                    Duration::from_secs(5),
                )?;
                s.write_all(b"x")?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let conns_s = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();

    // (d) 1 KiB echo latency.
    let n = args.echo_requests;
    let (p50, p99) = client.ns.run(move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(ip.into(), 9001), Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        let req = [0xa5u8; 1024];
        let mut resp = [0u8; 1024];
        for _ in 0..100 {
            s.write_all(&req)?;
            s.read_exact(&mut resp)?;
        }
        let mut samples = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while samples.len() < n && Instant::now() < deadline {
            let t = Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut resp)?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        Ok((pct(0.5), pct(0.99)))
    })?;
    Ok(Figures {
        mb_s: bytes as f64 / elapsed / 1e6,
        conns_s,
        p50_us: p50,
        p99_us: p99,
        cpu_s_per_gb: cpu / gb.max(1e-9),
    })
}

fn enter(path: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns affects only the calling thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn iptables(node: &e2e::cluster::Node, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.ns.name()))
        .arg("--")
        .arg("iptables")
        .args(args)
        .output()
        .context("running iptables (apt-get install -y iptables)")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// TPROXY capture equivalent to the eBPF programs, for the node's pods;
/// `inbound` false leaves the uplink alone (the steering section's proxy
/// dials the server itself, so only the pods' outbound needs capture).
///
/// New connections go to TPROXY before anything else: TPROXY hands a SYN
/// that meets a TIME_WAIT socket to its listener, the kernel's own hand-off.
/// With the `-m socket` rule first (as Istio's sidecar rules order them) that
/// SYN is given to the TIME_WAIT socket instead, which answers with an ACK,
/// and the client resets and retries: 2.9k against 12.3k connections/s in
/// the steering section. (`-m socket` without `--transparent`: with it,
/// replies to ztunnel's source-preserving upstream sockets were not matched
/// and connects timed out.)
fn install_tproxy(node: &e2e::cluster::Node, inbound: bool) -> anyhow::Result<()> {
    node.ns.run(|| Ok(ebpf_redirect::setup_node_routing()?))?;
    let mark = "0x539";
    let up = node.uplink.as_str();
    for pod in &node.pods {
        let (i, d) = (pod.host_if.as_str(), pod.ip);
        let to =
            |port: u16| format!("-j TPROXY --on-port {port} --on-ip 0.0.0.0 --tproxy-mark {mark}");
        let rules = [
            format!("-i {i} -p tcp --syn {}", to(15001)),
            // Packets of sockets ztunnel owns (accepted or source-preserving upstream).
            format!("-i {i} -p tcp -m socket -j MARK --set-mark {mark}"),
            format!("-i {up} -d {d} -p tcp --syn --dport 15008 {}", to(15008)),
            format!("-i {up} -d {d} -p tcp --syn {}", to(15006)),
            format!("-i {up} -d {d} -p tcp -m socket -j MARK --set-mark {mark}"),
        ];
        let rules = if inbound { &rules[..] } else { &rules[..2] };
        for rule in rules {
            let full = format!("-t mangle -A PREROUTING {rule}");
            iptables(node, &full.split_whitespace().collect::<Vec<_>>())?;
        }
    }
    Ok(())
}

fn start_mesh(
    cluster: &Cluster,
    dir: &TempDir,
    config: &std::path::Path,
    pki: &Pki,
    extra: &dyn Fn(u8) -> Vec<String>,
) -> anyhow::Result<Vec<Ztunnel>> {
    let mut zs = Vec::new();
    for (n, sa) in [(1u8, "client"), (2u8, "server")] {
        let certs = dir.path().join(format!("certs{n}"));
        pki.write_root(&certs)?;
        pki.write_cert(&certs, &Pki::identity("bench", sa))?;
        let node = cluster.node(n);
        let args = extra(n);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        zs.push(Ztunnel::spawn_in_netns(
            node.ns.name(),
            dir.path(),
            &e2e::Source::static_files(config, &certs),
            &format!("node{n}"),
            node.ip.into(),
            &args,
        )?);
    }
    Ok(zs)
}

/// The steering section's proxy: a transparent listener on 15001 in the
/// client's node that splices each captured connection to its original
/// destination (the accepted socket's local address) over plain TCP. The
/// same code serves both capture modes, so only the steering differs. One
/// thread, async: a thread per connection cost more than ztunnel itself and
/// would have hidden the steering in the connection rate.
struct SpliceProxy {
    /// The listening socket (a second descriptor), for capture's TIME_WAIT
    /// hand-off.
    listener: std::os::fd::OwnedFd,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl SpliceProxy {
    const ADDR: &'static str = "0.0.0.0:15001";

    fn start(node: &e2e::cluster::Node) -> anyhow::Result<Self> {
        // IPv4 only: TPROXY's `--on-ip 0.0.0.0` looks up an IPv4 listener,
        // and the eBPF side is given the same address.
        let listener = node.ns.run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_ip_transparent_v4(true)?;
            s.set_nonblocking(true)?;
            s.bind(&Self::ADDR.parse::<SocketAddr>()?.into())?;
            s.listen(1024)?;
            Ok(TcpListener::from(s))
        })?;
        let own = listener.try_clone()?.into();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        // The upstream sockets are made on this thread, in the node's namespace.
        let thread = node.ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    tokio::select! {
                        _ = &mut stopped => return Ok(()),
                        accepted = listener.accept() => {
                            let (down, _) = accepted?;
                            tokio::spawn(splice(down));
                        }
                    }
                }
            })
        });
        Ok(SpliceProxy {
            listener: own,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for SpliceProxy {
    fn drop(&mut self) {
        // Dropping the runtime closes the listener and any connection left.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn splice(mut down: tokio::net::TcpStream) -> std::io::Result<()> {
    let to = down.local_addr()?;
    let mut up = tokio::net::TcpStream::connect(to).await?;
    for s in [&down, &up] {
        s.set_nodelay(true)?;
    }
    // Passes each half-close on, which the sink's reply needs.
    tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 64 * 1024, 64 * 1024).await?;
    Ok(())
}

/// One run of `mode` (0 direct, 1 eBPF, 2 iptables) on a fresh cluster: no
/// state (conntrack, routes, pins) carries over between runs.
fn run_mode(
    mode: usize,
    steering: bool,
    args: &Args,
    dir: &TempDir,
    pki: &Pki,
) -> anyhow::Result<Figures> {
    let cluster = Cluster::build(2, 1)?;
    let (client, server) = (cluster.pod(1, 0), cluster.pod(2, 0));
    let stop = Arc::new(AtomicBool::new(false));
    start_servers(server, stop.clone())?;
    let figures = match (mode, steering) {
        (0, _) => measure(client, server, args),
        (1, true) => {
            let node = cluster.node(1);
            let proxy = SpliceProxy::start(node)?;
            let pins = PinDir::new()?;
            let pin_dir = pins.path().to_path_buf();
            let (ip, veth) = (client.ip, client.host_if.clone());
            let listener = proxy.listener.try_clone()?;
            let mut capture = node.ns.run(move || {
                ebpf_redirect::setup_node_routing()?;
                let mut c = ebpf_redirect::Capture::load(SpliceProxy::ADDR.parse()?, &pin_dir)?;
                c.set_listener_sockets(ebpf_redirect::ListenerSockets {
                    outbound: Some(std::os::fd::AsFd::as_fd(&listener)),
                    ..Default::default()
                })?;
                c.enroll(ip.into())?;
                c.attach(&veth)?;
                Ok(c)
            })?;
            let f = measure(client, server, args);
            // Links and maps are pinned: only remove_all takes them away.
            let removed = node.ns.run(move || Ok(capture.remove_all()?));
            drop(proxy);
            removed?;
            f
        }
        (_, true) => {
            install_tproxy(cluster.node(1), false)?;
            let proxy = SpliceProxy::start(cluster.node(1))?;
            let f = measure(client, server, args);
            drop(proxy);
            f
        }
        (1, false) => {
            let pins = PinDir::new()?;
            let pin = pins.path().display().to_string();
            let extra = |n: u8| {
                let up = cluster.node(n).uplink.clone();
                vec![
                    "--capture".into(),
                    "--capture-uplink".into(),
                    up,
                    "--bpf-pin-dir".into(),
                    pin.clone(),
                ]
            };
            let config = mesh_config(dir, client, server)?;
            let zs = start_mesh(&cluster, dir, &config, pki, &extra)?;
            for z in &zs {
                z.wait_log("capturing inbound traffic", Duration::from_secs(10))?;
            }
            measure(client, server, args)
        }
        (_, false) => {
            for n in 1..=2 {
                install_tproxy(cluster.node(n), true)?;
            }
            let extra = |_: u8| vec!["--transparent".to_string()];
            let config = mesh_config(dir, client, server)?;
            let _zs = start_mesh(&cluster, dir, &config, pki, &extra)?;
            measure(client, server, args)
        }
    };
    stop.store(true, Ordering::Relaxed);
    figures
}

fn mesh_config(dir: &TempDir, client: &Pod, server: &Pod) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n\
             - {{name: client, namespace: bench, serviceAccount: client, node: node1, addresses: [\"{}\"]}}\n\
             - {{name: server, namespace: bench, serviceAccount: server, node: node2, addresses: [\"{}\"]}}\n",
            client.ip, server.ip
        ),
    )?;
    Ok(config)
}

/// A section's result: medians per mode, and every round's figures.
struct SectionFigures {
    medians: [Figures; 3],
    rounds: [Vec<Figures>; 3],
}

/// Rounds alternating the three modes; medians per mode.
fn section(
    steering: bool,
    args: &Args,
    dir: &TempDir,
    pki: &Pki,
) -> anyhow::Result<SectionFigures> {
    let mut runs: [Vec<Figures>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..args.rounds.max(1) {
        eprint!("round {}:", round + 1);
        for (mode, name) in ["direct", "eBPF", "iptables TPROXY"]
            .into_iter()
            .enumerate()
        {
            let f = run_mode(mode, steering, args, dir, pki)?;
            // Each run's figures, so the spread behind a median can be judged.
            eprint!(
                " {name} {:.0} MB/s {:.0} conn/s p50 {:.1} p99 {:.1} us {:.2} s/GB;",
                f.mb_s, f.conns_s, f.p50_us, f.p99_us, f.cpu_s_per_gb
            );
            runs[mode].push(f);
        }
        eprintln!();
    }
    let median = |v: &[Figures], f: fn(&Figures) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        x[x.len() / 2]
    };
    let pick = |v: &[Figures]| Figures {
        mb_s: median(v, |f| f.mb_s),
        conns_s: median(v, |f| f.conns_s),
        p50_us: median(v, |f| f.p50_us),
        p99_us: median(v, |f| f.p99_us),
        cpu_s_per_gb: median(v, |f| f.cpu_s_per_gb),
    };
    Ok(SectionFigures {
        medians: [pick(&runs[0]), pick(&runs[1]), pick(&runs[2])],
        rounds: runs,
    })
}

/// How eBPF and iptables compare round by round (each pair ran minutes
/// apart, so drift hits both alike): the median of the per-round ratios,
/// and in how many rounds eBPF was at least as good.
fn paired(ebpf: &[Figures], tproxy: &[Figures], f: fn(&Figures) -> f64, higher: bool) -> String {
    let mut ratios: Vec<f64> = ebpf.iter().zip(tproxy).map(|(e, i)| f(e) / f(i)).collect();
    if ratios.is_empty() {
        return String::new();
    }
    let as_good = ratios
        .iter()
        .filter(|r| if higher { **r >= 1.0 } else { **r <= 1.0 })
        .count();
    ratios.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:>8.2} {:>8}",
        ratios[ratios.len() / 2],
        format!("{as_good}/{}", ratios.len())
    )
}

fn print_table(title: &str, section: &SectionFigures) {
    let [direct, ebpf, tproxy] = &section.medians;
    let [_, ebpf_rounds, tproxy_rounds] = &section.rounds;
    println!("\n{title}");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8}",
        "figure", "direct", "eBPF", "iptables", "eBPF/d", "ipt/d", "eBPF/ipt", "paired", "eBPF>="
    );
    println!("{}", "-".repeat(108));
    let row = |name: &str, f: fn(&Figures) -> f64, higher: bool| {
        let (d, e, i) = (f(direct), f(ebpf), f(tproxy));
        println!(
            "{name:<28} {d:>10.1} {e:>10.1} {i:>10.1} {:>8.2} {:>8.2} {:>10.2} {}",
            e / d,
            i / d,
            e / i,
            paired(ebpf_rounds, tproxy_rounds, f, higher)
        );
    };
    row("bulk, 1 stream (MB/s)", |f| f.mb_s, true);
    row("connections/s", |f| f.conns_s, true);
    row("1 KiB echo p50 (us)", |f| f.p50_us, false);
    row("1 KiB echo p99 (us)", |f| f.p99_us, false);
    row("CPU s per GB (machine)", |f| f.cpu_s_per_gb, false);
    println!(
        "paired: median over rounds of eBPF/iptables in the same round; \
         eBPF>=: rounds where eBPF was at least as good"
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !is_root() {
        bail!("ambit-capture-bench needs root (network namespaces, eBPF, iptables)");
    }
    let dir = TempDir::new("ambit-capture-bench")?;
    let pki = Pki::new()?;
    println!(
        "ambit-capture-bench: 2 nodes in namespaces, {} s per case, median of {} rounds",
        args.seconds, args.rounds
    );
    if args.section != Section::Steering {
        eprintln!("mesh (ztunnel):");
        let figures = section(false, &args, &dir, &pki)?;
        print_table("Mesh: ztunnel with each capture", &figures);
    }
    if args.section != Section::Mesh {
        eprintln!("steering only (splice proxy on the client's node):");
        let figures = section(true, &args, &dir, &pki)?;
        print_table("Steering only: splice proxy, no ztunnel", &figures);
    }
    println!("\nHigher is better for MB/s and connections/s, lower for latency and CPU.");
    Ok(())
}
