//! A local "cluster" of network namespaces, laid out as the architecture brief
//! fixes: node N is a namespace with uplink address 198.18.0.N on a bridge in a
//! `fabric` namespace; pod M of node N is a namespace with 198.19.N.(10+M),
//! joined to its node by a veth pair. Everything is deleted on drop.
//!
//! Pod addressing is /32 with the node as the only next hop, so all pod traffic,
//! same-node too, crosses the node's veth (where capture hooks in).

use std::net::Ipv4Addr;

use crate::netns::{veth, Netns};

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The node-side end of the pod's veth (where outbound capture attaches).
    pub host_if: String,
}

pub struct Node {
    pub ns: Netns,
    pub index: u8,
    pub ip: Ipv4Addr,
    /// The node-side end of its link to the fabric.
    pub uplink: String,
    pub pods: Vec<Pod>,
}

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

fn gateway(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node, 1)
}

impl Cluster {
    /// Builds `nodes` nodes (1-based) with `pods` pods each.
    pub fn build(nodes: u8, pods: u8) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=9).contains(&nodes) && pods <= 200, "unsupported size");
        let fabric = Netns::create("fabric")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut built = Vec::new();
        for n in 1..=nodes {
            let ns = Netns::create(&format!("node{n}"))?;
            let (uplink, fabric_end) = veth(&ns, &fabric)?;
            fabric.ip(&["link", "set", &fabric_end, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", &format!("{}/24", node_ip(n)), "dev", &uplink])?;
            ns.ip(&["link", "set", &uplink, "up"])?;
            ns.run(|| {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                Ok(())
            })?;
            let mut pod_list = Vec::new();
            for m in 0..pods {
                let pns = Netns::create(&format!("n{n}p{m}"))?;
                let (host_if, pod_if) = veth(&ns, &pns)?;
                let pip = pod_ip(n, m);
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{}/32", gateway(n)),
                    "dev",
                    &host_if,
                ])?;
                ns.ip(&["link", "set", &host_if, "up"])?;
                ns.ip(&["route", "add", &format!("{pip}/32"), "dev", &host_if])?;
                pns.ip(&["addr", "add", &format!("{pip}/32"), "dev", &pod_if])?;
                pns.ip(&["link", "set", &pod_if, "up"])?;
                pns.ip(&["route", "add", &gateway(n).to_string(), "dev", &pod_if])?;
                pns.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &gateway(n).to_string(),
                    "dev",
                    &pod_if,
                ])?;
                pod_list.push(Pod {
                    ns: pns,
                    ip: pip,
                    host_if,
                });
            }
            built.push(Node {
                ns,
                index: n,
                ip: node_ip(n),
                uplink,
                pods: pod_list,
            });
        }
        for node in &built {
            for other in &built {
                if other.index != node.index {
                    let net = format!("198.19.{}.0/24", other.index);
                    node.ns
                        .ip(&["route", "add", &net, "via", &other.ip.to_string()])?;
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
}
