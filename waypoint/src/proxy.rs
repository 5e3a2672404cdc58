//! The request path: route, authorize, limit, forward (with retries,
//! timeouts and mirrors), and account for every request once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mesh_core::config::{ServiceInfo, WorkloadInfo};
use mesh_core::Identity;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::authz::{self, L7Decision, RequestAttributes};
use crate::metrics::{PolicyLabels, RequestLabels, TcpLabels};
use crate::resilience::OutlierDetector;
use crate::route::{CompiledBackend, Matched, RequestAction, Selection};
use crate::state::{View, WaypointState};
use crate::telemetry;
use crate::upstream::{empty_body, Body, UpstreamError};

/// Who sent a tunnel into the waypoint, and what it asked to reach.
pub struct Downstream {
    /// The peer ztunnel's client certificate names the source workload.
    pub peer_identity: Arc<Identity>,
    /// The original client address (from `Forwarded`), else the peer's.
    pub client_ip: IpAddr,
    /// The original destination: a service VIP:port or a workload ip:port.
    pub target: SocketAddr,
    /// The trace context the CONNECT carried (the caller's ztunnel's
    /// connection span): the parent of requests that bring none of their own.
    pub trace: Option<opentelemetry::trace::SpanContext>,
}

/// Where a request went and how it ended, for metrics, logs and the span.
#[derive(Default)]
struct Record {
    route: Option<String>,
    service: Option<Arc<ServiceInfo>>,
    endpoint: Option<Arc<WorkloadInfo>>,
    flags: &'static str,
    attempts: u32,
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Serves one request.
pub async fn handle(
    state: Arc<WaypointState>,
    ds: Arc<Downstream>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    state.metrics.active_requests.inc();
    let view = state.view();
    let (parts, body) = req.into_parts();
    let protocol = if parts.version == http::Version::HTTP_2 {
        "http2"
    } else {
        "http"
    };
    let service = view.mesh.service_by_ip(ds.target.ip()).cloned();
    let span = telemetry::request_span(
        &parts,
        &telemetry::SpanAttributes {
            service: service.as_ref().map(|s| s.hostname.clone()),
            source_principal: Some(ds.peer_identity.to_string()),
            ..Default::default()
        },
        ds.trace.as_ref(),
    );
    let mut record = Record {
        service,
        flags: "-",
        ..Default::default()
    };
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let mut response = serve(&state, &view, &ds, parts, body, &mut record)
        .instrument(span.clone())
        .await;
    strip_hop_by_hop(response.headers_mut());
    if let Some(endpoint) = &record.endpoint {
        telemetry::record_destination(&span, &endpoint.identity.to_string());
    }
    telemetry::record_response(&span, response.status());
    account(
        &state, &view, &ds, &record, protocol, &method, &path, &response, start,
    );
    state.metrics.active_requests.dec();
    response
}

async fn serve(
    state: &Arc<WaypointState>,
    view: &Arc<View>,
    ds: &Downstream,
    mut parts: http::request::Parts,
    body: Incoming,
    record: &mut Record,
) -> Response<Body> {
    let target = ds.target;
    let workload = match &record.service {
        Some(_) => None,
        None => match view.mesh.workload_by_ip(target.ip()) {
            Some(w) => Some(w.clone()),
            None => {
                record.flags = "NR";
                return text(StatusCode::SERVICE_UNAVAILABLE, "no such destination\n");
            }
        },
    };
    // Routes, policies and the backend all see one normalized path, so what
    // was authorized is exactly what is served.
    if let Err(e) = normalize_uri(&mut parts) {
        record.flags = "DPE";
        tracing::debug!(path = parts.uri.path(), "request refused: {e}");
        return text(StatusCode::BAD_REQUEST, "bad request path\n");
    }
    let service_key = record.service.as_ref().map(|s| s.key());
    let matched = match view
        .router
        .select(service_key.as_deref(), target.port(), &parts)
    {
        Selection::NoMatch => {
            record.flags = "NR";
            return text(StatusCode::NOT_FOUND, "no route matched\n");
        }
        Selection::NoRoutes => None,
        Selection::Matched(m) => Some(m),
    };
    record.route = matched.as_ref().map(|m| m.route.to_string());
    if let Some(route) = &record.route {
        telemetry::record_route(&tracing::Span::current(), &parts.method, route);
    }

    // Authorization comes before anything with an effect (rate-limit
    // tokens, mirrors, upstream work).
    let config = view.mesh.config();
    let policies = authz::applicable(
        &config.http_policies,
        &config.root_namespace,
        (&state.gateway.0, &state.gateway.1),
        service_key.as_deref(),
        record.route.as_deref(),
    );
    if !policies.is_empty() {
        let host = host_of(&parts);
        let attrs = RequestAttributes {
            source: Some(&ds.peer_identity),
            source_ip: ds.client_ip,
            destination_port: target.port(),
            method: &parts.method,
            path: parts.uri.path(),
            host: &host,
            headers: &parts.headers,
        };
        let decision = authz::authorize(&policies, &attrs);
        let audited = match &decision {
            L7Decision::Allow { audited } | L7Decision::Deny { audited, .. } => audited,
        };
        for policy in audited {
            count_authz(state, policy, "audit");
            tracing::info!(policy = %policy, method = %parts.method, path = parts.uri.path(), source = %ds.peer_identity, "request matched an AUDIT policy");
        }
        if let L7Decision::Deny { policy, .. } = &decision {
            count_authz(state, policy, "deny");
            record.flags = "RBAC";
            return text(StatusCode::FORBIDDEN, "RBAC: access denied");
        }
    }

    if let Some(bucket) = state
        .resilience
        .rate_limit(service_key.as_deref(), record.route.as_deref())
    {
        if !bucket.try_take(Instant::now()) {
            record.flags = "RL";
            return text(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
        }
    }

    let mut chosen_backend = None;
    let backend = match &matched {
        None => match (&record.service, workload) {
            (Some(svc), _) => Backend::Service(svc.clone(), target.port()),
            (None, Some(w)) => Backend::Workload(w, target),
            (None, None) => {
                record.flags = "NR";
                return text(StatusCode::SERVICE_UNAVAILABLE, "no such destination\n");
            }
        },
        Some(m) => {
            let chosen = m.rule.pick_backend();
            chosen_backend = chosen;
            if let RequestAction::Respond(resp) = m.rule.apply_request(m, chosen, &mut parts) {
                return resp.map(|()| empty_body());
            }
            let Some(b) = chosen else {
                record.flags = "NR";
                return text(StatusCode::INTERNAL_SERVER_ERROR, "no backend\n");
            };
            match view.mesh.service_by_key(b.service()) {
                Some(svc) => Backend::Service(svc.clone(), b.port()),
                None => {
                    // Gateway API: a backend that does not resolve answers 500.
                    record.flags = "NR";
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "backend not found\n");
                }
            }
        }
    };
    if let Backend::Service(svc, _) = &backend {
        record.service = Some(svc.clone());
    }
    let backend_key = backend.service_key();
    let _request_permit = match backend_key
        .as_deref()
        .and_then(|k| state.resilience.breaker(k))
    {
        Some(breaker) => match breaker.try_acquire_request() {
            Some(p) => Some(p),
            None => {
                record.flags = "UO";
                return text(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n");
            }
        },
        None => None,
    };

    let timeouts = matched
        .as_ref()
        .map(|m| m.rule.timeouts())
        .unwrap_or_default();
    let retry = matched.as_ref().and_then(|m| m.rule.retry().cloned());
    let mirrors = matched
        .as_ref()
        .map(|m| m.rule.mirrors())
        .unwrap_or_default();
    let wants_replay = retry.is_some() || !mirrors.is_empty();
    let max_body = state.settings.max_buffered_body;
    // `timeouts.request` runs from the request's arrival to the response:
    // reading the body is part of it, so a client trickling its body cannot
    // hold the request (and its circuit-breaker slot) past the limit.
    let exchange = async {
        let body = match ReplayableBody::read(body, wants_replay, max_body).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!("request body: {e}");
                return None;
            }
        };
        prepare_upstream(&mut parts);
        telemetry::inject(&tracing::Span::current(), &mut parts.headers);
        if let (Some(bytes), false) = (body.bytes(), mirrors.is_empty()) {
            for (svc, port) in &mirrors {
                mirror(state, view, ds, &parts, bytes.clone(), svc, *port);
            }
        }
        let per_try = timeouts.backend_request.map(|d| d.0);
        Some(
            forward(
                state,
                view,
                ds,
                &backend,
                Some(parts),
                body,
                per_try,
                retry,
                record,
            )
            .await,
        )
    };
    let outcome = match timeouts.request {
        Some(limit) => tokio::time::timeout(limit.0, exchange).await.ok(),
        None => Some(exchange.await),
    };
    match outcome {
        Some(Some(resp)) => finish(resp, matched.as_ref(), chosen_backend),
        Some(None) => {
            record.flags = "DPE";
            text(StatusCode::BAD_REQUEST, "bad request body\n")
        }
        None => {
            record.flags = "UT";
            text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
        }
    }
}

