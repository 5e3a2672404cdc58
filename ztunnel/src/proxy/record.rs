//! One proxied connection's attribution: metrics labels and the access-log line.

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mesh_core::config::{ServiceInfo, WorkloadInfo};
use mesh_core::telemetry::Escaped;
use mesh_core::Identity;
use prometheus_client::metrics::counter::Counter;

use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::state::ProxyState;

/// Envoy-style response flags, as Istio reports them.
pub mod flags {
    pub const NONE: &str = "-";
    /// Denied by authorization policy.
    pub const RBAC: &str = "RBAC";
    /// Upstream connection failure.
    pub const UPSTREAM_FAILURE: &str = "UF";
    /// No healthy upstream (service without endpoints).
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// No route: the destination is not served here.
    pub const NO_ROUTE: &str = "NR";
    /// Connection ended by an error mid-stream.
    pub const RESET: &str = "UC";
}

#[derive(Clone)]
pub struct ConnectionRecord {
    pub reporter: Reporter,
    pub src_addr: SocketAddr,
    pub src_workload: Option<Arc<WorkloadInfo>>,
    pub src_identity: Option<Identity>,
    pub dst_addr: SocketAddr,
    pub dst_workload: Option<Arc<WorkloadInfo>>,
    pub dst_identity: Option<Identity>,
    pub dst_service: Option<Arc<ServiceInfo>>,
    /// Where the bytes actually went: the HBONE peer, or the workload itself.
    pub via: Option<SocketAddr>,
    pub security: SecurityPolicy,
    pub start: Instant,
    /// The tunnel's span ([`crate::telemetry`]); disabled for other connections.
    pub span: tracing::Span,
    /// Counters of the labels at open time, resolved once: a connection that
    /// ends cleanly counts its close without building and hashing its
    /// eleven labels again.
    counters: OnceLock<OpenCounters>,
}

#[derive(Clone)]
struct OpenCounters {
    closed: Counter,
    received: Counter,
    sent: Counter,
}

impl ConnectionRecord {
    pub fn new(reporter: Reporter, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        ConnectionRecord {
            reporter,
            src_addr,
            src_workload: None,
            src_identity: None,
            dst_addr,
            dst_workload: None,
            dst_identity: None,
            dst_service: None,
            via: None,
            security: SecurityPolicy::unknown,
            start: Instant::now(),
            span: tracing::Span::none(),
            counters: OnceLock::new(),
        }
    }

    fn labels(&self, response_flags: &str) -> TcpLabels {
        let unknown = || "unknown".to_string();
        let principal = |id: &Option<Identity>| id.as_ref().map_or_else(unknown, |i| i.to_string());
        TcpLabels {
            reporter: self.reporter,
            source_workload: self
                .src_workload
                .as_ref()
                .map_or_else(unknown, |w| w.workload.name.clone()),
            source_workload_namespace: self
                .src_workload
                .as_ref()
                .map(|w| w.workload.namespace.clone())
                .or_else(|| {
                    self.src_identity
                        .as_ref()
                        .map(|i| i.namespace().to_string())
                })
                .unwrap_or_else(unknown),
            source_principal: principal(&self.src_identity),
            destination_workload: self
                .dst_workload
                .as_ref()
                .map_or_else(unknown, |w| w.workload.name.clone()),
            destination_workload_namespace: self
                .dst_workload
                .as_ref()
                .map_or_else(unknown, |w| w.workload.namespace.clone()),
            destination_principal: principal(&self.dst_identity),
            destination_service: self
                .dst_service
                .as_ref()
                .map_or_else(unknown, |s| s.hostname.clone()),
            request_protocol: "tcp".to_string(),
            response_flags: response_flags.to_string(),
            connection_security_policy: self.security,
        }
    }

    /// Counts the connection as opened. Call once the proxy has decided to serve it.
    pub fn opened(&self, state: &ProxyState) {
        let m = &state.metrics;
        let labels = self.labels(flags::NONE);
        m.opened.get_or_create(&labels).inc();
        let _ = self.counters.set(OpenCounters {
            closed: m.closed.get_or_create(&labels).clone(),
            received: m.received_bytes.get_or_create(&labels).clone(),
            sent: m.sent_bytes.get_or_create(&labels).clone(),
        });
        m.active_connections.inc();
    }

