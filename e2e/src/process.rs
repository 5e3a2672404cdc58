//! A ztunnel or waypoint child process with its own log file; killed on drop.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the workspace's binaries are: `$AMBIT_BIN_DIR`, else next to the
/// running test executable (`target/<profile>/deps/..`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("AMBIT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().context("exe has no parent")?.to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Where a ztunnel gets its mesh view and certificates: command-line flags.
#[derive(Clone, Debug)]
pub struct Source(pub Vec<std::ffi::OsString>);

impl Source {
    /// A static config file and a certificate directory.
    pub fn static_files(config: &Path, certs: &Path) -> Self {
        Source(vec![
            "--config".into(),
            config.into(),
            "--certs".into(),
            certs.into(),
        ])
    }

    /// Adds arguments every proxy started from this source gets (e.g. the
    /// trace collector, `--otlp-endpoint`).
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.0.extend(args.iter().map(|a| a.into()));
        self
    }
}

/// A proxy process of ours: a node's ztunnel or a waypoint.
pub struct Proxy {
    /// `ztunnel` or `waypoint`.
    kind: &'static str,
    child: Option<Child>,
    pub node: String,
    pub ip: IpAddr,
    pub log_path: PathBuf,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<String>,
}

pub type Ztunnel = Proxy;
pub type Waypoint = Proxy;

impl Proxy {
    /// Starts a ztunnel for `node`, every listener on `ip` (HBONE per workload).
    pub fn spawn(
        dir: &Path,
        config: &Path,
        certs: &Path,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn_from(dir, &Source::static_files(config, certs), node, ip, extra)
    }

    /// As [`Ztunnel::spawn`], with the mesh and certificates from `source`.
    pub fn spawn_from(
        dir: &Path,
        source: &Source,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let ip_s = ip.to_string();
        let mut args = vec!["--bind-ip", ip_s.as_str(), "--hbone-addr", "per-workload"];
        args.extend_from_slice(extra);
        Self::launch(None, dir, source, node, ip, &args)
    }

    /// Starts a ztunnel inside network namespace `netns` (a cluster node), with
    /// its admin ports on `ip` and production listeners (transparent capture).
    pub fn spawn_in_netns(
        netns: &str,
        dir: &Path,
        source: &Source,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::in_netns(netns, dir, source, node, ip, extra, true)
    }

    fn in_netns(
        netns: &str,
        dir: &Path,
        source: &Source,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
        wait: bool,
    ) -> anyhow::Result<Self> {
        let admin = format!("{ip}:15000");
        let mut args = vec![
            "--admin-addr",
            admin.as_str(),
            "--metrics-addr",
            "0.0.0.0:15020",
        ];
        args.extend_from_slice(&["--readiness-addr", "0.0.0.0:15021"]);
        args.extend_from_slice(extra);
        Self::launch_ztunnel(Some(netns), dir, source, node, ip, &args, wait)
    }

    /// A ztunnel capturing with eBPF on `node` of a namespace cluster, inbound
    /// (its uplink) too, pinning under `pin_dir`, with static files.
    pub fn spawn_capturing(
        node: &crate::cluster::Node,
        dir: &Path,
        config: &Path,
        certs: &Path,
        pin_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_capturing_from(node, dir, &Source::static_files(config, certs), pin_dir)
    }

    /// As [`Ztunnel::spawn_capturing`], with the mesh and certificates from
    /// `source`; returns once capture is in place.
    pub fn spawn_capturing_from(
        node: &crate::cluster::Node,
        dir: &Path,
        source: &Source,
        pin_dir: &Path,
    ) -> anyhow::Result<Self> {
        let z = Self::spawn_capturing_idle(node, dir, source, pin_dir)?;
        z.wait_log("capturing inbound traffic", Duration::from_secs(10))?;
        Ok(z)
    }

    /// As [`Ztunnel::spawn_capturing_from`], for a node without a captured
    /// pod (one that runs only a waypoint pod, which is not captured):
    /// ztunnel attaches nothing until a pod there is enrolled, so this
    /// returns once it is ready (its first config from `source` applied).
    pub fn spawn_capturing_idle(
        node: &crate::cluster::Node,
        dir: &Path,
        source: &Source,
        pin_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::capturing(node, dir, source, pin_dir, true)
    }

