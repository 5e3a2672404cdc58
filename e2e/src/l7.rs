//! An L7 mesh on loopback: a waypoint process in front of HTTP backends on
//! node2 (behind a real ztunnel), and a client that speaks to the waypoint
//! the way node1's ztunnel would: HBONE with the client workload's
//! certificate, `:authority` = the service VIP.
//!
//! Backends are in-process HTTP/1.1 servers that answer with what they saw
//! (JSON), and misbehave on request: `x-echo-status`, `x-echo-delay-ms`,
//! `x-echo-fail-on: <backend name>` (500 from that backend only), and
//! `x-echo-fail-first: N` (with `x-echo-key`) for flaky-backend tests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_core::hbone::{self, H2Client, H2Tuning, TunnelIo};
use mesh_core::tls::{client_config, TrustRoots};
use tokio::task::JoinHandle;

use crate::mesh::TempDir;
use crate::process::{Source, Waypoint, Ztunnel};
use crate::{Pki, Subnet};

/// Port every backend listens on (service port = target port).
pub const BACKEND_PORT: u16 = 9080;

/// The backends of the topology, by workload name.
pub const BACKENDS: [&str; 4] = ["reviews-v1", "reviews-v2", "ratings", "flaky"];

/// Addresses of the L7 topology.
#[derive(Clone, Copy, Debug)]
pub struct L7Addrs {
    pub client: IpAddr,
    pub other: IpAddr,
    pub waypoint: IpAddr,
    /// Workload addresses of [`BACKENDS`], in order.
    pub backends: [IpAddr; 4],
    /// Service VIPs: `reviews` (both versions), then one per backend.
    pub reviews_vip: IpAddr,
    pub backend_vips: [IpAddr; 4],
    pub waypoint_vip: IpAddr,
}

impl L7Addrs {
    fn new(subnet: &Subnet) -> Self {
        L7Addrs {
            client: subnet.workload(0),
            other: subnet.workload(1),
            waypoint: subnet.workload(9),
            backends: [2, 3, 4, 5].map(|n| subnet.workload(n)),
            reviews_vip: subnet.ip(200),
            backend_vips: [201, 202, 203, 204].map(|n| subnet.ip(n)),
            waypoint_vip: subnet.ip(209),
        }
    }

    /// `reviews` VIP:9080, the usual request target.
    pub fn reviews(&self) -> SocketAddr {
        SocketAddr::new(self.reviews_vip, BACKEND_PORT)
    }

    pub fn service(&self, backend: &str) -> SocketAddr {
        let i = BACKENDS.iter().position(|b| *b == backend).unwrap_or(0);
        SocketAddr::new(self.backend_vips[i], BACKEND_PORT)
    }
}

/// The mesh config of the topology; `l7` is YAML appended at top level
/// (`httpRoutes:`, `httpPolicies:`, `trafficPolicies:` sections).
pub fn config(a: &L7Addrs, l7: &str) -> String {
    let wp = "waypoint: {namespace: demo, name: waypoint}";
    let mut out = format!(
        r#"# L7 loopback mesh
workloads:
- {{name: client, namespace: demo, serviceAccount: client, node: node1, addresses: ["{client}"]}}
- {{name: other, namespace: other, serviceAccount: other, node: node1, addresses: ["{other}"]}}
- {{name: waypoint-0, namespace: demo, serviceAccount: waypoint, node: node3, addresses: ["{waypoint}"], services: [demo/waypoint], nativeTunnel: true}}
"#,
        client = a.client,
        other = a.other,
        waypoint = a.waypoint,
    );
    for (i, b) in BACKENDS.iter().enumerate() {
        let services = if b.starts_with("reviews") {
            format!("[demo/reviews, demo/{b}]")
        } else {
            format!("[demo/{b}]")
        };
        out.push_str(&format!(
            "- {{name: {b}, namespace: demo, serviceAccount: {sa}, node: node2, addresses: [\"{ip}\"], services: {services}, {wp}}}\n",
            sa = b.split('-').next().unwrap_or(b),
            ip = a.backends[i],
        ));
    }
    out.push_str(&format!(
        "services:\n- {{name: reviews, namespace: demo, addresses: [\"{}\"], ports: [{{port: {BACKEND_PORT}}}], {wp}}}\n",
        a.reviews_vip
    ));
    for (i, b) in BACKENDS.iter().enumerate() {
        out.push_str(&format!(
            "- {{name: {b}, namespace: demo, addresses: [\"{}\"], ports: [{{port: {BACKEND_PORT}}}], {wp}}}\n",
            a.backend_vips[i]
        ));
    }
    out.push_str(&format!(
        "- {{name: waypoint, namespace: demo, addresses: [\"{}\"], ports: [{{port: 15008}}]}}\n",
        a.waypoint_vip
    ));
    out.push_str(l7);
    out.push('\n');
    out
}

