//! Builds the eBPF programs of `mesh-ebpf` with aya-build and leaves the object in OUT_DIR,
//! where `src/ebpf.rs` embeds it. With `AYA_BUILD_SKIP=1` (e.g. for `cargo check` on a machine
//! without bpf-linker) an empty object is written instead and the agent refuses to load it.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("workspace root")?
        .join("mesh-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var("OUT_DIR")?);
        fs::write(out.join("mesh-ebpf"), [])?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
}
