//! The KEDA scaler query of deploy/kubernetes/keda-scaledobject.yaml, read out of the manifest
//! and run on the real schema: the number of workers it asks for, and its plan.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bizq::config::{Config, DependencyFailurePolicy};
use bizq::handlers::KNOWN_TYPES;
use bizq::lifecycle::{self, ClaimRequest, NewTask};
use bizq_tests::engine::{generate, workspace};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool, Row};

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(name)
}

/// The value of `key` in the manifest's trigger metadata. The query is a literal block scalar
/// (`query: |-`), its lines indented below the key; other keys are quoted one-line scalars.
/// Anything else fails here, loudly, rather than running a half-read query.
fn trigger_metadata(manifest: &str, key: &str) -> String {
    let lines: Vec<&str> = manifest.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (at, line) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no `{key}:` in the ScaledObject"));
    let value = line.trim_start()[key.len() + 1..].trim();
    if value != "|-" {
        return value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{key} is not a quoted string: {value}"))
            .to_string();
    }
    let body: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
        .copied()
        .collect();
    let margin = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .expect("the query block is empty");
    body.iter()
        .map(|l| l.get(margin..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
}

/// Rows of `tasks` the executed plan looked at, node by node (`EXPLAIN ANALYZE`): what it
/// returned plus what its filters threw away, times its loops. Sequential scans are named.
fn tasks_rows_read(plan: &Value, out: &mut Vec<(String, f64)>) {
    let num = |k: &str| plan.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    if plan.get("Relation Name").and_then(Value::as_str) == Some("tasks") {
        let read = (num("Actual Rows")
            + num("Rows Removed by Filter")
            + num("Rows Removed by Index Recheck"))
            * num("Actual Loops").max(1.0);
        let node = plan["Node Type"].as_str().unwrap_or("?");
        let index = plan
            .get("Index Name")
            .and_then(Value::as_str)
            .unwrap_or("-");
        out.push((format!("{node} ({index})"), read));
    }
    for child in plan
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        tasks_rows_read(child, out);
    }
}

/// Pins the scaling contract of the worker ScaledObject: its query returns exactly one number,
/// the workers needed for the tasks queued or running, `ceil((queued + processing) /
/// worker.concurrency)` with the concurrency of deploy/kubernetes/bizq.toml (the ConfigMap),
/// so that with targetQueryValue the HPA's `ceil(value / target)` is that many replicas.
/// Pending (scheduled, blocked), terminal and escalated tasks are not counted. And the query
/// reads only live tasks through an index: with 20,000 completed rows, it reads none of them.
#[sqlx::test(migrations = "../migrations")]
async fn keda_query_asks_for_queued_and_running_tasks_per_worker_slot(
    pool: PgPool,
) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(deploy_file("keda-scaledobject.yaml"))?;
    // The query is this repository's own manifest, run as written: that is the point.
    let query = trigger_metadata(&manifest, "query");
    let target: f64 = trigger_metadata(&manifest, "targetQueryValue").parse()?;
    let config = Config::from_toml(&std::fs::read_to_string(deploy_file("bizq.toml"))?)?;
    config.validate()?;
    let slots = config.worker.concurrency as i64;
    assert!(slots > 1, "the ConfigMap's worker.concurrency is {slots}");

    // History: completed tasks, as a long-running deployment has (and the planner sees).
    let ws = workspace(&pool, 1_000_000).await?;
    sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, completed_at,
                            actual_cost)
         SELECT $1, 'ai.generate', 'content', 'old', '{}', 'completed', now(), 1
           FROM generate_series(1, 20000)",
    )
    .bind(ws)
    .execute(&pool)
    .await?;

    // The live queue: 70 tasks due now, of which 10 are claimed (processing) and 60 queued.
    let first = generate(&pool, ws, "root", 5, &[]).await?;
    for i in 1..70 {
        generate(&pool, ws, &format!("due {i}"), 5, &[]).await?;
    }
    // Not counted: 20 scheduled for tomorrow, 10 waiting on a dependency (both pending),
    // a human task (escalated) and an unknown type (failed at admission).
    for i in 0..20 {
        let mut t = NewTask::generate(ws, &format!("later {i}"));
        t.scheduled_for = Some(chrono::Utc::now() + chrono::Duration::days(1));
        lifecycle::enqueue(&pool, &t).await?;
    }
    for i in 0..10 {
        generate(&pool, ws, &format!("after root {i}"), 5, &[first]).await?;
    }
    let mut human = NewTask::generate(ws, "a person decides");
    human.worker_type = Some("human".into());
    lifecycle::enqueue(&pool, &human).await?;
    let mut unknown = NewTask::generate(ws, "nobody runs this");
    unknown.task_type = "video.render".into();
    lifecycle::enqueue(&pool, &unknown).await?;
    lifecycle::admit(&pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    let claimed = lifecycle::claim(
        &pool,
        &ClaimRequest {
            worker_id: "deploy-keda-test",
            limit: 10,
            type_patterns: None,
            lease: Duration::from_secs(300),
        },
    )
    .await?;
    assert_eq!(claimed.len(), 10);
    sqlx::query("ANALYZE tasks").execute(&pool).await?;

    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*)
           FROM tasks
          GROUP BY status
          ORDER BY status",
    )
    .fetch_all(&pool)
    .await?;
    let count = |s: &str| {
        counts
            .iter()
            .find(|(status, _)| status == s)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(
        (
            count("queued"),
            count("processing"),
            count("pending"),
            count("escalated"),
            count("failed"),
            count("completed")
        ),
        (60, 10, 30, 1, 1, 20000),
        "the seeded queue: {counts:?}"
    );

    // KEDA's contract: one row, one numeric column.
    let rows = sqlx::query(AssertSqlSafe(query.clone()))
        .fetch_all(&pool)
        .await?;
    assert_eq!(rows.len(), 1, "the query returns one row");
    assert_eq!(rows[0].columns().len(), 1, "the query returns one column");
    let wanted: i64 = rows[0].try_get(0)?;
    let expected = (count("queued") + count("processing") + slots - 1) / slots;
    assert_eq!(
        wanted, expected,
        "ceil((queued + processing) / {slots}) workers; the query was:\n{query}"
    );
    assert_eq!(expected, 3, "70 live tasks at 32 slots each");
    // What the HPA makes of it (metric type AverageValue): ceil(value / target) replicas.
    assert_eq!((wanted as f64 / target).ceil() as i64, expected);

    // The queue's indexes answer it: of the 20,000 finished rows not one is read (the live
    // tasks are 102), and nothing is read sequentially. KEDA polls this every 15 s forever.
    let plan: Value = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {query}"
    )))
    .fetch_one(&pool)
    .await?;
    let mut reads = Vec::new();
    tasks_rows_read(&plan[0]["Plan"], &mut reads);
    let total: f64 = reads.iter().map(|(_, n)| n).sum();
    assert!(
        !reads.is_empty()
            && total <= 200.0
            && reads.iter().all(|(n, _)| !n.starts_with("Seq Scan")),
        "the scaler query reads {total} rows of tasks: {reads:?}; plan:\n{plan:#}"
    );

    // An empty queue asks for no workers (minReplicaCount keeps the floor).
    sqlx::query("UPDATE tasks SET status = 'cancelled' WHERE status IN ('queued', 'processing')")
        .execute(&pool)
        .await?;
    let idle: i64 = sqlx::query_scalar(AssertSqlSafe(query.clone()))
        .fetch_one(&pool)
        .await?;
    assert_eq!(idle, 0);
    Ok(())
}