fn finish(
    mut resp: Response<Body>,
    matched: Option<&Matched<'_>>,
    backend: Option<&CompiledBackend>,
) -> Response<Body> {
    if let Some(m) = matched {
        let (mut parts, body) = resp.into_parts();
        m.rule.apply_response(backend, &mut parts);
        resp = Response::from_parts(parts, body);
    }
    resp
}

/// Where a request is sent: a Service port (an endpoint is chosen per
/// attempt), or one workload addressed directly.
enum Backend {
    Service(Arc<ServiceInfo>, u16),
    Workload(Arc<WorkloadInfo>, SocketAddr),
}

impl Backend {
    fn service_key(&self) -> Option<String> {
        match self {
            Backend::Service(s, _) => Some(s.key()),
            Backend::Workload(..) => None,
        }
    }
}

/// A request body that can be sent more than once (retries, mirrors) when
/// it is small enough to hold, else streamed once.
enum ReplayableBody {
    Buffered(Bytes),
    Streamed(Option<Incoming>),
}

impl ReplayableBody {
    async fn read(body: Incoming, replay: bool, limit: usize) -> Result<Self, String> {
        use hyper::body::Body as _;
        let size = body.size_hint();
        if body.is_end_stream() {
            return Ok(ReplayableBody::Buffered(Bytes::new()));
        }
        let fits = size.exact().is_some_and(|n| n as usize <= limit);
        if !(replay && fits) {
            return Ok(ReplayableBody::Streamed(Some(body)));
        }
        let collected = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(ReplayableBody::Buffered(collected.to_bytes()))
    }

