//! A local "cluster" of network namespaces, laid out as the architecture brief
//! fixes: node N is a namespace with uplink address 198.18.0.N on a bridge in a
//! `fabric` namespace; pod M of node N is a namespace with 198.19.N.(10+M),
//! joined to its node by a veth pair. Everything is deleted on drop.
//!
//! Pod addressing is /32 with the node as the only next hop, so all pod traffic,
//! same-node too, crosses the node's veth (where capture hooks in).
//!
//! [`Cluster::build_dual_stack`] adds IPv6 from the benchmarking range
//! 2001:2::/48 (RFC 5180), wired the same way: node N is 2001:2::N/64 on the
//! fabric, its pods are 2001:2:0:N::X/128 (X: the digits of the last octet of
//! the pod's IPv4 address, so 198.19.1.10 pairs with 2001:2:0:1::10), and a
//! pod's next hop is fe80::1 on its veth's node side.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::netns::{veth, Netns};

pub struct Pod {
    pub ns: Netns,
    /// `namespace/name` when built from a spec, else `n<N>p<M>`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// The node-side end of the pod's veth (where outbound capture attaches).
    pub host_if: String,
}

pub struct Node {
    pub ns: Netns,
    pub index: u8,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the fabric, in a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// The node-side end of its link to the fabric.
    pub uplink: String,
    pub pods: Vec<Pod>,
}

/// The fabric bridge's own address: nodes reach a control plane run in the
/// fabric namespace here (198.18.0.N are the nodes).
pub const CONTROL_PLANE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 254);

pub struct Cluster {
    pub nodes: Vec<Node>,
    // Dropped last: node uplinks hang off its bridge.
    _fabric: Netns,
}

pub fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, n)
}

pub fn pod_ip(node: u8, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node, 10 + pod)
}

/// Node N's IPv6 address on the fabric (dual-stack clusters).
pub fn node_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, u16::from(n))
}

/// The IPv6 address paired with pod address `v4` of node `node`.
pub fn pod_ip6(node: u8, v4: Ipv4Addr) -> Ipv6Addr {
    let last = v4.octets()[3].to_string();
    // Decimal digits read as hex: always valid, distinct per octet.
    let x = u16::from_str_radix(&last, 16).unwrap_or(0);
    Ipv6Addr::new(0x2001, 2, 0, u16::from(node), 0, 0, 0, x)
}

/// The /64 holding node N's pods' IPv6 addresses.
fn pod_net6(node: u8) -> String {
    format!("2001:2:0:{node:x}::/64")
}

/// The node side's address on every pod veth: a pod's IPv6 next hop.
/// Link-local, so every veth of a node can carry it.
const GATEWAY6: &str = "fe80::1";

/// Addresses and routes for one pod's veth pair (/32 pod, node as next hop;
/// /128 and fe80::1 for IPv6).
fn wire(
    node: &Netns,
    pod: &Netns,
    n: u8,
    pip: Ipv4Addr,
    pip6: Option<Ipv6Addr>,
    host_if: &str,
    pod_if: &str,
) -> anyhow::Result<()> {
    let gw = gateway(n).to_string();
    node.ip(&["addr", "add", &format!("{gw}/32"), "dev", host_if])?;
    if pip6.is_some() {
        let gw6 = format!("{GATEWAY6}/64");
        node.ip(&["-6", "addr", "add", &gw6, "dev", host_if, "nodad"])?;
    }
    node.ip(&["link", "set", host_if, "up"])?;
    node.ip(&["route", "add", &format!("{pip}/32"), "dev", host_if])?;
    pod.ip(&["addr", "add", &format!("{pip}/32"), "dev", pod_if])?;
    if let Some(p6) = pip6 {
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{p6}/128"),
            "dev",
            pod_if,
            "nodad",
        ])?;
    }
    pod.ip(&["link", "set", pod_if, "up"])?;
    pod.ip(&["route", "add", &gw, "dev", pod_if])?;
    pod.ip(&["route", "add", "default", "via", &gw, "dev", pod_if])?;
    if let Some(p6) = pip6 {
        node.ip(&["-6", "route", "add", &format!("{p6}/128"), "dev", host_if])?;
        pod.ip(&[
            "-6", "route", "add", "default", "via", GATEWAY6, "dev", pod_if,
        ])?;
    }
    Ok(())
}

