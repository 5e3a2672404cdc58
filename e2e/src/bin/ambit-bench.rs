//! Loopback benchmark: direct TCP vs client → ztunnel → HBONE → ztunnel → server,
//! measured in the same run and printed side by side with ratios.
//!
//! Traffic enters the mesh through ztunnel's SOCKS5 listener (no capture on
//! loopback), so every meshed connection pays one extra local round trip for the
//! SOCKS handshake that captured traffic will not pay.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::client::socks5_connect_pipelined;
use e2e::load::{median, rss_mib, server_runtime, Align, Latencies, Table};
use e2e::mesh::TwoNodes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(name = "ambit-bench", about = "Direct vs meshed TCP on loopback")]
struct Args {
    /// Seconds per throughput / connection-rate measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Parallel streams for the aggregate throughput case.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Each case runs this many times (direct and mesh alternating); the median is shown.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent clients in the connection-rate case, one row each. At 8
    /// the meshed path is bound by its per-connection latency (every hop
    /// wakes a thread) rather than by CPU, and more clients raise its rate;
    /// 64 saturates both paths, which is the capacity the goal is about.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 64])]
    conn_clients: Vec<usize>,
    /// Round trips in the latency case (bounded by --seconds too).
    #[arg(long, default_value_t = 20_000)]
    echo_requests: usize,
    /// Open tunnels for the loaded-RSS figure.
    #[arg(long, default_value_t = 1000)]
    tunnels: usize,
    /// Which cases to run (letters a-e as in the table).
    #[arg(long, default_value = "abcde")]
    cases: String,
    /// Passed to both ztunnels (see `ztunnel --help`).
    #[arg(long)]
    h2_stream_window: Option<u32>,
    #[arg(long)]
    h2_max_frame_size: Option<u32>,
    /// Data-plane worker threads per ztunnel.
    #[arg(long)]
    ztunnel_workers: Option<usize>,
    /// ztunnel log filter (access logs are on at "info", as in production).
    #[arg(long, default_value = "info")]
    ztunnel_log: String,
    /// Both ztunnels trace every tunnel (sampling 1.0) to an OTLP receiver
    /// in this process: the cost of tunnel spans.
    #[arg(long)]
    trace: bool,
}

#[derive(Clone, Copy)]
enum Path {
    Direct,
    Mesh { socks: SocketAddr, src: IpAddr },
}

impl Path {
    async fn connect(&self, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        match *self {
            Path::Direct => {
                let s = TcpStream::connect(dst).await?;
                s.set_nodelay(true)?;
                Ok(s)
            }
            // Pipelined: the SOCKS exchange stands in for capture, which has no
            // handshake at all; one round trip of it is the least we can pay.
            Path::Mesh { socks, src } => socks5_connect_pipelined(socks, src, dst).await,
        }
    }
}

/// Counts bytes until EOF, then answers with the count (8 bytes, big endian).
async fn sink(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Echo that closes after the client's first message when `close_first`
/// (connection-rate case), else echoes until EOF.
async fn echo(addr: SocketAddr, close_first: bool) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 || s.write_all(&buf[..k]).await.is_err() || close_first {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

async fn bulk(path: Path, dst: SocketAddr, streams: usize, secs: f64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut s = path.connect(dst).await?;
            let buf = vec![0x5au8; 256 * 1024];
            while Instant::now() < deadline {
                s.write_all(&buf).await?;
            }
            s.shutdown().await?;
            let mut n = [0u8; 8];
            s.read_exact(&mut n).await?;
            anyhow::Ok(u64::from_be_bytes(n))
        }));
    }
    let mut delivered = 0;
    for t in tasks {
        delivered += t.await??;
    }
    Ok(delivered as f64 / start.elapsed().as_secs_f64() / 1e6)
}

async fn conn_rate(path: Path, dst: SocketAddr, clients: usize, secs: f64) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut s = path.connect(dst).await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                // Wait for the server's close so TIME_WAIT lands on its side.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

