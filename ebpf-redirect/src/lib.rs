//! eBPF capture of enrolled pods' TCP into the node's ztunnel.
//!
//! So far: the outbound capture program (C, `bpf/capture.c`, built by clang
//! from `build.rs`), its aya loader ([`Capture`]), node routing for marked
//! packets, and per-pod port exclusions read from pod annotations. Inbound
//! capture, pinning, enrollment from the control plane and ztunnel
//! integration arrive with the rest of the eBPF issue.

pub mod capture;
pub mod exclusions;

pub use capture::{
    ingress_programs, interface_for, program_loaded, setup_node_routing, Capture, CaptureError,
    CaptureStats,
};

/// `skb->mark` set on every packet assigned to a ztunnel socket, routed by
/// `ip rule add fwmark 0x539 lookup 100` to `local 0.0.0.0/0 dev lo table 100`.
pub const CAPTURE_MARK: u32 = 0x539;

/// Routing table holding the `local` route for marked packets.
pub const CAPTURE_ROUTE_TABLE: u32 = 100;
