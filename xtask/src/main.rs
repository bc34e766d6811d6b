//! Developer tasks for the mesh-agent workspace (`cargo xtask <task>`): toolchain
//! setup, building, the full lint + kernel test run used by CI, and the demo.
#![forbid(unsafe_code)]

mod fuzz;
mod manifests;
mod process;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::process::Env;

/// The eBPF crate is built for the BPF target by `mesh-agent/build.rs` (aya-build);
/// built for the host it is not a program, and it would unify mesh-common's `user`
/// feature into a `no_std` crate. Host builds, tests and clippy leave it out.
const EBPF_CRATE: &str = "mesh-ebpf";

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for mesh-agent"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: llvm-22-dev, nightly rust-src, bpf-linker 0.13.0, iproute2.
    Setup,
    /// Setup, then build every binary of the workspace (agent, test pods, demo).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Setup, fmt and clippy checks, build, then the whole suite (kernel tests need root).
    Test {
        /// Arguments for the test binaries, e.g. `-- enroll --nocapture`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Setup, release build, then the benchmarks (ratios against same-run baselines).
    Bench {
        /// Run every benchmark briefly (what CI does): proves they work, measures nothing.
        #[arg(long)]
        smoke: bool,
        /// Arguments for `mesh-bench`, e.g. `-- --sockmap` or `-- --only traffic`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Write the generated manifests under deploy/agent/crds (the Istio CRDs); `--check` writes
    /// nothing and fails if the committed ones differ.
    Manifests {
        #[arg(long)]
        check: bool,
    },
    /// Setup, build, then run the netns-cluster demo as root (sudo if not root);
    /// `cargo xtask demo bookinfo` runs Istio's Bookinfo walk-through.
    Demo {
        /// Arguments for `mesh-demo` (`bookinfo`, `--verbose`...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = Env::new().and_then(|env| match cli.task {
        Task::Setup => setup::setup(&env).map(|()| ExitCode::SUCCESS),
        Task::Build { release } => {
            setup::setup(&env)?;
            build(&env, release)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Test { test_args } => test(&env, &test_args),
        Task::Demo { args } => demo(&env, &args),
        Task::Manifests { check } => manifests::run(&env.root, check).map(|()| ExitCode::SUCCESS),
        Task::Bench { smoke, args } => bench(&env, smoke, &args),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo build --bins` over every host crate, so the `tests` crate turns on
/// mesh-agent's `testing` feature here as it does in `cargo test` (one shared build).
fn build(env: &Env, release: bool) -> Result<()> {
    let mut cmd = env.cargo();
    cmd.args(["build", "--workspace", "--exclude", EBPF_CRATE, "--bins"]);
    if release {
        cmd.arg("--release");
    }
    process::run(&mut cmd)
}

/// Absolute paths of the binaries the suite and the demo start, checked to exist.
struct Bins {
    agent: PathBuf,
    pod: PathBuf,
    demo: PathBuf,
}

impl Bins {
    fn debug(env: &Env) -> Result<Self> {
        let dir = env.target_dir()?.join("debug");
        Ok(Self {
            agent: dir.join("mesh-agent"),
            pod: dir.join("mesh-pod"),
            demo: dir.join("mesh-demo"),
        })
    }

    fn require(path: &Path) -> Result<()> {
        if !path.is_file() {
            bail!(
                "{} was not built by `cargo build --workspace --bins`",
                path.display()
            );
        }
        Ok(())
    }
}

fn test(env: &Env, test_args: &[String]) -> Result<ExitCode> {
    let started = Instant::now();
    setup::setup(env)?;

    // Cheap checks first: fail fast before the long build and the kernel suite.
    process::run(env.cargo().args(["fmt", "--all", "--", "--check"]))?;
    process::run(
        env.cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--all-targets",
            ])
            .args(["--", "-D", "warnings"]),
    )?;
    // The eBPF crate gets its own run, for the target it is really compiled for.
    process::run(
        env.command("rustup")
            .args(["run", "nightly", "cargo", "clippy", "--package", EBPF_CRATE])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"]),
    )?;

    build(env, false)?;
    let bins = Bins::debug(env)?;
    Bins::require(&bins.agent)?;
    Bins::require(&bins.pod)?;
    if !process::is_root() {
        eprintln!("xtask: note: not root; the kernel tests need root (under CI=true they fail)");
    }

    let mut totals = TestTotals::default();
    let status = process::run_tee(
        env.cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--no-fail-fast",
            ])
            .env("MESH_AGENT_BIN", &bins.agent)
            .env("MESH_POD_BIN", &bins.pod)
            .arg("--")
            .args(test_args),
        |line| totals.add(line),
    )?;

    // The benchmarks must keep working: a smoke run of them is part of the suite.
    let bench_ok = process::run(
        env.command(env.target_dir()?.join("debug/mesh-bench"))
            .arg("--smoke"),
    )
    .is_ok();
    // Every fuzz target briefly on its corpus: a crash fails the suite.
    let fuzz = fuzz::run_all(env);
    if let Err(e) = &fuzz {
        eprintln!("xtask: fuzzing failed: {e:#}");
    }
    let fuzz_ok = fuzz.is_ok();
    let status_ok = status.success() && bench_ok && fuzz_ok;

    let secs = started.elapsed().as_secs();
    let verdict = if status_ok { "ok" } else { "FAILED" };
    println!(
        "xtask test: {verdict}: fmt ok, clippy ok, build ok, bench smoke {}, fuzz {}, tests {} \
         passed, {} failed, {} ignored in {} binaries ({}m{:02}s)",
        if bench_ok { "ok" } else { "FAILED" },
        if fuzz_ok { "ok" } else { "FAILED" },
        totals.passed,
        totals.failed,
        totals.ignored,
        totals.binaries,
        secs / 60,
        secs % 60
    );
    Ok(if status_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo xtask bench`: the benchmark binary from a release build.
fn bench(env: &Env, smoke: bool, args: &[String]) -> Result<ExitCode> {
    setup::setup(env)?;
    build(env, !smoke)?;
    let profile = if smoke { "debug" } else { "release" };
    let bin = env.target_dir()?.join(profile).join("mesh-bench");
    Bins::require(&bin)?;
    let mut cmd = env.command(&bin);
    if smoke {
        cmd.arg("--smoke");
    }
    cmd.args(args);
    process::run(&mut cmd)?;
    Ok(ExitCode::SUCCESS)
}

/// Sums of libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Default)]
struct TestTotals {
    binaries: u64,
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn demo(env: &Env, args: &[String]) -> Result<ExitCode> {
    setup::setup(env)?;
    build(env, false)?;
    let bins = Bins::debug(env)?;
    for bin in [&bins.agent, &bins.pod, &bins.demo] {
        Bins::require(bin)?;
    }

    // The demo creates namespaces, cgroups and eBPF programs: it must run as root.
    let mut vars: Vec<(String, String)> = vec![
        ("MESH_AGENT_BIN".into(), bins.agent.display().to_string()),
        ("MESH_POD_BIN".into(), bins.pod.display().to_string()),
    ];
    let mut cmd = if process::is_root() {
        let mut c = env.command(&bins.demo);
        c.envs(vars);
        c
    } else {
        env.find_program("sudo")
            .context("the demo needs root and sudo is not installed: run it as root")?;
        eprintln!("xtask: not root, running the demo through sudo");
        // Hand the environment over with `env`: sudo's policy may drop variables.
        vars.extend(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| {
                    k.starts_with("RUST_") || k == "CI" || k == "PATH" || k == "NO_COLOR"
                }),
        );
        let mut c = env.command("sudo");
        c.arg("env")
            .args(vars.iter().map(|(k, v)| format!("{k}={v}")))
            .arg(&bins.demo);
        c
    };
    cmd.args(args);
    let status = process::status(&mut cmd)?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // Killed by a signal: the shell convention, 128 + signal.
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitCode::from(status.signal().map_or(1, |s| 128 + s as u8))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn totals_sum_libtest_result_lines_and_ignore_the_rest() {
        let mut t = TestTotals::default();
        for line in [
            "running 4 tests\n",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n",
            "test capture::same_node ... ok\n",
            "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.50s\n",
        ] {
            t.add(line);
        }
        assert_eq!((t.binaries, t.passed, t.failed, t.ignored), (2, 8, 2, 1));
    }
}
