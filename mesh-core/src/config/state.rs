use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{
    LoadBalancing, MeshConfig, MtlsMode, Policy, PolicyScope, Service, WaypointRef, Workload,
};
use crate::identity::Identity;

/// A workload with its derived identity. `active` counts connections this proxy
/// has sent to it, for least-connections balancing.
#[derive(Debug)]
pub struct WorkloadInfo {
    pub workload: Workload,
    pub identity: Identity,
    pub active: AtomicUsize,
}

impl WorkloadInfo {
    pub fn key(&self) -> String {
        format!("{}/{}", self.workload.namespace, self.workload.name)
    }

    /// The workload's address in the same family as `like`, else its first one.
    pub fn address_like(&self, like: IpAddr) -> IpAddr {
        let addrs = &self.workload.addresses;
        addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .unwrap_or(addrs[0])
    }
}

#[derive(Debug)]
pub struct ServiceInfo {
    pub service: Service,
    pub hostname: String,
    pub endpoints: Vec<Arc<WorkloadInfo>>,
    next: AtomicUsize,
}

impl ServiceInfo {
    /// A rotating start index, so round-robin choices made outside this
    /// module (a waypoint skipping ejected endpoints) spread like ours do.
    pub fn rotate(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn key(&self) -> String {
        self.service.key()
    }
}

/// Where an outbound connection goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// Straight to a workload address (or via a service VIP, then `service` is set).
    Workload {
        workload: Arc<WorkloadInfo>,
        service: Option<Arc<ServiceInfo>>,
        /// Workload address and target port.
        addr: SocketAddr,
    },
    /// Not part of the mesh: connect directly.
    Passthrough(SocketAddr),
}

/// How a destination's waypoint resolves.
#[derive(Debug, Clone)]
pub enum WaypointRoute {
    /// Through this waypoint Service, whose endpoints are all waypoint
    /// (native-tunnel) workloads.
    Ready {
        waypoint: WaypointRef,
        service: Arc<ServiceInfo>,
    },
    /// The destination needs a waypoint that cannot be used: its traffic is
    /// to be refused, never sent around the waypoint.
    Unavailable {
        waypoint: WaypointRef,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    #[error("service {0} does not expose port {1}")]
    NoSuchPort(String, u16),
}

/// An indexed, validated mesh config: what the data path looks things up in.
#[derive(Debug)]
pub struct MeshState {
    config: MeshConfig,
    workloads: HashMap<IpAddr, Arc<WorkloadInfo>>,
    services_by_ip: HashMap<IpAddr, Arc<ServiceInfo>>,
    services_by_host: HashMap<String, Arc<ServiceInfo>>,
    services_by_key: HashMap<String, Arc<ServiceInfo>>,
    policies: HashMap<String, Policy>,
    /// Identities of native-tunnel (waypoint) workloads.
    waypoint_identities: HashSet<Identity>,
}

impl MeshState {
    /// Indexes a config that passed [`super::parse_mesh_config`] validation.
    pub fn new(config: MeshConfig) -> Self {
        let mut by_key: HashMap<String, Arc<WorkloadInfo>> = HashMap::new();
        let mut workloads = HashMap::new();
        for w in &config.workloads {
            // Validation guarantees a well-formed identity; skip defensively otherwise.
            let Ok(identity) =
                Identity::new(&config.trust_domain, &w.namespace, &w.service_account)
            else {
                continue;
            };
            let info = Arc::new(WorkloadInfo {
                workload: w.clone(),
                identity,
                active: AtomicUsize::new(0),
            });
            for ip in &w.addresses {
                workloads.insert(*ip, info.clone());
            }
            by_key.insert(info.key(), info);
        }
        // Endpoints grouped in one pass over the workloads: O(workloads +
        // services), not their product (10k pods × 1k services matters).
        let mut endpoints_of: HashMap<&str, Vec<Arc<WorkloadInfo>>> = HashMap::new();
        for info in by_key.values() {
            for svc in &info.workload.services {
                endpoints_of
                    .entry(svc.as_str())
                    .or_default()
                    .push(info.clone());
            }
        }
        let mut services_by_ip = HashMap::new();
        let mut services_by_host = HashMap::new();
        let mut services_by_key = HashMap::new();
        for s in &config.services {
            let key = s.key();
            let mut endpoints = endpoints_of.remove(key.as_str()).unwrap_or_default();
            endpoints.sort_by(|a, b| {
                (&a.workload.namespace, &a.workload.name)
                    .cmp(&(&b.workload.namespace, &b.workload.name))
            });
            let hostname = s.hostname_in(&config.trust_domain);
            let info = Arc::new(ServiceInfo {
                service: s.clone(),
                hostname: hostname.clone(),
                endpoints,
                next: AtomicUsize::new(0),
            });
            for ip in &s.addresses {
                services_by_ip.insert(*ip, info.clone());
            }
            services_by_host.insert(hostname, info.clone());
            services_by_key.insert(key, info);
        }
        let waypoint_identities = by_key
            .values()
            .filter(|w| w.workload.native_tunnel)
            .map(|w| w.identity.clone())
            .collect();
        let policies = config
            .policies
            .iter()
            .map(|p| (p.key(), p.clone()))
            .collect();
        MeshState {
            config,
            workloads,
            services_by_ip,
            services_by_host,
            services_by_key,
            policies,
            waypoint_identities,
        }
    }

    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.workloads.get(&ip)
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<WorkloadInfo>> + 'a {
        let mut seen = std::collections::HashSet::new();
        self.workloads
            .values()
            .filter(move |w| w.workload.node == node && seen.insert(Arc::as_ptr(w)))
    }