/// No duplicate address detection in a namespace: addresses are usable at
/// once (a tentative one would stall the first connections for a second).
fn no_dad(ns: &Netns) -> anyhow::Result<()> {
    ns.run(|| {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")?;
        }
        Ok(())
    })
}

fn gateway(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node, 1)
}

/// Echo server and client used by tests to see who a pod's peer is.
pub type PeersHandle = std::thread::JoinHandle<anyhow::Result<Vec<std::net::SocketAddr>>>;

impl Pod {
    /// Serves `connections` connections on this pod's `port`, echoing one
    /// `len`-byte message on each; the handle returns the peers, in order.
    pub fn echo_peers(
        &self,
        port: u16,
        connections: usize,
        len: usize,
    ) -> anyhow::Result<PeersHandle> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::new(self.ip.into(), port);
        let listener = self
            .ns
            .run(move || Ok(std::net::TcpListener::bind(addr)?))?;
        Ok(std::thread::spawn(move || {
            let mut peers = Vec::new();
            for _ in 0..connections {
                let (mut s, peer) = listener.accept()?;
                let mut b = vec![0u8; len];
                s.read_exact(&mut b)?;
                s.write_all(&b)?;
                peers.push(peer);
            }
            Ok(peers)
        }))
    }

    /// From this pod, sends `msg` to `to` and checks it comes back.
    pub fn echo_to(&self, to: std::net::SocketAddr, msg: &'static [u8]) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        self.ns.run(move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))?;
            s.write_all(msg)?;
            let mut b = vec![0u8; msg.len()];
            s.read_exact(&mut b)?;
            anyhow::ensure!(b == msg, "echo mismatch from {to}");
            Ok(())
        })
    }
}

/// Waits for an echo server's peers.
pub fn join_peers(h: PeersHandle) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    h.join()
        .map_err(|_| anyhow::anyhow!("echo server thread panicked"))?
}

/// A pod to create: its name, node (1-based) and address (in 198.19.<node>.0/24).
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub node: u8,
    pub ip: Ipv4Addr,
}

impl PodSpec {
    /// Specs from `(name, node, address)` rows.
    pub fn list(rows: &[(&str, u8, Ipv4Addr)]) -> Vec<PodSpec> {
        rows.iter()
            .map(|&(name, node, ip)| PodSpec {
                name: name.into(),
                node,
                ip,
            })
            .collect()
    }
}

/// `pods` pods on each of `nodes` nodes, named `n<N>p<M>`.
fn numbered_pods(nodes: u8, pods: u8) -> anyhow::Result<Vec<PodSpec>> {
    anyhow::ensure!(pods <= 200, "unsupported size");
    Ok((1..=nodes)
        .flat_map(|n| {
            (0..pods).map(move |m| PodSpec {
                name: format!("n{n}p{m}"),
                node: n,
                ip: pod_ip(n, m),
            })
        })
        .collect())
}

impl Cluster {
    /// Builds `nodes` nodes (1-based) with `pods` pods each.
    pub fn build(nodes: u8, pods: u8) -> anyhow::Result<Self> {
        Self::build_inner(nodes, &numbered_pods(nodes, pods)?, false)
    }

    /// As [`Cluster::build`], with IPv6 addresses and routes besides the
    /// IPv4 ones (see the module docs).
    pub fn build_dual_stack(nodes: u8, pods: u8) -> anyhow::Result<Self> {
        Self::build_inner(nodes, &numbered_pods(nodes, pods)?, true)
    }

    /// Builds `nodes` nodes and exactly the pods given.
    pub fn build_with(nodes: u8, pods: &[PodSpec]) -> anyhow::Result<Self> {
        Self::build_inner(nodes, pods, false)
    }

