//! `bizq`: the admin CLI — migrate, enqueue, list, inspect, retry, cancel, stats, providers,
//! workers, credentials — the web dashboard and the local demo (the benchmark is `bizq-bench`).

mod admin;
mod credentials;
mod dashboard;
mod demo;
mod workers;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// BizQ: a multi-tenant task queue on PostgreSQL.
///
/// Every command reads the database from --database-url or $DATABASE_URL
/// (`scripts/db.sh url` prints one for a private local PostgreSQL), and the same TOML config
/// as bizq-scheduler and bizq-worker from --config or $BIZQ_CONFIG (else built-in defaults).
/// Give bizq the fleet's config: `bizq cancel` resolves the dependents of the task it cancels
/// by `scheduler.dependency_failure` — cancelled (the default) or escalated ("escalate").
#[derive(Parser, Debug)]
#[command(name = "bizq", version, propagate_version = true)]
struct Cli {
    /// PostgreSQL URL (default: $DATABASE_URL).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// TOML config file, the fleet's (default: $BIZQ_CONFIG, else built-in defaults; see
    /// config/bizq.toml). Its scheduler.dependency_failure decides what `bizq cancel` does to
    /// dependents. `bizq demo` uses it for its fleet only when given as a flag.
    #[arg(long, short, global = true, env = "BIZQ_CONFIG")]
    config: Option<PathBuf>,
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
    /// Start a failed, cancelled or escalated task over: pending, attempt 0, no error.
    Retry {
        /// Task id.
        id: uuid::Uuid,
    },
    /// Cancel a pending, queued, processing or escalated task (a running one is aborted
    /// within about a second and charged nothing).
    ///
    /// Dependents waiting for it are cancelled, transitively, or escalated for a person when
    /// the config (--config / $BIZQ_CONFIG) says scheduler.dependency_failure = "escalate".
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
    /// Serve the web dashboard (overview, workspaces, tasks, workers; retry and cancel).
    ///
    /// Listens on 127.0.0.1:8080 by default (ops.dashboard_addr). Any other address needs a
    /// token in $BIZQ_DASHBOARD_TOKEN or ops.dashboard_token_file.
    Dashboard(dashboard::DashboardArgs),
    /// Registered schedulers and workers: alive, draining, or LOST (not seen for
    /// ops.worker_lost_after_seconds: killed, or its host is gone).
    Workers,
    /// Run the local demo: seed workspace, a batch of tasks with priorities and dependencies,
    /// one scheduler and two workers as child processes, then a summary.
    ///
    /// The fleet runs with the built-in demo config (mock provider, 150 ms latency, 10%
    /// transient failures), or with --config when given as a flag ($BIZQ_CONFIG alone does not
    /// replace it).
    Demo(demo::DemoArgs),
    /// Keep the store-credentials key in the database, or rotate it (docs/security.md).
    #[command(subcommand)]
    Credentials(credentials::CredentialsCommand),
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
    let matches = Cli::command().get_matches();
    let config_flag = matches.value_source("config") == Some(ValueSource::CommandLine);
    let result = match Cli::from_arg_matches(&matches) {
        Ok(cli) => run(cli, config_flag).await,
        Err(e) => e.exit(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bizq: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config_flag: bool) -> anyhow::Result<()> {
    let url = bizq::config::database_url(cli.database_url)?;
    let config = || bizq::Config::load(cli.config.as_deref());
    match cli.command {
        Command::Migrate => admin::migrate(&url, &config()?).await,
        Command::Enqueue(a) => admin::enqueue(&admin::pool(&url, &config()?).await?, a).await,
        Command::List(a) => admin::list(&admin::pool(&url, &config()?).await?, a).await,
        Command::Inspect { id } => admin::inspect(&admin::pool(&url, &config()?).await?, id).await,
        Command::Retry { id } => admin::retry(&admin::pool(&url, &config()?).await?, id).await,
        Command::Cancel { id, reason } => {
            let config = config()?;
            admin::cancel(&admin::pool(&url, &config).await?, &config, id, &reason).await
        }
        Command::Stats => admin::stats(&admin::pool(&url, &config()?).await?).await,
        Command::Providers => admin::providers(&admin::pool(&url, &config()?).await?).await,
        Command::Dashboard(a) => {
            let config = config()?;
            let pool = admin::pool(&url, &config).await?;
            dashboard::run(pool, config, a).await
        }
        Command::Workers => {
            let config = config()?;
            workers::list(&admin::pool(&url, &config).await?, &config).await
        }
        // Only a --config typed on the command line replaces the demo's own config.
        Command::Demo(a) => demo::run(&url, cli.config.as_deref().filter(|_| config_flag), a).await,
        Command::Credentials(c) => credentials::run(&admin::pool(&url, &config()?).await?, c).await,
    }
}

/// Directory holding the `bizq-worker` and `bizq-scheduler` binaries: the one `bizq` runs from.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bizq binary")?;
    Ok(exe
        .parent()
        .context("the bizq binary has no parent directory")?
        .to_path_buf())
}
