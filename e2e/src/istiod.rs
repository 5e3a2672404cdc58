//! An istiod-lite child process (`serve`) on a loopback address, with node
//! bootstrap tokens, and the flags a ztunnel (or, with the token istiod-lite
//! issues each waypoint pod, a waypoint) needs to follow it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::{bin_path, Source};

pub struct Istiod {
    child: Option<Child>,
    pub ip: IpAddr,
    /// The network namespace it runs in, if not the caller's.
    netns: Option<String>,
    dir: PathBuf,
    pub manifests: PathBuf,
    pub log_path: PathBuf,
    tokens: BTreeMap<String, PathBuf>,
}

impl Istiod {
    /// Starts istiod-lite on `ip` (gRPC 15012, monitoring 15014) following
    /// `manifests`, with a bootstrap token for each of `nodes`; keeps its CA
    /// in `dir/ca` so a restart signs with the same root.
    pub fn spawn(dir: &Path, manifests: &Path, ip: IpAddr, nodes: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_in(None, dir, manifests, ip, nodes)
    }

    /// As [`Istiod::spawn`], inside network namespace `netns` when given.
    pub fn spawn_in(
        netns: Option<&str>,
        dir: &Path,
        manifests: &Path,
        ip: IpAddr,
        nodes: &[&str],
    ) -> anyhow::Result<Self> {
        let mut tokens = BTreeMap::new();
        let mut map = String::new();
        for node in nodes {
            let token = format!("{:032x}", rand::random::<u128>());
            let path = dir.join(format!("token-{node}"));
            std::fs::write(&path, &token)?;
            map.push_str(&format!("{node}: {token}\n"));
            tokens.insert(node.to_string(), path);
        }
        std::fs::write(dir.join("bootstrap-tokens.yaml"), map)?;
        let mut istiod = Istiod {
            child: None,
            ip,
            netns: netns.map(str::to_string),
            dir: dir.to_path_buf(),
            manifests: manifests.to_path_buf(),
            log_path: dir.join("istiod.log"),
            tokens,
        };
        istiod.start()?;
        Ok(istiod)
    }

    /// (Re)starts the process; returns once it serves its first snapshot.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("istiod-lite already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let bin = bin_path("istiod-lite")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if self.ip.is_loopback() {
            // A single-host test mesh: every pod is on 127.0.0.0/8.
            cmd.arg("serve").arg("--allow-loopback-pods");
        } else {
            cmd.arg("serve");
        }
        let child = cmd
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--data-dir")
            .arg(self.dir.join("ca"))
            .args(["--grpc-addr", &self.grpc().to_string()])
            .args(["--monitoring-addr", &self.monitoring().to_string()])
            .arg("--bootstrap-tokens")
            .arg(self.dir.join("bootstrap-tokens.yaml"))
            .args(["--serving-ip", &self.ip.to_string()])
            .args(["--poll-ms", "100"])
            .env(
                "AMBIT_LOG",
                std::env::var("AMBIT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning istiod-lite")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("istiod-lite exited with {status}:\n{}", self.log());
                }
            }
            if let Ok((200, _)) = self.http("/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("istiod-lite not ready after 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process outright (no graceful shutdown), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn grpc(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15012)
    }

    pub fn monitoring(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15014)
    }

    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("ca").join("root-cert.pem")
    }

    /// ztunnel flags to follow this control plane as `node` (xDS + CA over TLS).
    pub fn source_for(&self, node: &str) -> anyhow::Result<Source> {
        let token = self
            .tokens
            .get(node)
            .with_context(|| format!("no bootstrap token for node {node}"))?;
        Ok(Source(vec![
            "--xds-address".into(),
            format!("https://{}", self.grpc()).into(),
            "--ca-root-cert".into(),
            self.root_cert().into(),
            "--token-file".into(),
            token.into(),
        ]))
    }

    /// Waypoint flags to follow this control plane as waypoint pod `pod`
    /// (`namespace/name`), with the token istiod-lite issued that pod: a
    /// waypoint never holds its node's token, which would let it obtain its
    /// neighbours' identities. Waits (up to 10 s) for the token, issued once
    /// the pod is a waypoint pod of the model.
    pub fn source_for_waypoint(&self, pod: &str) -> anyhow::Result<Source> {
        let (ns, name) = pod
            .split_once('/')
            .with_context(|| format!("waypoint pod {pod:?} is not `namespace/name`"))?;
        let token = self
            .dir
            .join("ca")
            .join("waypoint-tokens")
            .join(ns)
            .join(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !token.exists() {
            if Instant::now() > deadline {
                bail!(
                    "istiod-lite issued no token for waypoint pod {pod} within 10 s (is it a \
                     pod labelled with the name of a Gateway of class istio-waypoint?):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Source(vec![
            "--xds-address".into(),
            format!("https://{}", self.grpc()).into(),
            "--ca-root-cert".into(),
            self.root_cert().into(),
            "--token-file".into(),
            token.into(),
        ]))
    }

    /// GET `path` on the monitoring port, from inside its namespace if needed.
    fn http(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (addr, path) = (self.monitoring(), path.to_string());
        match &self.netns {
            None => crate::client::http_get(addr, &path),
            Some(ns) => crate::netns::run_in(ns, move || crate::client::http_get(addr, &path)),
        }
    }

    /// The mesh model it serves (`/debug/config`).
    pub fn mesh_config(&self) -> anyhow::Result<mesh_core::config::MeshConfig> {
        let (status, body) = self.http("/debug/config")?;
        if status != 200 {
            bail!("istiod-lite /debug/config returned {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.http("/metrics")?;
        if status != 200 {
            bail!("istiod-lite metrics returned {status}");
        }
        Ok(body)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        self.kill();
    }
}
