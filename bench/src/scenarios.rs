//! The scenarios of `bizq-bench`: the figures quoted in docs/benchmark.md, measured in one
//! run so they compare as ratios on a noisy machine.
//!
//! 1. End to end: N tasks inserted (queued by the insert itself), the clock runs until the last is `completed`
//!    (mock provider at 0 ms), with 1, 2 and 4 worker processes and one scheduler. Rounds of
//!    these alternate with the raw-SQL run (4.) and each figure is a median.
//! 2. Pickup latency on an idle fleet: single inserts, `started_at - created_at`.
//! 3. Claim throughput of the claim statement alone: a near-empty queue, one with 1,000,000
//!    queued tasks, and one with 100,000 tasks blocked on an unfinished dependency; rounds
//!    interleave across the three and each figure is a median.
//! 4. The same lifecycle as raw SQL through `pgbench` on the same schema (tasks queued by
//!    their insert, the engine's own claim statement, complete with the same output and cost
//!    breakdown the mock provider returns), for the ratio engine / raw SQL.
//! 5. The floor: a task's writes as bulk statements on one connection, on the schema before
//!    0012 (four writes, 24 indexes) and on the lean one (three writes, 12 indexes).
//!    Microseconds per task per write, and the ceiling they put on any fleet on this
//!    machine's cores.
//! 6. Dashboards: `workspace_dashboard`, `task_performance`, `bizq list -w … -s failed` and
//!    `bizq stats` on a million finished tasks, before 0012 and after.
//! 7. Providers: the worker's real OpenAI client against a stand-in server in this process,
//!    under a fleet-wide rate budget and at high concurrency (`providers.rs`).
//!
//! Each scenario runs in fresh databases named `bizq_bench*` beside the one `DATABASE_URL`
//! names.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bizq::lifecycle::{self, CLAIM_SQL, ClaimRequest};
use clap::Args;
use clap::builder::TypedValueParser as _;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgPool, Row};

use bizq::fleet;

/// The benchmark's options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Tasks per end-to-end run.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) tasks: i64,
    /// Worker process counts for the end-to-end runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub(crate) workers: Vec<usize>,
    /// Rounds of the end-to-end and raw-SQL runs, alternating; medians are printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rounds: u32,
    /// Tasks inserted one by one for the pickup-latency figure.
    #[arg(long, default_value_t = 300)]
    pub(crate) latency_samples: usize,
    /// Queued tasks behind the claimable ones in the "deep queue" claim run.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) deep_queue: i64,
    /// Tasks blocked on an unfinished dependency in the "blocked" claim run.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) blocked: i64,
    /// Claims measured per claim round.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) claims: i64,
    /// Claim rounds per scenario; the median is printed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) claim_rounds: u32,
    /// Tasks per round of the "floor" scenario (bulk statements, one backend).
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub(crate) floor_tasks: i64,
    /// Rounds of the "floor" scenario; the median of each phase is printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) floor_rounds: u32,
    /// Finished tasks (over 100 workspaces) in the "dashboard" scenario.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub(crate) dashboard_tasks: i64,
    /// pgbench clients (each one claims and completes in a loop, like a worker).
    #[arg(long, default_value_t = 4)]
    pub(crate) pgbench_clients: usize,
    /// Seconds of each "providers" rate-budget run, from the stand-in's first call.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) provider_seconds: u64,
    /// The stand-in provider's fleet-wide `rpm` in the "providers" rate-budget runs.
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) provider_rpm: u64,
    /// The stand-in's latency in the "providers" rate-budget runs, ms.
    #[arg(long, default_value_t = 100)]
    pub(crate) provider_latency_ms: u64,
    /// `worker.concurrency` of each worker in the "providers" rate-budget runs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub(crate) provider_worker_concurrency: usize,
    /// `worker.concurrency` of the one worker in the "providers" concurrency run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub(crate) provider_concurrency: usize,
    /// The stand-in's latency in the "providers" concurrency run, ms.
    #[arg(long, default_value_t = 2000)]
    pub(crate) provider_slow_latency_ms: u64,
    /// Tasks of the "providers" concurrency run.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub(crate) provider_tasks: i64,
    /// Scenarios to run, comma separated: e2e, latency, claim, pgbench, floor, dashboard,
    /// providers.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = ["e2e", "latency", "claim", "pgbench", "floor", "dashboard", "providers"],
        default_value = "e2e,latency,claim,pgbench,floor,dashboard,providers"
    )]
    pub(crate) only: Vec<String>,
    /// Print the pgbench script (the raw-SQL lifecycle) and exit.
    #[arg(long)]
    pub(crate) print_pgbench_script: bool,
    /// Write the worker/scheduler logs here (default: discarded).
    #[arg(long)]
    pub(crate) logs: Option<std::path::PathBuf>,
}

const BENCH_CONFIG: &str = r#"
[worker]
concurrency = 1024
claim_batch = 256
complete_batch = 1000
result_writers = 1
heartbeat_ms = 5000
lease_seconds = 60
poll_interval_ms = 200

[scheduler]
tick_ms = 50
batch = 5000

[providers.mock]
enabled = true
latency_ms = 0
"#;

