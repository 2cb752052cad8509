//! Child fleets: starting, measuring and stopping `bizq-scheduler` / `bizq-worker` processes
//! from the binary beside the caller's (`bizq demo`, `bizq-bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Why a fleet member could not be started or measured.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("locating the running binary's directory: {0}")]
    BinDir(std::io::Error),
    #[error("creating the log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {path} (build it with `cargo build --workspace --bins`): {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} has exited")]
    Exited(String),
    #[error("reading {path}: {detail}")]
    Proc { path: String, detail: String },
}

/// A child process of the fleet.
pub struct Member {
    pub name: String,
    pub child: Child,
}

/// The directory of the running binary, where `bizq-scheduler` and `bizq-worker` are built.
pub fn bin_dir() -> Result<PathBuf, FleetError> {
    let exe = std::env::current_exe().map_err(FleetError::BinDir)?;
    exe.parent().map(Path::to_path_buf).ok_or_else(|| {
        FleetError::BinDir(std::io::Error::other("the binary has no parent directory"))
    })
}

/// Starts `bizq-<kind>` (from [`bin_dir`]) with the given config file, extra arguments and
/// extra environment variables (an API key the config names), logging to `log` or nowhere.
pub fn spawn(
    kind: &str,
    name: &str,
    url: &str,
    config: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    log: Option<&Path>,
) -> Result<Member, FleetError> {
    let bin = bin_dir()?.join(format!("bizq-{kind}"));
    let mut cmd = Command::new(&bin);
    cmd.arg("--config")
        .arg(config)
        .args(extra)
        .env("DATABASE_URL", url)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match log {
        Some(path) => {
            let log_error = |source| FleetError::Log {
                path: path.to_path_buf(),
                source,
            };
            let file = std::fs::File::create(path).map_err(log_error)?;
            cmd.stdout(file.try_clone().map_err(log_error)?)
                .stderr(file);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = cmd.spawn().map_err(|source| FleetError::Spawn {
        path: bin.clone(),
        source,
    })?;
    Ok(Member {
        name: name.to_string(),
        child,
    })
}

impl Member {
    /// The process's peak resident set so far (`VmHWM` in `/proc/<pid>/status`), in bytes.
    pub fn peak_rss_bytes(&self) -> Result<u64, FleetError> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| FleetError::Exited(self.name.clone()))?;
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).map_err(|e| FleetError::Proc {
            path: path.clone(),
            detail: format!("{e} (Linux only)"),
        })?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| FleetError::Proc {
                path,
                detail: "no VmHWM line".into(),
            })?;
        Ok(kib * 1024)
    }
}

/// SIGTERM every member, then wait for each (30 s, then SIGKILL); returns (name, exit code).
pub async fn stop(members: Vec<Member>) -> Vec<(String, Option<i32>)> {
    for m in &members {
        if let Some(pid) = m.child.id() {
            // Plain kill(2) through the `kill` command keeps the crate free of `unsafe`.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    let mut out = Vec::new();
    for mut m in members {
        let code =
            match tokio::time::timeout(std::time::Duration::from_secs(30), m.child.wait()).await {
                Ok(Ok(s)) => s.code(),
                _ => {
                    let _ = m.child.kill().await;
                    None
                }
            };
        out.push((m.name, code));
    }
    out
}
