//! Layer 7: what the waypoint knows about HTTP routing. `config` reads the routing objects
//! (HTTPRoute, VirtualService, DestinationRule) into typed structs with field paths in their
//! errors; `routes` compiles them into the per-service tables a request is matched against;
//! `resilience` compiles what a route says about failure (timeouts, retries, faults).
//! The waypoint itself (serving, forwarding, authorization per request) is in
//! [`crate::waypoint`].

pub mod config;
pub mod gateways;
pub mod resilience;
pub mod routes;