/// A one-connection pool on the server's `postgres` database, for CREATE/DROP DATABASE.
async fn admin_pool(base: &PgConnectOptions) -> anyhow::Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(base.clone().database("postgres"))
        .await?)
}

/// Creates (or recreates) the database `name` beside `url`'s and returns its URL and a pool.
pub(crate) async fn fresh_db_named(url: &str, name: &str) -> anyhow::Result<(String, PgPool)> {
    fresh_db_with(url, name, Schema::Lean).await
}

/// Which schema a bench database gets: every migration, or all but the lean-tasks one (0012),
/// which is the schema as it was before it (the seed's indexes, every insert `pending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schema {
    Seed,
    Lean,
}

/// The migration that made tasks lean (indexes, queue on insert, `updated_at`).
const LEAN_MIGRATION: i64 = 12;

/// Creates (or recreates) the database `name` beside `url`'s with `schema` and returns its
/// URL and a pool.
async fn fresh_db_with(url: &str, name: &str, schema: Schema) -> anyhow::Result<(String, PgPool)> {
    let base: PgConnectOptions = url.parse().context("parsing DATABASE_URL")?;
    let admin = admin_pool(&base).await?;
    drop_db(&admin, name).await?;
    // The names are this file's constants (checked by `bench_db_name`), never user input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {}",
        bench_db_name(name)?
    )))
    .execute(&admin)
    .await?;
    admin.close().await;
    let opts = base.database(name);
    let bench_url = with_database(url, name);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await?;
    match schema {
        Schema::Lean => {
            bizq::db::migrate(&pool).await?;
        }
        Schema::Seed => bizq::db::MIGRATOR
            .run_to(LEAN_MIGRATION - 1, &pool)
            .await
            .context("migrating to the schema before 0012")?,
    }
    Ok((bench_url, pool))
}

/// Creates (or recreates) the bench database `bizq_bench` and returns its URL and a pool.
async fn fresh_db(url: &str) -> anyhow::Result<(String, PgPool)> {
    fresh_db_named(url, "bizq_bench").await
}

/// `name` if it is a plain lower-case identifier starting with `bizq_bench`.
fn bench_db_name(name: &str) -> anyhow::Result<&str> {
    if name.starts_with("bizq_bench") && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        Ok(name)
    } else {
        bail!("not a bench database name: {name}")
    }
}

async fn drop_db(admin: &PgPool, name: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        bench_db_name(name)?
    )))
    .execute(admin)
    .await?;
    Ok(())
}

/// Drops the named bench databases (they can hold a million rows).
async fn drop_dbs(url: &str, names: &[&str]) -> anyhow::Result<()> {
    let base: PgConnectOptions = url.parse().context("parsing DATABASE_URL")?;
    let admin = admin_pool(&base).await?;
    for name in names {
        drop_db(&admin, name).await?;
    }
    admin.close().await;
    Ok(())
}

/// `url` with its database name replaced (query parameters kept), for the child processes
/// and pgbench.
fn with_database(url: &str, db: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let scheme_end = main.find("://").map_or(0, |i| i + 3);
    let base = match main[scheme_end..].find('/') {
        Some(i) => &main[..scheme_end + i],
        None => main,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Eight workspaces with plenty of credits; tasks are spread over them.
pub(crate) async fn workspaces(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO workspaces (name, slug, credits_balance, monthly_credit_limit)
         SELECT 'bench ' || g, 'bench-' || g, 1000000000, 2000000000 FROM generate_series(1, 8) g",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Registers the worker's types, as every worker does at start-up, so that inserts of them are
/// queued by the INSERT itself (lean schema only).
async fn register_types(pool: &PgPool) -> anyhow::Result<()> {
    bizq::task_types::register(pool, None, "bench", false).await?;
    Ok(())
}

/// Inserts `n` `ai.generate` tasks with `status`, spread over the workspaces, in chunks.
async fn insert_tasks(
    pool: &PgPool,
    n: i64,
    status: &str,
    deps_remaining: Option<i32>,
) -> anyhow::Result<()> {
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(50_000);
        sqlx::query(
            "INSERT INTO tasks (workspace_id, type, category, name, input, priority, status, deps_remaining)
             SELECT w.ids[1 + g % 8], 'ai.generate', 'content', 'bench',
                    jsonb_build_object('prompt', 'bench prompt ' || g), 1 + g % 10, $2, $3
               FROM generate_series(1, $1) g,
                    (SELECT array_agg(id ORDER BY slug) AS ids FROM workspaces) w",
        )
        .bind(chunk)
        .bind(status.to_string())
        .bind(deps_remaining)
        .execute(pool)
        .await?;
        done += chunk;
    }
    Ok(())
}

/// From the first task's insert to the last completion, by the rows' own timestamps.
pub(crate) async fn span_seconds(pool: &PgPool) -> anyhow::Result<f64> {
    Ok(sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(completed_at) - min(created_at))::float8 FROM tasks",
    )
    .fetch_one(pool)
    .await?)
}

async fn count(pool: &PgPool, status: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = $1")
            .bind(status.to_string())
            .fetch_one(pool)
            .await?,
    )
}