/// What one backend has served.
#[derive(Default)]
pub struct BackendStats {
    pub requests: AtomicU64,
    /// Requests per `x-echo-key`, for flaky behaviour and assertions.
    by_key: Mutex<HashMap<String, u64>>,
}

/// The running topology.
pub struct L7Mesh {
    pub dir: TempDir,
    pub addrs: L7Addrs,
    pub pki: Pki,
    pub z2: Ztunnel,
    pub waypoint: Waypoint,
    pub config_path: PathBuf,
    pub stats: HashMap<&'static str, Arc<BackendStats>>,
    _servers: Vec<JoinHandle<()>>,
}

impl L7Mesh {
    /// Starts node2's ztunnel, the waypoint, and one backend per workload.
    pub async fn start(l7: &str) -> anyhow::Result<Self> {
        Self::start_with(l7, &[]).await
    }

    /// As [`L7Mesh::start`], `waypoint_args` passed to the waypoint.
    pub async fn start_with(l7: &str, waypoint_args: &[&str]) -> anyhow::Result<Self> {
        let dir = TempDir::new("ambit-l7")?;
        let subnet = Subnet::random();
        let addrs = L7Addrs::new(&subnet);
        let pki = Pki::new()?;
        let config_path = dir.path().join("mesh.yaml");
        std::fs::write(&config_path, config(&addrs, l7))?;
        let certs2 = dir.path().join("certs-node2");
        let certs_wp = dir.path().join("certs-waypoint");
        pki.write_root(&certs2)?;
        pki.write_root(&certs_wp)?;
        for sa in ["reviews", "ratings", "flaky"] {
            pki.write_cert(&certs2, &Pki::identity("demo", sa))?;
        }
        pki.write_cert(&certs_wp, &Pki::identity("demo", "waypoint"))?;

        let mut stats = HashMap::new();
        let mut servers = Vec::new();
        for (i, b) in BACKENDS.iter().enumerate() {
            let s = Arc::new(BackendStats::default());
            servers.push(
                backend(
                    SocketAddr::new(addrs.backends[i], BACKEND_PORT),
                    b,
                    s.clone(),
                )
                .await?,
            );
            stats.insert(*b, s);
        }
        let z2 = Ztunnel::spawn(
            dir.path(),
            &config_path,
            &certs2,
            "node2",
            subnet.node(2),
            &[],
        )?;
        let waypoint = Waypoint::spawn_waypoint(
            dir.path(),
            &Source::static_files(&config_path, &certs_wp),
            "demo/waypoint",
            "node3",
            addrs.waypoint,
            waypoint_args,
        )?;
        Ok(L7Mesh {
            dir,
            addrs,
            pki,
            z2,
            waypoint,
            config_path,
            stats,
            _servers: servers,
        })
    }

