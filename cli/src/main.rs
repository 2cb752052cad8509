//! `bizq`: the admin CLI — migrate, enqueue, list, inspect, retry, cancel, stats, providers —
//! plus the local demo and the benchmark.

mod admin;
mod bench;
mod demo;
mod fleet;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// BizQ: a multi-tenant task queue on PostgreSQL.
///
/// Every command reads the database from --database-url or $DATABASE_URL
/// (`scripts/db.sh url` prints one for a private local PostgreSQL).
#[derive(Parser, Debug)]
#[command(name = "bizq", version, propagate_version = true)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the schema migrations (idempotent: a second run changes nothing).
    Migrate,
    /// Insert a task (status `pending`), exactly as product code would.
    Enqueue(admin::EnqueueArgs),
    /// List tasks, newest first.
    List(admin::ListArgs),
    /// Show one task in full: status, attempts, lease, error, output, dependencies.
    Inspect {
        /// Task id.
        id: uuid::Uuid,
    },
    /// Start a failed, cancelled or escalated task over with fresh attempts.
    Retry {
        /// Task id.
        id: uuid::Uuid,
    },
    /// Cancel a pending, queued, processing or escalated task (a running one is aborted
    /// within about a second and charged nothing).
    Cancel {
        /// Task id.
        id: uuid::Uuid,
        /// Recorded in error_details.message.
        #[arg(long, default_value = "by an admin")]
        reason: String,
    },
    /// Queue depth by status, oldest waiting task, throughput, workspaces' credits.
    Stats,
    /// AI providers parked fleet-wide (bad key, exhausted quota): until when, why, and how
    /// many tasks wait for each.
    Providers,
    /// Run the local demo: seed workspace, a batch of tasks with priorities and dependencies,
    /// one scheduler and two workers as child processes, then a summary.
    Demo(demo::DemoArgs),
    /// Measure throughput and latency against raw SQL through pgbench (see README).
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Bench(a) = &cli.command
        && let Some(script) = bench::requested_script(a)
    {
        // Printing the pgbench script needs no database.
        print!("{script}");
        return Ok(());
    }
    let url = bizq::config::database_url(cli.database_url)?;
    match cli.command {
        Command::Migrate => admin::migrate(&url).await,
        Command::Enqueue(a) => admin::enqueue(&admin::pool(&url).await?, a).await,
        Command::List(a) => admin::list(&admin::pool(&url).await?, a).await,
        Command::Inspect { id } => admin::inspect(&admin::pool(&url).await?, id).await,
        Command::Retry { id } => {
            let was = bizq::lifecycle::retry(&admin::pool(&url).await?, id).await?;
            println!("task {id}: {was} -> pending (the scheduler admits it again)");
            Ok(())
        }
        Command::Cancel { id, reason } => {
            let was = bizq::lifecycle::cancel(&admin::pool(&url).await?, id, &reason).await?;
            println!("task {id}: {was} -> cancelled");
            Ok(())
        }
        Command::Stats => admin::stats(&admin::pool(&url).await?).await,
        Command::Providers => admin::providers(&admin::pool(&url).await?).await,
        Command::Demo(a) => demo::run(&url, a).await,
        Command::Bench(a) => bench::run(&url, a).await,
    }
    .with_context(|| "bizq failed".to_string())
}

/// Directory holding the `bizq-worker` and `bizq-scheduler` binaries: the one `bizq` runs from.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bizq binary")?;
    Ok(exe
        .parent()
        .context("the bizq binary has no parent directory")?
        .to_path_buf())
}