pub(crate) fn log_path(args: &BenchArgs, name: &str) -> Option<std::path::PathBuf> {
    args.logs.as_ref().map(|d| d.join(format!("{name}.log")))
}

async fn end_to_end(
    url: &str,
    args: &BenchArgs,
    config: &Path,
    workers: usize,
) -> anyhow::Result<f64> {
    let (bench_url, pool) = fresh_db(url).await?;
    workspaces(&pool).await?;
    let mut members = vec![fleet::spawn(
        "scheduler",
        "scheduler",
        &bench_url,
        config,
        &[],
        &[],
        log_path(args, "e2e-scheduler").as_deref(),
    )?];
    for i in 0..workers {
        let name = format!("e2e-{workers}-worker-{i}");
        members.push(fleet::spawn(
            "worker",
            &name,
            &bench_url,
            config,
            &[],
            &[],
            log_path(args, &name).as_deref(),
        )?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // let the fleet connect and go idle
    let started = Instant::now();
    insert_tasks(&pool, args.tasks, "pending", None).await?;
    // A cheap probe (the partial queue indexes answer it) at a modest rate, so that watching
    // does not steal the CPU being measured; the figure itself comes from the rows' own
    // timestamps, exactly as for the raw-SQL run.
    let mut last_report = Instant::now();
    loop {
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE status IN ('pending', 'queued', 'processing'))",
        )
        .fetch_one(&pool)
        .await?;
        if !busy {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            fleet::stop(members).await;
            bail!("end-to-end run with {workers} workers did not finish in 30 minutes");
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  ... {}/{} completed",
                count(&pool, "completed").await?,
                args.tasks
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    fleet::stop(members).await;
    let completed = count(&pool, "completed").await?;
    if completed < args.tasks {
        bail!("only {completed} of {} tasks completed", args.tasks);
    }
    let elapsed = span_seconds(&pool).await?;
    pool.close().await;
    Ok(args.tasks as f64 / elapsed)
}

async fn pickup_latency(
    url: &str,
    args: &BenchArgs,
    config: &Path,
) -> anyhow::Result<(f64, f64, f64)> {
    let (bench_url, pool) = fresh_db(url).await?;
    workspaces(&pool).await?;
    let members = vec![
        fleet::spawn(
            "scheduler",
            "scheduler",
            &bench_url,
            config,
            &[],
            &[],
            log_path(args, "latency-scheduler").as_deref(),
        )?,
        fleet::spawn(
            "worker",
            "worker",
            &bench_url,
            config,
            &[],
            &[],
            log_path(args, "latency-worker").as_deref(),
        )?,
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ws: uuid::Uuid = sqlx::query_scalar("SELECT id FROM workspaces ORDER BY slug LIMIT 1")
        .fetch_one(&pool)
        .await?;
    for i in 0..args.latency_samples {
        lifecycle::enqueue(
            &pool,
            &lifecycle::NewTask::generate(ws, &format!("latency {i}")),
        )
        .await?;
        // An idle fleet: each task arrives alone.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&pool, "completed").await? < args.latency_samples as i64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet::stop(members).await;
    let row = sqlx::query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms::float8) AS p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms::float8) AS p99,
                max(ms)::float8 AS max
           FROM (SELECT EXTRACT(EPOCH FROM started_at - created_at) * 1000 AS ms
                   FROM tasks WHERE started_at IS NOT NULL) s",
    )
    .fetch_one(&pool)
    .await?;
    let p50: Option<f64> = row.try_get("p50")?;
    let p99: Option<f64> = row.try_get("p99")?;
    let max: Option<f64> = row.try_get("max")?;
    pool.close().await;
    Ok((
        p50.unwrap_or(f64::NAN),
        p99.unwrap_or(f64::NAN),
        max.unwrap_or(f64::NAN),
    ))
}

/// Claims `args.claims` tasks, 100 at a time, from one client; returns claims per second.
async fn claim_rate(pool: &PgPool, args: &BenchArgs) -> anyhow::Result<f64> {
    let req = ClaimRequest {
        worker_id: "bench",
        limit: 100,
        type_patterns: None,
        lease: Duration::from_secs(600),
    };
    let started = Instant::now();
    let mut claimed = 0i64;
    while claimed < args.claims {
        let got = lifecycle::claim(pool, &req).await?.len() as i64;
        if got == 0 {
            bail!("the queue ran dry after {claimed} claims");
        }
        claimed += got;
    }
    Ok(claimed as f64 / started.elapsed().as_secs_f64())
}

/// The three claim scenarios, each in its own database so their rounds can interleave.
const CLAIM_DBS: [&str; 3] = ["bizq_bench_empty", "bizq_bench_deep", "bizq_bench_blocked"];

/// Median of a list of rates (NaN when empty).
pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Claim throughput in three databases: near-empty, a deep queue, and many blocked tasks.
/// The rounds interleave (empty, deep, blocked, empty, ...) so that a slow spell of this
/// noisy machine hits all three alike; each figure is the median of `args.claim_rounds`.
async fn claim_throughput(url: &str, args: &BenchArgs) -> anyhow::Result<(f64, f64, f64)> {
    // Near-empty: only the tasks one round claims are queued (topped up before each round).
    let (_, empty) = fresh_db_named(url, CLAIM_DBS[0]).await?;
    workspaces(&empty).await?;

    // A deep queue: each round claims from the front of the index (priority 1 first) as it
    // would in production, and `deep_queue` tasks are still queued behind the last round.
    let (_, deep) = fresh_db_named(url, CLAIM_DBS[1]).await?;
    workspaces(&deep).await?;
    let deep_total = args.deep_queue + args.claims * i64::from(args.claim_rounds);
    eprintln!("  inserting {deep_total} queued tasks ...");
    insert_tasks(&deep, deep_total, "queued", Some(0)).await?;

    // Blocked work: tasks waiting on an unfinished dependency stay `pending`, outside the
    // claim index, so they should cost the claim nothing.
    let (_, blocked) = fresh_db_named(url, CLAIM_DBS[2]).await?;
    workspaces(&blocked).await?;
    eprintln!("  inserting {} blocked tasks ...", args.blocked);
    insert_tasks(&blocked, 1, "processing", Some(0)).await?;
    let parent: uuid::Uuid = sqlx::query_scalar("SELECT id FROM tasks")
        .fetch_one(&blocked)
        .await?;
    // All of them wait on one task: more dependents than the default limit (migration 0009).
    sqlx::query("UPDATE bizq_limits SET max_dependents = GREATEST(max_dependents, $1::int)")
        .bind(i32::try_from(args.blocked).unwrap_or(i32::MAX))
        .execute(&blocked)
        .await?;
    sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, depends_on, deps_remaining)
         SELECT workspace_id, 'ai.generate', 'content', 'blocked', '{\"prompt\": \"b\"}', 'pending', ARRAY[id], 1
           FROM tasks, generate_series(1, $1)
          WHERE id = $2",
    )
    .bind(args.blocked)
    .bind(parent)
    .execute(&blocked)
    .await?;
    sqlx::query(
        "INSERT INTO task_dependencies (task_id, depends_on_id)
         SELECT id, $1 FROM tasks WHERE status = 'pending'",
    )
    .bind(parent)
    .execute(&blocked)
    .await?;

    let (mut r_empty, mut r_deep, mut r_blocked) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.claim_rounds {
        eprintln!("  round {round}/{} ...", args.claim_rounds);
        for (pool, rates, top_up) in [
            (&empty, &mut r_empty, true),
            (&deep, &mut r_deep, false),
            (&blocked, &mut r_blocked, true),
        ] {
            if top_up {
                insert_tasks(pool, args.claims, "queued", Some(0)).await?;
            }
            // Every round starts from a vacuumed table, as autovacuum would leave it.
            sqlx::query("VACUUM ANALYZE tasks").execute(pool).await?;
            rates.push(claim_rate(pool, args).await?);
        }
    }
    for pool in [empty, deep, blocked] {
        pool.close().await;
    }
    drop_dbs(url, &CLAIM_DBS).await?;
    Ok((median(&r_empty), median(&r_deep), median(&r_blocked)))
}

