//! Command-line settings of the ztunnel process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

/// Where a listener binds, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|_| format!("{s:?} is neither ip:port nor off"))
    }
}

/// Where the HBONE (15008) server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HboneListen {
    /// One listener per local workload address, on `<workload ip>:15008`. The
    /// destination is the listener's address, as it would be under capture.
    PerWorkload,
    /// One listener (usually a wildcard with `--transparent`); the destination is
    /// the accepted socket's local address.
    At(SocketAddr),
}

impl FromStr for HboneListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "per-workload" {
            return Ok(HboneListen::PerWorkload);
        }
        s.parse()
            .map(HboneListen::At)
            .map_err(|_| format!("{s:?} is neither ip:port nor per-workload"))
    }
}

use mesh_core::sys::{parse_duration, parse_positive_duration};

/// Ambit ztunnel: the per-node L4 proxy of the ambient mesh.
#[derive(Parser, Debug, Clone)]
#[command(name = "ztunnel", version)]
pub struct Settings {
    /// Static mesh config file (workloads, services, policies), reloaded when
    /// it changes; the alternative to --xds-address.
    #[arg(
        long,
        env = "AMBIT_MESH_CONFIG",
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    pub config: Option<PathBuf>,

    /// Where certificates (and, with --xds-address, the mesh) come from.
    #[command(flatten)]
    pub control_plane: mesh_core::cli::ControlPlaneArgs,

    /// Name of the node this ztunnel serves.
    #[arg(long, env = "AMBIT_NODE_NAME")]
    pub node: String,

    /// Default IP for every listener not given explicitly (admin stays on loopback
    /// unless this is a loopback address too).
    #[arg(long)]
    pub bind_ip: Option<IpAddr>,

    /// Captured outbound TCP listener (15001).
    #[arg(long)]
    pub outbound_addr: Option<Listen>,

    /// Captured inbound plaintext listener (15006).
    #[arg(long)]
    pub inbound_plaintext_addr: Option<Listen>,

    /// HBONE listener: `per-workload` or an address (default [::]:15008).
    #[arg(long, default_value = "[::]:15008")]
    pub hbone_addr: HboneListen,

    /// Port HBONE peers listen on.
    #[arg(long, default_value_t = mesh_core::hbone::HBONE_PORT)]
    pub hbone_port: u16,

    /// SOCKS5 outbound listener for clients without capture (15080).
    #[arg(long)]
    pub socks5_addr: Option<Listen>,

    /// Admin server: /config_dump, /logging (15000, localhost).
    #[arg(long)]
    pub admin_addr: Option<Listen>,

    /// Prometheus metrics (15020).
    #[arg(long)]
    pub metrics_addr: Option<Listen>,

    /// Readiness /healthz/ready (15021).
    #[arg(long)]
    pub readiness_addr: Option<Listen>,

    /// Set IP_TRANSPARENT on the capture listeners (needs CAP_NET_ADMIN).
    #[arg(long)]
    pub transparent: bool,

    /// Capture local workloads' outbound TCP with eBPF into the outbound
    /// listener (implies --transparent; needs CAP_BPF and CAP_NET_ADMIN).
    #[arg(long)]
    pub capture: bool,

    /// With --capture: the node's uplink, where inbound traffic for enrolled
    /// pods (HBONE and plaintext) is captured.
    #[arg(long)]
    pub capture_uplink: Option<String>,

    /// With --capture or --transparent: connect to local workloads from the
    /// client's own IP (the application sees its real peer).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub preserve_source_ip: bool,

    /// With --capture: where capture maps and links are pinned (bpffs), per
    /// node name beneath it, so they outlive a ztunnel restart.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    pub bpf_pin_dir: PathBuf,

    /// How long open connections may finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Data-plane worker threads [default: half the CPUs, at least 1, at most 2].
    #[arg(long)]
    pub worker_threads: Option<usize>,

    /// How often the config file and certificates are checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    pub reload_interval: Duration,

    /// Close pooled HBONE connections idle this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,

