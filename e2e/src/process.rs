//! A ztunnel child process with its own log file; killed on drop.

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

pub struct Ztunnel {
    child: Option<Child>,
    pub node: String,
    pub ip: IpAddr,
    pub log_path: PathBuf,
}

impl Ztunnel {
    /// Starts a ztunnel for `node`, every listener on `ip` (HBONE per workload).
    pub fn spawn(
        dir: &Path,
        config: &Path,
        certs: &Path,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log_path = dir.join(format!("ztunnel-{node}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin_path("ztunnel")?)
            .arg("--config")
            .arg(config)
            .arg("--certs")
            .arg(certs)
            .args([
                "--node",
                node,
                "--bind-ip",
                &ip.to_string(),
                "--hbone-addr",
                "per-workload",
            ])
            .args(["--reload-interval", "200ms", "--drain-timeout", "5s"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("AMBIT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning ztunnel")?;
        let mut z = Ztunnel {
            child: Some(child),
            node: node.to_string(),
            ip,
            log_path,
        };
        z.wait_ready(Duration::from_secs(20))?;
        Ok(z)
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
                        "ztunnel {} exited with {status}:\n{}",
                        self.node,
                        self.log()
                    );
                }
            }
            if let Ok((200, _)) = crate::client::http_get(self.addr(15021), "/healthz/ready") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "ztunnel {} not ready after {timeout:?}:\n{}",
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
                    "{needle:?} not in ztunnel {} log after {timeout:?}:\n{log}",
                    self.node
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = crate::client::http_get(self.addr(15020), "/metrics")?;
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
            let text = self.metrics()?;
            if metric_sum(&text, metric, labels) >= want {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "{metric} {labels:?} never reached {want} on {}:\n{text}",
                    self.node
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = crate::client::http_get(self.addr(15000), "/config_dump")?;
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
                bail!("ztunnel {} still running after {timeout:?}", self.node);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ztunnel {
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
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Raises the open-file soft limit to the hard limit (tests open thousands of sockets).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
