//! L7 loopback benchmark: 1 KiB GETs over keep-alive HTTP/1.1 and HTTP/2 on
//! three paths measured in the same run — direct, ztunnel L4, and ztunnel +
//! waypoint — at a fixed rate (open loop) and at saturation (closed loop).
//!
//! Topology on a random 127.X.Y.0/24: node1's ztunnel holds the client
//! workload (traffic enters through its SOCKS5 listener, as in ambit-bench),
//! node2's ztunnel the server workload, whose HTTP server runs in this
//! process on a thread of its own; the waypoint process (Gateway
//! demo/waypoint, pod on node3, no ztunnel there) speaks HBONE itself.
//! Service `bench-l4` selects the server without a waypoint, `bench-l7` with
//! one, so the two meshed paths differ only by the waypoint.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use e2e::client::socks5_connect_pipelined;
use e2e::load::{self, Align, Latencies, Table};
use e2e::mesh::{Addrs, TwoNodes};
use e2e::process::{metric_sum, Source, Waypoint};
use e2e::Pki;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(
    name = "ambit-l7-bench",
    about = "1 KiB GETs over HTTP/1.1 and HTTP/2: direct vs ztunnel L4 vs ztunnel + waypoint"
)]
struct Args {
    /// Seconds per measurement (each fixed-rate and each saturation run).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Requests per second in the fixed-rate (open-loop) runs.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Keep-alive connections per run (the saturation runs' concurrency with
    /// --streams 1).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// HTTP/2 only: concurrent streams per connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Each measurement runs this many times (paths alternating); medians are shown.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Comma-separated: http1, http2.
    #[arg(long, default_value = "http1,http2")]
    protocols: String,
    /// Log filter of the ztunnels and the waypoint (access logs are on at
    /// "info", as in production).
    #[arg(long, default_value = "info")]
    proxy_log: String,
    /// Also print the tables as Markdown.
    #[arg(long)]
    markdown: bool,
}

/// Service port = target port of the bench server.
const PORT: u16 = 9080;
/// Requests per connection before timing starts: pools, TLS sessions, TCP
/// windows and the waypoint's upstream connections are warm by then.
const WARMUP: usize = 50;
/// Latency samples kept per run (reservoir-sampled beyond).
const MAX_SAMPLES: usize = 1_000_000;
/// One request that takes longer than this fails, so a run always ends.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A worker gives up after this many failures (a dead path fails fast and
/// would otherwise spin through the whole schedule).
const MAX_ERRORS: u64 = 100;
const BODY: &[u8; 1024] = &[b'x'; 1024];
const PERCENTILES: [f64; 3] = [0.50, 0.99, 0.999];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

fn parse_protocols(s: &str) -> anyhow::Result<Vec<Proto>> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let proto = match p.to_ascii_lowercase().as_str() {
            "http1" | "h1" | "http/1.1" => Proto::H1,
            "http2" | "h2" | "http/2" => Proto::H2,
            other => bail!("unknown protocol {other:?} (http1, http2)"),
        };
        if !out.contains(&proto) {
            out.push(proto);
        }
    }
    if out.is_empty() {
        bail!("--protocols names none");
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathKind {
    Direct,
    L4,
    Waypoint,
}

const PATHS: [PathKind; 3] = [PathKind::Direct, PathKind::L4, PathKind::Waypoint];

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::L4 => "ztunnel L4",
            PathKind::Waypoint => "ztunnel + waypoint",
        }
    }
}

/// Where one path's connections go.
#[derive(Clone)]
struct Route {
    /// SOCKS5 listener of node1's ztunnel and the client workload's address;
    /// None for direct.
    socks: Option<(SocketAddr, IpAddr)>,
    target: SocketAddr,
    authority: &'static str,
}

impl Route {
    async fn connect(&self) -> anyhow::Result<TcpStream> {
        match self.socks {
            None => {
                let s = TcpStream::connect(self.target).await?;
                s.set_nodelay(true)?;
                Ok(s)
            }
            // Pipelined SOCKS5 stands in for capture (one round trip, paid
            // once per keep-alive connection, outside the timed window).
            Some((socks, src)) => socks5_connect_pipelined(socks, src, self.target).await,
        }
    }
}

/// One request slot: an HTTP/1.1 connection, or one stream's worth of an
/// HTTP/2 connection (the sender is shared between a connection's streams).
enum Sender {
    H1 {
        tx: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        host: HeaderValue,
    },
    H2 {
        tx: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        uri: Uri,
    },
}

