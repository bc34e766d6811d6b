//! Finding a Kubernetes pod's network namespace from /proc (Kubernetes mode, where a pod
//! carries no `mesh-agent.io/netns` annotation): a process belongs to the pod when its cgroup
//! path names the pod UID in one of the layouts kubelet produces, and that process's
//! `/proc/PID/ns/net` is the pod's network namespace.
//!
//! Layouts recognised (`<uid>` is the pod UID, `<uid_>` the same with `_` for `-`):
//! - systemd cgroup driver: `.../kubepods-burstable-pod<uid_>.slice/...`,
//!   `kubepods-besteffort-pod<uid_>.slice`, `kubepods-pod<uid_>.slice` (guaranteed), with
//!   any kubelet cgroup root in front (the slice only has to end in `-pod<uid_>.slice`);
//! - cgroupfs driver: `.../kubepods/burstable/pod<uid>/<container>`, `.../kubepods/pod<uid>/...`;
//! - containers below the pod: containerd `cri-containerd-<id>.scope` (or `<id>`), CRI-O
//!   `crio-<id>.scope` (or `crio-<id>`), docker `docker-<id>.scope`. CRI-O's monitor
//!   `crio-conmon-<id>` lives in the pod's cgroup but in the host network namespace, so it
//!   never matches.
//!
//! Both cgroup v2 (`0::/path`) and v1 (`ID:controllers:/path`) lines are read, and paths
//! relative to the reader's cgroup namespace (`0::/../../kubepods.slice/...`, what a
//! containerised agent with a private cgroup namespace sees) match too. As a second guard a
//! process whose network namespace is the host's (that of `<proc>/1`, or the agent's own:
//! the agent runs in the host network namespace) is skipped: a host-network pod has no
//! namespace of its own to enroll.
#![forbid(unsafe_code)]

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where procfs is mounted when nothing else is said.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// The procfs the agent reads: `/proc` by default; in a container with `hostPID: true` that
/// is the host's, and a host procfs mounted elsewhere (e.g. `/host/proc`) works the same.
/// Tests point it at a fake tree or use the real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRoot(PathBuf);

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot(PathBuf::from(DEFAULT_PROC_ROOT))
    }
}

impl ProcRoot {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProcRoot(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// [`find_pod_netns`] under this procfs.
    pub fn find_pod_netns(&self, pod_uid: &str) -> Result<Option<PathBuf>, DiscoveryError> {
        find_pod_netns(&self.0, pod_uid)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid pod UID {uid:?}: expected letters, digits and `-` (a UUID)")]
    InvalidUid { uid: String },
    #[error("listing processes in {path}: {source}")]
    ListProcesses { path: PathBuf, source: io::Error },
    #[error("reading the host network namespace {path}: {source}")]
    HostNetns { path: PathBuf, source: io::Error },
    #[error(
        "pod {pod_uid}: process {pid} belongs to the pod but its network namespace {path} cannot \
         be read: {source} (reading another process's namespace needs CAP_SYS_PTRACE, and \
         hostPID in a container)"
    )]
    Netns {
        pod_uid: String,
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
}

/// The network namespace of pod `pod_uid` as `<proc_root>/<pid>/ns/net` of one of its
/// processes, or `None` when no process of the pod runs yet (the sandbox is still being
/// created: the caller retries).
///
/// Of the pod's processes outside the host network namespace the one with the lowest PID is
/// chosen, so repeated calls give the same path while it lives (usually the sandbox's
/// `pause`, which starts first and lives as long as the namespace). The path is only as
/// stable as that process: open it right away.
pub fn find_pod_netns(proc_root: &Path, pod_uid: &str) -> Result<Option<PathBuf>, DiscoveryError> {
    if !valid_uid(pod_uid) {
        return Err(DiscoveryError::InvalidUid {
            uid: pod_uid.to_owned(),
        });
    }
    let host = host_netns_ids(proc_root)?;
    let entries = fs::read_dir(proc_root).map_err(|source| DiscoveryError::ListProcesses {
        path: proc_root.to_owned(),
        source,
    })?;
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();

    let mut unreadable = None;
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        // A process that exited meanwhile has no file any more: not the pod's.
        let Ok(cgroups) = fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if !cgroups.lines().any(|l| cgroup_matches_pod(l, pod_uid)) {
            continue;
        }
        let netns = dir.join("ns").join("net");
        match fs::metadata(&netns) {
            Ok(m) if host.contains(&(m.dev(), m.ino())) => continue,
            Ok(_) => return Ok(Some(netns)),
            Err(e) if vanished(&e) => continue,
            Err(source) => {
                unreadable.get_or_insert(DiscoveryError::Netns {
                    pod_uid: pod_uid.to_owned(),
                    pid,
                    path: netns,
                    source,
                });
            }
        }
    }
    unreadable.map_or(Ok(None), Err)
}

