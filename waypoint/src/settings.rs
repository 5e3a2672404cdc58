//! Command-line settings of the waypoint process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_core::sys::{parse_duration, parse_positive_duration};

/// Ambit waypoint: the L7 proxy a namespace's traffic passes when L7 policy applies.
#[derive(Parser, Debug, Clone)]
#[command(name = "waypoint", version)]
pub struct Settings {
    /// The waypoint Gateway this proxy serves, `namespace/name` (routes and
    /// policies attached to it apply here).
    #[arg(long, env = "AMBIT_WAYPOINT")]
    pub gateway: String,

    /// HBONE listener: this waypoint pod's address, port 15008. The waypoint's
    /// own workload is the one with this IP in the mesh config.
    #[arg(long, env = "AMBIT_HBONE_ADDR")]
    pub hbone_addr: SocketAddr,

    /// Static mesh config file (workloads, services, routes, policies),
    /// reloaded when it changes; the alternative to --xds-address.
    #[arg(
        long,
        env = "AMBIT_CONFIG",
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    pub config: Option<PathBuf>,

    /// Where certificates (and, with --xds-address, the mesh) come from.
    #[command(flatten)]
    pub control_plane: mesh_core::cli::ControlPlaneArgs,

    /// Name of the node the waypoint pod runs on (the CA checks it).
    #[arg(long, env = "AMBIT_NODE_NAME")]
    pub node: String,

    /// Admin (`/config_dump`); loopback only by default.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    #[command(flatten)]
    pub tracing: mesh_core::cli::TracingArgs,

    /// Largest request head (request line and headers) accepted; beyond it, 431.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// Time a client has to send a complete request head (slowloris bound).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub header_read_timeout: Duration,

    /// How long to wait for a tunnel's first bytes to tell HTTP from other
    /// protocols; a client that sends nothing first (server-first protocols)
    /// is passed through at L4 after it.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    pub protocol_detection_timeout: Duration,

    /// HTTP/2 streams a client may have open at once on one tunnel.
    #[arg(long, default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Largest request body buffered so the request can be retried or mirrored;
    /// larger bodies are streamed and not retried.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_buffered_body: usize,

    /// Timeout for dialing an endpoint's ztunnel.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// How often the static config file and certificate directory are checked.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    pub reload_interval: Duration,

    /// How long open requests may finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Idle upstream connections are closed after this long.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub pool_idle_timeout: Duration,

    /// Data-plane worker threads [default: half the CPUs, at least 1, at most 2].
    #[arg(long)]
    pub worker_threads: Option<usize>,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl Settings {
    /// See [`mesh_core::sys::default_workers`].
    pub fn workers(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(mesh_core::sys::default_workers)
            .max(1)
    }

    /// The Gateway as (namespace, name).
    pub fn gateway(&self) -> Result<(String, String), String> {
        match self.gateway.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((ns.to_string(), name.to_string()))
            }
            _ => Err(format!(
                "--gateway {:?} is not namespace/name",
                self.gateway
            )),
        }
    }

    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        self.gateway()?;
        self.control_plane.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Settings {
        let mut args = vec![
            "waypoint",
            "--gateway",
            "demo/waypoint",
            "--hbone-addr",
            "127.0.0.1:15008",
            "--node",
            "n1",
        ];
        args.extend_from_slice(extra);
        Settings::parse_from(args)
    }

    #[test]
    fn gateway_must_be_namespaced() {
        let s = parse(&["--config", "c.yaml", "--certs", "d"]);
        assert_eq!(
            s.gateway().unwrap(),
            ("demo".to_string(), "waypoint".to_string())
        );
        assert!(s.validate().is_ok());
        for bad in ["waypoint", "/w", "demo/", "a/b/c"] {
            let mut s = s.clone();
            s.gateway = bad.to_string();
            assert!(s.validate().is_err(), "{bad} must be refused");
        }
    }
}
