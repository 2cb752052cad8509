//! `bizq-bench`, the benchmark's own binary, run as a process: the pgbench script it prints
//! runs the real lifecycle, the operator's `bizq` no longer carries the benchmark, and the
//! providers scenario runs end to end on a tiny setting, its printed figures agreeing with
//! what the stand-in server and the bench databases recorded.
//!
//! No speed is asserted here (house rule): only that the figures are the counts they claim
//! to be, and that the budget was kept.

use std::time::Duration;

use bizq::lifecycle::{self, NewTask};
use bizq_tests::engine::*;
use sqlx::PgPool;

/// What one run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> String {
        assert_eq!(
            self.code, 0,
            "the run failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self.stdout
    }
}

/// Runs `binary args...` with `DATABASE_URL` = `url` (or none), within `timeout`.
async fn run(binary_name: &str, url: Option<&str>, args: &[&str], timeout: Duration) -> Run {
    let mut cmd = tokio::process::Command::new(binary(binary_name));
    cmd.args(args)
        .env_remove("BIZQ_CONFIG")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{binary_name} {args:?} did not finish within {timeout:?}"))
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Pins `bizq-bench --print-pgbench-script`: it needs no database, and the script it prints
/// is the real lifecycle — run against a database where a worker registered `ai.generate`
/// (so the INSERT queued the task, migration 0012), it claims, completes and charges it.
#[sqlx::test(migrations = "../migrations")]
async fn bench_prints_a_pgbench_script_that_runs_the_lifecycle(pool: PgPool) -> anyhow::Result<()> {
    let script = run(
        "bizq-bench",
        None,
        &["--print-pgbench-script"],
        Duration::from_secs(30),
    )
    .await
    .ok();
    assert!(
        script.contains("BEGIN;\n") && script.ends_with("COMMIT;\n"),
        "{script}"
    );
    assert!(
        !script.contains('$'),
        "no unbound parameters left:\n{script}"
    );

    let ws = workspace(&pool, 1000).await?;
    bizq::task_types::register(&pool, None, "test", false).await?;
    let id = lifecycle::enqueue(&pool, &NewTask::generate(ws, "bench")).await?;
    // The script is the bench's own output with pgbench's client variable bound to 1.
    sqlx::raw_sql(sqlx::AssertSqlSafe(script.replace(":client_id", "1")))
        .execute(&pool)
        .await?;
    let (st, cost, locked_by): (String, Option<i32>, Option<String>) =
        sqlx::query_as("SELECT status, actual_cost, locked_by FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(st, "completed");
    assert_eq!(locked_by.as_deref(), Some("pgbench-1"));
    let cost = cost.expect("an actual cost");
    let c = credits(&pool, ws).await?;
    assert_eq!((c.balance, c.reserved, c.used), (1000 - cost, 0, cost));
    Ok(())
}

/// The operator's CLI does not carry the benchmark any more.
#[tokio::test]
async fn the_bizq_cli_has_no_bench_command() {
    let r = run("bizq", None, &["bench"], Duration::from_secs(30)).await;
    assert_ne!(r.code, 0, "bizq bench should not exist:\n{}", r.stdout);
    assert!(r.stderr.contains("unrecognized subcommand"), "{}", r.stderr);
    let help = run("bizq", None, &["--help"], Duration::from_secs(30))
        .await
        .ok();
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("bench")),
        "{help}"
    );
}

/// The number right after `prefix` in `line` (digits and a decimal point).
fn number_after(line: &str, prefix: &str) -> f64 {
    let at = line
        .find(prefix)
        .unwrap_or_else(|| panic!("{prefix:?} not in {line:?}"));
    let rest = line[at + prefix.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line:?}"))
}

/// The one line of `out` containing `marker`.
fn line<'a>(out: &'a str, marker: &str) -> &'a str {
    let found: Vec<&str> = out.lines().filter(|l| l.contains(marker)).collect();
    assert_eq!(found.len(), 1, "one line with {marker:?} in:\n{out}");
    found[0]
}

/// A pool on the bench database `name` beside the test's own.
async fn bench_db(pool: &PgPool, name: &str) -> anyhow::Result<PgPool> {
    let opts = pool.connect_options().as_ref().clone().database(name);
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?)
}

/// Completed tasks, tasks that took more than one attempt, and the first-insert-to-last-
/// completion span in seconds, of a bench database.
async fn tasks_of(db: &PgPool) -> anyhow::Result<(i64, i64, f64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'completed' AND ai_provider = 'standin'),
                count(*) FILTER (WHERE attempt > 1),
                EXTRACT(EPOCH FROM max(completed_at) - min(created_at))::float8
           FROM tasks",
    )
    .fetch_one(db)
    .await?)
}