async fn latency(path: Path, dst: SocketAddr, n: usize, secs: f64) -> anyhow::Result<[f64; 3]> {
    let mut s = path.connect(dst).await?;
    let req = [0xa5u8; 1024];
    let mut resp = [0u8; 1024];
    let mut samples = Latencies::new(n);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    // Warm up (pool, TLS session, TCP windows) before sampling.
    for _ in 0..100 {
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
    }
    while samples.count() < n as u64 && Instant::now() < deadline {
        let t = Instant::now();
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        samples.record(t.elapsed());
    }
    Ok(samples.percentiles([0.50, 0.99, 0.999]))
}

/// Runs `case` on both paths `rounds` times, alternating so drift on this shared
/// machine hits both alike; returns the per-figure medians (direct, mesh).
async fn both<const N: usize, F, Fut>(
    rounds: usize,
    direct: Path,
    mesh: Path,
    case: F,
) -> anyhow::Result<([f64; N], [f64; N])>
where
    F: Fn(Path) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<[f64; N]>>,
{
    let (mut d, mut m): (Vec<[f64; N]>, Vec<[f64; N]>) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        d.push(case(direct).await?);
        m.push(case(mesh).await?);
    }
    let pick =
        |runs: &Vec<[f64; N]>| std::array::from_fn(|i| median(runs.iter().map(|r| r[i]).collect()));
    Ok((pick(&d), pick(&m)))
}

struct Row {
    name: String,
    direct: Option<f64>,
    mesh: f64,
    goal: &'static str,
}

fn print_table(rows: &[Row]) {
    let mut t = Table::new(&[
        ("case", Align::Left),
        ("direct", Align::Right),
        ("mesh (L4)", Align::Right),
        ("ratio", Align::Right),
        ("goal", Align::Left),
    ]);
    for r in rows {
        let (d, ratio) = match r.direct {
            Some(d) => (format!("{d:.1}"), format!("{:.2}", r.mesh / d)),
            None => ("-".into(), "-".into()),
        };
        t.row(vec![
            r.name.clone(),
            d,
            format!("{:.1}", r.mesh),
            ratio,
            r.goal.into(),
        ]);
    }
    println!();
    print!("{}", t.render());
}

