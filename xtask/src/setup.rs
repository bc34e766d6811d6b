//! `cargo xtask setup`: checks each tool the build and the kernel suite need and
//! installs only what is missing, so a second run is a handful of cheap checks.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::process::{self, Env};

/// Where Debian's llvm-22 packages put LLVM; bpf-linker is built against it.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz, which builds and runs the targets under fuzz/ in `cargo xtask test`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Components of the nightly toolchain: rust-src for `-Z build-std=core` (the eBPF
/// build), clippy for the eBPF crate's own lint run in `cargo xtask test`.
const NIGHTLY_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];
/// Components of the toolchain that runs xtask, used by `cargo xtask test`.
const STABLE_COMPONENTS: [&str; 2] = ["clippy", "rustfmt"];
/// Programs the suite and `mesh-bench` run inside pods (program, Debian package): load
/// generators, a reverse proxy, Prometheus and Graphviz; kubectl for the manifests test; and
/// openssl, with which the CA tests make Istio's plug-in CA files as operators do.
const BENCH_TOOLS: [(&str, &str); 8] = [
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    // The reverse proxy the waypoint is measured against.
    ("nginx", "nginx-light"),
    // HTTP/2 load through the waypoint.
    ("h2load", "nghttp2-client"),
    // The Bookinfo walk-through scrapes every proxy into a real Prometheus and draws the
    // service graph Kiali would.
    ("prometheus", "prometheus"),
    ("dot", "graphviz"),
    // `kubectl kustomize` builds every kustomization under deploy/ in the manifests test.
    ("kubectl", "kubernetes-client"),
    ("openssl", "openssl"),
];

/// Debian's "do not start services from package scripts" hook: the benchmark runs its
/// own nginx in a test pod; the package must not start one on the machine's port 80.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn setup(env: &Env) -> Result<()> {
    // Debian packages first (bpf-linker links against llvm-22-dev), in one apt run.
    let mut apt = Vec::new();
    let llvm = llvm_present();
    report("llvm-22-dev", llvm);
    if !llvm {
        apt.push("llvm-22-dev");
    }
    let ip = env.find_program("ip").is_some();
    report("iproute2 (ip)", ip);
    if !ip {
        apt.push("iproute2");
    }
    for (program, package) in BENCH_TOOLS {
        let ok = env.find_program(program).is_some();
        report(&format!("{package} ({program})"), ok);
        if !ok {
            apt.push(package);
        }
    }
    if !apt.is_empty() {
        apt_install(env, &apt)?;
    }

    rust_components(env, Some("nightly"), &NIGHTLY_COMPONENTS)?;
    rust_components(env, None, &STABLE_COMPONENTS)?;

    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    let linker_ok = bpf_linker_version(env).as_deref() == Some(wanted.as_str());
    report(&wanted, linker_ok);
    if !linker_ok {
        process::run(
            env.cargo()
                // Outside the workspace, so its config does not apply to the install.
                .current_dir(std::env::temp_dir())
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
        )?;
        match bpf_linker_version(env) {
            Some(v) if v == wanted => {}
            other => bail!(
                "installed bpf-linker but `bpf-linker --version` says {other:?}, expected \
                 {wanted:?}: is another bpf-linker earlier in PATH?"
            ),
        }
    }

    let fuzz_ok = process::stdout_of(env.command("cargo-fuzz").arg("--version")).is_some();
    report(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}"), fuzz_ok);
    if !fuzz_ok {
        process::run(env.cargo().current_dir(std::env::temp_dir()).args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}

fn report(item: &str, ok: bool) {
    println!("setup: {item:<28} {}", if ok { "ok" } else { "installing" });
}

/// llvm-22-dev ships the unversioned `libLLVM.so` link and `llvm-config` (the
/// versioned `libLLVM.so.1` alone comes from the runtime package).
fn llvm_present() -> bool {
    let prefix = Path::new(LLVM_PREFIX);
    prefix.join("lib/libLLVM.so").exists() && prefix.join("bin/llvm-config").exists()
}

fn apt_install(env: &Env, packages: &[&str]) -> Result<()> {
    if !process::is_root() {
        bail!(
            "setup must install {} with apt-get, which needs root: run `sudo apt-get install -y {}` \
             and then this command again, or run it as root",
            packages.join(", "),
            packages.join(" ")
        );
    }
    if env.find_program("apt-get").is_none() {
        bail!(
            "apt-get not found: install {} by hand (this project is set up for Debian)",
            packages.join(", ")
        );
    }
    process::run(
        env.command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"),
    )?;
    let own_policy = !Path::new(POLICY_RC_D).exists();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = process::run(
        env.command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(packages),
    );
    if own_policy {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    installed?;
    if packages.contains(&"llvm-22-dev") && !llvm_present() {
        bail!("apt-get installed llvm-22-dev but {LLVM_PREFIX}/lib/libLLVM.so is still missing");
    }
    Ok(())
}

/// Checks (and adds) rustup components of `toolchain` (`None`: the one running xtask).
fn rust_components(env: &Env, toolchain: Option<&str>, components: &[&str]) -> Result<()> {
    let label = toolchain.unwrap_or("stable");
    let mut list = env.command("rustup");
    list.args(["component", "list", "--installed"]);
    if let Some(t) = toolchain {
        list.args(["--toolchain", t]);
    }
    let installed = process::stdout_of(&mut list).with_context(|| {
        format!(
            "`{}` failed: is rustup installed and the {label} toolchain present? \
             (`rustup toolchain install {label}`)",
            process::display(&list)
        )
    })?;
    let mut missing = Vec::new();
    for c in components {
        // Lines look like `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
        let ok = installed
            .lines()
            .any(|l| l == *c || l.strip_prefix(c).is_some_and(|r| r.starts_with('-')));
        report(&format!("{label} {c}"), ok);
        if !ok {
            missing.push(*c);
        }
    }
    if !missing.is_empty() {
        let mut add = env.command("rustup");
        add.args(["component", "add"]).args(&missing);
        if let Some(t) = toolchain {
            add.args(["--toolchain", t]);
        }
        process::run(&mut add)?;
    }
    Ok(())
}

fn bpf_linker_version(env: &Env) -> Option<String> {
    process::stdout_of(env.command("bpf-linker").arg("--version")).map(|s| s.trim().to_owned())
}
