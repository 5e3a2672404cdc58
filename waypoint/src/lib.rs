//! The waypoint: Ambit's L7 proxy, entered only when L7 policy applies.
//!
//! * [`sniff`]: is a tunnel's payload HTTP/1.x, HTTP/2 or opaque bytes.
//! * [`route`]: Gateway API HTTPRoute matching, filters and backend choice.
//! * [`authz`]: L7 AuthorizationPolicy decisions.
//! * [`resilience`]: circuit breaking, outlier ejection, local rate limits.
//! * [`telemetry`]: OpenTelemetry spans over OTLP, W3C trace context.

pub mod authz;
pub mod resilience;
pub mod route;
pub mod sniff;
pub mod telemetry;
