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
    /// Name shown in `bizq workers` (default: host:pid:random).
    #[arg(long)]
    id: Option<String>,
    /// Serve /metrics, /healthz and /readyz here, e.g. 127.0.0.1:9465 (overrides
    /// ops.metrics_addr; default off).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Log lines as `human` (default) or `json` (overrides ops.log_format).
    #[arg(long)]
    log_format: Option<bizq::config::LogFormat>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = bizq::Config::load(args.config.as_deref())?;
    bizq::ops::apply_flags(&mut config, args.metrics_addr, args.log_format);
    bizq::logs::init(
        config.ops.log_format,
        "info,sqlx=warn",
        bizq::logs::Output::Stdout,
    );
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
    let id = args.id.unwrap_or_else(bizq::worker::default_worker_id);
    let ops = bizq::ops::start(
        &pool,
        &config,
        &id,
        bizq::registry::Role::Scheduler,
        Default::default(),
        shutdown.clone(),
    )
    .await?;
    Scheduler::new(pool, config).run(shutdown).await?;
    ops.stop().await;
    Ok(())
}
