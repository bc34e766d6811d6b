//! A request body as `ca serve` receives it: gRPC framing, Istio's message, the
//! impersonated identity, and the authorization of a node caller against a small mesh.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::ca_service::{
    authorize::{Caller, authorize},
    grpc::{CertificateRequest, decode_frame},
};
use mesh_agent::state::{MeshState, RawObjects};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_frame::<CertificateRequest>(data) else {
        return;
    };
    let state = MeshState::new(vec![], vec![], RawObjects::default());
    let caller = Caller::Node("node-a".into());
    let _ = authorize(
        &caller,
        request.impersonated_identity(),
        &state,
        "cluster.local",
    );
});
