//! Layer 7: what the waypoint and the ingress gateway know about HTTP routing. `config`
//! reads the routing objects (HTTPRoute, GRPCRoute, VirtualService, DestinationRule) into
//! typed structs with field paths in their errors; `gateways` reads the ingress Gateways
//! (Istio's and the Gateway API's class `istio`); `routes` compiles them into the
//! per-service and per-gateway tables a request is matched against; `resilience` compiles
//! what a route says about failure (timeouts, retries, faults, connection pools, outlier
//! detection). Serving, forwarding and authorization per request are in
//! [`crate::waypoint`]; the gateway's listeners in [`crate::gateway`].

pub mod config;
pub mod gateways;
pub mod resilience;
pub mod routes;