/// Completes the `processing` tasks that `and_filter` (an SQL `AND …`, or empty) selects,
/// writing what the engine writes for them: the mock provider's output and cost breakdown for
/// each row's own prompt, the same shape and size, so raw SQL and the floor write (and index)
/// the same bytes as the engine does.
fn complete_like_the_mock(and_filter: &str) -> String {
    let tokens = "GREATEST((length(input ->> 'prompt') + 3) / 4, 1)";
    format!(
        "UPDATE tasks
            SET status = 'completed',
                output = jsonb_build_object(
             'text', '[mock:' || lpad(to_hex(hashtext(input ->> 'prompt')), 8, '0')
                     || '] A considered answer to \"' || left(input ->> 'prompt', 60) || '\".',
             'usage', jsonb_build_object('prompt_tokens', {tokens},
                                         'completion_tokens', 16 + {tokens} / 2,
                                         'total_tokens', {tokens} + 16 + {tokens} / 2)),
         actual_cost = 1,
         cost_breakdown = jsonb_build_object(
             'provider', 'mock', 'model', 'mock-1', 'prompt_tokens', {tokens},
             'completion_tokens', 16 + {tokens} / 2, 'credits', 1,
             'rule', '1 credit + 1 per 1000 tokens'),
         processing_time_ms = 0,
         ai_provider = 'mock',
         ai_model = 'mock-1',
         completed_at = now(),
         lease_token = NULL,
         lease_expires_at = NULL,
         updated_at = now()
          WHERE status = 'processing' {and_filter}"
    )
}

/// The floor's admission (the seed schema's second write; the lean schema queues on insert,
/// so there it finds nothing) and its claim with the reservation, each one bulk statement
/// over every task; the insert before them is `insert_tasks`, as in the other scenarios, and
/// the completion after them is `complete_like_the_mock`. Both set `updated_at` as the
/// engine's statements do.
const FLOOR_UPDATES: [&str; 2] = [
    "UPDATE tasks
            SET status = 'queued',
                deps_remaining = 0,
                updated_at = now()
          WHERE status = 'pending'",
    "WITH claimed AS (
             UPDATE tasks
                SET status = 'processing',
                    started_at = now(),
                    attempt = attempt + 1,
                    lease_token = gen_random_uuid(),
                    lease_expires_at = now() + interval '10 minutes',
                    locked_by = 'floor',
                    reserved_credits = 1,
                    updated_at = now()
              WHERE status = 'queued'
             RETURNING workspace_id
         )
         UPDATE workspaces w
            SET credits_reserved = w.credits_reserved + c.n
           FROM (SELECT workspace_id, count(*)::int AS n FROM claimed GROUP BY workspace_id) c
          WHERE w.id = c.workspace_id",
];

