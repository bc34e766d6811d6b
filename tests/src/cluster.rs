//! A "cluster" built out of network namespaces: a fabric bridge, nodes with dual-stack
//! addresses and routes, pods as real `mesh-pod` processes in their own namespaces and
//! cgroups, and one real `mesh-agent` per node; all of it removed on drop.
//!
//! Addressing (node index `i` is named `node{i+1}`, `N = i + 1`; pod `j` of a node):
//! - node `eth0` (veth into the fabric bridge): `10.200.0.N/24`, `fd00:200::N/64`;
//! - pod `eth0` (veth to its node): `10.201.N.(10+j)/32`, `fd00:201:N::(10+j)/128`,
//!   default routes via `10.201.N.1` (onlink) and `fe80::1` on the node-side veth;
//! - each node routes its pods' /32 and /128 to their veths and every other node's
//!   `10.201.K.0/24`, `fd00:201:K::/64` via that node's fabric address.
//!
//! Names: a per-instance prefix `m` + pid (5 base-36 digits) + counter (2), e.g.
//! `m00abc01`; netns `<prefix>f` (fabric), `<prefix>n1` (node1), `<prefix>n1p0`
//! (node1's first pod); cgroups `<cgroup2>/<prefix>/<node>/<pod>`, agent pins under
//! `/sys/fs/bpf/<prefix>-<node>`, logs and configs in `$TMPDIR/mesh-test-<prefix>/`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::host::{self, ip, ip_batch, locate_binary};
use crate::workload::{self, ConnectReport, READY_PREFIX};

pub use crate::config::ConfigOptions;

/// Environment variable naming the agent binary (default: next to the test executable).
pub const AGENT_BIN_ENV: &str = "MESH_AGENT_BIN";
/// Environment variable naming the `mesh-pod` binary (default: next to the test executable).
pub const POD_BIN_ENV: &str = "MESH_POD_BIN";
/// Namespace or pod label that enrolls workloads, and its enrolling value.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
/// Pod annotation naming its network namespace in file mode.
pub const NETNS_ANNOTATION: &str = "mesh-agent.io/netns";
/// The agent's admin ports (in the node's namespace, on 127.0.0.1).
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
/// How long `start_agent` waits for `/healthz/ready`.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// What an agent logs when a successor took its listeners over.
const HANDED_OVER: &str = "a new agent took over the listeners";

const BPFFS: &str = "/sys/fs/bpf";
/// Sub-cgroups of a node's cgroup for what is not a pod (leading `_`: never a pod name).
const AGENT_CGROUP: &str = "_mesh-agent";
const HOST_CGROUP: &str = "_host";
const WORKDIR_PREFIX: &str = "mesh-test-";

