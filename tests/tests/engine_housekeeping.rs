//! Housekeeping: analytics partitions ahead, the monthly credit reset, single-flight, and
//! rebuilding a bloated queue index.

use std::time::Duration;

use bizq::config::{DependencyFailurePolicy, SchedulerConfig};
use bizq::handlers::KNOWN_TYPES;
use bizq::housekeeping::{self, BloatThresholds};
use bizq::lifecycle::{self, ClaimRequest};
use bizq_tests::engine::{generate, workspace};
use sqlx::PgPool;
use uuid::Uuid;

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
    // The months the function covers, computed in UTC as it does (not the session's zone).
    const EXPECTED_PARTITIONS: &str =
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'analytics_events'::regclass
            AND c.relname = ANY (SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC')
                                                  + make_interval(months => m),
                                                '\"analytics_events_y\"YYYY\"m\"MM')
                                   FROM generate_series(0, 5) m)";
    let existing: i64 = sqlx::query_scalar(EXPECTED_PARTITIONS)
        .fetch_one(&pool)
        .await?;
    let report = housekeeping::run(&pool, &config)
        .await?
        .expect("not locked elsewhere");
    assert_eq!(
        i64::from(report.partitions_created),
        6 - existing,
        "exactly the missing months of the six are created: {report:?}"
    );
    assert_eq!(report.workspaces_reset, 1, "{report:?}");
    assert!(
        report.indexes_rebuilt.is_empty(),
        "a small database has nothing to rebuild: {report:?}"
    );

    let months_ahead: i64 = sqlx::query_scalar(EXPECTED_PARTITIONS)
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

/// Three workspaces at the ends of the clock (Pacific/Kiritimati UTC+14, UTC, and
/// Pacific/Pago_Pago UTC−11, neither with daylight saving) whose billing month started
/// `month_start`, with some usage. Returns their ids in that order.
async fn far_zone_workspaces(pool: &PgPool, month_start: &str) -> anyhow::Result<[Uuid; 3]> {
    let mut ids = [Uuid::nil(); 3];
    for (i, tz) in ["Pacific/Kiritimati", "UTC", "Pacific/Pago_Pago"]
        .into_iter()
        .enumerate()
    {
        ids[i] = workspace(pool, 100).await?;
        sqlx::query(
            "UPDATE workspaces
                SET timezone = $2,
                    credits_used_this_month = $3,
                    credits_month_start = $4::date
              WHERE id = $1",
        )
        .bind(ids[i])
        .bind(tz)
        .bind(5 + i as i32)
        .bind(month_start)
        .execute(pool)
        .await?;
    }
    Ok(ids)
}

/// `(credits_used_this_month, credits_month_start)` of each workspace, as text dates.
async fn months(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<Vec<(i32, String)>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(
            sqlx::query_as(
                "SELECT credits_used_this_month, credits_month_start::text
                   FROM workspaces
                  WHERE id = $1",
            )
            .bind(id)
            .fetch_one(pool)
            .await?,
        );
    }
    Ok(out)
}

