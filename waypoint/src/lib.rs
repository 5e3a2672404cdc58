//! The waypoint: Ambit's L7 proxy, entered only when L7 policy applies.
//!
//! What exists so far is the first decision every tunnel needs: is the payload
//! HTTP/1.x, HTTP/2 (prior knowledge) or opaque bytes to pass through at L4.
//! The HBONE server, HTTPRoute engine, L7 authorization and tracing arrive with
//! the waypoint issue.

pub mod sniff;
