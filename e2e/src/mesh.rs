//! A two-node mesh on loopback: two ztunnel processes, workloads on 127.X.Y.*.
//!
//! node1 runs `client` (demo/client) and `intruder` (other/intruder); node2 runs
//! `server` (demo/server), an endpoint of service `echo` (VIP .200, port 80 →
//! 9000). Tests start their own servers on the server workload's address.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Pki, Subnet, Ztunnel};

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("{prefix}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("AMBIT_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Workload addresses of the standard topology.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub client: IpAddr,
    pub intruder: IpAddr,
    pub server: IpAddr,
    pub vip: IpAddr,
    /// A workload on node3, where no ztunnel runs (tests impersonate its peer).
    pub ghost: IpAddr,
}

pub struct TwoNodes {
    pub dir: TempDir,
    pub subnet: Subnet,
    pub pki: Pki,
    pub z1: Ztunnel,
    pub z2: Ztunnel,
    pub client: IpAddr,
    pub intruder: IpAddr,
    pub server: IpAddr,
    pub vip: IpAddr,
    pub ghost: IpAddr,
    pub config_path: PathBuf,
    pub certs1: PathBuf,
    pub certs2: PathBuf,
}

pub const SERVER_PORT: u16 = 9000;

impl TwoNodes {
    /// Starts both ztunnels with `policies` (a YAML list, `[]` for none) in force.
    pub fn start(policies: &str) -> anyhow::Result<Self> {
        Self::start_with(policies, &[])
    }

    pub fn start_with(policies: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::launch(|a| Self::config(a, policies), extra_args, &[])
    }

    /// Starts with a config of the caller's making (see [`TwoNodes::config`]);
    /// `extra_args` go to both ztunnels, `node1_args` to node1's only.
    pub fn launch(
        config: impl FnOnce(&Addrs) -> String,
        extra_args: &[&str],
        node1_args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("ambit-e2e")?;
        let subnet = Subnet::random();
        let pki = Pki::new()?;
        let addrs = Addrs {
            client: subnet.workload(0),
            intruder: subnet.workload(1),
            server: subnet.workload(2),
            ghost: subnet.workload(3),
            vip: subnet.ip(200),
        };
        let Addrs {
            client,
            intruder,
            server,
            vip,
            ghost,
        } = addrs;
        let config_path = dir.path().join("mesh.yaml");
        std::fs::write(&config_path, config(&addrs))?;
        let certs1 = dir.path().join("certs-node1");
        let certs2 = dir.path().join("certs-node2");
        pki.write_root(&certs1)?;
        pki.write_root(&certs2)?;
        // Node-scoped: each node holds certificates only for its own workloads.
        pki.write_cert(&certs1, &Pki::identity("demo", "client"))?;
        pki.write_cert(&certs1, &Pki::identity("other", "intruder"))?;
        pki.write_cert(&certs2, &Pki::identity("demo", "server"))?;
        let z1_args: Vec<&str> = extra_args.iter().chain(node1_args).copied().collect();
        let z1 = Ztunnel::spawn(
            dir.path(),
            &config_path,
            &certs1,
            "node1",
            subnet.node(1),
            &z1_args,
        )?;
        let z2 = Ztunnel::spawn(
            dir.path(),
            &config_path,
            &certs2,
            "node2",
            subnet.node(2),
            extra_args,
        )?;
        Ok(TwoNodes {
            dir,
            subnet,
            pki,
            z1,
            z2,
            client,
            intruder,
            server,
            vip,
            ghost,
            config_path,
            certs1,
            certs2,
        })
    }

    pub fn addrs(&self) -> Addrs {
        Addrs {
            client: self.client,
            intruder: self.intruder,
            server: self.server,
            vip: self.vip,
            ghost: self.ghost,
        }
    }

    /// The standard topology with `policies` (a YAML list).
    pub fn config(a: &Addrs, policies: &str) -> String {
        Self::config_with_server(a, &format!("[\"{}\"]", a.server), policies)
    }

    /// As [`TwoNodes::config`], with the server's address list given (YAML).
    pub fn config_with_server(a: &Addrs, server_addresses: &str, policies: &str) -> String {
        let Addrs {
            client,
            intruder,
            vip,
            ghost,
            ..
        } = *a;
        format!(
            r#"# two-node loopback mesh
workloads:
- name: client
  namespace: demo
  serviceAccount: client
  node: node1
  addresses: ["{client}"]
- name: intruder
  namespace: other
  serviceAccount: intruder
  node: node1
  addresses: ["{intruder}"]
- name: server
  namespace: demo
  serviceAccount: server
  node: node2
  addresses: {server_addresses}
  services: [demo/echo]
- name: ghost
  namespace: demo
  serviceAccount: ghost
  node: node3
  addresses: ["{ghost}"]
services:
- name: echo
  namespace: demo
  addresses: ["{vip}"]
  ports: [{{port: 80, targetPort: {SERVER_PORT}}}]
policies: {policies}
"#
        )
    }

    /// Rewrites the mesh config and waits until both ztunnels have reacted
    /// (reloaded or rejected it).
    pub fn rewrite_config(&self, yaml: &str, expect: &str) -> anyhow::Result<()> {
        let before = (count(&self.z1.log(), expect), count(&self.z2.log(), expect));
        std::fs::write(&self.config_path, yaml)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = (count(&self.z1.log(), expect), count(&self.z2.log(), expect));
            if now.0 > before.0 && now.1 > before.1 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("ztunnels did not log {expect:?} after config change");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn set_policies(&self, policies: &str) -> anyhow::Result<()> {
        let yaml = Self::config(&self.addrs(), policies);
        self.rewrite_config(&yaml, "config reloaded")
    }

    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server, SERVER_PORT)
    }

    pub fn vip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.vip, 80)
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}