/// One step of [`walk_month_turn`]: an instant (RFC 3339), how many workspaces reset at it,
/// and the expected `(used, month start)` of each of the three workspaces afterwards.
type Step<'a> = (&'a str, u64, [(i32, &'a str); 3]);

/// Walks `reset_monthly_credits` through fixed instants around one month turn and checks,
/// at each, exactly which workspaces were reset and every workspace's figures.
/// `steps`: (instant, how many reset at it, expected (used, month start) of each workspace).
async fn walk_month_turn(pool: &PgPool, ids: &[Uuid; 3], steps: &[Step<'_>]) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    for (at, reset, expected) in steps {
        let instant: chrono::DateTime<chrono::Utc> = at.parse()?;
        let n = housekeeping::reset_monthly_credits(&mut conn, Some(instant)).await?;
        assert_eq!(n, *reset, "workspaces reset at {at}");
        let expected: Vec<(i32, String)> = expected
            .iter()
            .map(|(used, start)| (*used, start.to_string()))
            .collect();
        assert_eq!(
            months(pool, ids).await?,
            expected,
            "[Kiritimati, UTC, Pago Pago] (used, month start) at {at}"
        );
    }
    Ok(())
}

/// Pins the monthly reset's use of each workspace's own timezone (and the instant it is
/// given): around the January→February turn of 2027, Kiritimati (UTC+14) resets at
/// 2027-01-31 10:00 UTC, UTC at 2027-02-01 00:00, Pago Pago (UTC−11) at 2027-02-01 11:00 —
/// each not a second earlier — and a reset workspace is not reset again.
#[sqlx::test(migrations = "../migrations")]
async fn the_monthly_reset_follows_far_time_zones_at_a_month_turn(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ids = far_zone_workspaces(&pool, "2027-01-01").await?;
    let jan = "2027-01-01";
    let feb = "2027-02-01";
    walk_month_turn(
        &pool,
        &ids,
        &[
            ("2027-01-15T12:00:00Z", 0, [(5, jan), (6, jan), (7, jan)]),
            ("2027-01-31T09:59:59Z", 0, [(5, jan), (6, jan), (7, jan)]),
            ("2027-01-31T10:00:00Z", 1, [(0, feb), (6, jan), (7, jan)]),
            ("2027-01-31T23:59:59Z", 0, [(0, feb), (6, jan), (7, jan)]),
            ("2027-02-01T00:00:00Z", 1, [(0, feb), (0, feb), (7, jan)]),
            ("2027-02-01T10:59:59Z", 0, [(0, feb), (0, feb), (7, jan)]),
            ("2027-02-01T11:00:00Z", 1, [(0, feb), (0, feb), (0, feb)]),
            ("2027-02-20T00:00:00Z", 0, [(0, feb), (0, feb), (0, feb)]),
        ],
    )
    .await
}

/// Same mechanism as above across the year turn 2027→2028, where the month start's year
/// changes too (a comparison on the month number alone would miss it).
#[sqlx::test(migrations = "../migrations")]
async fn the_monthly_reset_follows_far_time_zones_at_a_year_turn(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ids = far_zone_workspaces(&pool, "2027-12-01").await?;
    let dec = "2027-12-01";
    let jan = "2028-01-01";
    walk_month_turn(
        &pool,
        &ids,
        &[
            ("2027-12-31T09:59:59Z", 0, [(5, dec), (6, dec), (7, dec)]),
            ("2027-12-31T10:00:00Z", 1, [(0, jan), (6, dec), (7, dec)]),
            ("2027-12-31T23:59:59Z", 0, [(0, jan), (6, dec), (7, dec)]),
            ("2028-01-01T00:00:00Z", 1, [(0, jan), (0, jan), (7, dec)]),
            ("2028-01-01T10:59:59Z", 0, [(0, jan), (0, jan), (7, dec)]),
            ("2028-01-01T11:00:00Z", 1, [(0, jan), (0, jan), (0, jan)]),
        ],
    )
    .await
}

/// All dependency edges, as (dependent, dependency), sorted.
async fn edges(pool: &PgPool) -> anyhow::Result<Vec<(Uuid, Uuid)>> {
    Ok(sqlx::query_as(
        "SELECT task_id, depends_on_id
           FROM task_dependencies
          ORDER BY task_id, depends_on_id",
    )
    .fetch_all(pool)
    .await?)
}

fn sorted_edges(mut e: Vec<(Uuid, Uuid)>) -> Vec<(Uuid, Uuid)> {
    e.sort();
    e
}

/// Pins housekeeping's deletion of dependency edges: exactly the edges whose dependent
/// (`task_id`) reached a terminal state (completed, failed, cancelled) are deleted; an edge of
/// a still-waiting dependent stays, even when its dependency has completed.
#[sqlx::test(migrations = "../migrations")]
async fn housekeeping_drops_exactly_the_edges_of_finished_dependents(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let p1 = generate(&pool, ws, "parent 1", 5, &[]).await?;
    let p2 = generate(&pool, ws, "parent 2", 5, &[]).await?;
    let c1 = generate(&pool, ws, "child of 1", 5, &[p1]).await?;
    let c2 = generate(&pool, ws, "child of 1 and 2", 5, &[p1, p2]).await?;
    let c3 = generate(&pool, ws, "child of 2", 5, &[p2]).await?;
    let c4 = generate(&pool, ws, "other child of 1", 5, &[p1]).await?;
    let r = lifecycle::admit(&pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    assert_eq!((r.queued, r.waiting), (2, 4), "{r:?}");
    assert_eq!(
        edges(&pool).await?,
        sorted_edges(vec![(c1, p1), (c2, p1), (c2, p2), (c3, p2), (c4, p1)]),
        "admission wrote one edge per dependency"
    );

    // c1 cancelled, c2 failed, c4 completed (by hand, as an admin could); then p2 completes
    // while c3 still waits on it.
    assert_eq!(
        lifecycle::cancel(&pool, c1, "not needed").await?,
        "pending",
        "cancel returns the status the task had"
    );
    sqlx::query("UPDATE tasks SET status = 'failed', completed_at = now() WHERE id = $1")
        .bind(c2)
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE tasks SET status = 'completed', completed_at = now() WHERE id = ANY($1)")
        .bind(vec![c4, p2])
        .execute(&pool)
        .await?;
    let states: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM tasks WHERE id = ANY($1) ORDER BY id")
            .bind(vec![p1, p2, c1, c2, c3, c4])
            .fetch_all(&pool)
            .await?;
    let mut expected = vec![
        (p1, "queued".to_string()),
        (p2, "completed".to_string()),
        (c1, "cancelled".to_string()),
        (c2, "failed".to_string()),
        (c3, "pending".to_string()),
        (c4, "completed".to_string()),
    ];
    expected.sort();
    assert_eq!(states, expected);

    let report = housekeeping::run(&pool, &SchedulerConfig::default())
        .await?
        .expect("not locked elsewhere");
    assert_eq!(report.edges_deleted, 4, "{report:?}");
    assert_eq!(
        edges(&pool).await?,
        vec![(c3, p2)],
        "only the waiting dependent's edge is left"
    );
    let again = housekeeping::run(&pool, &SchedulerConfig::default())
        .await?
        .expect("not locked elsewhere");
    assert_eq!(again.edges_deleted, 0, "{again:?}");
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