    pub fn service_by_host(&self, host: &str) -> Option<&Arc<ServiceInfo>> {
        self.services_by_host.get(host)
    }

    pub fn service_by_ip(&self, ip: IpAddr) -> Option<&Arc<ServiceInfo>> {
        self.services_by_ip.get(&ip)
    }

    /// The service `namespace/name`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<ServiceInfo>> {
        self.services_by_key.get(key)
    }

    /// Resolves an original destination to a workload (directly or through a VIP).
    pub fn resolve(&self, dst: SocketAddr) -> Result<Destination, ResolveError> {
        if let Some(svc) = self.services_by_ip.get(&dst.ip()) {
            return self.pick_endpoint(svc, dst);
        }
        match self.workloads.get(&dst.ip()) {
            Some(w) => Ok(Destination::Workload {
                workload: w.clone(),
                service: None,
                addr: dst,
            }),
            None => Ok(Destination::Passthrough(dst)),
        }
    }

    /// Resolves `host:port` where `host` is a service hostname.
    pub fn resolve_host(&self, host: &str, port: u16) -> Option<Result<Destination, ResolveError>> {
        let svc = self.services_by_host.get(host)?;
        let vip = *svc.service.addresses.first()?;
        Some(self.pick_endpoint(svc, SocketAddr::new(vip, port)))
    }

    fn pick_endpoint(
        &self,
        svc: &Arc<ServiceInfo>,
        vip: SocketAddr,
    ) -> Result<Destination, ResolveError> {
        let key = format!("{}/{}", svc.service.namespace, svc.service.name);
        let port = svc
            .service
            .ports
            .iter()
            .find(|p| p.port == vip.port())
            .ok_or_else(|| ResolveError::NoSuchPort(key.clone(), vip.port()))?;
        let Some(workload) = Self::choose(svc) else {
            return Err(ResolveError::NoEndpoints(key));
        };
        Ok(Destination::Workload {
            workload: workload.clone(),
            service: Some(svc.clone()),
            addr: SocketAddr::new(workload.address_like(vip.ip()), port.target()),
        })
    }

    /// One endpoint of `svc` by its load-balancing algorithm; `None` without endpoints.
    fn choose(svc: &ServiceInfo) -> Option<&Arc<WorkloadInfo>> {
        let n = svc.endpoints.len();
        if n == 0 {
            return None;
        }
        match svc.service.load_balancing {
            LoadBalancing::RoundRobin => {
                let i = svc.next.fetch_add(1, Ordering::Relaxed) % n;
                svc.endpoints.get(i)
            }
            LoadBalancing::LeastConnections => {
                // Start the scan at a rotating offset so ties spread out.
                let start = svc.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| &svc.endpoints[(start + k) % n])
                    .min_by_key(|w| w.active.load(Ordering::Relaxed))
            }
        }
    }

    /// A pod of a ready waypoint service, balanced as the service says. The
    /// service's ports play no part: a waypoint is reached on its HBONE port
    /// whatever the Service lists.
    pub fn pick_waypoint(&self, waypoint: &ServiceInfo) -> Option<Arc<WorkloadInfo>> {
        Self::choose(waypoint).cloned()
    }

    /// Whether `id` is the identity of a native-tunnel (waypoint) workload.
    pub fn is_waypoint_identity(&self, id: &Identity) -> bool {
        self.waypoint_identities.contains(id)
    }

    /// Whether `peer` may deliver a connection to `w` (`None`: plaintext, no
    /// identity); `Err` says why not. A workload with a waypoint of its own takes connections
    /// only from the pods of the waypoints it is reached through: its own,
    /// and those of the services it is an endpoint of (a service's waypoint
    /// delivers the service's traffic to it). The peer is compared by the
    /// identity it proved, as Istio's ztunnel compared it before it left
    /// this check to policy.
    ///
    /// A workload without a waypoint of its own admits anyone, even when a
    /// service of it has one: a connection to the pod's own address never
    /// needed that waypoint, and the destination cannot tell the two apart.
    pub fn waypoint_admission(
        &self,
        w: &WorkloadInfo,
        peer: Option<&Identity>,
    ) -> Result<(), String> {
        let Some(own) = w.workload.waypoint.as_ref() else {
            return Ok(());
        };
        let Some(peer) = peer else {
            return Err(format!(
                "{} is behind waypoint {}: plaintext cannot come from it",
                w.key(),
                own.key()
            ));
        };
        let service_waypoints = w
            .workload
            .services
            .iter()
            .filter_map(|k| self.services_by_key.get(k))
            .filter_map(|s| s.service.waypoint.as_ref());
        let admitted = std::iter::once(own).chain(service_waypoints).any(|wp| {
            match self.resolve_waypoint(wp) {
                WaypointRoute::Ready { service, .. } => {
                    service.endpoints.iter().any(|e| &e.identity == peer)
                }
                WaypointRoute::Unavailable { .. } => false,
            }
        });
        if admitted {
            return Ok(());
        }
        let why = match self.resolve_waypoint(own) {
            WaypointRoute::Ready { .. } => format!("{peer} is not a pod of it"),
            WaypointRoute::Unavailable { reason, .. } => reason,
        };
        Err(format!(
            "{} is behind waypoint {}: {why}",
            w.key(),
            own.key()
        ))
    }

    /// The waypoint that traffic to `dst` must pass, if any: the service's
    /// when it was addressed through one that has a waypoint, else the
    /// workload's. A waypoint's own traffic to `dst` must not ask: it is the
    /// waypoint.
    pub fn waypoint_for(&self, dst: &Destination) -> Option<WaypointRoute> {
        let Destination::Workload {
            workload, service, ..
        } = dst
        else {
            return None;
        };
        let wp = service
            .as_ref()
            .and_then(|s| s.service.waypoint.as_ref())
            .or(workload.workload.waypoint.as_ref())?;
        Some(self.resolve_waypoint(wp))
    }

    /// How a waypoint reference resolves: its Service, if that exists and
    /// has only waypoint pods, else why it cannot be used.
    pub fn resolve_waypoint(&self, wp: &WaypointRef) -> WaypointRoute {
        let unavailable = |reason: String| WaypointRoute::Unavailable {
            waypoint: wp.clone(),
            reason,
        };
        let host = wp.hostname_in(&self.config.trust_domain);
        let Some(svc) = self
            .services_by_host
            .get(&host)
            .filter(|s| s.service.namespace == wp.namespace)
        else {
            return unavailable(format!("waypoint {} has no service {host}", wp.key()));
        };
        // Only a waypoint's pods speak HBONE themselves; any other service
        // under that name (say, an ingress gateway's) must not receive
        // traffic meant for a waypoint.
        if svc.endpoints.is_empty() {
            return unavailable(format!("waypoint {} has no endpoints", wp.key()));
        }
        if let Some(w) = svc.endpoints.iter().find(|w| !w.workload.native_tunnel) {
            return unavailable(format!(
                "waypoint {} has endpoint {} that is not a waypoint",
                wp.key(),
                w.key()
            ));
        }
        WaypointRoute::Ready {
            waypoint: wp.clone(),
            service: svc.clone(),
        }
    }

    /// The policies that apply to connections to `w`.
    pub fn policies_for<'a>(
        &'a self,
        w: &'a WorkloadInfo,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        let global = self.config.policies.iter().filter(move |p| match p.scope {
            PolicyScope::Global => true,
            PolicyScope::Namespace => {
                p.namespace == w.workload.namespace || p.namespace == self.config.root_namespace
            }
            PolicyScope::WorkloadSelector => false,
        });
        let selected = w
            .workload
            .authorization_policies
            .iter()
            .filter_map(move |k| self.policies.get(k));
        global.chain(selected)
    }

    /// The effective mTLS mode for `w` (see [`MeshConfig::mtls_mode`]).
    pub fn mtls_mode(&self, w: &WorkloadInfo) -> MtlsMode {
        self.config
            .mtls_mode(&w.workload.namespace, &w.workload.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_mesh_config;

    fn state(src: &str) -> MeshState {
        MeshState::new(parse_mesh_config(src).unwrap())
    }

    const MESH: &str = r#"
workloads:
- {name: a, namespace: ns, node: n1, addresses: ["198.19.1.1", "2001:2:1::1"], services: [ns/svc]}
- {name: b, namespace: ns, node: n2, addresses: ["198.19.2.1"], services: [ns/svc]}
services:
- {name: svc, namespace: ns, addresses: ["198.18.200.1", "2001:2:ff::1"], ports: [{port: 80, targetPort: 8080}]}
peerAuthentications:
- {name: strict, namespace: ns, mode: Strict}
- {name: relax-b, namespace: ns, mode: Permissive, workloads: [b]}
"#;

    #[test]
    fn vip_round_robin_and_port_mapping() {
        let s = state(MESH);
        let mut seen = Vec::new();
        for _ in 0..4 {
            match s.resolve("198.18.200.1:80".parse().unwrap()).unwrap() {
                Destination::Workload {
                    workload,
                    addr,
                    service,
                } => {
                    assert_eq!(addr.port(), 8080);
                    assert!(service.is_some());
                    seen.push(workload.workload.name.clone());
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(seen, ["a", "b", "a", "b"]);
        assert!(matches!(
            s.resolve("198.18.200.1:81".parse().unwrap()),
            Err(ResolveError::NoSuchPort(..))
        ));
        assert!(matches!(
            s.resolve("203.0.113.1:80".parse().unwrap()),
            Ok(Destination::Passthrough(_))
        ));
    }

    #[test]
    fn ipv6_vip_prefers_ipv6_endpoint_address() {
        let s = state(MESH);
        let addrs: Vec<_> = (0..2)
            .map(
                |_| match s.resolve("[2001:2:ff::1]:80".parse().unwrap()).unwrap() {
                    Destination::Workload { addr, .. } => addr,
                    d => panic!("{d:?}"),
                },
            )
            .collect();
        assert!(addrs.contains(&"[2001:2:1::1]:8080".parse().unwrap()));
        // b has no IPv6 address: falls back to its IPv4 one.
        assert!(addrs.contains(&"198.19.2.1:8080".parse().unwrap()));
    }

    #[test]
    fn least_connections_prefers_idle_endpoint() {
        let s = state(&MESH.replace(
            "ports: [{port: 80, targetPort: 8080}]",
            "ports: [{port: 80, targetPort: 8080}], loadBalancing: LeastConnections",
        ));
        let a = s.workload_by_ip("198.19.1.1".parse().unwrap()).unwrap();
        a.active.store(5, Ordering::Relaxed);
        for _ in 0..3 {
            match s.resolve("198.18.200.1:80".parse().unwrap()).unwrap() {
                Destination::Workload { workload, .. } => assert_eq!(workload.workload.name, "b"),
                d => panic!("{d:?}"),
            }
        }
    }

    #[test]
    fn mtls_mode_precedence() {
        let s = state(MESH);
        let a = s.workload_by_ip("198.19.1.1".parse().unwrap()).unwrap();
        let b = s.workload_by_ip("198.19.2.1".parse().unwrap()).unwrap();
        assert_eq!(s.mtls_mode(a), MtlsMode::Strict);
        assert_eq!(s.mtls_mode(b), MtlsMode::Permissive);
    }

    #[test]
    fn waypoint_for_prefers_the_service_and_fails_closed() {
        let s = state(
            r#"
workloads:
- {name: a, namespace: ns, node: n1, addresses: ["198.19.1.1"], services: [ns/svc], waypoint: {namespace: ns, name: wp-a}}
- {name: b, namespace: ns, node: n2, addresses: ["198.19.2.1"], services: [ns/other], waypoint: {namespace: ns, name: wp}}
- {name: wp-0, namespace: ns, node: n2, addresses: ["198.19.2.9"], services: [ns/wp], nativeTunnel: true}
- {name: c, namespace: ns, node: n2, addresses: ["198.19.2.2"], services: [ns/fake, ns/fake-wp]}
services:
- {name: svc, namespace: ns, addresses: ["198.18.200.1"], ports: [{port: 80}], waypoint: {namespace: ns, name: wp}}
- {name: other, namespace: ns, addresses: ["198.18.200.2"], ports: [{port: 80}]}
- {name: wp, namespace: ns, addresses: ["198.18.200.9"], ports: [{port: 15008}]}
- {name: fake, namespace: ns, addresses: ["198.18.200.3"], ports: [{port: 80}], waypoint: {namespace: ns, name: fake-wp}}
- {name: fake-wp, namespace: ns, addresses: ["198.18.200.4"], ports: [{port: 80}]}
"#,
        );
        let route = |dst: &str| s.waypoint_for(&s.resolve(dst.parse().unwrap()).unwrap());
        match route("198.18.200.1:80") {
            Some(WaypointRoute::Ready { service, waypoint }) => {
                assert_eq!(service.service.name, "wp");
                assert_eq!(waypoint.hbone_port, 15008);
            }
            r => panic!("service's waypoint: {r:?}"),
        }
        // Addressed directly, a's own (missing) waypoint applies.
        assert!(matches!(
            route("198.19.1.1:80"),
            Some(WaypointRoute::Unavailable { .. })
        ));
        // A service without a waypoint falls back to the workload's.
        assert!(matches!(
            route("198.18.200.2:80"),
            Some(WaypointRoute::Ready { .. })
        ));
        // A name that resolves to a service of ordinary workloads is no waypoint.
        match route("198.18.200.3:80") {
            Some(WaypointRoute::Unavailable { reason, .. }) => {
                assert!(reason.contains("not a waypoint"), "{reason}")
            }
            r => panic!("{r:?}"),
        }
        assert!(route("198.18.200.9:15008").is_none(), "the waypoint itself");
        assert!(route("203.0.113.1:80").is_none(), "passthrough");
    }

    const BEHIND_WAYPOINTS: &str = r#"
workloads:
- {name: a, namespace: ns, node: n1, addresses: ["198.19.1.1"], services: [ns/svc], waypoint: {namespace: ns, name: wp}}
- {name: b, namespace: ns, node: n2, addresses: ["198.19.2.1"], services: [ns/svc]}
- {name: c, namespace: ns, node: n2, addresses: ["198.19.2.2"], waypoint: {namespace: ns, name: gone}}
- {name: wp-0, namespace: ns, serviceAccount: wp, node: n2, addresses: ["198.19.2.9"], services: [ns/wp], nativeTunnel: true}
- {name: svc-wp-0, namespace: ns, serviceAccount: svc-wp, node: n2, addresses: ["198.19.2.8"], services: [ns/svc-wp], nativeTunnel: true}
services:
- {name: svc, namespace: ns, addresses: ["198.18.200.1"], ports: [{port: 80}], waypoint: {namespace: ns, name: svc-wp}}
- {name: wp, namespace: ns, addresses: ["198.18.200.9"], ports: [{port: 15008}]}
- {name: svc-wp, namespace: ns, addresses: ["198.18.200.8"], ports: [{port: 80}]}
"#;

    #[test]
    fn waypoint_admission_admits_only_the_waypoints_pods() {
        let s = state(BEHIND_WAYPOINTS);
        let w = |ip: &str| s.workload_by_ip(ip.parse().unwrap()).unwrap().clone();
        let id = |sa: &str| Identity::new("cluster.local", "ns", sa).unwrap();
        let (a, b, c) = (w("198.19.1.1"), w("198.19.2.1"), w("198.19.2.2"));
        // a's own waypoint, and the waypoint of its service, which delivers
        // the service's traffic to it.
        assert_eq!(s.waypoint_admission(&a, Some(&id("wp"))), Ok(()));
        assert_eq!(s.waypoint_admission(&a, Some(&id("svc-wp"))), Ok(()));
        let err = s.waypoint_admission(&a, Some(&id("default"))).unwrap_err();
        assert!(err.contains("not a pod of it"), "{err}");
        assert!(s.waypoint_admission(&a, None).is_err(), "plaintext");
        // No waypoint of its own: anyone, even though its service has one.
        assert_eq!(s.waypoint_admission(&b, Some(&id("default"))), Ok(()));
        assert_eq!(s.waypoint_admission(&b, None), Ok(()));
        // A waypoint that cannot be resolved admits nobody.
        let err = s.waypoint_admission(&c, Some(&id("wp"))).unwrap_err();
        assert!(err.contains("has no service"), "{err}");
        assert!(s.is_waypoint_identity(&id("wp")));
        assert!(!s.is_waypoint_identity(&id("default")));
    }

    #[test]
    fn pick_waypoint_ignores_ports_and_balances() {
        let s = state(BEHIND_WAYPOINTS);
        let route = s.waypoint_for(&s.resolve("198.18.200.1:80".parse().unwrap()).unwrap());
        let Some(WaypointRoute::Ready { service, .. }) = route else {
            panic!("{route:?}");
        };
        // svc-wp does not list 15008: a waypoint is reached on its HBONE port anyway.
        let pod = s.pick_waypoint(&service).unwrap();
        assert_eq!(pod.workload.name, "svc-wp-0");
    }

    #[test]
    fn local_workloads_are_deduplicated() {
        let s = state(MESH);
        assert_eq!(s.local_workloads("n1").count(), 1);
        assert_eq!(s.local_workloads("n3").count(), 0);
    }
}