    fn build_inner(nodes: u8, pods: &[PodSpec], dual_stack: bool) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=9).contains(&nodes), "unsupported size");
        for p in pods {
            anyhow::ensure!(
                (1..=nodes).contains(&p.node) && p.ip.octets()[..3] == [198, 19, p.node],
                "pod {} must be on a node 1..={nodes} with an address in 198.19.{}.0/24",
                p.name,
                p.node
            );
        }
        let fabric = Netns::create("fabric")?;
        if dual_stack {
            no_dad(&fabric)?;
        }
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        if dual_stack {
            fabric.ip(&["-6", "addr", "add", "2001:2::fe/64", "dev", "br0", "nodad"])?;
        }
        fabric.ip(&["link", "set", "br0", "up"])?;
        // Where a control plane in the fabric namespace is reached from nodes.
        fabric.ip(&[
            "addr",
            "add",
            &format!("{CONTROL_PLANE_IP}/24"),
            "dev",
            "br0",
        ])?;
        let mut built = Vec::new();
        for n in 1..=nodes {
            let ns = Netns::create(&format!("node{n}"))?;
            if dual_stack {
                no_dad(&ns)?;
            }
            let (uplink, fabric_end) = veth(&ns, &fabric)?;
            fabric.ip(&["link", "set", &fabric_end, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", &format!("{}/24", node_ip(n)), "dev", &uplink])?;
            let ip6 = dual_stack.then(|| node_ip6(n));
            if let Some(ip6) = ip6 {
                let a = format!("{ip6}/64");
                ns.ip(&["-6", "addr", "add", &a, "dev", &uplink, "nodad"])?;
            }
            ns.ip(&["link", "set", &uplink, "up"])?;
            ns.run(move || {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                if dual_stack {
                    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
                }
                Ok(())
            })?;
            let mut pod_list = Vec::new();
            for (m, spec) in pods.iter().filter(|p| p.node == n).enumerate() {
                let pns = Netns::create(&format!("n{n}p{m}"))?;
                if dual_stack {
                    no_dad(&pns)?;
                }
                let (host_if, pod_if) = veth(&ns, &pns)?;
                let pip = spec.ip;
                let pip6 = dual_stack.then(|| pod_ip6(n, pip));
                wire(&ns, &pns, n, pip, pip6, &host_if, &pod_if)?;
                pod_list.push(Pod {
                    ns: pns,
                    name: spec.name.clone(),
                    ip: pip,
                    ip6: pip6,
                    host_if,
                });
            }
            built.push(Node {
                ns,
                index: n,
                ip: node_ip(n),
                ip6,
                uplink,
                pods: pod_list,
            });
        }
        for node in &built {
            // Pods reach a control plane in the fabric too (a waypoint pod
            // follows istiod-lite itself): the fabric routes each node's pod
            // range back through that node.
            fabric.ip(&[
                "route",
                "add",
                &format!("198.19.{}.0/24", node.index),
                "via",
                &node.ip.to_string(),
            ])?;
            for other in &built {
                if other.index != node.index {
                    let net = format!("198.19.{}.0/24", other.index);
                    node.ns
                        .ip(&["route", "add", &net, "via", &other.ip.to_string()])?;
                }
            }
            let Some(ip6) = node.ip6 else { continue };
            let via = ip6.to_string();
            fabric.ip(&["-6", "route", "add", &pod_net6(node.index), "via", &via])?;
            for other in built.iter().filter(|o| o.index != node.index) {
                if let Some(o6) = other.ip6 {
                    let net = pod_net6(other.index);
                    node.ns
                        .ip(&["-6", "route", "add", &net, "via", &o6.to_string()])?;
                }
            }
        }
        Ok(Cluster {
            nodes: built,
            _fabric: fabric,
        })
    }

    /// The namespace holding the bridge between nodes (for packet captures).
    pub fn fabric_name(&self) -> &str {
        self._fabric.name()
    }

    pub fn node(&self, n: u8) -> &Node {
        &self.nodes[usize::from(n) - 1]
    }

    pub fn pod(&self, node: u8, pod: u8) -> &Pod {
        &self.node(node).pods[usize::from(pod)]
    }

    /// Replaces `pod`'s veth pair with a new one of the same names, as a
    /// pod sandbox restart does (the interface index changes).
    pub fn recreate_veth(&self, pod: &Pod) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.pods.iter().any(|p| p.host_if == pod.host_if))
            .ok_or_else(|| anyhow::anyhow!("pod {} not in this cluster", pod.name))?;
        let pod_if = format!("vb{}", &pod.host_if[2..]);
        node.ns.ip(&["link", "del", &pod.host_if])?;
        crate::netns::ip(&[
            "link",
            "add",
            &pod.host_if,
            "netns",
            node.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
            "netns",
            pod.ns.name(),
        ])?;
        wire(
            &node.ns,
            &pod.ns,
            node.index,
            pod.ip,
            pod.ip6,
            &pod.host_if,
            &pod_if,
        )
    }

    /// A pod by the name it was built with.
    pub fn pod_named(&self, name: &str) -> Option<&Pod> {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
    }
}
