//! Network namespaces: open one by path and run short, blocking sections (socket creation,
//! netlink setup) inside it from any thread, returning to the agent's own namespace after.
//! Sockets keep the namespace they were created in, so one runtime serves every pod.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};

/// The namespace the agent itself runs in (the node's), opened once at start-up.
static HOST: OnceLock<File> = OnceLock::new();

/// Remembers the agent's own network namespace. Call once, before any `Netns::run`.
pub fn init_host() -> io::Result<()> {
    if HOST.get().is_none() {
        let _ = HOST.set(File::open("/proc/self/ns/net")?);
    }
    Ok(())
}

/// An open handle to a pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Ok(Netns {
            path: path.to_owned(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this namespace, then switches back.
    /// `f` must not block for long nor yield to an async runtime.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        let host = HOST
            .get()
            .ok_or_else(|| io::Error::other("host netns not initialised"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        // Failing to return would leave a runtime thread in a pod's namespace: fatal.
        if let Err(e) = setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the host network namespace");
            std::process::abort();
        }
        Ok(result)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
