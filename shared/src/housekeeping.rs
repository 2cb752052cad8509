//! Periodic upkeep run by one scheduler at a time: analytics partitions for the coming
//! months, the monthly reset of `credits_used_this_month`, dependency edges no longer needed,
//! and rebuilding a queue index that bloated.

use sqlx::{PgPool, Row};

use crate::Result;
use crate::config::SchedulerConfig;

/// What one housekeeping run did.
#[derive(Debug, Default, Clone)]
pub struct HousekeepingReport {
    pub partitions_created: i32,
    pub workspaces_reset: u64,
    pub edges_deleted: u64,
    pub indexes_rebuilt: Vec<String>,
}

/// Key of the advisory lock that makes housekeeping single-flight across schedulers.
pub const LOCK_KEY: i64 = 0x6269_7a71_686b; // "bizqhk"

/// When a queue index counts as bloated enough to rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BloatThresholds {
    /// An index of this size or smaller is never rebuilt, however empty.
    pub min_bytes: i64,
    /// An index is rebuilt when it is more than this many times what its live entries need.
    pub ratio: i64,
}

impl BloatThresholds {
    /// What the scheduler uses: over 64 MB and more than 20 times what live entries need.
    pub const PRODUCTION: Self = Self {
        min_bytes: 64 * 1024 * 1024,
        ratio: 20,
    };
}

impl Default for BloatThresholds {
    fn default() -> Self {
        Self::PRODUCTION
    }
}

/// Runs housekeeping unless another scheduler is already doing it (then `Ok(None)`).
pub async fn run(pool: &PgPool, config: &SchedulerConfig) -> Result<Option<HousekeepingReport>> {
    run_with(pool, config, &BloatThresholds::PRODUCTION).await
}

/// [`run`] with the given thresholds for rebuilding a bloated queue index.
pub async fn run_with(
    pool: &PgPool,
    config: &SchedulerConfig,
    bloat: &BloatThresholds,
) -> Result<Option<HousekeepingReport>> {
    let mut conn = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?;
    if !got {
        return Ok(None);
    }
    let result = run_locked(&mut conn, config, bloat).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await;
    result.map(Some)
}

async fn run_locked(
    conn: &mut sqlx::PgConnection,
    config: &SchedulerConfig,
    bloat: &BloatThresholds,
) -> Result<HousekeepingReport> {
    let mut report = HousekeepingReport {
        partitions_created: ensure_partitions(&mut *conn, config.partitions_ahead).await?,
        ..Default::default()
    };
    report.workspaces_reset = reset_monthly_credits(&mut *conn, None).await?;
    report.edges_deleted = sqlx::query(
        "DELETE FROM task_dependencies d
          USING tasks t
          WHERE t.id = d.task_id
            AND t.status IN ('completed', 'failed', 'cancelled')",
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    report.indexes_rebuilt = rebuild_bloated_queue_indexes(&mut *conn, bloat).await?;
    Ok(report)
}

/// Creates the coming months' `analytics_events` partitions. Attaching a partition takes
/// SHARE ROW EXCLUSIVE locks on the tables its foreign keys reference (`tasks`, `workspaces`,
/// …), which the fleet writes all the time; waiting for them would deadlock with a claim that
/// holds one and wants the other. So each try waits at most 200 ms for its locks and gives
/// way; it is tried a few times, and the next housekeeping run tries again (the partitions are
/// made months ahead, and the default partition catches any row meanwhile).
pub async fn ensure_partitions(conn: &mut sqlx::PgConnection, months_ahead: i32) -> Result<i32> {
    let mut last_err = None;
    for attempt in 0..5u64 {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query("SET LOCAL lock_timeout = '200ms'")
            .execute(&mut *tx)
            .await?;
        match sqlx::query_scalar::<_, i32>("SELECT ensure_analytics_partitions($1)")
            .bind(months_ahead)
            .fetch_one(&mut *tx)
            .await
        {
            Ok(n) => {
                tx.commit().await?;
                return Ok(n);
            }
            Err(e) => {
                let _ = tx.rollback().await;
                last_err = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(50 + 100 * attempt)).await;
            }
        }
    }
    match last_err {
        Some(e) => Err(e.into()),
        None => Ok(0),
    }
}

/// Resets `credits_used_this_month` for every workspace whose month (in its own timezone)
/// has turned since its last reset, as of the instant `at` (`None`: the database's `now()`,
/// which is what the scheduler passes; tests pass fixed instants around month boundaries).
/// A timezone name the database no longer knows counts as UTC instead of failing the whole
/// statement.
pub async fn reset_monthly_credits(
    conn: &mut sqlx::PgConnection,
    at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<u64> {
    let done = sqlx::query(
        "WITH due AS (
             SELECT w.id, m.month_start
               FROM workspaces w
              CROSS JOIN LATERAL (
                    SELECT (date_trunc('month',
                                       COALESCE($1::timestamptz, now())
                                         AT TIME ZONE CASE WHEN is_valid_timezone(w.timezone)
                                                           THEN w.timezone
                                                           ELSE 'UTC' END))::date AS month_start
                    ) m
              WHERE w.credits_month_start < m.month_start
              ORDER BY w.id
                FOR NO KEY UPDATE OF w
         )
         UPDATE workspaces w
            SET credits_used_this_month = 0,
                credits_month_start = due.month_start
           FROM due
          WHERE w.id = due.id",
    )
    .bind(at)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// The queue's partial indexes hold only live work, but a burst of millions of tasks leaves
/// them full of empty pages that autovacuum does not give back. When one is over
/// `bloat.min_bytes` (64 MB in production) and more than `bloat.ratio` times (20) what its live
/// entries need, rebuild it without blocking the fleet.
async fn rebuild_bloated_queue_indexes(
    conn: &mut sqlx::PgConnection,
    bloat: &BloatThresholds,
) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes
           FROM pg_class c
          WHERE c.relkind = 'i'
            AND c.relname IN ('idx_tasks_admit', 'idx_tasks_promote', 'idx_tasks_claim',
                              'idx_tasks_lease', 'idx_tasks_credit_wait')
            AND pg_relation_size(c.oid) > $1",
    )
    .bind(bloat.min_bytes)
    .fetch_all(&mut *conn)
    .await?;
    let mut rebuilt = Vec::new();
    if rows.is_empty() {
        return Ok(rebuilt);
    }
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks
          WHERE status IN ('pending', 'queued', 'processing')",
    )
    .fetch_one(&mut *conn)
    .await?;
    // What the live entries need: about 64 bytes each, plus 1 MB of slack.
    let needed = live.saturating_mul(64).saturating_add(1024 * 1024);
    for r in rows {
        let name: String = r.try_get("name")?;
        let bytes: i64 = r.try_get("bytes")?;
        if bytes > bloat.ratio.saturating_mul(needed) {
            // The name comes from the fixed list above, never from input.
            let sql = format!("REINDEX INDEX CONCURRENTLY {name}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await?;
            rebuilt.push(name);
        }
    }
    Ok(rebuilt)
}
