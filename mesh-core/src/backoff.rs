//! Small timing helpers shared by the control-plane clients and sources.

use std::time::Duration;

/// `d` ±25 %, so a fleet that lost the control plane together does not come
/// back in lockstep.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.75..1.25))
}

/// Sleeps until `at`; never returns without one (for `select!` arms that
/// are armed only sometimes).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