    /// Timeout for TCP connect plus TLS handshake, both directions.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// HTTP/2 flow-control window per tunnel, bytes (the connection window is
    /// this times 100, so one stalled tunnel never blocks the others).
    #[arg(long, default_value_t = mesh_core::hbone::H2Tuning::default().stream_window,
          value_parser = clap::value_parser!(u32).range(65_535..=16 * 1024 * 1024))]
    pub h2_stream_window: u32,

    /// Largest HTTP/2 frame we accept, bytes (16 KiB to 16 MiB); also the
    /// most a tunnel queues for sending.
    #[arg(long, default_value_t = mesh_core::hbone::H2Tuning::default().max_frame_size,
          value_parser = clap::value_parser!(u32).range(16384..=16_777_215))]
    pub h2_max_frame_size: u32,

    #[command(flatten)]
    pub tracing: mesh_core::cli::TracingArgs,

    /// Log filter (tracing EnvFilter syntax); changeable at runtime via /logging.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl Settings {
    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        self.control_plane.validate()
    }

    /// Source address for connections to local workloads on behalf of `client`.
    pub fn upstream_source(&self, client: std::net::IpAddr) -> Option<std::net::IpAddr> {
        // Needs capture of the replies: eBPF (--capture) or an external
        // TPROXY setup (--transparent).
        ((self.capture || self.transparent) && self.preserve_source_ip).then_some(client)
    }

    /// See [`mesh_core::sys::default_workers`].
    pub fn workers(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(mesh_core::sys::default_workers)
            .max(1)
    }

    pub fn h2_tuning(&self) -> mesh_core::hbone::H2Tuning {
        mesh_core::hbone::H2Tuning {
            stream_window: self.h2_stream_window.max(65_535),
            max_frame_size: self.h2_max_frame_size,
        }
    }

    fn resolve(&self, given: Option<Listen>, default_ip: IpAddr, port: u16) -> Listen {
        given.unwrap_or(Listen::At(SocketAddr::new(
            self.bind_ip.unwrap_or(default_ip),
            port,
        )))
    }

    pub fn outbound(&self) -> Listen {
        self.resolve(self.outbound_addr, self.capture_ip(), 15001)
    }

    pub fn inbound_plaintext(&self) -> Listen {
        self.resolve(self.inbound_plaintext_addr, self.capture_ip(), 15006)
    }

    /// Default address of the listeners capture steers to: under eBPF
    /// capture a dual-stack `[::]`, so pods' IPv6 connections have a
    /// listener too (IPv4 ones arrive IPv4-mapped); else `0.0.0.0`.
    fn capture_ip(&self) -> IpAddr {
        if self.capture {
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::from([0, 0, 0, 0])
        }
    }

    /// SOCKS5 grants a workload's identity on the strength of the source IP
    /// alone, so like admin it stays on loopback unless told otherwise.
    pub fn socks5(&self) -> Listen {
        self.loopback_only(self.socks5_addr, 15080)
    }

    pub fn admin(&self) -> Listen {
        self.loopback_only(self.admin_addr, 15000)
    }

    fn loopback_only(&self, given: Option<Listen>, port: u16) -> Listen {
        let default = IpAddr::from([127, 0, 0, 1]);
        match (given, self.bind_ip) {
            (Some(l), _) => l,
            (None, Some(ip)) if ip.is_loopback() => Listen::At(SocketAddr::new(ip, port)),
            (None, _) => Listen::At(SocketAddr::new(default, port)),
        }
    }

    pub fn metrics(&self) -> Listen {
        self.resolve(self.metrics_addr, IpAddr::from([0, 0, 0, 0]), 15020)
    }

    pub fn readiness(&self) -> Listen {
        self.resolve(self.readiness_addr, IpAddr::from([0, 0, 0, 0]), 15021)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e300h").is_err());
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn bind_ip_applies_to_defaults_only() {
        let s = Settings::parse_from([
            "ztunnel",
            "--config",
            "c",
            "--node",
            "n",
            "--certs",
            "d",
            "--bind-ip",
            "127.1.2.3",
            "--metrics-addr",
            "off",
        ]);
        assert_eq!(s.socks5(), Listen::At("127.1.2.3:15080".parse().unwrap()));
        assert_eq!(s.admin(), Listen::At("127.1.2.3:15000".parse().unwrap()));
        assert_eq!(s.metrics(), Listen::Off);
        assert_eq!(s.hbone_addr, HboneListen::At("[::]:15008".parse().unwrap()));
        assert_eq!(s.control_plane.root_namespace, "istio-system");
        let s = Settings::parse_from([
            "ztunnel",
            "--config",
            "c",
            "--node",
            "n",
            "--certs",
            "d",
            "--root-namespace",
            "mesh-root",
        ]);
        assert_eq!(s.control_plane.root_namespace, "mesh-root");
    }

    #[test]
    fn capture_listeners_default_to_dual_stack() {
        let base = ["ztunnel", "--config", "c", "--node", "n", "--certs", "d"];
        let s = Settings::parse_from(base);
        assert_eq!(s.outbound(), Listen::At("0.0.0.0:15001".parse().unwrap()));
        let s = Settings::parse_from(base.iter().chain(&["--capture"]));
        assert_eq!(s.outbound(), Listen::At("[::]:15001".parse().unwrap()));
        assert_eq!(
            s.inbound_plaintext(),
            Listen::At("[::]:15006".parse().unwrap())
        );
        let s = Settings::parse_from(base.iter().chain(&[
            "--capture",
            "--outbound-addr",
            "0.0.0.0:15001",
        ]));
        assert_eq!(s.outbound(), Listen::At("0.0.0.0:15001".parse().unwrap()));
    }
}
