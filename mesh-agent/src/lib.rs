//! mesh-agent: an eBPF-accelerated, sidecarless service-mesh node agent in the style of
//! Istio's ambient mode. README.md says how to use it; docs/ records the design.
#![deny(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod admission;
pub mod agent;
pub mod analyze;
pub mod authz_check;
pub mod ca_service;
pub mod config;
pub mod dns;
pub mod drain;
pub mod dump;
pub mod ebpf;
pub mod enroll;
pub mod gateway;
pub mod handoff;
pub mod identity;
pub mod l7;
pub mod labels;
pub mod lb;
pub mod log_limit;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod peer_auth;
mod policy_json;
pub mod probes;
pub mod proxy;
pub mod rbac;
pub mod runtime;
pub mod spans;
pub mod state;
pub mod status;
pub mod sys;
pub mod table;
pub mod waypoint;