/// Pins docs/deployment.md's least-privilege role for KEDA: `BYPASSRLS` and `SELECT (status)` on
/// `tasks` are enough to run the scaler query and see every tenant's tasks. Without
/// `BYPASSRLS`, row-level security would hide the tasks and the query would ask for 0 workers
/// while the queue grows; without the column grant it fails.
#[sqlx::test(migrations = "../migrations")]
async fn keda_query_runs_as_the_documented_read_only_role(pool: PgPool) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(deploy_file("keda-scaledobject.yaml"))?;
    let query = trigger_metadata(&manifest, "query");
    let ws = workspace(&pool, 1000).await?;
    for i in 0..40 {
        generate(&pool, ws, &format!("queued {i}"), 5, &[]).await?;
    }
    lifecycle::admit(&pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;

    // Roles are cluster-wide: a unique name, dropped at the end.
    let role = format!("bizq_keda_{}", uuid::Uuid::new_v4().simple());
    let mut conn = pool.acquire().await?;
    for stmt in [
        format!("CREATE ROLE {role} NOLOGIN BYPASSRLS"),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT (status) ON tasks TO {role}"),
        format!("SET ROLE {role}"),
    ] {
        sqlx::query(AssertSqlSafe(stmt)).execute(&mut *conn).await?;
    }
    let as_role: Result<i64, sqlx::Error> = sqlx::query_scalar(AssertSqlSafe(query.clone()))
        .fetch_one(&mut *conn)
        .await;
    sqlx::query("RESET ROLE").execute(&mut *conn).await?;
    for stmt in [
        format!("REVOKE ALL ON tasks FROM {role}"),
        format!("REVOKE ALL ON SCHEMA public FROM {role}"),
        format!("DROP ROLE {role}"),
    ] {
        sqlx::query(AssertSqlSafe(stmt)).execute(&mut *conn).await?;
    }
    assert_eq!(as_role?, 2, "40 queued tasks at 32 slots: 2 workers");
    Ok(())
}
