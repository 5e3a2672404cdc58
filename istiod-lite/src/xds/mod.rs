//! Serving the mesh over delta ADS: snapshots of the translated model and the
//! gRPC service that streams their differences to proxies.

pub mod metrics;
pub mod server;
pub mod snapshot;
pub mod visibility;

pub use metrics::XdsMetrics;
pub use server::XdsServer;
pub use snapshot::Snapshot;

#[cfg(test)]
mod tests;
