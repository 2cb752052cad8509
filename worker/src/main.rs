//! `bizq-worker`: claims queued tasks and runs them. Run as many as you like, anywhere.

use std::path::PathBuf;

use anyhow::Context;
use bizq::db::{self, PoolSettings};
use bizq::worker::{Worker, connections_needed, default_worker_id};
use clap::Parser;

/// Claims queued BizQ tasks by priority, runs them, and writes results back.
///
/// Stops gracefully on SIGTERM/SIGINT: no new claims, running tasks get
/// `worker.shutdown_grace_seconds`, the rest go back to the queue. Exits 0.
#[derive(Parser, Debug)]
#[command(name = "bizq-worker", version)]
struct Args {
    /// PostgreSQL URL (default: $DATABASE_URL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// TOML config file (default: $BIZQ_CONFIG, else built-in defaults). See config/bizq.toml.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Task type patterns to claim, comma separated, `*` as wildcard: --types 'content.*,ai.*'.
    #[arg(long, value_delimiter = ',')]
    types: Option<Vec<String>>,
    /// Tasks run at once (overrides worker.concurrency).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Name shown in tasks.locked_by (default: host:pid:random).
    #[arg(long)]
    id: Option<String>,
    /// Serve /metrics, /healthz and /readyz here, e.g. 127.0.0.1:9464 (overrides
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
    if let Some(t) = args.types {
        config.worker.types = t;
    }
    if let Some(c) = args.concurrency {
        config.worker.concurrency = c;
    }
    config.validate()?;
    let url = bizq::config::database_url(args.database_url)?;
    let worker_id = args.id.unwrap_or_else(default_worker_id);
    let pool = db::connect(
        &url,
        &PoolSettings {
            application_name: format!("bizq-worker {worker_id}"),
            max_connections: connections_needed(&config.worker),
            dependency_failure: config.scheduler.dependency_failure,
        },
    )
    .await
    .context("connecting to PostgreSQL")?;
    db::check_schema(&pool).await?;
    let worker = Worker::new(pool.clone(), config.clone(), worker_id.clone())?;
    let shutdown = bizq::signals::shutdown_token();
    let ops = bizq::ops::start(
        &pool,
        &config,
        &worker_id,
        bizq::registry::Role::Worker,
        worker.liveness(),
        shutdown.clone(),
    )
    .await?;
    worker.run(shutdown).await?;
    ops.stop().await;
    Ok(())
}
