//! Command-line arguments every proxy shares: where its mesh config and
//! certificates come from (a control plane, or static files), and the
//! start-up that follows from them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::ca_client::{CaClient, Scope};
use crate::grpc::ControlPlane;
use crate::sys::parse_positive_duration;
use crate::tls::{dir, CertificateStore, TrustRoots};

/// Span export, flattened into each proxy's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct TracingArgs {
    /// OTLP/gRPC trace collector, e.g. http://otel-collector:4317 [default: no tracing].
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share of new traces sampled, 0.0–1.0 (a caller's own decision, in its
    /// `traceparent`, is kept).
    #[arg(long, default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sampling: f64,
}

impl TracingArgs {
    /// The export settings for a proxy named `service_name` logging with `log_filter`.
    pub fn config(
        &self,
        service_name: String,
        log_filter: &str,
    ) -> crate::telemetry::TracingConfig {
        crate::telemetry::TracingConfig {
            otlp_endpoint: self.otlp_endpoint.clone(),
            sampling_ratio: self.trace_sampling,
            service_name,
            log_filter: log_filter.to_owned(),
        }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number between 0 and 1")),
    }
}

/// Flattened into each proxy's settings (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct ControlPlaneArgs {
    /// The control plane's delta ADS endpoint: https://HOST:15012 (or
    /// http://HOST:15010 for tests).
    #[arg(long, env = "AMBIT_XDS_ADDRESS")]
    pub xds_address: Option<String>,

    /// The CA endpoint [default: the xDS address]; certificates come from
    /// here unless --certs is given.
    #[arg(long, env = "AMBIT_CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// The mesh root certificate: trust anchor for workload certificates and
    /// for the control plane's serving certificate.
    #[arg(long, env = "AMBIT_CA_ROOT_CERT")]
    pub ca_root_cert: Option<PathBuf>,

    /// File with this node's bearer token for the control plane (re-read per call).
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// DNS name the control plane's certificate must carry.
    #[arg(long, default_value = crate::grpc::CONTROL_PLANE_NAME)]
    pub control_plane_name: String,

    /// Trust domain of the mesh (xDS mode; a static config names its own).
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The control plane's root namespace, whose policies apply mesh-wide
    /// (xDS mode; a static config names its own). Must match istiod-lite's
    /// `--root-namespace`.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = crate::xds::mesh_handler::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Lifetime asked of the CA for workload certificates.
    #[arg(long, default_value = "24h", value_parser = parse_positive_duration)]
    pub cert_ttl: Duration,

    /// Static certificates: a directory with root-cert.pem and
    /// <namespace>/<service-account>/{cert-chain,key}.pem [default: from the CA].
    #[arg(long, env = "AMBIT_CERTS_DIR")]
    pub certs: Option<PathBuf>,
}

impl ControlPlaneArgs {
    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.token_file.is_some() {
            // The token is a node credential: never in cleartext off the host.
            for addr in [&self.xds_address, &self.ca_address].into_iter().flatten() {
                if addr.starts_with("http://") && !is_loopback_url(addr) {
                    return Err(format!(
                        "{addr}: a token (--token-file) is only sent over https, or http to loopback"
                    ));
                }
            }
        }
        if self.certs.is_none() {
            if self.ca_root_cert.is_none() {
                return Err(
                    "without --certs, certificates come from the CA: --ca-root-cert is needed"
                        .into(),
                );
            }
            if self.ca_address().is_none() {
                return Err(
                    "without --certs, a CA is needed: give --ca-address or --xds-address".into(),
                );
            }
        }
        Ok(())
    }

    /// The CA to ask for certificates: --ca-address, else the xDS address.
    pub fn ca_address(&self) -> Option<&str> {
        self.ca_address.as_deref().or(self.xds_address.as_deref())
    }

    /// The control plane at `address`, trusted through --ca-root-cert.
    pub fn control_plane(&self, address: &str) -> anyhow::Result<ControlPlane> {
        let roots = match &self.ca_root_cert {
            Some(path) => Some(read_roots(path)?),
            None => None,
        };
        Ok(ControlPlane {
            address: address.to_string(),
            roots,
            server_name: self.control_plane_name.clone(),
            token_file: self.token_file.clone(),
        })
    }

    /// The certificate store at start: the static directory's contents, or
    /// only the trust roots (the CA client fills in the rest).
    pub fn initial_certificates(&self) -> anyhow::Result<CertificateStore> {
        let store = CertificateStore::default();
        match (&self.certs, &self.ca_root_cert) {
            (Some(d), _) => dir::apply(&store, dir::load_dir(d)?),
            (None, Some(root)) => store.set_roots(read_roots(root)?),
            (None, None) => {}
        }
        Ok(store)
    }

    /// The CA client, when certificates come from the CA, for the node's
    /// workloads in `scope`; `on_result` sees
    /// each fetch's outcome (`issued` or a failure label), for a metric.
    /// Must be called inside the tokio runtime that will run it.
    pub fn ca_client(
        &self,
        node: &str,
        store: &CertificateStore,
        scope: Scope,
        on_result: impl Fn(&'static str) + Send + Sync + 'static,
    ) -> anyhow::Result<Option<CaClient>> {
        let (None, Some(addr)) = (&self.certs, self.ca_address()) else {
            return Ok(None);
        };
        let client = CaClient::new(
            &self.control_plane(addr)?,
            node.to_string(),
            store.clone(),
            self.cert_ttl,
        )?
        .with_scope(scope)
        .with_observer(move |_, outcome| {
            on_result(match outcome {
                Ok(()) => "issued",
                Err(e) => e.label(),
            })
        });
        Ok(Some(client))
    }
}

fn read_roots(path: &std::path::Path) -> anyhow::Result<TrustRoots> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    TrustRoots::from_pem(&pem).with_context(|| format!("parsing {}", path.display()))
}

/// `http://127.x.y.z:port`, `http://[::1]:port` or `http://localhost:port`.
fn is_loopback_url(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        cp: ControlPlaneArgs,
    }

    fn parse(args: &[&str]) -> ControlPlaneArgs {
        Args::parse_from(std::iter::once("proxy").chain(args.iter().copied())).cp
    }

    #[test]
    fn tokens_are_not_sent_in_cleartext_off_the_host() {
        let with = |addr: &str| {
            parse(&["--xds-address", addr, "--certs", "d", "--token-file", "t"]).validate()
        };
        assert!(with("http://198.18.0.254:15010").is_err());
        assert!(with("http://127.0.0.1:15010").is_ok());
        assert!(with("http://[::1]:15010").is_ok());
        assert!(with("https://198.18.0.254:15012").is_ok());
    }

    #[test]
    fn certificates_need_a_source() {
        assert!(parse(&[]).validate().is_err());
        assert!(parse(&["--ca-root-cert", "r.pem"]).validate().is_err());
        let s = parse(&[
            "--xds-address",
            "https://cp:15012",
            "--ca-root-cert",
            "r.pem",
        ]);
        assert!(s.validate().is_ok());
        assert_eq!(s.ca_address(), Some("https://cp:15012"));
        let s = parse(&[
            "--xds-address",
            "https://cp:15012",
            "--ca-address",
            "https://ca:15012",
            "--ca-root-cert",
            "r.pem",
        ]);
        assert_eq!(s.ca_address(), Some("https://ca:15012"));
        assert!(parse(&["--certs", "d"]).validate().is_ok());
    }
}
