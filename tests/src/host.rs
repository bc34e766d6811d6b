//! Host plumbing for the test cluster: running `ip`, sysctls inside a namespace,
//! finding cgroup v2 and the test binaries, and removing what a killed run left behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workload::enter_netns;

/// Runs `f` on a fresh thread that has entered the network namespace at `netns`;
/// sockets it opens stay in that namespace after it returns. The calling thread is
/// left untouched.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(netns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
    })
}

/// Where a workspace binary is: `$<env_var>` if set, else next to the running
/// executable (`target/<profile>/`, also when that is `target/<profile>/deps/`).
pub fn locate_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{env_var}={} is not a file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("finding the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found at {} (build it with `cargo build --bins -p mesh-agent -p tests`, \
             or set {env_var})",
            path.display()
        );
    }
    Ok(path)
}

/// The mount point of the cgroup v2 hierarchy, from /proc/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

fn unescape_mount_path(path: &str) -> String {
    path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// Whether `ip` (iproute2) runs.
pub fn have_ip() -> bool {
    Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `ip <args>`; the error carries the command line and ip's stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `commands` through one `ip [-n netns] -batch -`; the error names the commands.
pub fn ip_batch(netns: Option<&str>, commands: &[String]) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (is iproute2 installed?)")?;
    let script = commands.join("\n") + "\n";
    child
        .stdin
        .take()
        .context("ip stdin")?
        .write_all(script.as_bytes())
        .context("writing to ip -batch")?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`ip {}-batch` failed ({}): {}\ncommands:\n{script}",
            netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Writes sysctls (`("net/ipv4/ip_forward", "1")`, paths under /proc/sys) inside the
/// network namespace at `netns`.
pub fn sysctls(netns: &Path, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(netns, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            fs::write(&path, value).with_context(|| {
                format!(
                    "writing {value} to {} in {}",
                    path.display(),
                    netns.display()
                )
            })?;
        }
        Ok(())
    })?
}

/// Names of the network namespaces `ip netns list` knows.
pub fn netns_list() -> Vec<String> {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// Deletes a network namespace (no error if it is already gone).
pub fn delete_netns(name: &str) -> Result<()> {
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", name])
}

/// Removes a cgroup directory tree, children first, retrying while the kernel still
/// counts exiting processes in it.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (processes still in it: {})",
                        dir.display(),
                        procs.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                });
            }
        }
    }
}

/// Pids in a cgroup tree (from every `cgroup.procs` under `dir`).
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&entry.path()));
            }
        }
    }
    pids
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