    /// Records the end of an opened connection: metrics and the access-log line.
    pub fn closed(
        &self,
        state: &ProxyState,
        to_dst: u64,
        to_src: u64,
        response_flags: &str,
        error: Option<&dyn Display>,
    ) {
        let m = &state.metrics;
        m.active_connections.dec();
        match self.counters.get() {
            Some(c) if response_flags == flags::NONE => {
                c.closed.inc();
                c.received.inc_by(to_dst);
                c.sent.inc_by(to_src);
            }
            _ => {
                let labels = self.labels(response_flags);
                m.closed.get_or_create(&labels).inc();
                m.received_bytes.get_or_create(&labels).inc_by(to_dst);
                m.sent_bytes.get_or_create(&labels).inc_by(to_src);
            }
        }
        self.log(to_dst, to_src, response_flags, error);
    }

    /// Records a connection refused before it was opened (policy, no route, ...).
    pub fn refused(
        &self,
        state: &ProxyState,
        reason: &str,
        response_flags: &str,
        error: &dyn Display,
    ) {
        let m = &state.metrics;
        let labels = self.labels(response_flags);
        m.opened.get_or_create(&labels).inc();
        m.closed.get_or_create(&labels).inc();
        m.failure(self.direction(), reason);
        self.log(0, 0, response_flags, Some(error));
    }

    /// The workload address the bytes were delivered to.
    pub fn dst_addr_ip(&self) -> std::net::IpAddr {
        self.via.map_or(self.dst_addr.ip(), |v| v.ip())
    }

    pub fn direction(&self) -> &'static str {
        match self.reporter {
            Reporter::source => "outbound",
            Reporter::destination => "inbound",
        }
    }

    fn log(&self, to_dst: u64, to_src: u64, response_flags: &str, error: Option<&dyn Display>) {
        crate::telemetry::finish(self, to_dst, to_src, response_flags, error);
        // One preformatted message (see mesh_core::telemetry::ACCESS_TARGET):
        // `name=value` as tracing's fields read, strings quoted.
        tracing::info!(
            target: mesh_core::telemetry::ACCESS_TARGET,
            "{}",
            AccessLine {
                record: self,
                to_dst,
                to_src,
                response_flags,
                error,
            }
        );
    }
}

/// The access-log line of a finished connection.
struct AccessLine<'a> {
    record: &'a ConnectionRecord,
    to_dst: u64,
    to_src: u64,
    response_flags: &'a str,
    error: Option<&'a dyn Display>,
}

impl Display for AccessLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.record;
        let duration_ms = r.start.elapsed().as_secs_f64() * 1000.0;
        let result = if self.response_flags == flags::NONE {
            "ok"
        } else {
            self.response_flags
        };
        // Names come from config and certificates, the error from a peer:
        // all escaped, so no value can split the line (tracing used to).
        let src_workload = r.src_workload.as_ref().map(|w| Escaped(w.key()));
        let dst_workload = r.dst_workload.as_ref().map(|w| Escaped(w.key()));
        let dst_service = r.dst_service.as_ref().map(|s| Escaped(&s.hostname));
        let src_identity = r.src_identity.as_ref().map(Escaped);
        let dst_identity = r.dst_identity.as_ref().map(Escaped);
        write!(
            f,
            "connection complete direction=\"{}\" src.addr={} src.workload={} \
             src.identity={} dst.addr={} dst.via={} dst.workload={} dst.identity={} \
             dst.service={} security={:?} bytes_sent={} bytes_recv={} \
             duration_ms={duration_ms:.2} result={result:?} error={}",
            r.direction(),
            r.src_addr,
            Dash(&src_workload),
            Dash(&src_identity),
            r.dst_addr,
            Dash(&r.via),
            Dash(&dst_workload),
            Dash(&dst_identity),
            Dash(&dst_service),
            r.security,
            self.to_dst,
            self.to_src,
            Dash(&self.error.map(Escaped)),
        )
    }
}

/// `-` for none, as access logs show absent fields; formats in place.
struct Dash<'a, T>(&'a Option<T>);

impl<T: Display> Display for Dash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Counts a connection against its destination endpoint for least-connections balancing.
pub struct ActiveEndpoint(Arc<WorkloadInfo>);

impl ActiveEndpoint {
    pub fn new(w: Arc<WorkloadInfo>) -> Self {
        w.active.fetch_add(1, Ordering::Relaxed);
        ActiveEndpoint(w)
    }
}

impl Drop for ActiveEndpoint {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
