//! Harness for end-to-end tests, the benchmark and the loopback demo: allocate
//! loopback addresses, mint certificates, run ztunnel processes, drive traffic.

pub mod client;
pub mod cluster;
pub mod demo;
pub mod istiod;
pub mod l7;
pub mod load;
pub mod local_cluster;
pub mod loopback;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod port_reuse;
pub mod process;
pub mod served;
pub mod servers;
pub mod sniff;
pub mod waypoint_stub;

pub use loopback::Subnet;
pub use pki::Pki;
pub use process::{Source, Ztunnel};