impl Sender {
    /// `streams` senders over one new connection (one for HTTP/1.1).
    async fn open(route: &Route, proto: Proto, streams: usize) -> anyhow::Result<Vec<Sender>> {
        let io = TokioIo::new(route.connect().await?);
        match proto {
            Proto::H1 => {
                let (tx, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let host = HeaderValue::from_static(route.authority);
                Ok(vec![Sender::H1 { tx, host }])
            }
            Proto::H2 => {
                let (tx, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let uri: Uri = format!("http://{}/", route.authority).parse()?;
                Ok((0..streams.max(1))
                    .map(|_| Sender::H2 {
                        tx: tx.clone(),
                        uri: uri.clone(),
                    })
                    .collect())
            }
        }
    }

    /// GET / and read the whole 1 KiB body.
    async fn get(&mut self) -> anyhow::Result<()> {
        let resp = match self {
            Sender::H1 { tx, host } => {
                let req = Request::get("/")
                    .header(header::HOST, host.clone())
                    .body(Empty::new())?;
                tx.ready().await?;
                tx.send_request(req).await?
            }
            Sender::H2 { tx, uri } => {
                let req = Request::get(uri.clone())
                    .version(http::Version::HTTP_2)
                    .body(Empty::new())?;
                tx.ready().await?;
                tx.send_request(req).await?
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK || body.len() != BODY.len() {
            bail!("{status}, {} body bytes", body.len());
        }
        Ok(())
    }

    async fn get_bounded(&mut self) -> anyhow::Result<()> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.get())
            .await
            .context("request timed out")?
    }
}

/// The proxies whose CPU time is charged to each run.
#[derive(Clone, Copy)]
struct Pids {
    z1: Option<u32>,
    z2: Option<u32>,
    waypoint: Option<u32>,
}

impl Pids {
    fn cpu_ms(&self) -> [f64; 3] {
        [self.z1, self.z2, self.waypoint].map(|p| load::cpu_ms(p).unwrap_or(f64::NAN))
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Open loop at this many requests/s.
    Rate(f64),
    Saturate,
}

/// One run's figures.
#[derive(Clone, Debug)]
struct Run {
    ok: u64,
    errors: u64,
    /// Requests never sent: the schedule ran past its hard stop.
    abandoned: u64,
    rps: f64,
    /// p50, p99, p99.9 in µs.
    pct: [f64; 3],
    /// CPU ms of z1, z2 and the waypoint during the timed window.
    cpu_ms: [f64; 3],
    /// Warm-up plus timed requests that succeeded (for the metric check).
    served: u64,
}

impl Run {
    /// CPU ms per 10k requests of (z1 + z2, waypoint).
    fn cpu_per_10k(&self) -> (f64, f64) {
        let per = |ms: f64| ms / self.ok.max(1) as f64 * 10_000.0;
        (per(self.cpu_ms[0] + self.cpu_ms[1]), per(self.cpu_ms[2]))
    }
}

/// What one worker brings back.
struct Outcome {
    lat: Latencies,
    ok: u64,
    errors: u64,
    abandoned: u64,
    last_done: Option<Instant>,
}

impl Outcome {
    fn new(cap: usize) -> Self {
        Outcome {
            lat: Latencies::new(cap),
            ok: 0,
            errors: 0,
            abandoned: 0,
            last_done: None,
        }
    }

    fn done(&mut self, res: anyhow::Result<()>, from: Instant, first_error: &mut Option<String>) {
        let now = Instant::now();
        match res {
            Ok(()) => {
                self.lat.record(now - from);
                self.ok += 1;
                self.last_done = Some(now);
            }
            Err(e) => {
                self.errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

/// Open loop: request `i` is due at `start + i / rate` whatever happened to
/// earlier ones. Workers claim indices in order, so a free worker is always
/// holding the next due request; when none is free at a request's due time
/// (the path under test holds them all), its latency counts from the due time,
/// which is what keeps a slow path from hiding its queueing (coordinated
/// omission). When a free worker merely wakes late, that is Tokio's 1 ms timer
/// in the client, not the path, so the clock starts at the actual send.
async fn open_loop(
    mut s: Sender,
    start: Instant,
    rate: f64,
    total: u64,
    hard_stop: Instant,
    next: Arc<AtomicU64>,
    cap: usize,
) -> (Outcome, Option<String>) {
    let mut out = Outcome::new(cap);
    let mut first_error = None;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        let claimed = Instant::now();
        if claimed > hard_stop || out.errors >= MAX_ERRORS {
            out.abandoned += 1;
            continue;
        }
        let from = if claimed < due {
            tokio::time::sleep_until(due.into()).await;
            Instant::now()
        } else {
            due
        };
        let res = s.get_bounded().await;
        out.done(res, from, &mut first_error);
    }
    (out, first_error)
}

/// Closed loop: back-to-back requests until `deadline`.
async fn closed_loop(mut s: Sender, deadline: Instant, cap: usize) -> (Outcome, Option<String>) {
    let mut out = Outcome::new(cap);
    let mut first_error = None;
    while Instant::now() < deadline && out.errors < MAX_ERRORS {
        let from = Instant::now();
        let res = s.get_bounded().await;
        out.done(res, from, &mut first_error);
    }
    (out, first_error)
}

async fn measure(
    route: &Route,
    proto: Proto,
    mode: Mode,
    args: &Args,
    pids: Pids,
) -> anyhow::Result<Run> {
    let mut senders = Vec::new();
    for _ in 0..args.connections.max(1) {
        senders.extend(Sender::open(route, proto, args.streams).await?);
    }
    // Warm-up, sequentially per sender, outside the timed window.
    let mut served = 0u64;
    let streams = senders.len() / args.connections.max(1);
    let per_sender = (WARMUP / streams.max(1)).max(1);
    for s in &mut senders {
        for _ in 0..per_sender {
            s.get_bounded()
                .await
                .with_context(|| format!("warm-up on the {:?} path", route.target))?;
            served += 1;
        }
    }
    let cap = MAX_SAMPLES / senders.len();
    let secs = args.seconds.max(0.1);
    let cpu_before = pids.cpu_ms();
    let start = Instant::now();
    let mut tasks = Vec::new();
    match mode {
        Mode::Rate(rate) => {
            let rate = rate.max(1.0);
            let total = (rate * secs).ceil() as u64;
            // Late past this, the path cannot keep the rate at all: stop
            // rather than stretch the run.
            let hard_stop = start + Duration::from_secs_f64(secs * 2.0 + 1.0);
            let next = Arc::new(AtomicU64::new(0));
            for s in senders {
                tasks.push(tokio::spawn(open_loop(
                    s,
                    start,
                    rate,
                    total,
                    hard_stop,
                    next.clone(),
                    cap,
                )));
            }
        }
        Mode::Saturate => {
            let deadline = start + Duration::from_secs_f64(secs);
            for s in senders {
                tasks.push(tokio::spawn(closed_loop(s, deadline, cap)));
            }
        }
    }
    let mut all = Outcome::new(MAX_SAMPLES);
    let mut first_error = None;
    for t in tasks {
        let (o, e) = t.await?;
        all.lat.merge(o.lat);
        all.ok += o.ok;
        all.errors += o.errors;
        all.abandoned += o.abandoned;
        all.last_done = all.last_done.max(o.last_done);
        if first_error.is_none() {
            first_error = e;
        }
    }
    let cpu_after = pids.cpu_ms();
    if let Some(e) = first_error {
        eprintln!(
            "\n  {} errors on {:?} ({mode:?}), first: {e}",
            all.errors, route.target
        );
    }
    let elapsed = all.last_done.map_or(secs, |t| (t - start).as_secs_f64());
    Ok(Run {
        ok: all.ok,
        errors: all.errors,
        abandoned: all.abandoned,
        rps: all.ok as f64 / elapsed.max(1e-9),
        pct: all.lat.percentiles(PERCENTILES),
        cpu_ms: std::array::from_fn(|i| cpu_after[i] - cpu_before[i]),
        served: served + all.ok,
    })
}

/// The bench server: 1 KiB for every request, HTTP/1.1 or HTTP/2 (prior
/// knowledge) told apart by the first bytes, so one port serves the direct
/// path in both protocols and the waypoint's HTTP/1.1 upstream.
async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the bench server on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Out of descriptors or similar: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(serve_conn(tcp));
        }
    });
    Ok(())
}

async fn serve_conn(tcp: TcpStream) {
    let svc = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
    });
    if speaks_h2(&tcp).await {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    }
}

