//! A configuration file as the node agent reads it: parsed, checked and translated into
//! the mesh's state (routes and policies included). Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::config::{Settings, file::load_state};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(state) = load_state(text, "fuzz.yaml", "node-a", &Settings::default()) {
        let _ = state.routes();
        let _ = state.policies();
    }
});
