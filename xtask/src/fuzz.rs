//! The fuzz targets under `fuzz/` (cargo fuzz, libFuzzer): `cargo xtask test` runs each for
//! a few seconds, starting from its committed corpus (`fuzz/corpus/TARGET`). What the run
//! finds goes to a scratch directory under the target directory, so the committed corpus
//! only changes by hand; a crash fails the suite and leaves its input in
//! `fuzz/artifacts/TARGET`, to become a unit test.

use anyhow::Result;

use crate::process::{self, Env};

/// Every target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 4] = ["config_objects", "policy", "hbone_request", "ca_request"];
/// How long each target runs in the suite.
const SECONDS: u32 = 5;

pub fn run_all(env: &Env) -> Result<()> {
    let dir = env.root().join("fuzz");
    let scratch = env.target_dir()?.join("fuzz-corpus");
    for target in TARGETS {
        let found = scratch.join(target);
        std::fs::create_dir_all(&found)?;
        process::run(
            env.command("rustup")
                .current_dir(&dir)
                .args(["run", "nightly", "cargo", "fuzz", "run", target])
                .arg(&found)
                .arg(dir.join("corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={SECONDS}"))
                // A single input that takes seconds is a hang worth reporting.
                .args(["-timeout=10", "-rss_limit_mb=4096"]),
        )?;
    }
    Ok(())
}
