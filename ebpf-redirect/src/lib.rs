//! eBPF capture of enrolled pods' TCP into the node's ztunnel.
//!
//! So far: the capture contract shared by the BPF programs and their loader
//! (packet mark, routing table) and the per-pod port exclusions read from pod
//! annotations. The C programs (built by clang from `build.rs`) and the aya
//! loader arrive with the eBPF issue.

pub mod exclusions;

/// `skb->mark` set on every packet assigned to a ztunnel socket, routed by
/// `ip rule add fwmark 0x539 lookup 100` to `local 0.0.0.0/0 dev lo table 100`.
pub const CAPTURE_MARK: u32 = 0x539;

/// Routing table holding the `local` route for marked packets.
pub const CAPTURE_ROUTE_TABLE: u32 = 100;
