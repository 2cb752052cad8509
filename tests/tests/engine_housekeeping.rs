//! Housekeeping: analytics partitions ahead, the monthly credit reset, single-flight, and
//! rebuilding a bloated queue index.

use std::time::Duration;

use bizq::config::{DependencyFailurePolicy, SchedulerConfig};
use bizq::handlers::KNOWN_TYPES;
use bizq::housekeeping::{self, BloatThresholds};
use bizq::lifecycle::{self, ClaimRequest};
use bizq_tests::engine::{generate, workspace};
use sqlx::PgPool;

#[sqlx::test(migrations = "../migrations")]
async fn housekeeping_creates_partitions_and_resets_months(pool: PgPool) -> anyhow::Result<()> {
    let stale = workspace(&pool, 100).await?;
    let current = workspace(&pool, 100).await?;
    sqlx::query(
        "UPDATE workspaces
            SET credits_used_this_month = 50,
                credits_month_start = (date_trunc('month', now()) - interval '1 month')::date
          WHERE id = $1",
    )
    .bind(stale)
    .execute(&pool)
    .await?;
    sqlx::query("UPDATE workspaces SET credits_used_this_month = 7 WHERE id = $1")
        .bind(current)
        .execute(&pool)
        .await?;

    let config = SchedulerConfig {
        partitions_ahead: 5,
        ..Default::default()
    };
    let report = housekeeping::run(&pool, &config)
        .await?
        .expect("not locked elsewhere");
    assert!(report.partitions_created >= 1, "{report:?}");
    assert_eq!(report.workspaces_reset, 1, "{report:?}");
    assert!(
        report.indexes_rebuilt.is_empty(),
        "a small database has nothing to rebuild: {report:?}"
    );

    let months_ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'analytics_events'::regclass
            AND c.relname = ANY (SELECT to_char(now() + make_interval(months => m), '\"analytics_events_y\"YYYY\"m\"MM')
                                   FROM generate_series(0, 5) m)",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        months_ahead, 6,
        "this month and the next five have partitions"
    );

    let rows: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT credits_used_this_month, credits_month_start = date_trunc('month', now() AT TIME ZONE timezone)::date
           FROM workspaces WHERE id = ANY($1) ORDER BY id = $2 DESC",
    )
    .bind(vec![stale, current])
    .bind(stale)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        rows,
        vec![(0, true), (7, true)],
        "only the stale workspace was reset"
    );

    // A second run has nothing left to do.
    let again = housekeeping::run(&pool, &config)
        .await?
        .expect("not locked elsewhere");
    assert_eq!((again.partitions_created, again.workspaces_reset), (0, 0));
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn only_one_scheduler_keeps_house_at_a_time(pool: PgPool) -> anyhow::Result<()> {
    let mut other = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(housekeeping::LOCK_KEY)
        .execute(&mut *other)
        .await?;
    let config = SchedulerConfig::default();
    assert!(
        housekeeping::run(&pool, &config).await?.is_none(),
        "another scheduler holds the lock"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(housekeeping::LOCK_KEY)
        .execute(&mut *other)
        .await?;
    assert!(housekeeping::run(&pool, &config).await?.is_some());
    Ok(())
}

/// Size in bytes, validity and readiness of the index `name`.
async fn index_state(pool: &PgPool, name: &str) -> anyhow::Result<(i64, bool, bool)> {
    Ok(sqlx::query_as(
        "SELECT pg_relation_size(c.oid), i.indisvalid, i.indisready
           FROM pg_class c
           JOIN pg_index i ON i.indexrelid = c.oid
          WHERE c.relname = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await?)
}

#[sqlx::test(migrations = "../migrations")]
async fn a_bloated_claim_index_is_rebuilt(pool: PgPool) -> anyhow::Result<()> {
    // A burst of 50,000 queued tasks, newest first (distinct keys, so btree deduplication
    // cannot pack them; descending, so pages split half full), all completed, then vacuumed:
    // the claim index keeps its pages, but they are empty.
    let ws = workspace(&pool, 1000).await?;
    sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input, priority, status,
                            deps_remaining, created_at)
         SELECT $1, 'ai.generate', 'content', 'burst', '{}', 1 + i % 10, 'queued', 0,
                now() - i * interval '1 millisecond'
           FROM generate_series(1, 50000) AS i",
    )
    .bind(ws)
    .execute(&pool)
    .await?;
    sqlx::query("UPDATE tasks SET status = 'completed' WHERE status = 'queued'")
        .execute(&pool)
        .await?;
    sqlx::raw_sql("VACUUM tasks").execute(&pool).await?;
    let (bloated, _, _) = index_state(&pool, "idx_tasks_claim").await?;
    assert!(bloated > 2 * 1024 * 1024, "the burst left {bloated} bytes");

    // Production thresholds: a few MB is not worth a rebuild.
    let config = SchedulerConfig::default();
    let report = housekeeping::run(&pool, &config)
        .await?
        .expect("not locked elsewhere");
    assert!(report.indexes_rebuilt.is_empty(), "{report:?}");
    assert_eq!(index_state(&pool, "idx_tasks_claim").await?.0, bloated);

    // Low thresholds (over 1 MB and bigger than its live entries need): the claim index, and
    // only it, is rebuilt, small and valid.
    let low = BloatThresholds {
        min_bytes: 1024 * 1024,
        ratio: 1,
    };
    let report = housekeeping::run_with(&pool, &config, &low)
        .await?
        .expect("not locked elsewhere");
    assert_eq!(
        report.indexes_rebuilt,
        vec!["idx_tasks_claim"],
        "{report:?}"
    );
    let (rebuilt, valid, ready) = index_state(&pool, "idx_tasks_claim").await?;
    assert!(
        rebuilt * 10 < bloated,
        "{bloated} bytes before the rebuild, {rebuilt} after"
    );
    assert!(valid && ready, "idx_tasks_claim is valid and ready");
    let leftovers: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text
           FROM pg_class c
           JOIN pg_index i ON i.indexrelid = c.oid
          WHERE i.indrelid = 'tasks'::regclass
            AND (NOT i.indisvalid OR c.relname LIKE 'idx_tasks_claim%cc%')",
    )
    .fetch_all(&pool)
    .await?;
    assert!(
        leftovers.is_empty(),
        "no half-built index left: {leftovers:?}"
    );

    // Claims still work after the rebuild.
    let task = generate(&pool, ws, "after the rebuild", 5, &[]).await?;
    lifecycle::admit(&pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    let claimed = lifecycle::claim(
        &pool,
        &ClaimRequest {
            worker_id: "t",
            limit: 10,
            type_patterns: None,
            lease: Duration::from_secs(30),
        },
    )
    .await?;
    let ids: Vec<_> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![task]);
    Ok(())
}