    fn capturing(
        node: &crate::cluster::Node,
        dir: &Path,
        source: &Source,
        pin_dir: &Path,
        wait: bool,
    ) -> anyhow::Result<Self> {
        let pin = pin_dir.display().to_string();
        let args = [
            "--capture",
            "--capture-uplink",
            node.uplink.as_str(),
            "--bpf-pin-dir",
            pin.as_str(),
        ];
        let name = format!("node{}", node.index);
        let ip = node.ip.into();
        Self::in_netns(node.ns.name(), dir, source, &name, ip, &args, wait)
    }

    /// As [`Ztunnel::spawn_capturing_idle`], without waiting for readiness:
    /// for a ztunnel that cannot get ready (its control plane is away).
    pub fn start_capturing_unready(
        node: &crate::cluster::Node,
        dir: &Path,
        source: &Source,
        pin_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::capturing(node, dir, source, pin_dir, false)
    }

    /// Waits for `/healthz/ready` (e.g. after [`Ztunnel::start_capturing_unready`]).
    pub fn wait_until_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_ready(timeout)
    }

    /// Waits until every local workload in its config dump has a certificate
    /// (with a CA, they are fetched once the mesh arrives).
    pub fn wait_certificates(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let dump = self.config_dump()?;
            // One certificate per identity: pods may share a service account.
            let want: std::collections::BTreeSet<(String, String)> = dump["config"]["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["node"] == dump["node"])
                // A waypoint holds its own certificate, not the node's ztunnel.
                .filter(|w| w["nativeTunnel"] != true)
                .map(|w| (w["namespace"].to_string(), w["serviceAccount"].to_string()))
                .collect();
            let (want, have) = (
                want.len(),
                dump["certificates"].as_array().map_or(0, Vec::len),
            );
            if have >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel {}: {have} of {want} workload certificates after {timeout:?}:\n{}",
                    self.node,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn launch(
        netns: Option<&str>,
        dir: &Path,
        source: &Source,
        node: &str,
        ip: IpAddr,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::launch_ztunnel(netns, dir, source, node, ip, args, true)
    }

    /// A ztunnel for `node`; `wait`: return once it is ready.
    fn launch_ztunnel(
        netns: Option<&str>,
        dir: &Path,
        source: &Source,
        node: &str,
        ip: IpAddr,
        args: &[&str],
        wait: bool,
    ) -> anyhow::Result<Self> {
        let mut common = vec!["--node", node, "--reload-interval", "200ms"];
        common.extend_from_slice(args);
        let mut z = Self::start_bin("ztunnel", netns, dir, source, node, ip, &common)?;
        if wait {
            z.wait_ready(Duration::from_secs(20))?;
        }
        Ok(z)
    }

    /// Starts the waypoint of Gateway `gateway` (`namespace/name`), its pod
    /// at `ip` (HBONE on `ip`:15008, admin ports on `ip` too) on `node`.
    pub fn spawn_waypoint(
        dir: &Path,
        source: &Source,
        gateway: &str,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::launch_waypoint(None, dir, source, gateway, node, ip, extra)
    }

    /// Starts the waypoint of Gateway `gateway` (`namespace/name`) inside
    /// `pod`'s network namespace of a namespace cluster, as that waypoint
    /// pod (HBONE on `<pod ip>:15008`, admin ports on the pod address), on
    /// the pod's node `node`. With a control plane, `source` carries the
    /// pod's own token ([`crate::istiod::Istiod::source_for_waypoint`]): the
    /// CA grants a waypoint its own identity only, and a node's token no
    /// waypoint identity. Returns once it is ready: config synced and its own
    /// certificate issued.
    pub fn spawn_waypoint_in_netns(
        pod: &crate::cluster::Pod,
        dir: &Path,
        source: &Source,
        gateway: &str,
        node: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let ip = IpAddr::V4(pod.ip);
        Self::launch_waypoint(Some(pod.ns.name()), dir, source, gateway, node, ip, extra)
    }

    fn launch_waypoint(
        netns: Option<&str>,
        dir: &Path,
        source: &Source,
        gateway: &str,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let addr = |port: u16| SocketAddr::new(ip, port).to_string();
        let (hbone, admin, metrics, ready) = (addr(15008), addr(15000), addr(15020), addr(15021));
        let mut args = vec![
            "--gateway",
            gateway,
            "--node",
            node,
            "--hbone-addr",
            hbone.as_str(),
            "--admin-addr",
            admin.as_str(),
            "--metrics-addr",
            metrics.as_str(),
            "--readiness-addr",
            ready.as_str(),
            "--reload-interval",
            "200ms",
        ];
        args.extend_from_slice(extra);
        Self::launch_bin("waypoint", netns, dir, source, gateway, ip, &args)
    }

    fn launch_bin(
        kind: &'static str,
        netns: Option<&str>,
        dir: &Path,
        source: &Source,
        name: &str,
        ip: IpAddr,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut z = Self::start_bin(kind, netns, dir, source, name, ip, args)?;
        z.wait_ready(Duration::from_secs(20))?;
        Ok(z)
    }

    /// [`Self::launch_bin`] without waiting for readiness.
    fn start_bin(
        kind: &'static str,
        netns: Option<&str>,
        dir: &Path,
        source: &Source,
        name: &str,
        ip: IpAddr,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let log_path = dir.join(format!("{kind}-{}.log", name.replace('/', "-")));
        let log = std::fs::File::create(&log_path)?;
        let bin = bin_path(kind)?;
        let mut cmd = match netns {
            Some(ns) => {
                // nsenter, not `ip netns exec`: the latter remounts /sys in a new
                // mount namespace, hiding the host's bpffs pins from ztunnel.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(&source.0)
            .args(["--drain-timeout", "5s"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("AMBIT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {kind}"))?;
        Ok(Proxy {
            kind,
            child: Some(child),
            node: name.to_string(),
            ip,
            log_path,
            netns: netns.map(str::to_string),
        })
    }

    /// GET `path` on one of its HTTP ports, from inside its namespace if needed.
    fn http(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.addr(port);
        let path = path.to_string();
        match &self.netns {
            None => crate::client::http_get(addr, &path),
            Some(ns) => crate::netns::run_in(ns, move || crate::client::http_get(addr, &path)),
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    pub fn socks5(&self) -> SocketAddr {
        self.addr(15080)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} {} exited with {status}:\n{}",
                        self.kind,
                        self.node,
                        self.log()
                    );
                }
            }
            if let Ok((200, _)) = self.http(15021, "/healthz/ready") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} {} not ready after {timeout:?}:\n{}",
            self.kind,
            self.node,
            self.log()
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                bail!(
                    "{needle:?} not in {} {} log after {timeout:?}:\n{log}",
                    self.kind,
                    self.node
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.http(15020, "/metrics")?;
        if status != 200 {
            bail!("metrics returned {status}");
        }
        Ok(body)
    }

    /// Polls the metrics endpoint until the labelled sum reaches `want`.
    pub async fn wait_for_metric(
        &self,
        metric: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(text) = self.metric_reached(metric, labels, want, deadline)? {
                return Ok(text);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Self::wait_for_metric`] for tests without a runtime: blocks the thread.
    pub fn wait_for_metric_blocking(
        &self,
        metric: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(text) = self.metric_reached(metric, labels, want, deadline)? {
                return Ok(text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One poll: the metrics text once the labelled sum reaches `want`,
    /// `None` to poll again, an error past `deadline`.
    fn metric_reached(
        &self,
        metric: &str,
        labels: &[(&str, &str)],
        want: f64,
        deadline: Instant,
    ) -> anyhow::Result<Option<String>> {
        let text = self.metrics()?;
        if metric_sum(&text, metric, labels) >= want {
            return Ok(Some(text));
        }
        if Instant::now() > deadline {
            bail!(
                "{metric} {labels:?} never reached {want} on {}:\n{text}",
                self.node
            );
        }
        Ok(None)
    }

    pub fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.http(15000, "/config_dump")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Sends SIGTERM (graceful drain).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} {} still running after {timeout:?}",
                    self.kind,
                    self.node
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sums every sample of `metric` whose labels contain all `labels` (`k="v"` pairs).
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
