//! The admin commands: migrate, enqueue, list, inspect, retry, cancel, stats.

use anyhow::{Context, bail};
use bizq::config::DependencyFailurePolicy;
use bizq::db::{self, PoolSettings};
use bizq::lifecycle::{self, NewTask};
use bizq::queries;
use bizq::{Config, TaskStatus};
use clap::Args;
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Opens the CLI's pool with the fleet's `scheduler.dependency_failure`: cancelling a task
/// here resolves its waiting dependents (by trigger, in this session) exactly as a failure in
/// the fleet would.
pub async fn pool(url: &str, config: &Config) -> anyhow::Result<PgPool> {
    let pool = db::connect(
        url,
        &PoolSettings {
            application_name: "bizq".into(),
            max_connections: 4,
            dependency_failure: config.scheduler.dependency_failure,
        },
    )
    .await
    .context("connecting to PostgreSQL")?;
    Ok(pool)
}

pub async fn migrate(url: &str, config: &Config) -> anyhow::Result<()> {
    let pool = pool(url, config).await?;
    let before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = '_sqlx_migrations'")
            .fetch_one(&pool)
            .await?;
    let applied_before: Vec<i64> = if before > 0 {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&pool)
            .await?
    } else {
        Vec::new()
    };
    let revoked = db::migrate(&pool).await?;
    let mut n = 0;
    for m in db::MIGRATOR.iter() {
        if !applied_before.contains(&m.version) {
            println!("applied {:04} {}", m.version, m.description);
            n += 1;
        }
    }
    if n == 0 {
        println!(
            "schema is current ({} migrations); nothing to do",
            db::MIGRATOR.iter().count()
        );
    }
    for r in &revoked {
        println!("revoked {r} (not in bizq_tenant_grants)");
    }
    Ok(())
}

/// `bizq enqueue`.
#[derive(Args, Debug)]
pub struct EnqueueArgs {
    /// Workspace slug or id.
    #[arg(long, short)]
    workspace: String,
    /// Task type.
    #[arg(long = "type", short = 't', default_value = "ai.generate")]
    task_type: String,
    /// Input JSON, e.g. '{"prompt": "Write a tagline"}'.
    #[arg(long, short)]
    input: String,
    /// 1 runs first, 10 last.
    #[arg(long, short, default_value_t = 5)]
    priority: i32,
    /// Task ids this one waits for, comma separated.
    #[arg(long, value_delimiter = ',')]
    depends_on: Vec<Uuid>,
    /// Do not run before this time (RFC 3339).
    #[arg(long)]
    at: Option<chrono::DateTime<chrono::Utc>>,
    /// Estimated cost in credits (reserved at claim).
    #[arg(long)]
    estimated_cost: Option<i32>,
    /// Task name.
    #[arg(long, default_value = "cli task")]
    name: String,
    /// Category.
    #[arg(long, default_value = "content")]
    category: String,
}

