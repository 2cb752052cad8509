//! `bizq-scheduler`: admits, promotes, reclaims and keeps house. Run one or several.

use std::path::PathBuf;

use anyhow::Context;
use bizq::db::{self, PoolSettings};
use bizq::scheduler::Scheduler;
use clap::Parser;

/// Moves BizQ tasks from `pending` to `queued` when they are due and their dependencies
/// completed, rejects tasks that can never run, reclaims tasks of dead workers, creates
/// analytics partitions and resets monthly credit counters.
///
/// Several schedulers may run at once. Stops on SIGTERM/SIGINT and exits 0.
#[derive(Parser, Debug)]
#[command(name = "bizq-scheduler", version)]
struct Args {
    /// PostgreSQL URL (default: $DATABASE_URL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// TOML config file (default: $BIZQ_CONFIG, else built-in defaults). See config/bizq.toml.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let args = Args::parse();
    let config = bizq::Config::load(args.config.as_deref())?;
    let url = bizq::config::database_url(args.database_url)?;
    let pool = db::connect(
        &url,
        &PoolSettings {
            application_name: "bizq-scheduler".into(),
            max_connections: 4,
            dependency_failure: config.scheduler.dependency_failure,
        },
    )
    .await
    .context("connecting to PostgreSQL")?;
    db::check_schema(&pool).await?;
    let shutdown = bizq::signals::shutdown_token();
    Scheduler::new(pool, config).run(shutdown).await?;
    Ok(())
}
