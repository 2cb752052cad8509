//! The reads of the admin commands (`bizq list`, `inspect`, `stats`), here so that the index
//! tests EXPLAIN the very SQL `bizq` runs.

use crate::TaskStatus;

/// `bizq list`: `$1` status, `$2` workspace id, `$3` type (each NULL for any), `$4` limit;
/// newest first.
pub const LIST_SQL: &str = "SELECT id, type, status, priority, attempt, created_at,
                COALESCE(wait_reason, error_details ->> 'code', '') AS note
           FROM tasks
          WHERE ($1::text IS NULL OR status = $1)
            AND ($2::uuid IS NULL OR workspace_id = $2)
            AND ($3::text IS NULL OR type = $3)
          ORDER BY created_at DESC
          LIMIT $4";

/// `bizq inspect`: one task by `$1` id, with its workspace's slug.
pub const INSPECT_SQL: &str =
    "SELECT t.id, t.workspace_id, w.slug, t.type, t.name, t.status, t.priority, t.attempt,
                t.max_attempts, t.worker_type, t.locked_by, t.lease_expires_at, t.wait_reason,
                t.depends_on, t.deps_remaining, t.scheduled_for, t.created_at, t.started_at,
                t.completed_at, t.processing_time_ms, t.estimated_cost, t.actual_cost,
                t.reserved_credits, t.ai_provider, t.ai_model, t.input, t.output,
                t.error_details, t.cost_breakdown
           FROM tasks t
           JOIN workspaces w ON w.id = t.workspace_id
          WHERE t.id = $1";

/// Run before the two `bizq stats` queries, in their transaction. The per-workspace counts of
/// statuses that (almost) never occur are estimated at thousands of rows each, so the planner
/// would spend about 90 ms compiling and optimising the plan with JIT for a query that runs in
/// about 5 ms (measured on a million finished tasks).
pub const STATS_SETTINGS_SQL: &str = "SET LOCAL jit = off";

/// `bizq stats`, tasks by status (statuses with none are left out). Each count reads an index
/// that holds what it counts (migration 0012): the statuses other than `completed` as short
/// ranges of idx_tasks_workspace_status_created, workspace by workspace (every task has one);
/// `completed` from the partial idx_tasks_workspace_completed_at, counted only up to `$1`
/// rows (see [`status_counts`]: beyond [`EXACT_COUNT_LIMIT`] the planner's estimate is shown).
pub const STATS_BY_STATUS_SQL: &str = "SELECT s.status, sum(c.n)::bigint AS n
           FROM unnest(ARRAY['cancelled', 'escalated', 'failed', 'pending', 'processing', 'queued']) AS s(status)
          CROSS JOIN workspaces w
          CROSS JOIN LATERAL (SELECT count(*) AS n
                                FROM tasks t
                               WHERE t.workspace_id = w.id
                                 AND t.status = s.status) c
          GROUP BY s.status
         HAVING sum(c.n) > 0
         UNION ALL
         SELECT 'completed', count(*)
           FROM (SELECT 1
                   FROM tasks
                  WHERE status = 'completed'
                  LIMIT $1) c
         HAVING count(*) > 0
          ORDER BY 1";

/// Completed tasks are counted exactly up to this many; above it `bizq stats` and the
/// dashboard show the planner's estimate, marked as one. Counting a million index entries
/// takes 60–170 ms on these machines, every time someone looks; the estimate takes well under
/// one (Oban's metrics estimate large states the same way, above 50,000 jobs).
pub const EXACT_COUNT_LIMIT: i64 = 50_000;

/// The planner's estimate of the completed tasks: the table's current size (pages) times the
/// density and the share of `completed` that `ANALYZE` last saw; it follows the table's growth
/// between autovacuum's analyses.
pub const COMPLETED_ESTIMATE_SQL: &str =
    "EXPLAIN (FORMAT JSON) SELECT 1 FROM tasks WHERE status = 'completed'";

/// One line of the tasks-by-status count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCount {
    pub status: TaskStatus,
    pub n: i64,
    /// The planner's estimate rather than a count (only `completed`, above
    /// [`EXACT_COUNT_LIMIT`]).
    pub estimated: bool,
}

/// Tasks by status, as `bizq stats` and the dashboard show them: every count exact, except
/// `completed` above [`EXACT_COUNT_LIMIT`], which is the planner's estimate (flagged). Run
/// inside a transaction after [`STATS_SETTINGS_SQL`].
pub async fn status_counts(conn: &mut sqlx::PgConnection) -> crate::Result<Vec<StatusCount>> {
    let rows: Vec<(TaskStatus, i64)> = sqlx::query_as(STATS_BY_STATUS_SQL)
        .bind(EXACT_COUNT_LIMIT + 1)
        .fetch_all(&mut *conn)
        .await?;
    let mut counts = Vec::with_capacity(rows.len());
    for (status, n) in rows {
        if status == TaskStatus::Completed && n > EXACT_COUNT_LIMIT {
            let plan: serde_json::Value = sqlx::query_scalar(COMPLETED_ESTIMATE_SQL)
                .fetch_one(&mut *conn)
                .await?;
            let estimate = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0) as i64;
            counts.push(StatusCount {
                status,
                // An estimate below what was just counted is certainly wrong.
                n: estimate.max(n),
                estimated: true,
            });
        } else {
            counts.push(StatusCount {
                status,
                n,
                estimated: false,
            });
        }
    }
    Ok(counts)
}

/// `bizq stats`, the queue's state: oldest queued task, completions of the last minute,
/// parked and blocked tasks. The last-minute and blocked counts go workspace by workspace, so
/// each is a short range of a workspace-led index instead of a scan of a whole one.
pub const STATS_QUEUE_SQL: &str = "SELECT (SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM tasks WHERE status = 'queued') AS oldest_queued_s,
                (SELECT count(*)
                   FROM workspaces w
                   JOIN tasks t ON t.workspace_id = w.id AND t.status = 'completed'
                  WHERE t.completed_at > now() - interval '1 minute') AS done_1m,
                (SELECT count(*) FROM tasks WHERE status = 'pending' AND wait_reason IS NOT NULL) AS parked,
                (SELECT count(*)
                   FROM workspaces w
                   JOIN tasks t ON t.workspace_id = w.id AND t.status = 'pending'
                  WHERE t.deps_remaining > 0) AS blocked";