/// `bizq-bench --only providers` on a tiny setting: two workers under `rpm = 1200` for 12 s,
/// then one worker with 40 tasks in flight against 500 ms calls. What it prints must be what
/// the stand-in and the databases saw:
/// - every call the stand-in received was answered and completed exactly one task (no task
///   took a second attempt, the completed count in the bench database equals the calls);
/// - requests/min is the calls in the window over its length, and the budget held: no
///   10-second window above its share plus the bucket's burst and a little timer jitter;
/// - the peak in flight never exceeds the worker's concurrency and reaches it (40 tasks, all
///   claimable at once); tasks/s is the database's completed count over its own span.
#[sqlx::test(migrations = "../migrations")]
async fn the_providers_scenario_prints_what_the_stand_in_counted(
    pool: PgPool,
) -> anyhow::Result<()> {
    const RPM: f64 = 1200.0;
    const SECONDS: f64 = 12.0;
    const CONCURRENCY: f64 = 40.0;
    const TASKS: i64 = 120;
    let out = run(
        "bizq-bench",
        Some(&url_of(&pool)),
        &[
            "--only",
            "providers",
            "--workers",
            "2",
            "--rounds",
            "1",
            "--provider-seconds",
            "12",
            "--provider-rpm",
            "1200",
            "--provider-latency-ms",
            "100",
            "--provider-worker-concurrency",
            "16",
            "--provider-concurrency",
            "40",
            "--provider-slow-latency-ms",
            "500",
            "--provider-tasks",
            "120",
        ],
        Duration::from_secs(240),
    )
    .await
    .ok();

    // Rate budget.
    let rate = line(&out, "workers=2");
    let per_minute = number_after(rate, "workers=2");
    let worst = number_after(rate, "worst 10 s window");
    let round = out
        .lines()
        .skip_while(|l| !l.contains("workers=2"))
        .find(|l| l.contains("round 1: stand-in received"))
        .unwrap_or_else(|| panic!("a rate round line:\n{out}"));
    let received = number_after(round, "received");
    let in_window = number_after(round, "calls (");
    let answered = number_after(round, "answered");
    let completed = number_after(round, "tasks completed");
    let db = bench_db(&pool, "bizq_bench_providers").await?;
    let (done, retried, _) = tasks_of(&db).await?;
    let budget_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provider_budgets
          WHERE provider = 'standin' AND dimension = 'requests' AND capacity = 1200",
    )
    .fetch_one(&db)
    .await?;
    db.close().await;
    assert_eq!(
        (received, answered, completed),
        (done as f64, done as f64, done as f64),
        "{out}"
    );
    assert_eq!(retried, 0, "no task needed a second call");
    assert!(
        (per_minute - (in_window / SECONDS * 60.0).round()).abs() <= 1.0,
        "{per_minute}/min from {in_window} calls in {SECONDS} s:\n{out}"
    );
    // The share of a 10 s window (200), the burst (a quarter second: 5), timer jitter (5).
    assert!(worst <= RPM / 6.0 + 10.0, "worst window {worst}:\n{out}");
    assert!(
        worst <= received && worst >= in_window * 10.0 / SECONDS * 0.9,
        "worst window {worst} of {received} calls ({in_window} in {SECONDS} s):\n{out}"
    );
    assert_eq!(
        budget_rows, 1,
        "the worker configured the fleet-wide budget"
    );
    // Not a speed claim: a stalled fleet would send next to nothing.
    assert!(
        per_minute >= RPM * 0.5,
        "{per_minute}/min of a {RPM} budget:\n{out}"
    );

    // Concurrency.
    let peak = number_after(line(&out, "calls in flight at the stand-in, peak"), "peak");
    let mean = number_after(line(&out, "calls in flight at the stand-in, mean"), "mean");
    let tasks_per_s = number_after(line(&out, "tasks/s (first insert"), "completion)");
    let rss = number_after(line(&out, "worker peak RSS"), "(VmHWM)");
    let conc = out
        .lines()
        .skip_while(|l| !l.contains("providers, concurrency"))
        .find(|l| l.contains("round 1: stand-in received"))
        .unwrap_or_else(|| panic!("a concurrency round line:\n{out}"));
    let db = bench_db(&pool, "bizq_bench_providers_conc").await?;
    let (done, retried, span) = tasks_of(&db).await?;
    db.close().await;
    assert_eq!(done, TASKS, "{out}");
    assert_eq!(retried, 0);
    assert_eq!(number_after(conc, "received"), TASKS as f64, "{conc}");
    assert_eq!(number_after(conc, "answered"), TASKS as f64, "{conc}");
    assert_eq!(
        number_after(conc, "tasks completed"),
        TASKS as f64,
        "{conc}"
    );
    assert_eq!(peak, CONCURRENCY, "every task claimable at once:\n{out}");
    assert!(
        mean > 0.0 && mean <= peak,
        "mean {mean} in flight, peak {peak}"
    );
    assert!(
        (tasks_per_s - TASKS as f64 / span).abs() <= 1.0,
        "{tasks_per_s} tasks/s, the database says {TASKS} in {span} s"
    );
    assert!(rss > 1.0, "a resident set in MB: {rss}");
    Ok(())
}