// One client thread, like one client process.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_core::sys::raise_fd_limit();
    let mut extra = Vec::new();
    let (w, f) = (
        args.h2_stream_window.map(|v| v.to_string()),
        args.h2_max_frame_size.map(|v| v.to_string()),
    );
    if let Some(w) = &w {
        extra.extend(["--h2-stream-window", w.as_str()]);
    }
    if let Some(f) = &f {
        extra.extend(["--h2-max-frame-size", f.as_str()]);
    }
    let otlp = if args.trace {
        Some(e2e::otlp::OtlpReceiver::start(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        )))?)
    } else {
        None
    };
    let endpoint = otlp.as_ref().map(|o| o.endpoint());
    if let Some(e) = &endpoint {
        extra.extend(["--otlp-endpoint", e.as_str()]);
    }
    let workers = args.ztunnel_workers.map(|w| w.to_string());
    if let Some(w) = &workers {
        extra.extend(["--worker-threads", w.as_str()]);
    }
    // SAFETY: single-threaded at this point of startup for our purposes; the
    // variable is only read by child processes spawned below.
    unsafe { std::env::set_var("AMBIT_TEST_LOG", &args.ztunnel_log) };
    let mesh = TwoNodes::start_with("[]", &extra)?;
    let mesh_path = Path::Mesh {
        socks: mesh.z1.socks5(),
        src: mesh.client,
    };
    let sink_addr = SocketAddr::new(mesh.server, 9000);
    let echo_addr = SocketAddr::new(mesh.server, 9001);
    let rate_addr = SocketAddr::new(mesh.server, 9002);
    // The servers get a thread (and runtime) of their own, as a server process
    // would: "direct" then always means client thread ↔ server thread.
    let servers = server_runtime("bench-servers")?;
    servers.spawn(sink(sink_addr)).await??;
    servers.spawn(echo(echo_addr, false)).await??;
    servers.spawn(echo(rate_addr, true)).await??;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = (rss_mib(mesh.z1.pid()), rss_mib(mesh.z2.pid()));
    println!(
        "ambit-bench: loopback, 2 ztunnels (node1 -> node2), {} s per case, median of {} rounds",
        args.seconds, args.rounds
    );

    let mut rows = Vec::new();
    let (secs, r) = (args.seconds, args.rounds);
    let direct = Path::Direct;
    let run = |c: char| args.cases.contains(c);
    if run('a') {
        eprint!("bulk 1 stream... ");
        let (d, m) = both(r, direct, mesh_path, |p| async move {
            Ok([bulk(p, sink_addr, 1, secs).await?])
        })
        .await?;
        rows.push(Row {
            name: "(a) bulk, 1 stream (MB/s)".to_string(),
            direct: Some(d[0]),
            mesh: m[0],
            goal: ">= 0.30 of direct",
        });
    }
    if run('b') {
        eprint!("bulk {} streams... ", args.parallel);
        let par = args.parallel;
        let (d, m) = both(r, direct, mesh_path, |p| async move {
            Ok([bulk(p, sink_addr, par, secs).await?])
        })
        .await?;
        rows.push(Row {
            name: "(b) bulk, parallel streams (MB/s)".to_string(),
            direct: Some(d[0]),
            mesh: m[0],
            goal: "",
        });
    }
    if run('c') {
        let most = args.conn_clients.iter().copied().max().unwrap_or(0);
        for &clients in &args.conn_clients {
            eprint!("connection rate, {clients} clients... ");
            let (d, m) = both(r, direct, mesh_path, |p| async move {
                Ok([conn_rate(p, rate_addr, clients, secs).await?])
            })
            .await?;
            rows.push(Row {
                name: format!("(c) new connections/s, {clients} clients"),
                direct: Some(d[0]),
                mesh: m[0],
                goal: if clients == most {
                    ">= 0.30 of direct"
                } else {
                    ""
                },
            });
        }
    }
    if run('d') {
        eprint!("1 KiB echo latency... ");
        let n = args.echo_requests;
        let (d, m) = both(r, direct, mesh_path, |p| async move {
            latency(p, echo_addr, n, secs).await
        })
        .await?;
        let names = [
            "(d) 1 KiB echo p50 (us)",
            "(d) 1 KiB echo p99 (us)",
            "(d) 1 KiB echo p99.9 (us)",
        ];
        for (i, name) in names.into_iter().enumerate() {
            let goal = if i == 1 { "added p99 < 150 us" } else { "" };
            rows.push(Row {
                name: name.to_string(),
                direct: Some(d[i]),
                mesh: m[i],
                goal,
            });
        }
        rows.push(Row {
            name: "(d) added p99 (us)".to_string(),
            direct: None,
            mesh: m[1] - d[1],
            goal: "< 150 us",
        });
    }
    if run('e') {
        eprint!("{} open tunnels... ", args.tunnels);
        let mut open = Vec::with_capacity(args.tunnels);
        for _ in 0..args.tunnels {
            let mut s = mesh_path.connect(echo_addr).await?;
            s.write_all(b"hi").await?;
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await?;
            open.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let loaded = (rss_mib(mesh.z1.pid()), rss_mib(mesh.z2.pid()));
        drop(open);
        eprintln!("done");
        rows.push(Row {
            name: "(e) ztunnel RSS idle, node1 (MiB)".to_string(),
            direct: None,
            mesh: idle.0,
            goal: "< 10 MiB",
        });
        rows.push(Row {
            name: "(e) ztunnel RSS idle, node2 (MiB)".to_string(),
            direct: None,
            mesh: idle.1,
            goal: "< 10 MiB",
        });
        rows.push(Row {
            name: "(e) RSS, 1000 tunnels, node1 (MiB)".to_string(),
            direct: None,
            mesh: loaded.0,
            goal: "",
        });
        rows.push(Row {
            name: "(e) RSS, 1000 tunnels, node2 (MiB)".to_string(),
            direct: None,
            mesh: loaded.1,
            goal: "",
        });
    }
    print_table(&rows);
    if let Some(o) = &otlp {
        // Spans are exported within a second of their connection's end.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        println!("\ntracing on: {} tunnel spans received", o.spans().len());
    }
    println!(
        "\nh2 stream window {} B, max frame {} B",
        args.h2_stream_window
            .unwrap_or(mesh_core::hbone::H2Tuning::default().stream_window),
        args.h2_max_frame_size
            .unwrap_or(mesh_core::hbone::H2Tuning::default().max_frame_size)
    );
    Ok(())
}
