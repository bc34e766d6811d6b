//! Running the tools xtask drives (cargo, rustup, apt-get, the demo): one place that
//! knows the workspace root, the cargo in use and a PATH that includes cargo's bin dir.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace and the environment every child process is started with.
pub struct Env {
    /// Repository root (the workspace `Cargo.toml` lives here).
    pub root: PathBuf,
    /// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
    cargo: OsString,
    /// `PATH` with `$CARGO_HOME/bin` in front when it was missing, so a freshly
    /// installed `bpf-linker` (and rustup) is found by us and by `aya-build`.
    path: OsString,
}

impl Env {
    pub fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        if let Some(bin) = cargo_home().map(|h| h.join("bin"))
            && !dirs.contains(&bin)
        {
            dirs.insert(0, bin);
        }
        let path = std::env::join_paths(dirs).context("PATH holds an invalid entry")?;
        Ok(Self { root, cargo, path })
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A command run from the workspace root with our PATH.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        cmd
    }

    /// `cargo` (the toolchain that runs xtask) from the workspace root.
    pub fn cargo(&self) -> Command {
        self.command(&self.cargo)
    }

    /// Whether `name` is an executable in PATH or in the usual sbin directories
    /// (a non-root PATH often lacks them, and `ip` lives there).
    pub fn find_program(&self, name: &str) -> Option<PathBuf> {
        std::env::split_paths(&self.path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    }

    /// `target_directory` from `cargo metadata` (honours CARGO_TARGET_DIR and config).
    pub fn target_dir(&self) -> Result<PathBuf> {
        let out = self
            .cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .stderr(Stdio::inherit())
            .output()
            .context("running `cargo metadata`")?;
        if !out.status.success() {
            bail!("`cargo metadata` failed with {}", out.status);
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
        let dir = meta["target_directory"]
            .as_str()
            .context("`cargo metadata` output has no target_directory")?;
        Ok(PathBuf::from(dir))
    }
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Shell-like rendering of a command, for the log line and error messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    // `$CARGO` is an absolute path into the toolchain; show it as plain `cargo`.
    if Path::new(&parts[0]).file_name() == Some(OsStr::new("cargo")) {
        parts[0] = "cargo".into();
    }
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; returns its status after logging the command.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    let shown = display(cmd);
    eprintln!("xtask: $ {shown}");
    cmd.status()
        .with_context(|| format!("cannot start `{shown}`"))
}

/// Runs `cmd` and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it could not start or failed.
pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd`, forwarding its stdout line by line to ours and handing each line to
/// `on_line` (used to total up libtest's `test result:` lines). stderr is inherited.
pub fn run_tee(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<ExitStatus> {
    let shown = display(cmd);
    eprintln!("xtask: $ {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut reader = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut stdout = std::io::stdout();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .context("reading test output")?
            == 0
        {
            break;
        }
        stdout.write_all(&line).ok();
        stdout.flush().ok();
        on_line(&String::from_utf8_lossy(&line));
    }
    child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))
}

/// Whether we run as root (effective uid 0), from /proc/self/status.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
