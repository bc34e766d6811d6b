//! AuthorizationPolicy objects (JSON, as the API server gives them) translated, then judged
//! against one connection: translation and evaluation must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::rbac::{BenchCase, Policies};

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = serde_json::from_slice::<Vec<serde_json::Value>>(data) else {
        return;
    };
    let (policies, _errors) = Policies::parse(&objects, "istio-system");
    let case = BenchCase::new("shop");
    let _ = policies.evaluate(&case.workload, &case.connection());
    let _ = policies.explain(&case.workload, &case.connection());
});