    /// Replaces the L7 sections and waits until the waypoint has the new config.
    pub fn set_l7(&self, l7: &str) -> anyhow::Result<()> {
        let before = self.config_updates()?;
        std::fs::write(&self.config_path, config(&self.addrs, l7))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.config_updates()? <= before {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("waypoint did not reload:\n{}", self.waypoint.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn config_updates(&self) -> anyhow::Result<f64> {
        let m = self.waypoint.metrics()?;
        Ok(crate::process::metric_sum(
            &m,
            "ambit_config_updates_total",
            &[],
        ))
    }

    /// Requests `backend` has served so far.
    pub fn served(&self, backend: &str) -> u64 {
        self.stats
            .get(backend)
            .map_or(0, |s| s.requests.load(Ordering::Relaxed))
    }

    /// A client acting as node1's ztunnel for the workload `(ns, sa)`.
    pub async fn client(&self, ns: &str, sa: &str) -> anyhow::Result<L7Client> {
        let src = Pki::identity(ns, sa);
        let issued = self.pki.ca.issue(&src, Duration::from_secs(3600))?;
        let cert = issued.to_workload_certificate()?;
        let roots = TrustRoots::from_pem(self.pki.ca.root_pem().as_bytes())?;
        let tls = client_config(&cert, &roots, vec![Pki::identity("demo", "waypoint")])?;
        let hbone_addr = SocketAddr::new(self.addrs.waypoint, hbone::HBONE_PORT);
        let h2 = H2Client::connect(
            hbone_addr,
            Arc::new(tls),
            H2Tuning::default(),
            Duration::from_secs(5),
            || {},
        )
        .await
        .with_context(|| format!("HBONE to the waypoint at {hbone_addr}"))?;
        let client_ip = if ns == "demo" {
            self.addrs.client
        } else {
            self.addrs.other
        };
        Ok(L7Client { h2, client_ip })
    }
}

/// A response, body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The backend's account of the request (empty when the waypoint answered).
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Which backend served it ("" when none did).
    pub fn backend(&self) -> String {
        self.echo()["backend"].as_str().unwrap_or("").to_string()
    }
}

/// Sends requests into the waypoint over HBONE, one tunnel per request
/// stream of HTTP/1.1 (or one HTTP/2 connection) per call.
pub struct L7Client {
    h2: H2Client,
    client_ip: IpAddr,
}

impl L7Client {
    /// A raw tunnel to `target`: bytes in, bytes out (hostile-client tests).
    pub async fn tunnel(&self, target: SocketAddr) -> anyhow::Result<TunnelIo> {
        self.tunnel_from(target, self.client_ip).await
    }

    /// As [`Self::tunnel`], claiming `client_ip` as the original source.
    pub async fn tunnel_from(
        &self,
        target: SocketAddr,
        client_ip: IpAddr,
    ) -> anyhow::Result<TunnelIo> {
        let forwarded = [(
            http::HeaderName::from_static(hbone::FORWARDED),
            http::HeaderValue::from_str(&hbone::forwarded_for(client_ip))?,
        )];
        let tunnel = self.h2.open(target, &forwarded).await?;
        Ok(TunnelIo::new(tunnel))
    }

    /// An HTTP/1.1 connection inside one tunnel to `target`.
    pub async fn http1(&self, target: SocketAddr) -> anyhow::Result<Http1> {
        let io = self.tunnel(target).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http1 {
            sender,
            _task: task,
        })
    }

    /// An HTTP/2 (prior knowledge) connection inside one tunnel to `target`.
    pub async fn http2(&self, target: SocketAddr) -> anyhow::Result<Http2> {
        let io = self.tunnel(target).await?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(io),
        )
        .await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http2 {
            sender,
            _task: task,
        })
    }

    /// One request on a fresh HTTP/1.1 tunnel.
    pub async fn send(
        &self,
        target: SocketAddr,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<Reply> {
        self.http1(target).await?.send(req).await
    }

    /// `GET path` with `headers` to `target` on a fresh tunnel.
    pub async fn get(
        &self,
        target: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        self.send(target, request("GET", target, path, headers))
            .await
    }
}

/// A request to `target` with the `Host` a client would send.
pub fn request(
    method: &str,
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path).header(
        "host",
        format!("reviews.demo.svc.cluster.local:{}", target.port()),
    );
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

pub struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    _task: JoinHandle<()>,
}

impl Http1 {
    /// Sends and reads the whole response (keep-alive: call again for the next).
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        read(resp).await
    }
}

pub struct Http2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    _task: JoinHandle<()>,
}

impl Http2 {
    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        // HTTP/2 requests carry the authority in the URI, not a Host header.
        let host = req
            .headers_mut()
            .remove("host")
            .and_then(|h| h.to_str().ok().map(str::to_string))
            .unwrap_or_else(|| "reviews".into());
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.uri_mut() = format!("http://{host}{pq}").parse()?;
        *req.version_mut() = http::Version::HTTP_2;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        read(resp).await
    }
}

async fn read(resp: Response<Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// An HTTP/1.1 backend that reports what it received.
async fn backend(
    addr: SocketAddr,
    name: &'static str,
    stats: Arc<BackendStats>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding backend {name} on {addr}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let stats = stats.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let stats = stats.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(answer(name, peer, &stats, req).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }))
}

async fn answer(
    name: &'static str,
    peer: SocketAddr,
    stats: &BackendStats,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |k: &str| parts.headers.get(k).and_then(|v| v.to_str().ok());
    let key_count = header("x-echo-key").map(|k| {
        let mut m = stats.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let c = m.entry(k.to_string()).or_default();
        *c += 1;
        *c
    });
    if let Some(ms) = header("x-echo-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status = header("x-echo-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    if header("x-echo-fail-on") == Some(name) {
        status = StatusCode::INTERNAL_SERVER_ERROR;
    }
    if let (Some(n), Some(count)) = (
        header("x-echo-fail-first").and_then(|v| v.parse::<u64>().ok()),
        key_count,
    ) {
        if count <= n {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.to_string(), joined.join(",").into());
    }
    let echo = serde_json::json!({
        "backend": name,
        "peer": peer.ip().to_string(),
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "host": header("host"),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "attempt": key_count,
    });
    let mut resp = Response::new(Full::new(Bytes::from(echo.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-backend", http::HeaderValue::from_static(name));
    resp
}