/// The workspace a `--workspace` value (or the dashboard's filter) names: a value that reads
/// as a UUID (any form the `uuid` crate accepts) is an id and matches by id only; anything
/// else is a slug. Never both, so a slug cannot stand for another workspace's id (and
/// migration 0017 refuses UUID-shaped slugs anyway).
pub async fn find_workspace(pool: &PgPool, slug_or_id: &str) -> anyhow::Result<Option<Uuid>> {
    let value = slug_or_id.trim();
    let id = match Uuid::try_parse(value) {
        Ok(id) => {
            sqlx::query_scalar("SELECT id FROM workspaces WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        }
        Err(_) => {
            sqlx::query_scalar("SELECT id FROM workspaces WHERE slug = $1")
                .bind(value)
                .fetch_optional(pool)
                .await?
        }
    };
    Ok(id)
}

async fn workspace_id(pool: &PgPool, slug_or_id: &str) -> anyhow::Result<Uuid> {
    find_workspace(pool, slug_or_id)
        .await?
        .with_context(|| format!("no workspace with slug or id '{slug_or_id}'"))
}

pub async fn enqueue(pool: &PgPool, a: EnqueueArgs) -> anyhow::Result<()> {
    let input: Value = serde_json::from_str(&a.input).context("--input is not valid JSON")?;
    if !(1..=10).contains(&a.priority) {
        bail!("--priority must be between 1 (first) and 10 (last)");
    }
    let task = NewTask {
        workspace_id: workspace_id(pool, &a.workspace).await?,
        task_type: a.task_type,
        category: a.category,
        name: a.name,
        input,
        priority: a.priority,
        depends_on: a.depends_on,
        scheduled_for: a.at,
        estimated_cost: a.estimated_cost,
        worker_type: None,
        ai_provider: None,
        max_attempts: None,
    };
    let id = lifecycle::enqueue(pool, &task).await?;
    println!("{id}");
    Ok(())
}

/// `bizq list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this status (pending, queued, processing, completed, failed, cancelled, escalated).
    #[arg(long, short)]
    status: Option<TaskStatus>,
    /// Only this workspace (slug or id).
    #[arg(long, short)]
    workspace: Option<String>,
    /// Only this task type.
    #[arg(long = "type", short = 't')]
    task_type: Option<String>,
    /// Rows to show.
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: i64,
}

pub async fn list(pool: &PgPool, a: ListArgs) -> anyhow::Result<()> {
    let ws = match &a.workspace {
        Some(w) => Some(workspace_id(pool, w).await?),
        None => None,
    };
    let rows = sqlx::query(queries::LIST_SQL)
        .bind(a.status)
        .bind(ws)
        .bind(a.task_type)
        .bind(a.limit)
        .fetch_all(pool)
        .await?;
    println!(
        "{:<36}  {:<16} {:<10} {:>3} {:>3}  {:<19}  note",
        "id", "type", "status", "pri", "att", "created"
    );
    for r in rows {
        let created: chrono::DateTime<chrono::Utc> = r.try_get("created_at")?;
        println!(
            "{:<36}  {:<16} {:<10} {:>3} {:>3}  {:<19}  {}",
            r.try_get::<Uuid, _>("id")?,
            r.try_get::<String, _>("type")?,
            r.try_get::<TaskStatus, _>("status")?,
            r.try_get::<i32, _>("priority")?,
            r.try_get::<i32, _>("attempt")?,
            created.format("%Y-%m-%d %H:%M:%S"),
            r.try_get::<String, _>("note")?,
        );
    }
    Ok(())
}

pub async fn inspect(pool: &PgPool, id: Uuid) -> anyhow::Result<()> {
    let row = sqlx::query(queries::INSPECT_SQL)
        .bind(id)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("task {id} not found"))?;
    fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
        v.map_or("-".into(), |v| v.to_string())
    }
    let ts = |c: &str| -> anyhow::Result<String> {
        Ok(opt(
            row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(c)?
        ))
    };
    println!("task           {}", row.try_get::<Uuid, _>("id")?);
    println!(
        "workspace      {} ({})",
        row.try_get::<String, _>("slug")?,
        row.try_get::<Uuid, _>("workspace_id")?
    );
    println!(
        "type / name    {} / {}",
        row.try_get::<String, _>("type")?,
        row.try_get::<String, _>("name")?
    );
    println!("status         {}", row.try_get::<TaskStatus, _>("status")?);
    println!(
        "wait reason    {}",
        opt(row.try_get::<Option<String>, _>("wait_reason")?)
    );
    println!("priority       {}", row.try_get::<i32, _>("priority")?);
    println!(
        "attempt        {} (max {})",
        row.try_get::<i32, _>("attempt")?,
        opt(row.try_get::<Option<i32>, _>("max_attempts")?)
    );
    println!(
        "worker         {} ({}), lease until {}",
        opt(row.try_get::<Option<String>, _>("locked_by")?),
        opt(row.try_get::<Option<String>, _>("worker_type")?),
        ts("lease_expires_at")?
    );
    let deps: Option<Vec<Uuid>> = row.try_get("depends_on")?;
    let deps = deps.unwrap_or_default();
    println!(
        "depends on     {} ({} unfinished)",
        if deps.is_empty() {
            "-".to_string()
        } else {
            deps.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
        opt(row.try_get::<Option<i32>, _>("deps_remaining")?)
    );
    println!("scheduled for  {}", ts("scheduled_for")?);
    println!("created        {}", ts("created_at")?);
    println!("started        {}", ts("started_at")?);
    println!("completed      {}", ts("completed_at")?);
    println!(
        "time           {} ms",
        opt(row.try_get::<Option<i32>, _>("processing_time_ms")?)
    );
    println!(
        "cost           estimated {}, actual {}, reserved {}",
        opt(row.try_get::<Option<i32>, _>("estimated_cost")?),
        opt(row.try_get::<Option<i32>, _>("actual_cost")?),
        row.try_get::<i32, _>("reserved_credits")?
    );
    println!(
        "provider/model {} / {}",
        opt(row.try_get::<Option<String>, _>("ai_provider")?),
        opt(row.try_get::<Option<String>, _>("ai_model")?)
    );
    for col in ["input", "output", "error_details", "cost_breakdown"] {
        let v: Option<Value> = row.try_get(col)?;
        println!(
            "{col}:\n{}",
            v.map_or("  -".to_string(), |v| serde_json::to_string_pretty(&v)
                .unwrap_or_default())
        );
    }
    Ok(())
}

/// `bizq retry`.
pub async fn retry(pool: &PgPool, id: Uuid) -> anyhow::Result<()> {
    let was = lifecycle::retry(pool, id).await?;
    println!("task {id}: {was} -> pending, attempt 0 (the scheduler admits it again)");
    Ok(())
}

