//! The kernel-level suite of mesh-agent: its test binaries (`mesh-pod`, the process a
//! test pod runs; `mesh-demo`, the `cargo xtask demo` report) and integration tests
//! under `tests/`, all built on [`mesh_agent::testing`].
#![forbid(unsafe_code)]

pub use mesh_agent::testing;
