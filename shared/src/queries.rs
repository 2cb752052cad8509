//! The reads of the admin commands (`bizq list`, `inspect`, `stats`), here so that the index
//! tests EXPLAIN the very SQL `bizq` runs.

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
/// `completed` from the partial idx_tasks_workspace_completed_at.
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
           FROM tasks
          WHERE status = 'completed'
         HAVING count(*) > 0
          ORDER BY 1";

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
