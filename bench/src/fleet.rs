//! Starting, measuring and stopping the `bizq-scheduler` / `bizq-worker` child processes of
//! the benchmark's fleets.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use tokio::process::{Child, Command};

/// A child process of the fleet.
pub struct Member {
    pub name: String,
    pub child: Child,
}

/// Starts `bizq-<kind>` with the given config file and extra arguments.
pub fn spawn(
    kind: &str,
    name: &str,
    url: &str,
    config: &Path,
    extra: &[&str],
    log: Option<&Path>,
) -> anyhow::Result<Member> {
    spawn_env(kind, name, url, config, extra, &[], log)
}

/// [`spawn`] with extra environment variables (an API key the config names).
pub fn spawn_env(
    kind: &str,
    name: &str,
    url: &str,
    config: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    log: Option<&Path>,
) -> anyhow::Result<Member> {
    let bin = crate::bin_dir()?.join(format!("bizq-{kind}"));
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
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "starting {} (build it with `cargo build --release`)",
            bin.display()
        )
    })?;
    Ok(Member {
        name: name.to_string(),
        child,
    })
}

impl Member {
    /// The process's peak resident set so far (`VmHWM` in `/proc/<pid>/status`), in bytes.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("the process has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status (Linux only)"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no VmHWM line in /proc/{pid}/status"))?;
        Ok(kib * 1024)
    }
}

/// SIGTERM every member, then wait for each; returns (name, exit code).
pub async fn stop(members: Vec<Member>) -> Vec<(String, Option<i32>)> {
    for m in &members {
        if let Some(pid) = m.child.id() {
            // SAFETY-free: plain kill(2) through the `kill` command keeps this crate unsafe-free.
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