/// Whether privileged tests can run here. Without root (or cgroup v2, or `ip`) it
/// returns false so the test can skip, except under `CI=true`, where it panics:
/// a kernel test that did not run is a failure in CI.
pub fn require_root() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF)".to_string());
    }
    if host::cgroup2_mount().is_none() {
        missing.push("a cgroup2 mount (none in /proc/mounts)".to_string());
    }
    if !host::have_ip() {
        missing.push("`ip` from iproute2".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let message = format!("kernel test needs {}", missing.join(", "));
    if ci {
        panic!("{message}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// A pod to create: Kubernetes name, namespace, labels, service account, and the
/// index of the node it runs on (0 = `node1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: usize,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

impl PodSpec {
    /// A pod with no labels and service account `default`.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, node: usize) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            node,
            labels: BTreeMap::new(),
            service_account: "default".into(),
        }
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn service_account(mut self, service_account: impl Into<String>) -> Self {
        self.service_account = service_account.into();
        self
    }
}

/// Builds a [`Cluster`]; see [`Cluster::builder`].
#[derive(Debug, Clone, Default)]
pub struct ClusterBuilder {
    nodes: usize,
    pods_per_node: usize,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<PodSpec>,
}

impl ClusterBuilder {
    /// Number of nodes (1..=99). Default 1, or enough for the pods listed.
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Also create this many pods on every node, named `pod-<node>-<k>` (`pod-1-0`...)
    /// in namespace `default`, which is labelled ambient unless declared otherwise.
    pub fn pods_per_node(mut self, pods: usize) -> Self {
        self.pods_per_node = pods;
        self
    }

    /// Declares a Kubernetes namespace with these labels.
    pub fn namespace<K: Into<String>, V: Into<String>>(
        mut self,
        name: impl Into<String>,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.namespaces.insert(
            name.into(),
            labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Declares a namespace labelled `istio.io/dataplane-mode: ambient`.
    pub fn ambient_namespace(self, name: impl Into<String>) -> Self {
        self.namespace(name, [(DATAPLANE_MODE_LABEL, AMBIENT)])
    }

    /// Adds a pod (namespaces it names but nobody declared get no labels).
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }

    /// Creates everything. On error, whatever was created is removed again.
    pub fn build(mut self) -> Result<Cluster> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the test cluster needs root (network namespaces, cgroups, eBPF)");
        }
        let cgroup2 = host::cgroup2_mount().context("no cgroup2 filesystem in /proc/mounts")?;
        let pod_bin = locate_binary("mesh-pod", POD_BIN_ENV)?;
        static REAP: Once = Once::new();
        REAP.call_once(|| reap_stale(&cgroup2));

        let needed = self.pods.iter().map(|p| p.node + 1).max().unwrap_or(1);
        let nodes = self.nodes.max(needed).max(1);
        if nodes > 99 {
            bail!("at most 99 nodes, asked for {nodes}");
        }
        if self.pods_per_node > 0 {
            self.namespaces.entry("default".into()).or_insert_with(|| {
                [(DATAPLANE_MODE_LABEL.to_string(), AMBIENT.to_string())].into()
            });
            let generated: Vec<PodSpec> = (0..nodes)
                .flat_map(|n| {
                    (0..self.pods_per_node)
                        .map(move |k| PodSpec::new(format!("pod-{}-{k}", n + 1), "default", n))
                })
                .collect();
            self.pods.splice(0..0, generated);
        }
        for pod in &self.pods {
            self.namespaces.entry(pod.namespace.clone()).or_default();
        }

        let prefix = new_prefix();
        let workdir = std::env::temp_dir().join(format!("{WORKDIR_PREFIX}{prefix}"));
        fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        let shared = Arc::new(Shared {
            cgroup_root: cgroup2.join(&prefix),
            prefix: prefix.clone(),
            workdir,
            pod_bin,
            processes: Mutex::new(Vec::new()),
            netns: Mutex::new(Vec::new()),
            log_seq: AtomicUsize::new(0),
            uid_seq: AtomicU32::new(0),
        });
        let mut cluster = Cluster {
            fabric: format!("{prefix}f"),
            shared,
            nodes: Vec::new(),
            pods: Mutex::new(Vec::new()),
            namespaces: self.namespaces,
            torn_down: false,
        };
        // From here on, an error drops `cluster`, which removes what exists so far.
        cluster.create_fabric()?;
        for index in 0..nodes {
            let node = cluster.create_node(index, nodes)?;
            cluster.nodes.push(node);
        }
        for spec in self.pods {
            cluster.add_pod(spec)?;
        }
        Ok(cluster)
    }
}

/// What nodes and pods share: names, binaries, and everything teardown must find.
#[derive(Debug)]
struct Shared {
    prefix: String,
    workdir: PathBuf,
    cgroup_root: PathBuf,
    pod_bin: PathBuf,
    processes: Mutex<Vec<Process>>,
    /// Network namespaces created, in creation order.
    netns: Mutex<Vec<String>>,
    log_seq: AtomicUsize,
    uid_seq: AtomicU32,
}

impl Shared {
    /// `mesh-pod --netns <netns> [--cgroup <cgroup>] <args...>`
    fn mesh_pod(&self, netns: &Path, cgroup: Option<&Path>, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.pod_bin);
        cmd.arg("--netns").arg(netns);
        if let Some(cgroup) = cgroup {
            cmd.arg("--cgroup").arg(cgroup);
        }
        cmd.args(args);
        cmd
    }

    fn log_file(&self, name: &str) -> Result<(PathBuf, File)> {
        let seq = self.log_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.workdir.join(format!("{name}-{seq}.log"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok((path, file))
    }

    /// Spawns a long-running process owned by the cluster (killed at teardown).
    /// With `wait_ready`, waits for the `READY` line `mesh-pod serve` prints.
    fn spawn(
        &self,
        owner: &str,
        mut cmd: Command,
        log_name: &str,
        wait_ready: bool,
    ) -> Result<Process> {
        let (log, file) = self.log_file(log_name)?;
        cmd.stdin(Stdio::null()).stderr(file.try_clone()?);
        if wait_ready {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(file);
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let process = Process {
            owner: owner.to_string(),
            pid,
            child: Arc::new(Mutex::new(child)),
            log,
        };
        lock(&self.processes).push(process.clone());
        if let Some(stdout) = stdout {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.starts_with(READY_PREFIX) => {}
                Ok(line) => {
                    let _ = process.stop();
                    bail!(
                        "{owner}: {cmd:?} did not become ready (stdout {line:?}); log:\n{}",
                        process.log_text()
                    );
                }
                Err(_) => {
                    let _ = process.stop();
                    bail!(
                        "{owner}: {cmd:?} not ready after 10 s; log:\n{}",
                        process.log_text()
                    );
                }
            }
        }
        Ok(process)
    }

    /// Runs a command to completion, failing with its output if it fails.
    fn run(&self, mut cmd: Command) -> Result<String> {
        let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !output.status.success() {
            bail!(
                "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn new_netns(&self, name: &str) -> Result<PathBuf> {
        ip(&["netns", "add", name])?;
        lock(&self.netns).push(name.to_string());
        Ok(PathBuf::from("/run/netns").join(name))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn new_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "m{}{}",
        base36(std::process::id(), 5),
        base36(counter % (36 * 36), 2)
    )
}

fn base36(mut n: u32, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for d in digits.iter_mut().rev() {
        *d = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(digits).expect("ascii")
}

/// The pid encoded in a prefix made by [`new_prefix`], if `name` starts with one.
fn prefix_pid(name: &str) -> Option<(String, u32)> {
    let prefix = name.get(..8)?;
    let digits = prefix.strip_prefix('m')?;
    if !digits
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    let pid = u32::from_str_radix(&digits[..5], 36).ok()?;
    Some((prefix.to_string(), pid))
}

/// Removes what test runs that were killed (so never dropped their cluster) left:
/// only prefixes whose work directory exists and whose pid is gone.
fn reap_stale(cgroup2: &Path) {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(WORKDIR_PREFIX) else {
            continue;
        };
        let Some((prefix, pid)) = prefix_pid(rest) else {
            continue;
        };
        if prefix != rest || host::pid_alive(pid) {
            continue;
        }
        let mut leftovers = Vec::new();
        if let Err(e) = remove_prefixed(&prefix, cgroup2, &[], &mut leftovers) {
            eprintln!("mesh-test: removing leftovers of dead run {prefix}: {e:#}");
        }
        if !leftovers.is_empty() {
            eprintln!(
                "mesh-test: removed leftovers of dead run {prefix}: {}",
                leftovers.join(", ")
            );
        }
    }
}

/// Kills processes in `<cgroup2>/<prefix>`, removes `/sys/fs/bpf/<prefix>*` (after
/// `uninstall_cmds` ran), the netns named `<prefix>*` and the cgroup tree.
fn remove_prefixed(
    prefix: &str,
    cgroup2: &Path,
    extra_netns: &[String],
    removed: &mut Vec<String>,
) -> Result<()> {
    let mut errors = Vec::new();
    let cgroup_root = cgroup2.join(prefix);
    for _ in 0..3 {
        let pids = host::cgroup_pids(&cgroup_root);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                removed.push(format!("process {pid}"));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                match remove_pin_dir(&entry.path()) {
                    Ok(()) => removed.push(entry.path().display().to_string()),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    let mut netns: Vec<String> = extra_netns.to_vec();
    for name in host::netns_list() {
        if name.starts_with(prefix) && !netns.contains(&name) {
            netns.push(name);
        }
    }
    // Pods before nodes before the fabric: longest names first is exactly that.
    netns.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in netns {
        match host::delete_netns(&name) {
            Ok(()) => removed.push(format!("netns {name}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if cgroup_root.exists() {
        match host::remove_cgroup_tree(&cgroup_root) {
            Ok(()) => removed.push(cgroup_root.display().to_string()),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

/// Removes an agent's bpffs pin directory (unmounting it first if the agent mounted a
/// bpffs right there). Unlinking a pinned link detaches its program.
fn remove_pin_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let dir_str = dir.to_string_lossy();
    let mounted = mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(&*dir_str))
        .count();
    for _ in 0..mounted {
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", dir.display()))?;
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// A process the cluster started and kills at teardown (a pod's server, an agent...).
#[derive(Debug, Clone)]
pub struct Process {
    owner: String,
    pid: u32,
    child: Arc<Mutex<Child>>,
    log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pod or node it belongs to.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running (not exited).
    pub fn is_running(&self) -> bool {
        matches!(lock(&self.child).try_wait(), Ok(None))
    }

    /// Exit status if it has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Waits until the process has printed `needle` (its log, polled every 5 ms); fails if it
    /// exits first or `timeout` passes.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                bail!(
                    "{} exited ({status}) before printing {needle:?}: {}",
                    self.owner,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no {needle:?} after {timeout:?}: {}",
                    self.owner,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// When the process exited (polled every millisecond), which it must have done with
    /// success after printing `needle`; killed if `timeout` passes first.
    pub fn wait_exit_after(&self, needle: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                let at = Instant::now();
                if !status.success() || !self.log_text().contains(needle) {
                    bail!("{} failed ({status}): {}", self.owner, self.log_text());
                }
                return Ok(at);
            }
            if Instant::now() > deadline {
                let _ = self.stop();
                bail!(
                    "{}: no {needle:?} and no exit after {timeout:?}",
                    self.owner
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL and reap.
    pub fn stop(&self) -> Result<ExitStatus> {
        self.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10))
    }

    /// Sends `signal`, waits up to `grace` for the exit, then SIGKILLs.
    pub fn signal_and_wait(&self, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        let mut child = lock(&self.child);
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let _ = kill(Pid::from_raw(self.pid as i32), signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        Ok(child.wait()?)
    }
}

/// The cluster: fabric, nodes, pods, agents. Dropping it removes all of it.
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
    fabric: String,
    nodes: Vec<Node>,
    pods: Mutex<Vec<Arc<Pod>>>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    torn_down: bool,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The unique prefix of every name this cluster created.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// Per-cluster directory for logs and config files (kept if the test panics).
    pub fn workdir(&self) -> &Path {
        &self.shared.workdir
    }

    /// `<workdir>/cluster.yaml`, a natural place for the config file.
    pub fn config_path(&self) -> PathBuf {
        self.shared.workdir.join("cluster.yaml")
    }

    /// `mesh-agent authz check` on this cluster's config file, from pod `from` to `to`, with
    /// `extra` arguments (`--method`, ...): whether it says allowed, and its report.
    pub fn authz_check(&self, from: &str, to: SocketAddr, extra: &[&str]) -> (bool, String) {
        let pod = self.pod(from);
        let agent = locate_binary("mesh-agent", AGENT_BIN_ENV).expect("the mesh-agent binary");
        let out = std::process::Command::new(agent)
            .args(["authz", "check", "-f"])
            .arg(self.config_path())
            .arg("--from")
            .arg(format!("{}/{}", pod.namespace(), pod.name()))
            .args(["--to", &to.to_string()])
            .args(extra)
            .output()
            .expect("running mesh-agent authz check");
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "authz check failed: {report}"
        );
        (out.status.success(), report)
    }

    /// `<cgroup2>/<prefix>`: every node's and pod's cgroup is below it.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// The fabric namespace name (holds bridge `br0`).
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node by index (0 = `node1`). Panics if out of range.
    pub fn node(&self, index: usize) -> &Node {
        self.nodes.get(index).unwrap_or_else(|| {
            panic!(
                "no node index {index}: the cluster has {}",
                self.nodes.len()
            )
        })
    }

    /// The pod named `name`. Panics if there is none.
    pub fn pod(&self, name: &str) -> Arc<Pod> {
        self.try_pod(name)
            .unwrap_or_else(|| panic!("no pod named {name}"))
    }

    pub fn try_pod(&self, name: &str) -> Option<Arc<Pod>> {
        lock(&self.pods)
            .iter()
            .find(|p| p.spec.name == name)
            .cloned()
    }

    pub fn pods(&self) -> Vec<Arc<Pod>> {
        lock(&self.pods).clone()
    }

    /// Pods on node `index`.
    pub fn pods_on(&self, index: usize) -> Vec<Arc<Pod>> {
        lock(&self.pods)
            .iter()
            .filter(|p| p.spec.node == index)
            .cloned()
            .collect()
    }

    /// Declared namespaces and their labels.
    pub fn namespaces(&self) -> &BTreeMap<String, BTreeMap<String, String>> {
        &self.namespaces
    }

    fn create_fabric(&self) -> Result<()> {
        let path = self.shared.new_netns(&self.fabric)?;
        host::sysctls(&path, NO_DAD)?;
        ip_batch(
            Some(&self.fabric),
            &[
                "link set lo up".into(),
                "link add br0 type bridge mcast_snooping 0".into(),
                "link set br0 up".into(),
            ],
        )
    }

    fn create_node(&self, index: usize, nodes: usize) -> Result<Node> {
        let n = index + 1;
        let netns = format!("{}n{n}", self.shared.prefix);
        let name = format!("node{n}");
        let path = self.shared.new_netns(&netns)?;
        host::sysctls(&path, NO_DAD)?;
        host::sysctls(
            &path,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
                ("net/ipv6/conf/default/forwarding", "1"),
            ],
        )?;
        ip_batch(
            Some(&self.fabric),
            &[
                format!("link add n{n} type veth peer name eth0 netns {netns}"),
                format!("link set n{n} master br0"),
                format!("link set n{n} up"),
            ],
        )?;
        let mut commands = vec![
            "link set lo up".to_string(),
            format!("addr add 10.200.0.{n}/24 dev eth0"),
            format!("addr add fd00:200::{n}/64 dev eth0 nodad"),
            "link set eth0 up".to_string(),
        ];
        for k in (1..=nodes).filter(|&k| k != n) {
            commands.push(format!(
                "route add 10.201.{k}.0/24 via 10.200.0.{k} dev eth0"
            ));
            commands.push(format!(
                "route add fd00:201:{k}::/64 via fd00:200::{k} dev eth0"
            ));
        }
        ip_batch(Some(&netns), &commands)?;

        let cgroup = self.shared.cgroup_root.join(&name);
        for dir in [cgroup.join(HOST_CGROUP), cgroup.join(AGENT_CGROUP)] {
            fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        Ok(Node {
            shared: self.shared.clone(),
            index,
            name: name.clone(),
            ipv4: Ipv4Addr::new(10, 200, 0, n as u8),
            ipv6: format!("fd00:200::{n}").parse()?,
            netns_path: path,
            netns,
            bpffs_dir: PathBuf::from(BPFFS).join(format!("{}-{name}", self.shared.prefix)),
            cgroup,
            next_pod: AtomicUsize::new(0),
            agent: Mutex::new(None),
            had_agent: AtomicBool::new(false),
        })
    }

    /// Creates a pod (namespace, veth, addresses, routes, cgroup) on `spec.node`.
    /// It is in the next config file written, not in one already written.
    pub fn add_pod(&self, spec: PodSpec) -> Result<Arc<Pod>> {
        let node = self
            .nodes
            .get(spec.node)
            .with_context(|| format!("pod {}: no node index {}", spec.name, spec.node))?;
        if self.try_pod(&spec.name).is_some() {
            bail!("a pod named {} exists already", spec.name);
        }
        let j = node.next_pod.fetch_add(1, Ordering::Relaxed);
        if j > 200 {
            bail!("at most 200 pods per node");
        }
        let n = node.index + 1;
        let host_id = 10 + j;
        let netns = format!("{}n{n}p{j}", self.shared.prefix);
        let veth = format!("veth{j}");
        let ipv4 = Ipv4Addr::new(10, 201, n as u8, host_id as u8);
        let ipv6: Ipv6Addr = format!("fd00:201:{n}::{host_id}").parse()?;

        let path = self.shared.new_netns(&netns)?;
        host::sysctls(&path, NO_DAD)?;
        ip_batch(
            Some(&node.netns),
            &[
                format!("link add {veth} type veth peer name eth0 netns {netns}"),
                format!("addr add 10.201.{n}.1/32 dev {veth}"),
                format!("addr add fe80::1/64 dev {veth} nodad"),
                format!("link set {veth} up"),
            ],
        )?;
        ip_batch(
            Some(&netns),
            &[
                "link set lo up".into(),
                format!("addr add {ipv4}/32 dev eth0"),
                format!("addr add {ipv6}/128 dev eth0 nodad"),
                "link set eth0 up".into(),
                format!("route add 0.0.0.0/0 via 10.201.{n}.1 dev eth0 onlink"),
                "route add ::/0 via fe80::1 dev eth0".into(),
            ],
        )?;
        ip_batch(
            Some(&node.netns),
            &[
                format!("route add {ipv4}/32 dev {veth}"),
                format!("route add {ipv6}/128 dev {veth}"),
            ],
        )?;
        let seq = self.shared.uid_seq.fetch_add(1, Ordering::Relaxed);
        let tag: u32 = self
            .shared
            .prefix
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        let uid = format!("{tag:08x}-0000-4000-8000-{seq:012x}");
        // Laid out as kubelet's cgroupfs driver does (`pod<uid>`), so the agent can find a
        // pod's namespace from its processes in Kubernetes mode.
        let cgroup = node.cgroup.join(format!("pod{uid}"));
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;

        let pod = Arc::new(Pod {
            shared: self.shared.clone(),
            uid,
            node_name: node.name.clone(),
            node_ipv4: node.ipv4,
            node_ipv6: node.ipv6,
            index: j,
            netns,
            netns_path: path,
            veth,
            ipv4,
            ipv6,
            cgroup,
            spec,
        });
        lock(&self.pods).push(pod.clone());
        Ok(pod)
    }

    /// Kills a pod's processes and deletes its namespace (which removes its veth and
    /// the node's routes to it) and cgroup.
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let pod = {
            let mut pods = lock(&self.pods);
            let i = pods
                .iter()
                .position(|p| p.spec.name == name)
                .with_context(|| format!("no pod named {name}"))?;
            pods.remove(i)
        };
        let owned: Vec<Process> = {
            let mut processes = lock(&self.shared.processes);
            let (mine, rest) = processes.drain(..).partition(|p| p.owner == pod.spec.name);
            *processes = rest;
            mine
        };
        for process in owned {
            process.stop()?;
        }
        for pid in host::cgroup_pids(&pod.cgroup) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        host::delete_netns(&pod.netns)?;
        lock(&self.shared.netns).retain(|n| *n != pod.netns);
        host::remove_cgroup_tree(&pod.cgroup)
    }

    /// Writes the config file for every pod (multi-document YAML of `v1` Namespace and
    /// Pod objects), atomically: a temporary file renamed over `path`.
    pub fn write_config(&self, path: &Path, opts: &ConfigOptions) -> Result<()> {
        let yaml = self.config_yaml(opts)?;
        if !opts.deliberate_errors {
            let errors = crate::config::analyze_errors(&yaml);
            if !errors.is_empty() {
                bail!(
                    "mesh-agent analyze finds errors in a configuration meant to be valid \
                     (ConfigOptions::with_deliberate_errors if they are the point):\n{}",
                    errors.join("\n")
                );
            }
        }
        write_atomically(path, yaml.as_bytes())
    }

    /// The text [`write_config`](Self::write_config) writes.
    pub fn config_yaml(&self, opts: &ConfigOptions) -> Result<String> {
        crate::config::render(&self.namespaces, &self.pods(), opts)
    }

    /// Waits until `mesh-agent status` (run on the first node, over this cluster's config
    /// file) finds every proxy running the file as it is now: a condition to wait on after
    /// rewriting the configuration, rather than a sleep.
    pub fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let config = self.config_path();
        let config = config.to_str().context("a UTF-8 path")?;
        let mut last = String::new();
        let synced = crate::eventually(timeout, || {
            let out = self.nodes[0].mesh_agent(&["status", "-f", config]);
            last = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            out.status.success()
        });
        if !synced {
            bail!("the proxies did not all take the configuration within {timeout:?}:\n{last}");
        }
        Ok(())
    }

    /// Starts every node's agent with `config` and waits until all are ready.
    pub fn start_agents(&self, config: &Path) -> Result<()> {
        self.start_agents_with(config, &[])
    }

    /// [`start_agents`](Self::start_agents) with extra `mesh-agent run` flags.
    pub fn start_agents_with(&self, config: &Path, extra: &[&str]) -> Result<()> {
        for node in &self.nodes {
            node.spawn_agent(config, extra)?;
        }
        for node in &self.nodes {
            node.wait_agent_ready(AGENT_READY_TIMEOUT)?;
        }
        Ok(())
    }

    /// Tears down now and reports what could not be removed (drop does the same but
    /// can only print).
    pub fn teardown(mut self) -> Result<()> {
        let errors = self.teardown_inner();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("teardown of {}: {}", self.shared.prefix, errors.join("; "))
        }
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        let panicking = std::thread::panicking();

        // 1. Pod and host processes.
        let processes: Vec<Process> = lock(&self.shared.processes).drain(..).collect();
        for process in processes.iter().rev() {
            if let Err(e) = process.stop() {
                errors.push(format!(
                    "stopping {} ({}): {e:#}",
                    process.pid, process.owner
                ));
            }
        }
        // 2. Agents, then their eBPF objects.
        for node in self.nodes.iter().rev() {
            if let Err(e) = node.stop_agent() {
                errors.push(format!("stopping the agent of {}: {e:#}", node.name));
            }
        }
        if panicking {
            for node in &self.nodes {
                node.print_agent_log_tail(80);
            }
        }
        for node in self.nodes.iter().rev() {
            if node.had_agent.load(Ordering::Relaxed)
                && let Err(e) = node.uninstall()
            {
                errors.push(format!("uninstall on {}: {e:#}", node.name));
            }
            if let Err(e) = remove_pin_dir(&node.bpffs_dir) {
                errors.push(format!("{e:#}"));
            }
        }
        // 3. Namespaces (pods, nodes, fabric), cgroups, anything else with our prefix.
        let netns: Vec<String> = lock(&self.shared.netns).drain(..).rev().collect();
        let cgroup2 = self
            .shared
            .cgroup_root
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut removed = Vec::new();
        if let Err(e) = remove_prefixed(&self.shared.prefix, &cgroup2, &netns, &mut removed) {
            errors.push(format!("{e:#}"));
        }

        if panicking || std::env::var_os("MESH_TEST_KEEP").is_some() {
            eprintln!(
                "mesh-test: cluster {} torn down; logs kept in {}",
                self.shared.prefix,
                self.shared.workdir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.shared.workdir) {
            errors.push(format!("removing {}: {e}", self.shared.workdir.display()));
        }
        errors
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let errors = self.teardown_inner();
        if !errors.is_empty() {
            eprintln!(
                "mesh-test: teardown of {} left problems: {}",
                self.shared.prefix,
                errors.join("; ")
            );
        }
    }
}

/// Duplicate address detection off, so IPv6 addresses are usable at once.
const NO_DAD: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Runs the mesh-agent binary with `args` through `command` (a node's or a pod's).
fn mesh_agent_output(command: impl Fn(&[&str]) -> Command, args: &[&str]) -> std::process::Output {
    let agent = locate_binary("mesh-agent", AGENT_BIN_ENV).expect("the mesh-agent binary");
    let agent = agent.to_str().expect("a UTF-8 path");
    let mut all = vec![agent];
    all.extend_from_slice(args);
    command(&all)
        .output()
        .unwrap_or_else(|e| panic!("running mesh-agent {args:?}: {e}"))
}

/// A node: a network namespace with `eth0` on the fabric, routes to every pod, and
/// possibly a running agent.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    index: usize,
    name: String,
    netns: String,
    netns_path: PathBuf,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    cgroup: PathBuf,
    bpffs_dir: PathBuf,
    next_pod: AtomicUsize,
    agent: Mutex<Option<Process>>,
    had_agent: AtomicBool,
}

impl Node {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Kubernetes node name, `node1`...
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// Fabric address `10.200.0.N`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// Fabric address `fd00:200::N`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// `<cgroup2>/<prefix>/<node>`: what the agent gets as `--cgroup`.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The cgroup the agent process itself runs in (below the node cgroup, as a
    /// DaemonSet pod is below the root cgroup where the hooks are attached).
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup.join(AGENT_CGROUP)
    }

    /// `/sys/fs/bpf/<prefix>-<node>`: what the agent gets as `--bpffs-dir`.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// A command run in this node's namespace (and its `_host` cgroup) through
    /// `mesh-pod exec`, e.g. `node.command(&["ip", "route"])`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut all = vec!["exec", "--"];
        all.extend_from_slice(args);
        self.shared
            .mesh_pod(&self.netns_path, Some(&self.cgroup.join(HOST_CGROUP)), &all)
    }

    /// Runs a command in the node's namespace; its stdout, or an error with its output.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.shared.run(self.command(args))
    }

    /// `mesh-agent ARGS` in the node's namespace (where its agent's admin port is); its
    /// output, whatever its exit status.
    pub fn mesh_agent(&self, args: &[&str]) -> std::process::Output {
        mesh_agent_output(|all| self.command(all), args)
    }

    /// Starts `mesh-agent ARGS` as a long-lived process in the node's namespace (a host
    /// process, as istiod would be), logged as `<node>-<label>`; stopped with the cluster.
    pub fn spawn_mesh_agent(&self, label: &str, args: &[&str]) -> Result<Process> {
        let agent = locate_binary("mesh-agent", AGENT_BIN_ENV)?;
        let agent = agent.to_str().context("a UTF-8 path")?;
        let mut all = vec!["exec", "--", agent];
        all.extend_from_slice(args);
        let cmd =
            self.shared
                .mesh_pod(&self.netns_path, Some(&self.cgroup.join(HOST_CGROUP)), &all);
        self.shared
            .spawn(&self.name, cmd, &format!("{}-{label}", self.name), false)
    }

    /// Starts a host-network echo server (see [`workload::serve`]) on the node.
    pub fn spawn_server(&self, ports: &[u16]) -> Result<Process> {
        let cmd = self.shared.mesh_pod(
            &self.netns_path,
            Some(&self.cgroup.join(HOST_CGROUP)),
            &serve_args(ports)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        self.shared
            .spawn(&self.name, cmd, &format!("{}-serve", self.name), true)
    }

    /// `GET http://127.0.0.1:<port><path>` from inside the node's namespace.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        host::in_netns(&self.netns_path, || {
            workload::http_get(addr, path, Duration::from_secs(5))
        })?
    }

    /// The agent's Prometheus text (`:15020/metrics`).
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = self.http_get(METRICS_PORT, "/metrics")?;
        if status != 200 {
            bail!("{}: GET /metrics returned {status}: {body}", self.name);
        }
        Ok(body)
    }

    /// The agent's `:15000/config_dump` JSON.
    pub fn config_dump(&self) -> Result<serde_json::Value> {
        let (status, body) = self.http_get(ADMIN_PORT, "/config_dump")?;
        if status != 200 {
            bail!("{}: GET /config_dump returned {status}: {body}", self.name);
        }
        serde_json::from_str(&body)
            .with_context(|| format!("{}: /config_dump is not JSON: {body}", self.name))
    }

    /// Starts the agent with `config` and waits (20 s) until `/healthz/ready` is 200.
    pub fn start_agent(&self, config: &Path) -> Result<()> {
        self.spawn_agent(config, &[])?;
        self.wait_agent_ready(AGENT_READY_TIMEOUT)
    }

    /// Starts `mesh-agent run --node <node> --config <config> --cgroup <node cgroup>
    /// --bpffs-dir <dir> <extra...>` in the node's namespace, without waiting.
    pub fn spawn_agent(&self, config: &Path, extra: &[&str]) -> Result<()> {
        self.spawn_agent_from("--config", config, extra, &[])
    }

    /// Like [`Node::spawn_agent`], in Kubernetes mode: `--kubeconfig <kubeconfig>`.
    pub fn spawn_agent_kube(&self, kubeconfig: &Path, extra: &[&str]) -> Result<()> {
        self.spawn_agent_from("--kubeconfig", kubeconfig, extra, &[])
    }

    /// Like [`Node::spawn_agent`], with the agent's command line run by `wrapper` (e.g.
    /// `unshare -m ... sh -c '...; exec "$@"' sh`): the agent's path and arguments follow it.
    pub fn spawn_agent_wrapped(
        &self,
        config: &Path,
        extra: &[&str],
        wrapper: &[&str],
    ) -> Result<()> {
        self.spawn_agent_from("--config", config, extra, wrapper)
    }

    fn spawn_agent_from(
        &self,
        source_flag: &str,
        source: &Path,
        extra: &[&str],
        wrapper: &[&str],
    ) -> Result<()> {
        let mut agent = lock(&self.agent);
        if agent.as_ref().is_some_and(Process::is_running) {
            bail!("{}: the agent is already running", self.name);
        }
        let agent_bin = locate_binary("mesh-agent", AGENT_BIN_ENV)?;
        // Every agent of the cluster shares one development root unless told otherwise.
        let ca_dir = self.shared.workdir.join("ca");
        let own_ca = extra.contains(&"--ca-dir") || extra.contains(&"--ca-address");
        if !own_ca {
            init_ca(&agent_bin, &ca_dir)?;
        }
        let exec = [&["exec", "--"][..], wrapper].concat();
        let mut cmd = self
            .shared
            .mesh_pod(&self.netns_path, Some(&self.agent_cgroup()), &exec);
        cmd.arg(agent_bin)
            .args(["run", "--node", &self.name, source_flag])
            .arg(source)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .args(extra);
        if !own_ca {
            cmd.arg("--ca-dir").arg(&ca_dir);
        }
        // The node's own handoff socket (the default is one per machine).
        if !extra.contains(&"--handoff-socket") {
            cmd.arg("--handoff-socket").arg(self.handoff_socket());
        }
        // Plain log lines: field matching (`src.addr=`) must not meet colour codes.
        cmd.env("NO_COLOR", "1");
        self.had_agent.store(true, Ordering::Relaxed);
        *agent =
            Some(
                self.shared
                    .spawn(&self.name, cmd, &format!("{}-agent", self.name), false)?,
            );
        Ok(())
    }

    /// Where this node's agent offers its listeners to a successor.
    pub fn handoff_socket(&self) -> PathBuf {
        self.shared
            .workdir
            .join(format!("{}-handoff.sock", self.name))
    }

    /// Starts a new agent (`config`, `extra`) beside the running one, as an in-place
    /// upgrade does: it takes the running agent's listeners over the handoff socket. Waits
    /// until the old agent says it handed them over (the new one then serves) and returns
    /// the old process, which drains and exits by itself.
    pub fn take_over_agent(&self, config: &Path, extra: &[&str]) -> Result<Process> {
        let old = lock(&self.agent)
            .take()
            .with_context(|| format!("{}: no agent to take over from", self.name))?;
        self.spawn_agent(config, extra)?;
        let new = self.agent().context("the new agent")?;
        let handed_over = crate::eventually(AGENT_READY_TIMEOUT, || {
            old.log_text().contains(HANDED_OVER) || new.try_wait().is_some()
        });
        if !handed_over || new.try_wait().is_some() {
            bail!(
                "{}: the new agent did not take over within {AGENT_READY_TIMEOUT:?}; old agent's log:\n{}\nnew agent's log:\n{}",
                self.name,
                tail(&old.log_text(), 30),
                tail(&new.log_text(), 60)
            );
        }
        self.wait_agent_ready(AGENT_READY_TIMEOUT)?;
        Ok(old)
    }

    /// Waits until the agent answers 200 on `/healthz/ready`; fails early if it exits.
    pub fn wait_agent_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let process = lock(&self.agent)
                .clone()
                .with_context(|| format!("{}: no agent was started", self.name))?;
            if let Some(status) = process.try_wait() {
                bail!(
                    "{}: the agent exited ({status}) before it was ready; log {}:\n{}",
                    self.name,
                    process.log_path().display(),
                    tail(&process.log_text(), 60)
                );
            }
            let last = match self.http_get(READINESS_PORT, "/healthz/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "{}: the agent is not ready after {timeout:?} (last: {last}); log {}:\n{}",
                    self.name,
                    process.log_path().display(),
                    tail(&process.log_text(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running (or exited) agent process, if one was started.
    pub fn agent(&self) -> Option<Process> {
        lock(&self.agent).clone()
    }

    /// SIGTERM, wait up to 10 s (then SIGKILL). No agent: nothing to do.
    pub fn stop_agent(&self) -> Result<Option<ExitStatus>> {
        match self.agent() {
            Some(p) => Ok(Some(
                p.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10))?,
            )),
            None => Ok(None),
        }
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill_agent(&self) -> Result<Option<ExitStatus>> {
        match self.agent() {
            Some(p) => Ok(Some(p.stop()?)),
            None => Ok(None),
        }
    }

    /// Everything every agent started on this node wrote (stdout and stderr), oldest
    /// first.
    pub fn agent_log(&self) -> String {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.shared.workdir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let stem = format!("{}-agent-", self.name);
        let seq = |p: &PathBuf| -> Option<usize> {
            let name = p.file_name()?.to_str()?;
            name.strip_prefix(&stem)?.strip_suffix(".log")?.parse().ok()
        };
        logs.retain(|p| seq(p).is_some());
        logs.sort_by_key(|p| seq(p));
        logs.iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The access-log lines (those with `dst.addr=`) of every agent run on this node,
    /// colour codes stripped.
    pub fn access_log(&self) -> Vec<String> {
        strip_ansi(&self.agent_log())
            .lines()
            .filter(|l| l.contains("dst.addr"))
            .map(str::to_string)
            .collect()
    }

    fn print_agent_log_tail(&self, lines: usize) {
        if self.had_agent.load(Ordering::Relaxed) {
            eprintln!(
                "---- {} agent log (last {lines} lines) ----\n{}\n---- end of {} agent log ----",
                self.name,
                tail(&self.agent_log(), lines),
                self.name
            );
        }
    }

    /// `mesh-agent uninstall --bpffs-dir <dir>` in the node's namespace.
    pub fn uninstall(&self) -> Result<String> {
        let agent_bin = locate_binary("mesh-agent", AGENT_BIN_ENV)?;
        let mut cmd = self
            .shared
            .mesh_pod(&self.netns_path, None, &["exec", "--"]);
        cmd.arg(agent_bin)
            .arg("uninstall")
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir);
        self.shared.run(cmd)
    }
}

fn serve_args(ports: &[u16]) -> Vec<String> {
    let mut args = vec!["serve".to_string()];
    for port in ports {
        args.push("--port".into());
        args.push(port.to_string());
    }
    args
}

/// Writes a development root with `mesh-agent ca init` into `dir` unless one is there.
pub fn init_ca(agent_bin: &Path, dir: &Path) -> Result<()> {
    if dir.join("root-cert.pem").exists() {
        return Ok(());
    }
    let out = Command::new(agent_bin)
        .args(["ca", "init", "--out"])
        .arg(dir)
        .output()
        .with_context(|| format!("running {} ca init", agent_bin.display()))?;
    if !out.status.success() && !dir.join("root-cert.pem").exists() {
        bail!(
            "mesh-agent ca init --out {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A pod: a network namespace with `eth0` to its node, a cgroup, and whatever
/// processes the test starts in them.
#[derive(Debug)]
pub struct Pod {
    shared: Arc<Shared>,
    spec: PodSpec,
    uid: String,
    node_name: String,
    node_ipv4: Ipv4Addr,
    node_ipv6: Ipv6Addr,
    index: usize,
    netns: String,
    netns_path: PathBuf,
    veth: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    cgroup: PathBuf,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The pod as the API server holds it: running on its node with its addresses.
    pub fn kube_object(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name(), "namespace": self.namespace(), "uid": self.uid(), "labels": self.labels()},
            "spec": {"nodeName": self.node_name(), "serviceAccountName": self.service_account(), "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": self.ipv4().to_string(),
                       "podIPs": [{"ip": self.ipv4().to_string()}, {"ip": self.ipv6().to_string()}],
                       "hostIP": self.host_ips().0.to_string()},
        })
    }

    /// Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.spec.namespace
    }

    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.spec.labels
    }

    pub fn service_account(&self) -> &str {
        &self.spec.service_account
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Index of its node (0 = `node1`).
    pub fn node_index(&self) -> usize {
        self.spec.node
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node's fabric addresses (`status.hostIP`).
    pub fn host_ips(&self) -> (Ipv4Addr, Ipv6Addr) {
        (self.node_ipv4, self.node_ipv6)
    }

    /// Its index among the pods ever created on its node (address `.10 + index`).
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<netns>`, the `mesh-agent.io/netns` annotation.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The node-side end of its veth, in the node's namespace.
    pub fn node_veth(&self) -> &str {
        &self.veth
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }

    pub fn addr_v4(&self, port: u16) -> SocketAddr {
        (self.ipv4, port).into()
    }

    pub fn addr_v6(&self, port: u16) -> SocketAddr {
        (self.ipv6, port).into()
    }

    /// `<cgroup2>/<prefix>/<node>/<pod>`.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts the echo server (see [`workload::serve`]) on `ports`, dual-stack, and
    /// waits until it listens. The cluster kills it at teardown.
    pub fn spawn_server(&self, ports: &[u16]) -> Result<Process> {
        let args = serve_args(ports);
        let cmd = self.mesh_pod(&args.iter().map(String::as_str).collect::<Vec<_>>());
        self.shared.spawn(
            &self.spec.name,
            cmd,
            &format!("{}-serve", self.spec.name),
            true,
        )
    }

    /// Starts the DNS server ([`crate::dns_workload::serve`]) on port 53 answering
    /// `answers` (NXDOMAIN for other names, an empty truncated UDP answer for `truncate`),
    /// and waits until it listens. Its log has a `QUERY` line for every query it got.
    pub fn spawn_dns_server(
        &self,
        answers: &[(&str, IpAddr)],
        truncate: &[&str],
    ) -> Result<Process> {
        self.spawn_dns_server_with(answers, truncate, &[])
    }

    /// [`spawn_dns_server`](Self::spawn_dns_server) with extra `serve-dns` flags
    /// (`--mute`).
    pub fn spawn_dns_server_with(
        &self,
        answers: &[(&str, IpAddr)],
        truncate: &[&str],
        extra: &[&str],
    ) -> Result<Process> {
        let mut args: Vec<String> = vec!["serve-dns".into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        for (name, ip) in answers {
            args.extend(["--answer".into(), format!("{name}={ip}")]);
        }
        for name in truncate {
            args.extend(["--truncate".into(), (*name).to_string()]);
        }
        let cmd = self.mesh_pod(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let process = self.shared.spawn(
            &self.spec.name,
            cmd,
            &format!("{}-dns", self.spec.name),
            false,
        )?;
        process.wait_for_line("READY", Duration::from_secs(10))?;
        Ok(process)
    }

    /// Runs a `mesh-pod` command (not `exec`) in this pod; its stdout, or an error with its
    /// output.
    pub fn run_mesh_pod(&self, args: &[&str]) -> Result<String> {
        self.shared.run(self.mesh_pod(args))
    }

    /// Starts the HTTP echo server ([`crate::http_workload::serve_echo`]) on `port`,
    /// reporting this pod's name, and waits until it listens.
    pub fn spawn_echo(&self, port: u16) -> Result<Process> {
        let port = port.to_string();
        let cmd = self.mesh_pod(&["serve-echo", "--port", &port, "--name", &self.spec.name]);
        self.shared.spawn(
            &self.spec.name,
            cmd,
            &format!("{}-echo", self.spec.name),
            true,
        )
    }

    /// Starts a Bookinfo service ([`crate::bookinfo`]) on 9080 as this pod, its backends at
    /// `backends` (`details`, `reviews`, `ratings` → address), and waits until it listens.
    pub fn spawn_bookinfo(
        &self,
        service: &str,
        version: &str,
        backends: &[(&str, SocketAddr)],
    ) -> Result<Process> {
        let mut args = vec![
            "serve-bookinfo".to_owned(),
            "--service".into(),
            service.into(),
            "--version".into(),
            version.into(),
            "--name".into(),
            self.spec.name.clone(),
        ];
        for (name, addr) in backends {
            args.push("--backend".into());
            args.push(format!("{name}={addr}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.mesh_pod(&args);
        self.shared.spawn(
            &self.spec.name,
            cmd,
            &format!("{}-bookinfo", self.spec.name),
            true,
        )
    }

    /// Runs `mesh-agent waypoint` for the Gateway `namespace/name` in this pod (which
    /// should be labelled `istio.io/dataplane-mode: none` and with the Gateway's name), on
    /// `config`, with the cluster's CA; waits until it says it is ready.
    pub fn spawn_waypoint(
        &self,
        name: &str,
        namespace: &str,
        config: &Path,
        extra: &[&str],
    ) -> Result<Process> {
        self.spawn_l7(
            &["waypoint"],
            name,
            namespace,
            config,
            extra,
            "waypoint ready",
        )
    }

    /// Runs `mesh-agent gateway` (an ingress gateway) as `name` in `namespace` in this pod
    /// (outside the mesh: `istio.io/dataplane-mode: none`), whose labels select the Istio
    /// Gateways it serves, on `config`; waits until it says it is ready.
    pub fn spawn_gateway(
        &self,
        name: &str,
        namespace: &str,
        config: &Path,
        extra: &[&str],
    ) -> Result<Process> {
        self.spawn_l7(
            &["gateway", "--pod", &self.spec.name],
            name,
            namespace,
            config,
            extra,
            "ingress gateway ready",
        )
    }

    fn spawn_l7(
        &self,
        command: &[&str],
        name: &str,
        namespace: &str,
        config: &Path,
        extra: &[&str],
        ready: &str,
    ) -> Result<Process> {
        let agent_bin = locate_binary("mesh-agent", AGENT_BIN_ENV)?;
        let ca_dir = self.shared.workdir.join("ca");
        init_ca(&agent_bin, &ca_dir)?;
        let mut cmd = self.mesh_pod(&["exec", "--"]);
        cmd.arg(agent_bin)
            .args(command)
            .args(["--name", name, "--namespace", namespace, "--config"])
            .arg(config)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--service-account", self.service_account()])
            .args(extra);
        cmd.env("NO_COLOR", "1");
        let process = self.shared.spawn(
            &self.spec.name,
            cmd,
            &format!("{}-{}", self.spec.name, command[0]),
            false,
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !process.log_text().contains(ready) {
            if !process.is_running() || Instant::now() > deadline {
                bail!(
                    "{} {namespace}/{name} did not start: {}",
                    command[0],
                    process.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }

    /// An HTTPS GET from this pod to `to` with `sni` ([`crate::http_workload::tls_get`]).
    pub fn tls_get(
        &self,
        to: SocketAddr,
        sni: &str,
        path: &str,
    ) -> Result<crate::http_workload::TlsReply> {
        let to = to.to_string();
        let out = self
            .shared
            .run(self.mesh_pod(&["tls-get", "--to", &to, "--sni", sni, "--path", path]))?;
        serde_json::from_str(out.trim()).with_context(|| format!("reading tls-get output: {out}"))
    }

    /// Sends `calls` from this pod to `to` over one keep-alive connection (HTTP/2 with
    /// prior knowledge when `h2`) and returns every reply.
    pub fn http_calls(
        &self,
        to: SocketAddr,
        h2: bool,
        calls: &[crate::http_workload::Call],
    ) -> Result<Vec<crate::http_workload::Reply>> {
        let to = to.to_string();
        let calls = serde_json::to_string(calls)?;
        let mut args = vec![
            "http-calls",
            "--to",
            &to,
            "--calls",
            &calls,
            "--timeout-ms",
            "120000",
        ];
        if h2 {
            args.push("--h2");
        }
        let out = self.shared.run(self.mesh_pod(&args))?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("reading http-calls output: {out}"))
    }

    /// Calls the gRPC echo at `to` (`mesh-pod grpc-call`): `method` is
    /// [`crate::grpc_workload::UNARY`] or [`crate::grpc_workload::STREAM`].
    pub fn grpc_call(
        &self,
        to: SocketAddr,
        method: &str,
        messages: &[crate::grpc_workload::EchoRequest],
        headers: &[(&str, &str)],
    ) -> Result<crate::grpc_workload::Outcome> {
        let to = to.to_string();
        let messages = serde_json::to_string(messages)?;
        let headers = serde_json::to_string(headers)?;
        let out = self.shared.run(self.mesh_pod(&[
            "grpc-call",
            "--to",
            &to,
            "--method",
            method,
            "--messages",
            &messages,
            "--headers",
            &headers,
        ]))?;
        serde_json::from_str(out.trim()).with_context(|| format!("reading grpc-call output: {out}"))
    }

    /// Starts any command in the pod, in the background; killed at teardown.
    pub fn spawn(&self, args: &[&str]) -> Result<Process> {
        let cmd = self.command(args);
        self.shared.spawn(
            &self.spec.name,
            cmd,
            &format!("{}-proc", self.spec.name),
            false,
        )
    }

    /// Runs `mesh-pod connect` in the pod (10 s timeout): connect, check a `bytes`
    /// echo. `Ok` with `ok: false` when the connection failed; `Err` only when the
    /// client itself could not run.
    pub fn connect(&self, to: SocketAddr, bytes: u64) -> Result<ConnectReport> {
        self.connect_timeout(to, bytes, Duration::from_secs(10))
    }

    /// [`connect`](Self::connect) with a timeout for the connect and for each read or
    /// write (use a short one where failure is expected).
    pub fn connect_timeout(
        &self,
        to: SocketAddr,
        bytes: u64,
        timeout: Duration,
    ) -> Result<ConnectReport> {
        self.run_connect(to, bytes, timeout, &[])
    }

    /// [`connect`](Self::connect), sending at once instead of after the server's PEER
    /// line: bytes are in flight before the proxy has looked at the connection.
    pub fn connect_eager(&self, to: SocketAddr, bytes: u64) -> Result<ConnectReport> {
        self.run_connect(to, bytes, Duration::from_secs(10), &["--eager"])
    }

    /// [`connect`](Self::connect) as request and response: `turns` writes of an equal
    /// share of `bytes`, each echoed in full before the next.
    pub fn connect_in_turns(
        &self,
        to: SocketAddr,
        bytes: u64,
        turns: u32,
    ) -> Result<ConnectReport> {
        let turns = turns.to_string();
        self.run_connect(to, bytes, Duration::from_secs(10), &["--turns", &turns])
    }

    fn run_connect(
        &self,
        to: SocketAddr,
        bytes: u64,
        timeout: Duration,
        extra: &[&str],
    ) -> Result<ConnectReport> {
        let to = to.to_string();
        let bytes = bytes.to_string();
        let timeout_ms = timeout.as_millis().to_string();
        let mut args = vec![
            "connect",
            "--to",
            &to,
            "--bytes",
            &bytes,
            "--timeout-ms",
            &timeout_ms,
        ];
        args.extend_from_slice(extra);
        let mut cmd = self.mesh_pod(&args);
        let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'));
        match line.map(serde_json::from_str::<ConnectReport>) {
            Some(Ok(report)) => Ok(report),
            _ => bail!(
                "{}: `mesh-pod connect --to {to}` printed no report ({}):\nstdout: {}\nstderr: {}",
                self.spec.name,
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }
    }

    /// A command run in the pod's namespace and cgroup through `mesh-pod exec`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut all = vec!["exec", "--"];
        all.extend_from_slice(args);
        self.mesh_pod(&all)
    }

    /// Runs a command in the pod; its stdout, or an error with its output.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.shared.run(self.command(args))
    }

    /// `mesh-agent ARGS` in the pod's namespace (an operator's view from that pod); its
    /// output, whatever its exit status.
    pub fn mesh_agent(&self, args: &[&str]) -> std::process::Output {
        mesh_agent_output(|all| self.command(all), args)
    }

    fn mesh_pod(&self, args: &[&str]) -> Command {
        self.shared
            .mesh_pod(&self.netns_path, Some(&self.cgroup), args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_unique_and_decode_to_the_pid() {
        let a = new_prefix();
        let b = new_prefix();
        assert_ne!(a, b);
        assert_eq!(a.len(), 8);
        // The longest names stay within IFNAMSIZ - 1 = 15 characters.
        assert!(format!("{a}n99p200").len() <= 15);
        assert_eq!(
            prefix_pid(&format!("{a}n1p0")),
            Some((a, std::process::id()))
        );
        assert_eq!(prefix_pid("mesh-agent"), None);
    }

    #[test]
    fn colour_codes_are_stripped_from_log_lines() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[3msrc.addr\u{1b}[0m\u{1b}[2m=\u{1b}[0m10.201.1.10:4000";
        assert_eq!(strip_ansi(line), "2026  INFO src.addr=10.201.1.10:4000");
    }

    #[test]
    fn base36_is_fixed_width() {
        assert_eq!(base36(0, 5), "00000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(4_194_304, 5), "2hwcg");
    }
}