    fn bytes(&self) -> Option<&Bytes> {
        match self {
            ReplayableBody::Buffered(b) => Some(b),
            ReplayableBody::Streamed(_) => None,
        }
    }

    /// The body for one attempt; `None` once a streamed body has been sent.
    fn take(&mut self) -> Option<Body> {
        match self {
            ReplayableBody::Buffered(b) => Some(
                Full::new(b.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            ReplayableBody::Streamed(s) => s.take().map(|b| b.boxed_unsync()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    state: &Arc<WaypointState>,
    view: &View,
    ds: &Downstream,
    backend: &Backend,
    mut parts: Option<http::request::Parts>,
    mut body: ReplayableBody,
    per_try: Option<Duration>,
    retry: Option<mesh_core::config::RetryPolicy>,
    record: &mut Record,
) -> Response<Body> {
    let Some(own) = view.own.as_ref() else {
        record.flags = "UH";
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "waypoint has no identity\n",
        );
    };
    let Some(upstream) = state.upstream() else {
        record.flags = "UH";
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    };
    // Gateway API leaves the default to implementations: one retry when a
    // retry stanza is present without a count.
    let retries = retry.as_ref().map_or(0, |r| r.attempts.unwrap_or(1));
    let backoff = retry
        .as_ref()
        .and_then(|r| r.backoff)
        .map_or(Duration::from_millis(25), |d| d.0);
    let outliers = backend
        .service_key()
        .and_then(|k| state.resilience.outliers(&k));
    let breaker = backend
        .service_key()
        .and_then(|k| state.resilience.breaker(&k));
    let mut last: Option<Response<Body>> = None;
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::time::sleep(backoff).await;
        }
        let Some((endpoint, addr)) = choose_endpoint(backend, outliers.as_deref(), ds.target)
        else {
            record.flags = "UH";
            return text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
        };
        let Some(attempt_body) = body.take() else {
            break;
        };
        record.endpoint = Some(endpoint.clone());
        record.attempts = attempt + 1;
        // The last attempt takes the request head; earlier ones copy it.
        let head = if attempt == retries {
            parts.take()
        } else {
            parts.clone()
        };
        let Some(head) = head else {
            break;
        };
        let mut req = Request::from_parts(head, attempt_body);
        *req.version_mut() = http::Version::HTTP_11;
        let send = upstream.send(
            &own.identity,
            &endpoint,
            addr,
            ds.client_ip,
            req,
            breaker.as_ref(),
        );
        let result = match per_try {
            Some(limit) => tokio::time::timeout(limit, send).await.ok(),
            None => Some(send.await),
        };
        let more = attempt < retries;
        match result {
            None => {
                record.flags = "UT";
                note_outlier(outliers.as_deref(), backend, addr, None);
                if !more {
                    return text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                }
            }
            Some(Err(e @ UpstreamError::Overflow(..))) => {
                // Our own limit, not the endpoint's failure: no ejection, no retry.
                tracing::debug!(endpoint = %addr, "{e}");
                record.flags = e.flag();
                return text(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n");
            }
            Some(Err(e)) => {
                note_outlier(outliers.as_deref(), backend, addr, None);
                tracing::debug!(endpoint = %addr, attempt, "upstream failed: {e}");
                record.flags = e.flag();
                if !more {
                    return upstream_failure(&e);
                }
            }
            Some(Ok(resp)) => {
                let status = resp.status();
                note_outlier(outliers.as_deref(), backend, addr, Some(status));
                let retry_on = retry
                    .as_ref()
                    .is_some_and(|r| r.codes.contains(&status.as_u16()));
                let resp = resp.map(|b| b.boxed_unsync());
                if !(retry_on && more) {
                    record.flags = "-";
                    return resp;
                }
                record.flags = "URX";
                last = Some(resp);
            }
        }
    }
    last.unwrap_or_else(|| text(StatusCode::SERVICE_UNAVAILABLE, "upstream failed\n"))
}

fn upstream_failure(e: &UpstreamError) -> Response<Body> {
    match e {
        UpstreamError::Request(..) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers",
        ),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
    }
}

fn note_outlier(
    outliers: Option<&OutlierDetector>,
    backend: &Backend,
    addr: SocketAddr,
    status: Option<StatusCode>,
) {
    if let (Some(o), Backend::Service(svc, _)) = (outliers, backend) {
        let ejected = o.record(
            addr,
            status.map(|s| s.as_u16()),
            svc.endpoints.len(),
            Instant::now(),
        );
        if let Some(d) = ejected {
            tracing::warn!(service = %svc.key(), endpoint = %addr, ejected_for = ?d, "endpoint ejected after consecutive failures");
        }
    }
}

/// Rewrites the request path to its normalized form (query kept).
fn normalize_uri(parts: &mut http::request::Parts) -> Result<(), authz::PathError> {
    let normalized = match authz::normalize_path(parts.uri.path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    let pq = match parts.uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = pq.parse().ok();
    if let Ok(u) = Uri::from_parts(uri) {
        parts.uri = u;
    }
    Ok(())
}

/// An endpoint for one attempt: the service's endpoints from a rotating
/// start, skipping ejected ones.
fn choose_endpoint(
    backend: &Backend,
    outliers: Option<&OutlierDetector>,
    target: SocketAddr,
) -> Option<(Arc<WorkloadInfo>, SocketAddr)> {
    match backend {
        Backend::Workload(w, addr) => Some((w.clone(), *addr)),
        Backend::Service(svc, port) => {
            let target_port = svc
                .service
                .ports
                .iter()
                .find(|p| p.port == *port)
                .map(|p| p.target())?;
            let n = svc.endpoints.len();
            if n == 0 {
                return None;
            }
            let start = svc.rotate();
            let now = Instant::now();
            let mut fallback = None;
            for k in 0..n {
                let w = &svc.endpoints[(start + k) % n];
                let addr = SocketAddr::new(w.address_like(target.ip()), target_port);
                match outliers {
                    Some(o) if o.is_ejected(addr, now) => {
                        fallback.get_or_insert((w.clone(), addr));
                    }
                    _ => return Some((w.clone(), addr)),
                }
            }
            // Every endpoint ejected: Envoy's panic mode sends anyway rather
            // than failing everything.
            fallback
        }
    }
}

fn mirror(
    state: &Arc<WaypointState>,
    view: &Arc<View>,
    ds: &Downstream,
    parts: &http::request::Parts,
    body: Bytes,
    service: &str,
    port: u16,
) {
    let Some(svc) = view.mesh.service_by_key(service).cloned() else {
        tracing::debug!(service, "mirror backend not found");
        return;
    };
    let (Some(own), Some(upstream)) = (view.own.clone(), state.upstream().cloned()) else {
        return;
    };
    let backend = Backend::Service(svc, port);
    let Some((endpoint, addr)) = choose_endpoint(&backend, None, ds.target) else {
        return;
    };
    let mut req = Request::from_parts(
        parts.clone(),
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *req.version_mut() = http::Version::HTTP_11;
    let client = ds.client_ip;
    // Mirrors are fire-and-forget: their answers are read and dropped, and a
    // slow mirror never holds the real request.
    tokio::spawn(async move {
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            upstream.send(&own.identity, &endpoint, addr, client, req, None),
        )
        .await;
        if let Ok(Ok(resp)) = sent {
            let _ = resp.into_body().collect().await;
        }
    });
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Makes the request an HTTP/1.1 one for the backend: origin-form target and
/// a `Host` header (HTTP/2 carries it as `:authority`).
fn prepare_upstream(parts: &mut http::request::Parts) {
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    let origin = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    if let Ok(uri) = origin.parse::<Uri>() {
        parts.uri = uri;
    }
}

/// The request's host, without port: `Host`, else the URI's authority.
fn host_of(parts: &http::request::Parts) -> String {
    let raw = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    strip_port(raw).to_ascii_lowercase()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn count_authz(state: &WaypointState, policy: &str, action: &'static str) {
    state
        .metrics
        .authz
        .get_or_create(&PolicyLabels {
            policy: policy.to_string(),
            action,
        })
        .inc();
}

#[allow(clippy::too_many_arguments)]
fn account(
    state: &WaypointState,
    view: &View,
    ds: &Downstream,
    record: &Record,
    protocol: &'static str,
    method: &http::Method,
    path: &str,
    response: &Response<Body>,
    start: Instant,
) {
    let unknown = || "unknown".to_string();
    let source = view.mesh.workload_by_ip(ds.client_ip);
    let (svc_host, svc_name, svc_ns) = match &record.service {
        Some(s) => (
            s.hostname.clone(),
            s.service.name.clone(),
            s.service.namespace.clone(),
        ),
        None => (unknown(), unknown(), unknown()),
    };
    let labels = RequestLabels {
        reporter: "waypoint",
        source_workload: source.map_or_else(unknown, |w| w.workload.name.clone()),
        source_workload_namespace: source.map_or_else(unknown, |w| w.workload.namespace.clone()),
        source_principal: ds.peer_identity.to_string(),
        destination_workload: record
            .endpoint
            .as_ref()
            .map_or_else(unknown, |w| w.workload.name.clone()),
        destination_workload_namespace: record
            .endpoint
            .as_ref()
            .map_or_else(unknown, |w| w.workload.namespace.clone()),
        destination_principal: record
            .endpoint
            .as_ref()
            .map_or_else(unknown, |w| w.identity.to_string()),
        destination_service: svc_host,
        destination_service_name: svc_name,
        destination_service_namespace: svc_ns,
        request_protocol: protocol,
        response_code: response.status().as_u16(),
        response_flags: record.flags,
        connection_security_policy: "mutual_tls",
        route: record.route.clone().unwrap_or_else(unknown),
    };
    let elapsed = start.elapsed();
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .request_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64() * 1000.0);
    tracing::info!(
        target: "access",
        src = %ds.client_ip,
        src_identity = %ds.peer_identity,
        dst = %ds.target,
        dst_identity = %labels.destination_principal,
        method = %method,
        path,
        route = %labels.route,
        status = labels.response_code,
        flags = record.flags,
        attempts = record.attempts,
        duration_ms = elapsed.as_millis() as u64,
        "request"
    );
}

/// Non-HTTP bytes: passed at L4 to an endpoint of the original destination,
/// under the L4 part of the L7 policies.
pub async fn pass_through<IO>(state: &Arc<WaypointState>, ds: &Downstream, mut io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let view = state.view();
    let service = view.mesh.service_by_ip(ds.target.ip()).cloned();
    let backend = match (&service, view.mesh.workload_by_ip(ds.target.ip())) {
        (Some(svc), _) => Backend::Service(svc.clone(), ds.target.port()),
        (None, Some(w)) => Backend::Workload(w.clone(), ds.target),
        (None, None) => return,
    };
    let service_key = service.as_ref().map(|s| s.key());
    let config = view.mesh.config();
    let policies = authz::applicable(
        &config.http_policies,
        &config.root_namespace,
        (&state.gateway.0, &state.gateway.1),
        service_key.as_deref(),
        None,
    );
    let labels = TcpLabels {
        reporter: "waypoint",
        source_principal: ds.peer_identity.to_string(),
        destination_service: service
            .as_ref()
            .map_or_else(|| "unknown".into(), |s| s.hostname.clone()),
        destination_principal: "unknown".into(),
        response_flags: "-",
    };
    if !authz::authorize_tcp(
        &policies,
        Some(&ds.peer_identity),
        ds.client_ip,
        ds.target.port(),
    ) {
        state.metrics.refused("policy_denied");
        tracing::info!(source = %ds.peer_identity, dst = %ds.target, "L4 pass-through denied by policy");
        return;
    }
    let (Some(own), Some(upstream)) = (view.own.as_ref(), state.upstream()) else {
        return;
    };
    let Some((endpoint, addr)) = choose_endpoint(&backend, None, ds.target) else {
        state.metrics.refused("no_healthy_upstream");
        return;
    };
    let mut upstream_io = match upstream
        .open_raw(&own.identity, &endpoint, addr, ds.client_ip)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            state.metrics.refused("connect_failed");
            tracing::warn!(dst = %addr, "L4 pass-through: {e}");
            return;
        }
    };
    let labels = TcpLabels {
        destination_principal: endpoint.identity.to_string(),
        ..labels
    };
    state.metrics.tcp_opened.get_or_create(&labels).inc();
    let copied = tokio::io::copy_bidirectional(&mut io, &mut upstream_io).await;
    if let Ok((up, down)) = copied {
        state
            .metrics
            .tcp_received_bytes
            .get_or_create(&labels)
            .inc_by(up);
        state
            .metrics
            .tcp_sent_bytes
            .get_or_create(&labels)
            .inc_by(down);
    }
    state.metrics.tcp_closed.get_or_create(&labels).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_do_not_pass() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn h2_requests_become_origin_form_with_host() {
        let req = Request::builder()
            .uri("http://reviews.demo:9080/a/b?x=1")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_upstream(&mut parts);
        assert_eq!(parts.uri.to_string(), "/a/b?x=1");
        assert_eq!(parts.headers[header::HOST], "reviews.demo:9080");
        assert_eq!(host_of(&parts), "reviews.demo");
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
