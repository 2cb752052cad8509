//! `bizq-bench`: the benchmark quoted in docs/benchmark.md (the scenarios are in
//! `scenarios.rs` and `providers.rs`), kept out of the operator's `bizq` CLI.

mod providers;
mod scenarios;
mod stand_in;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Measure the engine end to end, raw SQL through pgbench, the claim statement, the floor,
/// the dashboards, and AI providers against a stand-in server (see docs/benchmark.md).
///
/// Each scenario runs in fresh databases named `bizq_bench*` beside the one the database URL
/// names. The fleets it starts are the `bizq-worker` and `bizq-scheduler` binaries beside
/// this one (`cargo build --release --bins`).
#[derive(Parser, Debug)]
#[command(name = "bizq-bench", version)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL); the bench databases are created beside it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    args: scenarios::BenchArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bizq-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(script) = scenarios::requested_script(&cli.args) {
        // Printing the pgbench script needs no database.
        print!("{script}");
        return Ok(());
    }
    let url = bizq::config::database_url(cli.database_url)?;
    scenarios::run(&url, cli.args).await
}

/// Directory holding the `bizq-worker` and `bizq-scheduler` binaries: the one `bizq-bench`
/// runs from.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bizq-bench binary")?;
    Ok(exe
        .parent()
        .context("the bizq-bench binary has no parent directory")?
        .to_path_buf())
}
