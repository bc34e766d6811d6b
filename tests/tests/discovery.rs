//! Kernel test of pod network-namespace discovery (`mesh_agent::enroll::discovery`) against
//! real processes in the real /proc: network namespaces from `ip netns add`, cgroup v2
//! directories laid out as kubelet lays them out (systemd and cgroupfs drivers, containerd
//! and CRI-O container scopes), and `mesh-pod` processes placed in them. Everything is
//! created under a unique prefix and removed on drop, also when an assertion fails.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mesh_agent::enroll::discovery::{ProcRoot, find_pod_netns};
use tests::{locate_binary, require_root};

/// How long a started process may take to be in its cgroup and namespace.
const SETTLE: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique, short prefix for this test's namespaces and cgroups.
fn prefix() -> String {
    format!(
        "mdisc{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A UUID-shaped pod UID, unique to this run.
fn pod_uid(n: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        n,
        nanos & 0xfff,
        (nanos >> 12) & 0xfff,
        (nanos >> 24) & 0xffff_ffff_ffff
    )
}

fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        .expect("a cgroup2 mount in /proc/mounts")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (dev, inode) of a namespace file, which identify the namespace.
fn ns_id(path: &Path) -> (u64, u64) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// What the test built; `Drop` removes it in reverse order.
struct World {
    netns: Vec<String>,
    /// Top cgroup directories (each removed with everything below).
    cgroups: Vec<PathBuf>,
    children: Vec<Child>,
    pod_bin: PathBuf,
}

impl World {
    fn new() -> Self {
        World {
            netns: Vec::new(),
            cgroups: Vec::new(),
            children: Vec::new(),
            pod_bin: locate_binary("mesh-pod", "MESH_POD_BIN")
                .expect("the mesh-pod binary (cargo build --bins, or MESH_POD_BIN)"),
        }
    }

    /// A named network namespace; its path under /run/netns.
    fn netns(&mut self, name: &str) -> PathBuf {
        ip(&["netns", "add", name]);
        self.netns.push(name.to_owned());
        Path::new("/run/netns").join(name)
    }

    /// Registers a top cgroup directory for removal, then creates `dir` below it.
    fn cgroup(&mut self, top: &Path, dir: &Path) -> PathBuf {
        assert!(dir.starts_with(top));
        if !self.cgroups.iter().any(|c| c == top) {
            self.cgroups.push(top.to_owned());
        }
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        dir.to_owned()
    }

    /// `mesh-pod [--netns NETNS] --cgroup CGROUP exec -- sleep 60`; returns its pid once it
    /// is in the cgroup and running `sleep` (so it has entered the namespace too).
    fn spawn(&mut self, netns: Option<&Path>, cgroup: &Path) -> u32 {
        let mut cmd = Command::new(&self.pod_bin);
        if let Some(ns) = netns {
            cmd.arg("--netns").arg(ns);
        }
        cmd.arg("--cgroup")
            .arg(cgroup)
            .args(["exec", "--", "sleep", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = cmd.spawn().expect("starting mesh-pod");
        let pid = child.id();
        self.children.push(child);
        let deadline = Instant::now() + SETTLE;
        loop {
            let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if procs.split_whitespace().any(|p| p == pid.to_string()) && comm.trim() == "sleep" {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "mesh-pod {pid} did not reach {} and exec sleep within {SETTLE:?}",
                cgroup.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for top in self.cgroups.iter().rev() {
            if let Err(e) = remove_cgroup_tree(top) {
                eprintln!("cleanup: {e}");
            }
        }
        for name in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// Removes a cgroup tree, children first, retrying while exiting processes still count.
fn remove_cgroup_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("removing cgroup {}: {e}", dir.display())),
        }
    }
}

/// Waits until discovery finds the pod (processes may still be settling) and returns it.
fn discover(uid: &str) -> Option<PathBuf> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = find_pod_netns(Path::new("/proc"), uid).expect("discovery");
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn finds_pod_netns_from_kubelet_cgroup_layouts_and_skips_host_netns_processes() {
    if !require_root() {
        return;
    }
    let cg2 = cgroup2_mount();
    let p = prefix();
    let mut w = World::new();

    // Pod A: systemd cgroup driver, burstable, containerd. A CRI-O-style conmon and a
    // host-network process sit in the same pod slice in the host namespace; they start
    // first, so they have lower PIDs than the pod's real process.
    let uid_a = pod_uid(1);
    let netns_a = w.netns(&format!("{p}a"));
    let top_a = cg2.join(format!("{p}.slice"));
    let slice_a = top_a.join(format!(
        "kubepods-burstable-pod{}.slice",
        uid_a.replace('-', "_")
    ));
    let conmon = w.cgroup(&top_a, &slice_a.join("crio-conmon-0a1b2c.scope"));
    let hostnet = w.cgroup(&top_a, &slice_a.join("cri-containerd-host0.scope"));
    let sandbox_a = w.cgroup(&top_a, &slice_a.join("cri-containerd-5a5b5c.scope"));
    let conmon_pid = w.spawn(None, &conmon);
    let hostnet_pid = w.spawn(None, &hostnet);
    let pod_a_pid = w.spawn(Some(&netns_a), &sandbox_a);
    assert!(
        conmon_pid < pod_a_pid && hostnet_pid < pod_a_pid,
        "pid order"
    );

    // Pod B: cgroupfs driver, besteffort, containerd (plain container id directory).
    let uid_b = pod_uid(2);
    let netns_b = w.netns(&format!("{p}b"));
    let top_b = cg2.join(&p);
    let container_b = w.cgroup(
        &top_b,
        &top_b.join(format!("kubepods/besteffort/pod{uid_b}/9f8e7d6c")),
    );
    w.spawn(Some(&netns_b), &container_b);

    // Pod C: host network (its only process is in the host namespace): nothing to enroll.
    let uid_c = pod_uid(3);
    let container_c = w.cgroup(
        &top_b,
        &top_b.join(format!("kubepods/burstable/pod{uid_c}/crio-0c0c0c")),
    );
    w.spawn(None, &container_c);

    let found_a = discover(&uid_a).expect("pod A (systemd driver) found");
    assert_eq!(
        ns_id(&found_a),
        ns_id(&netns_a),
        "pod A: {} is not the pod's namespace",
        found_a.display()
    );
    assert_eq!(found_a, PathBuf::from(format!("/proc/{pod_a_pid}/ns/net")));

    let found_b = ProcRoot::default()
        .find_pod_netns(&uid_b)
        .expect("discovery")
        .expect("pod B (cgroupfs driver) found");
    assert_eq!(
        ns_id(&found_b),
        ns_id(&netns_b),
        "pod B: {} is not the pod's namespace",
        found_b.display()
    );

    assert_eq!(
        find_pod_netns(Path::new("/proc"), &uid_c).expect("discovery"),
        None
    );
    assert_eq!(
        find_pod_netns(Path::new("/proc"), &pod_uid(4)).expect("discovery"),
        None,
        "an unknown pod UID"
    );
}