/// A task's writes as bulk statements (insert, admit, claim with its reservation, complete
/// with the credit triggers), timed one by one on one connection, on `schema`. Microseconds
/// per task for each, in that order; on the lean schema the insert queues the tasks itself
/// (the worker's types are registered first, as a worker does) and admit finds nothing.
async fn floor_round(url: &str, n: i64, schema: Schema) -> anyhow::Result<[f64; 4]> {
    let (_, pool) = fresh_db_with(url, "bizq_bench", schema).await?;
    workspaces(&pool).await?;
    if schema == Schema::Lean {
        register_types(&pool).await?;
    }
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    let mut conn = pool.acquire().await?;
    let per_task = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let mut phases = [0.0; 4];
    let t = Instant::now();
    insert_tasks(&pool, n, "pending", None).await?;
    phases[0] = per_task(t);
    let updates = [
        FLOOR_UPDATES[0].to_string(),
        FLOOR_UPDATES[1].to_string(),
        complete_like_the_mock(""),
    ];
    for (phase, sql) in phases[1..].iter_mut().zip(updates) {
        let t = Instant::now();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await?
            .rows_affected();
        *phase = if rows == 0 { f64::NAN } else { per_task(t) };
    }

    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'completed'")
        .fetch_one(&mut *conn)
        .await?;
    if done != n {
        bail!("floor round completed {done} of {n} tasks");
    }
    drop(conn);
    pool.close().await;
    Ok(phases)
}