/// Whether one line of `/proc/PID/cgroup` (`hierarchy-ID:controllers:path`, v1 or v2)
/// places the process in pod `pod_uid`, in a cgroup layout kubelet produces. CRI-O's
/// `crio-conmon-*` cgroups never match (conmon runs in the host network namespace).
pub fn cgroup_matches_pod(cgroup_line: &str, pod_uid: &str) -> bool {
    if !valid_uid(pod_uid) {
        return false;
    }
    let mut fields = cgroup_line.trim_end().splitn(3, ':');
    let (Some(_hierarchy), Some(_controllers), Some(path)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let cgroupfs_pod = format!("pod{pod_uid}");
    let systemd_pod = format!("-pod{}.slice", pod_uid.replace('-', "_"));
    let mut components = path.split('/').filter(|c| !c.is_empty());
    let in_pod = components.any(|c| c == cgroupfs_pod || is_systemd_pod_slice(c, &systemd_pod));
    // Below the pod's cgroup: any container but CRI-O's monitor.
    in_pod && !components.any(|c| c.starts_with("crio-conmon-"))
}

/// `kubepods-burstable-pod<uid_>.slice` and friends: a non-empty kubelet prefix, then
/// `-pod<uid_>.slice`.
fn is_systemd_pod_slice(component: &str, suffix: &str) -> bool {
    component.len() > suffix.len() && component.ends_with(suffix)
}

/// Pod UIDs are UUIDs (static pods: a hex hash); anything else cannot be matched safely.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The host's network namespace (that of `<proc_root>/1`) and the agent's own (a
/// host-network DaemonSet pod: the same one) as (dev, inode). Either may be unreadable
/// (a supervisor PID 1 with more capabilities than the agent), not both.
fn host_netns_ids(proc_root: &Path) -> Result<Vec<(u64, u64)>, DiscoveryError> {
    let init = proc_root.join("1").join("ns").join("net");
    let own = Path::new(DEFAULT_PROC_ROOT)
        .join("self")
        .join("ns")
        .join("net");
    let init_id = fs::metadata(&init).map(|m| (m.dev(), m.ino()));
    let own_id = fs::metadata(&own).map(|m| (m.dev(), m.ino()));
    match (init_id, own_id) {
        (Err(source), Err(_)) => Err(DiscoveryError::HostNetns { path: init, source }),
        (init_id, own_id) => Ok(init_id.into_iter().chain(own_id).collect()),
    }
}

/// The process exited between listing and reading it.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7a1c9a3e-5b0f-4c6e-9d21-0f3b8e6a4c12";
    const UID_: &str = "7a1c9a3e_5b0f_4c6e_9d21_0f3b8e6a4c12";
    const OTHER: &str = "0b8e6a4c-9d21-4c6e-5b0f-7a1c9a3e3f12";
    const CTR: &str = "4f9e8d7c6b5a493827161504f3e2d1c0b9a8f7e6d5c4b3a29180706f5e4d3c2b";

    fn line(path: &str) -> String {
        format!("0::{path}")
    }

    #[test]
    fn cgroup_line_matches_pod_in_every_kubelet_layout() {
        let cases: Vec<(&str, String, bool)> = vec![
            // systemd driver, containerd
            (
                "systemd_containerd_burstable",
                line(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CTR}.scope"
                )),
                true,
            ),
            (
                "systemd_containerd_besteffort",
                line(&format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope"
                )),
                true,
            ),
            (
                "systemd_containerd_guaranteed_kubepods_pod_slice",
                line(&format!(
                    "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CTR}.scope"
                )),
                true,
            ),
            (
                "systemd_custom_kubelet_cgroup_root",
                line(&format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope"
                )),
                true,
            ),
            // systemd driver, CRI-O
            (
                "systemd_crio_container",
                line(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CTR}.scope"
                )),
                true,
            ),
            (
                "systemd_crio_conmon_is_skipped",
                line(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CTR}.scope"
                )),
                false,
            ),
            // systemd driver, docker (cri-dockerd)
            (
                "systemd_docker_container",
                line(&format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CTR}.scope"
                )),
                true,
            ),
            // cgroupfs driver
            (
                "cgroupfs_containerd_burstable",
                line(&format!("/kubepods/burstable/pod{UID}/{CTR}")),
                true,
            ),
            (
                "cgroupfs_containerd_besteffort",
                line(&format!("/kubepods/besteffort/pod{UID}/{CTR}")),
                true,
            ),
            (
                "cgroupfs_guaranteed_kubepods_pod",
                line(&format!("/kubepods/pod{UID}/{CTR}")),
                true,
            ),
            (
                "cgroupfs_crio_container",
                line(&format!("/kubepods/burstable/pod{UID}/crio-{CTR}")),
                true,
            ),
            (
                "cgroupfs_crio_conmon_is_skipped",
                line(&format!("/kubepods/burstable/pod{UID}/crio-conmon-{CTR}")),
                false,
            ),
            (
                "cgroupfs_pod_cgroup_itself",
                line(&format!("/kubepods/burstable/pod{UID}")),
                true,
            ),
            // cgroup v1 lines
            (
                "v1_memory_cgroupfs",
                format!("12:memory:/kubepods/burstable/pod{UID}/{CTR}"),
                true,
            ),
            (
                "v1_cpu_cpuacct_systemd",
                format!(
                    "4:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CTR}.scope"
                ),
                true,
            ),
            (
                "v1_named_systemd_hierarchy",
                format!(
                    "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CTR}.scope"
                ),
                true,
            ),
            (
                "v1_crio_conmon_is_skipped",
                format!("9:pids:/kubepods/besteffort/pod{UID}/crio-conmon-{CTR}"),
                false,
            ),
            // what a containerised reader in its own cgroup namespace sees
            (
                "cgroup_namespace_relative_systemd_path",
                line(&format!(
                    "/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope"
                )),
                true,
            ),
            // not the pod
            (
                "other_pod_systemd",
                line(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CTR}.scope",
                    OTHER.replace('-', "_")
                )),
                false,
            ),
            (
                "other_pod_cgroupfs",
                line(&format!("/kubepods/burstable/pod{OTHER}/{CTR}")),
                false,
            ),
            (
                "systemd_slice_with_dashes_is_not_kubelet_escaping",
                line(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice/cri-containerd-{CTR}.scope"
                )),
                false,
            ),
            (
                "cgroupfs_uid_with_underscores_is_not_cgroupfs",
                line(&format!("/kubepods/burstable/pod{UID_}/{CTR}")),
                false,
            ),
            (
                "uid_as_prefix_of_a_longer_pod_name",
                line(&format!("/kubepods/burstable/pod{UID}0/{CTR}")),
                false,
            ),
            (
                "uid_only_as_a_container_directory",
                line(&format!("/kubepods/burstable/pod{OTHER}/{UID}")),
                false,
            ),
            (
                "systemd_slice_without_kubelet_prefix",
                line(&format!("/pod{UID_}.slice/cri-containerd-{CTR}.scope")),
                false,
            ),
            (
                "host_containerd_service",
                line("/system.slice/containerd.service"),
                false,
            ),
            ("root_cgroup", line("/"), false),
            ("malformed_line", format!("pod{UID}"), false),
            ("empty_line", String::new(), false),
        ];
        for (name, l, want) in cases {
            assert_eq!(cgroup_matches_pod(&l, UID), want, "{name}: {l}");
        }
    }

    #[test]
    fn cgroup_line_never_matches_an_empty_or_path_like_uid() {
        let l = line(&format!("/kubepods/burstable/pod{UID}/{CTR}"));
        for uid in ["", "/", "..", &format!("{UID}/{CTR}")] {
            assert!(!cgroup_matches_pod(&l, uid), "uid {uid:?}");
        }
    }

    /// A fake procfs: `<root>/<pid>/cgroup` and `<root>/<pid>/ns/net` (a regular file, so
    /// (dev, inode) identify it as they do a namespace), removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!(
                "mesh-discovery-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            let p = FakeProc(root);
            p.process(1, "0::/init.scope\n", None);
            p
        }

        /// A process with this cgroup file; its netns is a new file, or a hard link to
        /// `same_netns_as`'s.
        fn process(&self, pid: u32, cgroup: &str, same_netns_as: Option<u32>) -> PathBuf {
            let ns = self.0.join(pid.to_string()).join("ns");
            fs::create_dir_all(&ns).unwrap();
            fs::write(self.0.join(pid.to_string()).join("cgroup"), cgroup).unwrap();
            let net = ns.join("net");
            match same_netns_as {
                Some(other) => {
                    fs::hard_link(self.0.join(other.to_string()).join("ns/net"), &net).unwrap()
                }
                None => fs::write(&net, b"").unwrap(),
            }
            net
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn v2(path: &str) -> String {
        format!("1:name=systemd:{path}\n0::{path}\n")
    }

    #[test]
    fn find_pod_netns_picks_the_lowest_pid_outside_the_host_netns() {
        let proc = FakeProc::new("lowest");
        let pod =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        // conmon: in the pod's cgroup, in the host netns; lowest pid, must be skipped.
        proc.process(10, &v2(&format!("{pod}/crio-conmon-{CTR}.scope")), Some(1));
        // a host-network container of the pod: skipped by its namespace.
        proc.process(11, &v2(&format!("{pod}/crio-aaaa.scope")), Some(1));
        proc.process(12, &v2("/system.slice/kubelet.service"), None);
        let pause = proc.process(20, &v2(&format!("{pod}/crio-{CTR}.scope")), None);
        proc.process(30, &v2(&format!("{pod}/crio-bbbb.scope")), Some(20));
        proc.process(31, &v2(&format!("/kubepods/burstable/pod{OTHER}/x")), None);
        fs::create_dir_all(proc.0.join("self-not-a-pid")).unwrap();

        assert_eq!(find_pod_netns(&proc.0, UID).unwrap(), Some(pause.clone()));
        assert_eq!(
            ProcRoot::new(&proc.0).find_pod_netns(UID).unwrap(),
            Some(pause)
        );
    }

    #[test]
    fn find_pod_netns_is_none_without_a_process_of_the_pod() {
        let proc = FakeProc::new("none");
        proc.process(
            5,
            &v2(&format!("/kubepods/besteffort/pod{OTHER}/{CTR}")),
            None,
        );
        assert_eq!(find_pod_netns(&proc.0, UID).unwrap(), None);
    }

    #[test]
    fn find_pod_netns_is_none_for_a_host_network_pod() {
        let proc = FakeProc::new("hostnet");
        proc.process(
            7,
            &v2(&format!("/kubepods/besteffort/pod{UID}/{CTR}")),
            Some(1),
        );
        assert_eq!(find_pod_netns(&proc.0, UID).unwrap(), None);
    }

    #[test]
    fn find_pod_netns_skips_processes_that_exited() {
        let proc = FakeProc::new("exited");
        // pid 8 is listed but its files are gone (it exited between readdir and read).
        fs::create_dir_all(proc.0.join("8")).unwrap();
        let pod = proc.process(9, &v2(&format!("/kubepods/pod{UID}/{CTR}")), None);
        // pid 6 matches but its namespace link is gone (a zombie).
        fs::create_dir_all(proc.0.join("6")).unwrap();
        fs::write(
            proc.0.join("6/cgroup"),
            v2(&format!("/kubepods/pod{UID}/x")),
        )
        .unwrap();
        assert_eq!(find_pod_netns(&proc.0, UID).unwrap(), Some(pod));
    }

    #[test]
    fn find_pod_netns_errors_name_what_is_wrong() {
        let proc = FakeProc::new("errors");
        let err = find_pod_netns(&proc.0, "../etc").unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidUid { .. }), "{err}");

        let missing = proc.0.join("nope");
        let err = find_pod_netns(&missing, UID).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }
}