/// `bizq cancel`. Says what the policy did to the dependents that were waiting for the task.
pub async fn cancel(pool: &PgPool, config: &Config, id: Uuid, reason: &str) -> anyhow::Result<()> {
    let was = lifecycle::cancel(pool, id, reason).await?;
    println!("task {id}: {was} -> cancelled");
    let policy = config.scheduler.dependency_failure;
    let became = match policy {
        DependencyFailurePolicy::Cancel => TaskStatus::Cancelled,
        DependencyFailurePolicy::Escalate => TaskStatus::Escalated,
    };
    let dependents: i64 = sqlx::query_scalar(
        "SELECT count(*)
           FROM task_dependencies d
           JOIN tasks c ON c.id = d.task_id
          WHERE d.depends_on_id = $1
            AND c.status = $2
            AND c.error_details ->> 'code' = 'dependency_cancelled'
            AND c.error_details ->> 'dependency' = $1::text",
    )
    .bind(id)
    .bind(became)
    .fetch_one(pool)
    .await?;
    if dependents > 0 {
        println!(
            "{dependents} dependent task(s) waiting for it {became} \
             (scheduler.dependency_failure = \"{}\")",
            policy.as_str()
        );
    }
    Ok(())
}

pub async fn stats(pool: &PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(queries::STATS_SETTINGS_SQL)
        .execute(&mut *tx)
        .await?;
    let counts = queries::status_counts(&mut tx).await?;
    println!("tasks by status:");
    for c in counts {
        if c.estimated {
            println!(
                "  {:<11} {:>9}  (estimated: more than {}, so not counted one by one)",
                c.status,
                format!("~{}", c.n),
                queries::EXACT_COUNT_LIMIT
            );
        } else {
            println!("  {:<11} {:>9}", c.status, c.n);
        }
    }
    let row = sqlx::query(queries::STATS_QUEUE_SQL)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    println!(
        "oldest queued task waits: {}",
        row.try_get::<Option<f64>, _>("oldest_queued_s")?
            .map_or("-".into(), |s| format!("{s:.1} s"))
    );
    println!(
        "completed in the last minute: {}",
        row.try_get::<i64, _>("done_1m")?
    );
    println!(
        "pending on dependencies: {}",
        row.try_get::<i64, _>("blocked")?
    );
    println!(
        "parked (workspace cannot pay / not active): {}",
        row.try_get::<i64, _>("parked")?
    );
    let ws = sqlx::query(
        "SELECT slug, plan, credits_balance, credits_reserved, credits_used_this_month, monthly_credit_limit
           FROM workspaces ORDER BY slug LIMIT 20",
    )
    .fetch_all(pool)
    .await?;
    println!("workspaces (balance / reserved / used this month / monthly limit):");
    for r in ws {
        println!(
            "  {:<24} {:<10} {:>8} / {:>6} / {:>8} / {:>8}",
            r.try_get::<String, _>("slug")?,
            r.try_get::<String, _>("plan")?,
            r.try_get::<i32, _>("credits_balance")?,
            r.try_get::<i32, _>("credits_reserved")?,
            r.try_get::<Option<i32>, _>("credits_used_this_month")?
                .unwrap_or(0),
            r.try_get::<Option<i32>, _>("monthly_credit_limit")?
                .map_or("-".into(), |v| v.to_string()),
        );
    }
    Ok(())
}

/// `bizq providers`: every provider that was ever parked (`provider_status`), whether it is
/// parked now, why, and the tasks waiting for it. Reasons are the provider's redacted message.
pub async fn providers(pool: &PgPool) -> anyhow::Result<()> {
    let rows = sqlx::query(
        "SELECT p.provider,
                p.parked_until > now() AS parked,
                p.parked_until,
                p.reason,
                (SELECT count(*)
                   FROM tasks t
                  WHERE t.status = 'pending'
                    AND t.wait_reason = 'provider_unavailable'
                    AND t.error_details ->> 'provider' = p.provider) AS waiting
           FROM provider_status p
          ORDER BY p.provider",
    )
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        println!("no provider has been parked");
        return Ok(());
    }
    println!(
        "{:<16} {:<8} {:<25} {:>8}  reason",
        "provider", "state", "parked until", "waiting"
    );
    for r in rows {
        let until: chrono::DateTime<chrono::Utc> = r.try_get("parked_until")?;
        println!(
            "{:<16} {:<8} {:<25} {:>8}  {}",
            r.try_get::<String, _>("provider")?,
            if r.try_get::<bool, _>("parked")? {
                "parked"
            } else {
                "probing"
            },
            until.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            r.try_get::<i64, _>("waiting")?,
            r.try_get::<String, _>("reason")?
        );
    }
    Ok(())
}
