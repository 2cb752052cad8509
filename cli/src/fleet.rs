//! Starting and stopping `bizq-scheduler` / `bizq-worker` child processes for the demo.

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
    let bin = crate::bin_dir()?.join(format!("bizq-{kind}"));
    let mut cmd = Command::new(&bin);
    cmd.arg("--config")
        .arg(config)
        .args(extra)
        .env("DATABASE_URL", url)
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