/// Whether the connection opens with the HTTP/2 preface ("PRI * HTTP/2.0").
async fn speaks_h2(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 3];
    // Bounded: a client that never sends is left to the HTTP/1.1 server's
    // own handling after a second.
    for _ in 0..1000 {
        match tcp.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= 3 || buf[0] != b'P' => return &buf[..n.min(3)] == b"PRI",
            // A partial first segment: rare, wait for the rest.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    false
}

/// `ip` with its last octet replaced (more addresses in the run's subnet).
fn sibling(ip: IpAddr, host: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, host))
        }
        IpAddr::V6(_) => ip,
    }
}

struct Extra {
    waypoint: IpAddr,
    l4_vip: IpAddr,
    l7_vip: IpAddr,
    waypoint_vip: IpAddr,
}

fn extra(a: &Addrs) -> Extra {
    Extra {
        waypoint: sibling(a.client, 19),
        l4_vip: sibling(a.vip, 201),
        l7_vip: sibling(a.vip, 202),
        waypoint_vip: sibling(a.vip, 209),
    }
}

/// Both services select the server; only `bench-l7` names the waypoint. The
/// server workload itself names none: ztunnel would then refuse the L4 path
/// (a workload behind a waypoint admits only its waypoint).
fn config(a: &Addrs) -> String {
    let Extra {
        waypoint,
        l4_vip,
        l7_vip,
        waypoint_vip,
    } = extra(a);
    format!(
        r#"# ambit-l7-bench
workloads:
- {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: ["{client}"]}}
- {{name: server, namespace: demo, serviceAccount: server, node: node2, addresses: ["{server}"], services: [demo/bench-l4, demo/bench-l7]}}
- {{name: waypoint-0, namespace: demo, serviceAccount: waypoint, node: node3, addresses: ["{waypoint}"], services: [demo/waypoint], nativeTunnel: true}}
services:
- {{name: bench-l4, namespace: demo, addresses: ["{l4_vip}"], ports: [{{port: {PORT}}}]}}
- {{name: bench-l7, namespace: demo, addresses: ["{l7_vip}"], ports: [{{port: {PORT}}}], waypoint: {{namespace: demo, name: waypoint}}}}
- {{name: waypoint, namespace: demo, addresses: ["{waypoint_vip}"], ports: [{{port: 15008}}]}}
policies: []
"#,
        client = a.client,
        server = a.server,
    )
}