/// Median per phase over `rounds` rounds, alternating the two variants round by round.
async fn floor(url: &str, args: &BenchArgs) -> anyhow::Result<[[f64; 4]; 2]> {
    let mut samples: [Vec<[f64; 4]>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=args.floor_rounds {
        eprintln!("  round {round}/{} ...", args.floor_rounds);
        for (i, schema) in [Schema::Seed, Schema::Lean].into_iter().enumerate() {
            samples[i].push(floor_round(url, args.floor_tasks, schema).await?);
        }
    }
    let phase = |i: usize, p: usize| median(&samples[i].iter().map(|s| s[p]).collect::<Vec<_>>());
    Ok([0, 1].map(|i| [0, 1, 2, 3].map(|p| phase(i, p))))
}

/// The engine's lifecycle as raw SQL in a pgbench script: the tasks were queued by their
/// own INSERT (lean schema), so a client claims with the engine's own statement and completes
/// what it claimed (task rows locked in id order first, as the engine does; the billing
/// triggers lock the workspace rows). Three writes per task, as in the engine.
fn pgbench_script(batch: i64) -> String {
    let claim = CLAIM_SQL
        .replace("$1", "'pgbench-' || :client_id")
        .replace("$2", &batch.to_string())
        .replace("$3::text[]", "NULL::text[]")
        .replace("$4", "600000")
        .replace("$5::boolean", "false");
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    format!(
        "{claim};\nBEGIN;\n{lock_tasks};\n{complete};\nCOMMIT;\n",
        claim = one_line(&claim),
        lock_tasks = one_line(
            "SELECT id FROM tasks WHERE status = 'processing' AND locked_by = 'pgbench-' || :client_id
             ORDER BY id FOR NO KEY UPDATE"
        ),
        complete = one_line(&complete_like_the_mock(
            "AND locked_by = 'pgbench-' || :client_id"
        )),
    )
}

async fn raw_sql(url: &str, args: &BenchArgs, dir: &Path) -> anyhow::Result<f64> {
    let (bench_url, pool) = fresh_db(url).await?;
    workspaces(&pool).await?;
    register_types(&pool).await?;
    insert_tasks(&pool, args.tasks, "pending", None).await?;
    let queued = count(&pool, "queued").await?;
    if queued != args.tasks {
        bail!("the inserts queued {queued} of {} tasks", args.tasks);
    }
    let batch = 256i64;
    let script = dir.join("lifecycle.sql");
    std::fs::write(&script, pgbench_script(batch))?;
    let clients = args.pgbench_clients;
    let started = Instant::now();
    // The password goes to pgbench in its environment, never on its command line (`ps`).
    let (target, password) = split_password(&bench_url)?;
    // The claim skips a workspace whose row another client holds (as the engine's does, since
    // 0009), so a transaction may claim nothing: pgbench runs in passes, each with enough
    // transactions per client for what is left, until the queue is drained.
    let mut passes = 0;
    loop {
        let left = args.tasks - count(&pool, "completed").await?;
        if left <= 0 {
            break;
        }
        passes += 1;
        if passes > 50 {
            bail!(
                "pgbench left {left} of {} tasks after 50 passes",
                args.tasks
            );
        }
        let per_client = (left / batch / clients as i64) + 20;
        let mut pgbench = tokio::process::Command::new("pgbench");
        if let Some(password) = &password {
            pgbench.env("PGPASSWORD", password);
        }
        let out = pgbench
            .arg("-n")
            .arg("-f")
            .arg(&script)
            .arg("-c")
            .arg(clients.to_string())
            .arg("-j")
            .arg(clients.to_string())
            .arg("-t")
            .arg(per_client.to_string())
            .arg(&target)
            .output()
            .await
            .context("running pgbench (apt-get install postgresql-client)")?;
        if !out.status.success() {
            bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    // Stop the clock when the last task completed, not when the idle tail of pgbench ends.
    let last = span_seconds(&pool).await?;
    let completed = count(&pool, "completed").await?;
    let _ = started;
    pool.close().await;
    if completed < args.tasks {
        bail!("pgbench completed only {completed} of {} tasks", args.tasks);
    }
    Ok(args.tasks as f64 / last)
}

/// A connection URL without its password, and the password (percent-decoded), so the
/// password can travel in `PGPASSWORD` instead of a command line.
fn split_password(url: &str) -> anyhow::Result<(String, Option<String>)> {
    let mut parsed = url::Url::parse(url).context("parsing the bench database URL")?;
    let Some(encoded) = parsed.password().map(str::to_owned) else {
        return Ok((url.to_owned(), None));
    };
    parsed
        .set_password(None)
        .map_err(|()| anyhow::anyhow!("cannot remove the password from the bench database URL"))?;
    Ok((parsed.to_string(), Some(percent_decode(&encoded))))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(Ok(b)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The two dashboard databases: the schema before 0012 and the lean one, same rows.
const DASHBOARD_DBS: [&str; 2] = ["bizq_bench_dash_seed", "bizq_bench_dash_lean"];

/// `bizq stats` as shipped before 0012 (the lean schema's are in `bizq::queries`).
const STATS_BY_STATUS_BEFORE: &str =
    "SELECT status, count(*) AS n FROM tasks GROUP BY status ORDER BY status";
const STATS_QUEUE_BEFORE: &str = "SELECT (SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM tasks WHERE status = 'queued') AS oldest_queued_s,
                (SELECT count(*) FROM tasks WHERE status = 'completed' AND completed_at > now() - interval '1 minute') AS done_1m,
                (SELECT count(*) FROM tasks WHERE status = 'pending' AND wait_reason IS NOT NULL) AS parked,
                (SELECT count(*) FROM tasks WHERE status = 'pending' AND deps_remaining > 0) AS blocked";

/// The dashboard queries, as a tenant's dashboard and an operator run them.
const DASHBOARD_QUERIES: [&str; 4] = [
    "workspace_dashboard, one workspace",
    "task_performance, one workspace",
    "bizq list -w <workspace> -s failed",
    "bizq stats (both queries)",
];

/// `n` finished tasks over 100 workspaces (1 in 53 failed, the rest completed with the mock's
/// kind of output), created and completed over the last 30 days, then vacuumed and analyzed as
/// autovacuum would leave them.
async fn finished_tasks(pool: &PgPool, n: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO workspaces (name, slug, credits_balance, monthly_credit_limit)
         SELECT 'dash ' || g, 'dash-' || lpad(g::text, 3, '0'), 1000000000, 2000000000
           FROM generate_series(1, 100) g",
    )
    .execute(pool)
    .await?;
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(100_000);
        sqlx::query(
            "INSERT INTO tasks (workspace_id, type, category, name, input, priority, status,
                                deps_remaining, output, actual_cost, cost_breakdown,
                                processing_time_ms, ai_provider, ai_model, attempt, error_details,
                                created_at, started_at, completed_at)
             SELECT w.ids[1 + g % 100],
                    CASE WHEN g % 3 = 0 THEN 'ai.summarize' ELSE 'ai.generate' END, 'content', 'dash',
                    jsonb_build_object('prompt', 'dash prompt ' || g), 1 + g % 10,
                    CASE WHEN g % 53 = 0 THEN 'failed' ELSE 'completed' END, 0,
                    CASE WHEN g % 53 <> 0 THEN jsonb_build_object(
                        'text', '[mock:' || lpad(to_hex(hashtext('p' || g)), 8, '0')
                                || '] A considered answer to \"dash prompt ' || g || '\".',
                        'usage', jsonb_build_object('prompt_tokens', 4, 'completion_tokens', 18,
                                                    'total_tokens', 22)) END,
                    CASE WHEN g % 53 <> 0 THEN 1 END,
                    CASE WHEN g % 53 <> 0 THEN jsonb_build_object('provider', 'mock', 'model', 'mock-1', 'credits', 1) END,
                    5 + g % 40, 'mock', 'mock-1', 1,
                    CASE WHEN g % 53 = 0 THEN jsonb_build_object('message', 'provider error', 'code', 'provider_error', 'attempt', 1) END,
                    now() - (g % 43200) * interval '1 minute' - interval '2 seconds',
                    now() - (g % 43200) * interval '1 minute' - interval '1 second',
                    now() - (g % 43200) * interval '1 minute'
               FROM generate_series($1 + 1, $1 + $2) g,
                    (SELECT array_agg(id ORDER BY slug) AS ids FROM workspaces) w",
        )
        .bind(done)
        .bind(chunk)
        .execute(pool)
        .await?;
        done += chunk;
    }
    sqlx::query("VACUUM ANALYZE tasks").execute(pool).await?;
    Ok(())
}

/// Runs each dashboard query `reps` times (a different workspace each time) and returns the
/// median milliseconds of each.
async fn dashboard_round(pool: &PgPool, schema: Schema, reps: usize) -> anyhow::Result<[f64; 4]> {
    let workspaces: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM workspaces ORDER BY slug")
        .fetch_all(pool)
        .await?;
    let queue = match schema {
        Schema::Seed => STATS_QUEUE_BEFORE,
        Schema::Lean => bizq::queries::STATS_QUEUE_SQL,
    };
    let mut samples: [Vec<f64>; 4] = Default::default();
    for r in 0..reps {
        let ws = workspaces[(r * 37) % workspaces.len()];
        let t = Instant::now();
        sqlx::query(
            "SELECT workspace_id, pending_tasks, processing_tasks, tasks_completed_today,
                    revenue_30d, orders_today, total_products, active_products
               FROM workspace_dashboard
              WHERE workspace_id = $1",
        )
        .bind(ws)
        .fetch_all(pool)
        .await?;
        samples[0].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sqlx::query(
            "SELECT workspace_id, task_type, total_executions, avg_processing_time, avg_cost,
                    avg_quality_score, success_rate, date
               FROM task_performance
              WHERE workspace_id = $1",
        )
        .bind(ws)
        .fetch_all(pool)
        .await?;
        samples[1].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sqlx::query(bizq::queries::LIST_SQL)
            .bind("failed")
            .bind(ws)
            .bind(None::<String>)
            .bind(20i64)
            .fetch_all(pool)
            .await?;
        samples[2].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let mut tx = pool.begin().await?;
        if schema == Schema::Lean {
            sqlx::query(bizq::queries::STATS_SETTINGS_SQL)
                .execute(&mut *tx)
                .await?;
        }
        match schema {
            Schema::Seed => {
                sqlx::query(STATS_BY_STATUS_BEFORE)
                    .fetch_all(&mut *tx)
                    .await?;
            }
            Schema::Lean => {
                bizq::queries::status_counts(&mut tx).await?;
            }
        }
        sqlx::query(queue).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        samples[3].push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples.map(|s| median(&s)))
}

/// The dashboard queries on `n` finished tasks over 100 workspaces, the schema before 0012
/// against the lean one, rounds alternating; milliseconds, median over rounds of each round's
/// median.
async fn dashboards(url: &str, n: i64, rounds: u32) -> anyhow::Result<[[f64; 4]; 2]> {
    let mut pools = Vec::new();
    for (name, schema) in DASHBOARD_DBS.iter().zip([Schema::Seed, Schema::Lean]) {
        let (_, pool) = fresh_db_with(url, name, schema).await?;
        eprintln!("  {name}: inserting {n} finished tasks ...");
        finished_tasks(&pool, n).await?;
        pools.push((pool, schema));
    }
    let mut rounds_ms: [Vec<[f64; 4]>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        eprintln!("  round {round}/{rounds} ...");
        for (i, (pool, schema)) in pools.iter().enumerate() {
            rounds_ms[i].push(dashboard_round(pool, *schema, 15).await?);
        }
    }
    for (pool, _) in pools {
        pool.close().await;
    }
    drop_dbs(url, &DASHBOARD_DBS).await?;
    let q = |i: usize, k: usize| median(&rounds_ms[i].iter().map(|r| r[k]).collect::<Vec<_>>());
    Ok([0, 1].map(|i| [0, 1, 2, 3].map(|k| q(i, k))))
}

/// The pgbench script, when `--print-pgbench-script` asks for it instead of a run.
pub fn requested_script(args: &BenchArgs) -> Option<String> {
    args.print_pgbench_script.then(|| pgbench_script(256))
}

pub async fn run(url: &str, args: BenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("bizq-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if let Some(l) = &args.logs {
        std::fs::create_dir_all(l)?;
    }
    let config = dir.join("bench.toml");
    std::fs::write(&config, BENCH_CONFIG)?;
    println!(
        "bizq-bench: {}; {} tasks end to end, mock provider at 0 ms, one scheduler per run",
        args.only.join(", "),
        args.tasks
    );

    let run = |name: &str| args.only.iter().any(|o| o == name);
    // End to end and raw SQL alternate round by round, so that a slow spell of the machine
    // hits both; figures are medians, and each round's own ratio is shown too.
    let (run_e2e, run_raw) = (run("e2e"), run("pgbench"));
    let mut e2e: Vec<(usize, Vec<f64>)> = if run_e2e {
        args.workers.iter().map(|&w| (w, Vec::new())).collect()
    } else {
        Vec::new()
    };
    let mut raw = Vec::new();
    for round in (1..=args.rounds).filter(|_| run_e2e || run_raw) {
        for (w, rates) in &mut e2e {
            eprintln!(
                "round {round}/{}: end to end with {w} worker process(es) ...",
                args.rounds
            );
            rates.push(end_to_end(url, &args, &config, *w).await?);
        }
        if run_raw {
            eprintln!("round {round}/{}: raw SQL through pgbench ...", args.rounds);
            raw.push(raw_sql(url, &args, &dir).await?);
        }
    }
    let rounds_text = |xs: &[f64]| {
        xs.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (w, rates) in &e2e {
        println!(
            "end-to-end  workers={w}  {:>9.0} tasks/s  (median of {}: {})",
            median(rates),
            rates.len(),
            rounds_text(rates)
        );
    }
    if run_raw {
        let raw_median = median(&raw);
        println!(
            "raw SQL (pgbench, {} clients: insert queued + claim + complete)  {:>9.0} tasks/s  (median of {}: {})",
            args.pgbench_clients,
            raw_median,
            raw.len(),
            rounds_text(&raw)
        );
        for (w, rates) in &e2e {
            let per_round: Vec<f64> = rates.iter().zip(&raw).map(|(e, r)| e / r).collect();
            println!(
                "  engine with {w} worker(s) / raw SQL = {:.2}  (median of medians; rounds: {})",
                median(rates) / raw_median,
                per_round
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    if run("latency") {
        eprintln!("pickup latency on an idle fleet ...");
        let (p50, p99, max) = pickup_latency(url, &args, &config).await?;
        println!(
            "pickup latency (insert -> started_at), idle fleet, {} samples: p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms",
            args.latency_samples
        );
    }

    if run("claim") {
        eprintln!("claim throughput ...");
        let (empty, deep, blocked) = claim_throughput(url, &args).await?;
        println!(
            "claim statement, 1 client, 100 per claim, median of {} rounds:",
            args.claim_rounds
        );
        println!("  near-empty queue                   {empty:>9.0} claims/s");
        println!(
            "  {:>9} queued behind            {deep:>9.0} claims/s  ({:.2} of near-empty)",
            args.deep_queue,
            deep / empty
        );
        println!(
            "  {:>9} blocked on a dependency  {blocked:>9.0} claims/s  ({:.2} of near-empty)",
            args.blocked,
            blocked / empty
        );
    }

    if run("floor") {
        eprintln!("floor: the lifecycle as bulk statements ...");
        let [seed, lean] = floor(url, &args).await?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "floor: a task's writes as bulk statements of {} rows, 1 backend, no client work, median of {} rounds:",
            args.floor_tasks, args.floor_rounds
        );
        println!(
            "  {:<44} {:>7} {:>7} {:>7} {:>9} {:>8}  {:>11}  {:>14}",
            "us per task",
            "insert",
            "admit",
            "claim",
            "complete",
            "total",
            "1 backend",
            "bound, cores"
        );
        let cell = |x: f64| {
            if x.is_finite() {
                format!("{x:.1}")
            } else {
                "-".into()
            }
        };
        for (label, p) in [
            ("seed schema (before 0012: 24 indexes, 4 writes)", seed),
            ("lean schema (0012: 12 indexes, 3 writes)", lean),
        ] {
            let total: f64 = p.iter().filter(|x| x.is_finite()).sum();
            println!(
                "  {label:<44} {:>7} {:>7} {:>7} {:>9} {total:>8.1}  {:>7.0} /s  {:>7.0} /s x{cores}",
                cell(p[0]),
                cell(p[1]),
                cell(p[2]),
                cell(p[3]),
                1e6 / total,
                1e6 / total * cores as f64
            );
        }
        println!(
            "  (bound: an optimistic ceiling, every core running PostgreSQL flat out with no lock or WAL contention and no worker or client CPU)"
        );
    }
    if run("dashboard") {
        eprintln!("dashboard queries ...");
        let [seed, lean] = dashboards(url, args.dashboard_tasks, args.rounds).await?;
        println!(
            "dashboard queries on {} finished tasks over 100 workspaces, ms, median of {} alternating rounds of 15 runs:",
            args.dashboard_tasks, args.rounds
        );
        println!(
            "  {:<36} {:>14} {:>12} {:>8}",
            "query", "before 0012", "lean (0012)", "ratio"
        );
        for (k, name) in DASHBOARD_QUERIES.iter().enumerate() {
            println!(
                "  {name:<36} {:>14.2} {:>12.2} {:>8.2}",
                seed[k],
                lean[k],
                lean[k] / seed[k]
            );
        }
    }
    if run("providers") {
        eprintln!("providers against a stand-in server ...");
        crate::providers::run(url, &args, &dir).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_password;

    /// pgbench gets the URL without the password, and the password itself for `PGPASSWORD`.
    #[test]
    fn the_password_leaves_the_command_line() {
        let (url, password) =
            split_password("postgres://bench:s%3Acr%40t@db.example:5432/bizq_bench").unwrap();
        assert_eq!(url, "postgres://bench@db.example:5432/bizq_bench");
        assert_eq!(password.as_deref(), Some("s:cr@t"));
        let (url, password) = split_password("postgres://postgres@127.0.0.1:5/x").unwrap();
        assert_eq!(url, "postgres://postgres@127.0.0.1:5/x");
        assert_eq!(password, None);
    }
}
