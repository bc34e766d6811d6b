//! The node's kubelet, whose health probes must reach enrolled pods even under STRICT
//! PeerAuthentication. Istio source-NATs kubelet probes to 169.254.7.127 and exempts that
//! address; here the kernel programs recognise the kubelet by its cgroup: a connection its
//! processes open to an enrolled pod is recorded (both ends) and the pod's `sk_lookup`
//! lets it reach the application directly. Other host processes, host-network pods
//! included, stay subject to the pod's policies. This module finds the kubelet's cgroup:
//! given explicitly (`--kubelet-cgroup`), or the cgroup, under the one the agent captures,
//! of a process whose name is `kubelet`.

use std::{
    collections::VecDeque,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The process name the kubelet runs under.
pub const KUBELET_COMM: &str = "kubelet";
/// How many cgroup directories the search reads at most (a node has a few thousand).
const MAX_CGROUPS: usize = 50_000;

/// The cgroup id of a cgroup v2 directory, as `bpf_get_current_cgroup_id()` returns it
/// for the processes in it: the directory's inode number.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// The cgroups under `cgroup_root` (itself included) that hold a process named
/// [`KUBELET_COMM`], shallowest first. `proc_root` is the host's /proc.
pub fn find_kubelet_cgroups(cgroup_root: &Path, proc_root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut queue = VecDeque::from([cgroup_root.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        seen += 1;
        if seen > MAX_CGROUPS {
            break;
        }
        if holds_kubelet(&dir, proc_root) {
            found.push(dir.clone());
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    found
}

fn holds_kubelet(cgroup: &Path, proc_root: &Path) -> bool {
    let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) else {
        return false;
    };
    procs.lines().any(|pid| {
        std::fs::read_to_string(proc_root.join(pid.trim()).join("comm"))
            .is_ok_and(|comm| comm.trim_end() == KUBELET_COMM)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup tree and /proc: `cgroup.procs` files and `<pid>/comm` files.
    struct Fake(PathBuf);

    impl Fake {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("mesh-agent-probes-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Fake(dir)
        }

        fn cgroup(&self, path: &str, pids: &[u32]) {
            let dir = self.0.join("cg").join(path);
            std::fs::create_dir_all(&dir).unwrap();
            let procs: String = pids.iter().map(|p| format!("{p}\n")).collect();
            std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
        }

        fn process(&self, pid: u32, comm: &str) {
            let dir = self.0.join("proc").join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_the_cgroups_holding_a_process_named_kubelet() {
        let fake = Fake::new("find");
        fake.cgroup("", &[1]);
        fake.cgroup("system.slice", &[]);
        fake.cgroup("system.slice/kubelet.service", &[40, 41]);
        fake.cgroup("system.slice/containerd.service", &[50]);
        fake.cgroup("kubepods.slice/pod1", &[60]);
        fake.process(1, "systemd");
        fake.process(40, "kubelet");
        fake.process(41, "kubelet-plugin");
        fake.process(50, "containerd");
        fake.process(60, "kubelet-not");
        let found = find_kubelet_cgroups(&fake.0.join("cg"), &fake.0.join("proc"));
        assert_eq!(found, [fake.0.join("cg/system.slice/kubelet.service")]);
        // A tree without a kubelet: nothing (the caller says so).
        assert!(
            find_kubelet_cgroups(&fake.0.join("cg/kubepods.slice"), &fake.0.join("proc"))
                .is_empty()
        );
    }

    #[test]
    fn a_cgroup_id_is_the_directory_inode() {
        let fake = Fake::new("id");
        fake.cgroup("a", &[]);
        let dir = fake.0.join("cg/a");
        assert_eq!(
            cgroup_id(&dir).unwrap(),
            std::fs::metadata(&dir).unwrap().ino()
        );
        assert!(cgroup_id(&fake.0.join("cg/missing")).is_err());
    }
}