/// The machine's load averages: on a shared machine, other work competes
/// with all three paths, most with the ones that have the most threads.
fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let l: Vec<&str> = l.split_whitespace().take(3).collect();
    format!("load average {}", l.join(" "))
}

fn waypoint_requests(w: &Waypoint) -> anyhow::Result<f64> {
    Ok(metric_sum(&w.metrics()?, "istio_requests_total", &[]))
}

/// Medians over rounds of one path's runs.
struct Summary {
    rate: Run,
    sat: Run,
    /// CPU per 10k of (z1 + z2, waypoint): fixed rate, saturated.
    cpu_rate: (f64, f64),
    cpu_sat: (f64, f64),
    waypoint_rss: f64,
}

fn summarize(rate: &[Run], sat: &[Run], rss: &[f64]) -> Summary {
    let med = |runs: &[Run], f: &dyn Fn(&Run) -> f64| load::median(runs.iter().map(f).collect());
    let pick = |runs: &[Run]| Run {
        ok: runs.iter().map(|r| r.ok).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        abandoned: runs.iter().map(|r| r.abandoned).sum(),
        rps: med(runs, &|r| r.rps),
        pct: std::array::from_fn(|i| med(runs, &|r| r.pct[i])),
        cpu_ms: [f64::NAN; 3],
        served: runs.iter().map(|r| r.served).sum(),
    };
    Summary {
        rate: pick(rate),
        sat: pick(sat),
        cpu_rate: (
            med(rate, &|r| r.cpu_per_10k().0),
            med(rate, &|r| r.cpu_per_10k().1),
        ),
        cpu_sat: (
            med(sat, &|r| r.cpu_per_10k().0),
            med(sat, &|r| r.cpu_per_10k().1),
        ),
        waypoint_rss: load::median(rss.to_vec()),
    }
}

fn f0(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.0}")
    }
}

fn f2(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}")
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✔"
    } else {
        "✘"
    }
}

