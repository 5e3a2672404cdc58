//! eBPF capture of enrolled pods' TCP into the node's ztunnel.
//!
//! The capture programs (C, `bpf/capture.c`, built by clang from `build.rs`),
//! their aya loader ([`Capture`]: pinned maps and links, enrollment, per-pod
//! port exclusions) and node routing for marked packets. See docs/capture.md.

pub mod capture;

pub use capture::{
    ingress_programs, interface_for, netns_lookup_programs, program_loaded, setup_node_routing,
    veth_interfaces, Capture, CaptureError, CaptureStats, Direction, ListenerSockets,
};

/// `skb->mark` set on every packet assigned to a ztunnel socket, routed by
/// `ip rule add fwmark 0x539 lookup 100` to `local 0.0.0.0/0 dev lo table 100`.
pub const CAPTURE_MARK: u32 = 0x539;

/// Routing table holding the `local` route for marked packets.
pub const CAPTURE_ROUTE_TABLE: u32 = 100;