/// The protocol's table and its goal lines.
/// One round's L4 and waypoint runs: (fixed rate, saturated), each (L4, waypoint).
type RoundPair<'a> = ((&'a Run, &'a Run), (&'a Run, &'a Run));

/// `rounds` holds each round's (L4, waypoint) pair of fixed-rate and of
/// saturated runs: the goals are shown per round too, since on a shared
/// machine the spread says as much as the median.
fn report(
    proto: Proto,
    args: &Args,
    s: &[Summary; 3],
    rounds: &[RoundPair<'_>],
) -> (Table, Vec<String>) {
    let [d, l4, wp] = s;
    let mut t = Table::new(&[
        ("path", Align::Left),
        ("rps", Align::Right),
        ("p50 us", Align::Right),
        ("p99 us", Align::Right),
        ("p99.9 us", Align::Right),
        ("p99 / direct", Align::Right),
        ("sat. rps", Align::Right),
        ("sat. / direct", Align::Right),
        ("sat. / L4", Align::Right),
        ("ztunnels CPU ms/10k (rate; sat.)", Align::Right),
        ("waypoint CPU ms/10k (rate; sat.)", Align::Right),
        ("waypoint RSS MiB", Align::Right),
    ]);
    for (kind, x) in PATHS.iter().zip(s) {
        let meshed = *kind != PathKind::Direct;
        let through_wp = *kind == PathKind::Waypoint;
        let cpu = |on: bool, a: f64, b: f64| {
            if on {
                format!("{}; {}", f0(a), f0(b))
            } else {
                "-".into()
            }
        };
        t.row(vec![
            kind.name().into(),
            f0(x.rate.rps),
            f0(x.rate.pct[0]),
            f0(x.rate.pct[1]),
            f0(x.rate.pct[2]),
            f2(x.rate.pct[1] / d.rate.pct[1]),
            f0(x.sat.rps),
            f2(x.sat.rps / d.sat.rps),
            if meshed {
                f2(x.sat.rps / l4.sat.rps)
            } else {
                "-".into()
            },
            cpu(meshed, x.cpu_rate.0, x.cpu_sat.0),
            cpu(through_wp, x.cpu_rate.1, x.cpu_sat.1),
            if through_wp {
                format!("{:.1}", x.waypoint_rss)
            } else {
                "-".into()
            },
        ]);
    }
    let added = wp.rate.pct[1] - l4.rate.pct[1];
    let ratio = wp.sat.rps / l4.sat.rps;
    let per_round =
        |f: &dyn Fn(&RoundPair<'_>) -> String| rounds.iter().map(f).collect::<Vec<_>>().join(", ");
    let mut notes = vec![
        format!(
            "goal: waypoint p99 within 1 ms of L4 at {} rps: {:+.0} us {} (per round: {})",
            args.rate,
            added,
            mark(added <= 1000.0),
            per_round(&|((l4, wp), _)| format!("{:+.0}", wp.pct[1] - l4.pct[1]))
        ),
        format!(
            "goal: waypoint saturated rps >= 50% of L4: {:.0}% {} (per round: {})",
            ratio * 100.0,
            mark(ratio >= 0.5),
            per_round(&|(_, (l4, wp))| format!("{:.0}%", wp.rps / l4.rps * 100.0))
        ),
    ];
    for (kind, x) in PATHS.iter().zip(s) {
        let (errors, abandoned) = (x.rate.errors + x.sat.errors, x.rate.abandoned);
        if errors + abandoned > 0 {
            notes.push(format!(
                "{} {}: {errors} failed and {abandoned} abandoned requests over all rounds",
                proto.name(),
                kind.name()
            ));
        }
    }
    (t, notes)
}

// One client thread, like one client process (as in ambit-bench).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let protos = parse_protocols(&args.protocols)?;
    mesh_core::sys::raise_fd_limit();
    // SAFETY: no other thread reads the environment yet; the variable is read
    // by the proxy processes spawned below.
    unsafe { std::env::set_var("AMBIT_TEST_LOG", &args.proxy_log) };

    let mesh = TwoNodes::launch(config, &[], &[])?;
    let ex = extra(&mesh.addrs());
    let certs_wp = mesh.dir.path().join("certs-waypoint");
    mesh.pki.write_root(&certs_wp)?;
    mesh.pki
        .write_cert(&certs_wp, &Pki::identity("demo", "waypoint"))?;
    let waypoint = Waypoint::spawn_waypoint(
        mesh.dir.path(),
        &Source::static_files(&mesh.config_path, &certs_wp),
        "demo/waypoint",
        "node3",
        ex.waypoint,
        &[],
    )?;
    let server = SocketAddr::new(mesh.server, PORT);
    let servers = load::server_runtime("bench-server")?;
    servers.spawn(serve(server)).await??;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pids = Pids {
        z1: mesh.z1.pid(),
        z2: mesh.z2.pid(),
        waypoint: waypoint.pid(),
    };
    let idle = [pids.z1, pids.z2, pids.waypoint].map(load::rss_mib);
    let socks = Some((mesh.z1.socks5(), mesh.client));
    let routes = [
        Route {
            socks: None,
            target: server,
            authority: "server.demo",
        },
        Route {
            socks,
            target: SocketAddr::new(ex.l4_vip, PORT),
            authority: "bench-l4.demo.svc.cluster.local",
        },
        Route {
            socks,
            target: SocketAddr::new(ex.l7_vip, PORT),
            authority: "bench-l7.demo.svc.cluster.local",
        },
    ];
    println!(
        "ambit-l7-bench: loopback, 1 KiB GET, {} keep-alive connections{}, {} rps fixed rate and saturation, {} s per run, median of {} rounds",
        args.connections,
        if args.streams > 1 {
            format!(" ({} HTTP/2 streams each)", args.streams)
        } else {
            String::new()
        },
        args.rate,
        args.seconds,
        args.rounds
    );
    println!(
        "idle RSS MiB: ztunnel node1 {:.1}, node2 {:.1}, waypoint {:.1}; {}",
        idle[0],
        idle[1],
        idle[2],
        loadavg()
    );

    let mut output = Vec::new();
    for &proto in &protos {
        let mut rate: [Vec<Run>; 3] = Default::default();
        let mut sat: [Vec<Run>; 3] = Default::default();
        let mut rss = Vec::new();
        for round in 0..args.rounds.max(1) {
            for (p, kind) in PATHS.iter().enumerate() {
                eprint!(
                    "\r{} round {}/{}: {:<20}",
                    proto.name(),
                    round + 1,
                    args.rounds.max(1),
                    kind.name()
                );
                let before = waypoint_requests(&waypoint)?;
                let r = measure(&routes[p], proto, Mode::Rate(args.rate), &args, pids).await?;
                let s = measure(&routes[p], proto, Mode::Saturate, &args, pids).await?;
                // The paths must be what they claim: every waypoint-path
                // request counted by the waypoint, none of the others.
                let served = (r.served + s.served) as f64;
                if *kind == PathKind::Waypoint {
                    waypoint
                        .wait_for_metric("istio_requests_total", &[], before + served)
                        .await
                        .context("the waypoint did not see the waypoint path's requests")?;
                    rss.push(load::rss_mib(pids.waypoint));
                } else {
                    let after = waypoint_requests(&waypoint)?;
                    if after != before {
                        bail!(
                            "the waypoint counted {} requests of the {} path",
                            after - before,
                            kind.name()
                        );
                    }
                }
                rate[p].push(r);
                sat[p].push(s);
            }
        }
        eprintln!();
        let summaries: [Summary; 3] = std::array::from_fn(|p| summarize(&rate[p], &sat[p], &rss));
        let rounds: Vec<RoundPair<'_>> = (0..rate[0].len())
            .map(|i| ((&rate[1][i], &rate[2][i]), (&sat[1][i], &sat[2][i])))
            .collect();
        output.push((proto, report(proto, &args, &summaries, &rounds)));
    }

    for (proto, (table, notes)) in &output {
        println!(
            "\n{}: fixed rate {} rps (p50/p99/p99.9 from due time), then saturated (closed loop)",
            proto.name(),
            args.rate
        );
        print!("{}", table.render());
        for n in notes {
            println!("{n}");
        }
    }
    println!(
        "\nwaypoint RSS MiB: idle {:.1}, peak {:.1}; waypoint requests counted: {:.0}; {}",
        idle[2],
        load::peak_rss_mib(pids.waypoint),
        waypoint_requests(&waypoint)?,
        loadavg()
    );
    if args.markdown {
        for (proto, (table, notes)) in &output {
            println!("\n**{}**\n\n{}", proto.name(), table.markdown());
            for n in notes {
                println!("{n}  ");
            }
        }
    }
    Ok(())
}
