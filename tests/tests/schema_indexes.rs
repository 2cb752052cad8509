//! Every index on `tasks` earns its place: the plan of a query the product ships names it, or
//! it backs a key another table's foreign key needs. The list of indexes comes from the
//! catalog, so an index added without a query that uses it fails this file (migration 0012).

use std::collections::BTreeMap;

use bizq::lifecycle::{ADMIT_SELECT_SQL, CLAIM_SQL, PROMOTE_SQL, RECLAIM_SELECT_SQL, UNPARK_SQL};
use bizq::queries::{LIST_SQL, STATS_BY_STATUS_SQL, STATS_QUEUE_SQL};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// A shipped query, as the planner sees it: the SQL with its parameters as literals, and the
/// role it runs as (`Some(auth id)`: an authenticated member, under RLS).
struct Case {
    what: &'static str,
    sql: String,
    member: Option<Uuid>,
}

fn case(what: &'static str, sql: &str, params: &[&str]) -> Case {
    let mut sql = sql.to_string();
    // Highest first, so that `$1` does not eat the start of `$10`.
    for (i, p) in params.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), p);
    }
    Case {
        what,
        sql,
        member: None,
    }
}

fn as_member(mut c: Case, auth_id: Uuid) -> Case {
    c.member = Some(auth_id);
    c
}

/// A realistic mix over 100 workspaces of 200 tasks each: mostly finished work, a little of
/// every live state, references set on a few rows. Returns (workspace, a member's user id, a
/// member's auth id, a parent task id) of one workspace.
async fn load(pool: &PgPool) -> anyhow::Result<(Uuid, Uuid, Uuid, Uuid)> {
    sqlx::raw_sql(
        "INSERT INTO workspaces (name, slug, ai_preferences)
         SELECT 'ix ' || g, 'ix-' || lpad(g::text, 3, '0'), '{\"max_task_cost\": 50}'
           FROM generate_series(1, 100) g;
         INSERT INTO users (workspace_id, email, full_name, role, auth_user_id)
         SELECT id, slug || '@example.com', slug, 'member', gen_random_uuid() FROM workspaces;
         INSERT INTO tasks (workspace_id, type, category, name, input, priority, status,
                            deps_remaining, wait_reason, scheduled_for, lease_token,
                            lease_expires_at, locked_by, output, actual_cost, processing_time_ms,
                            created_at, started_at, completed_at, created_by, assigned_to)
         SELECT w.id,
                CASE WHEN g % 3 = 0 THEN 'ai.summarize' ELSE 'ai.generate' END, 'content', 'ix',
                jsonb_build_object('prompt', 'p' || g), 1 + g % 10,
                s.status,
                CASE WHEN s.b BETWEEN 93 AND 94 THEN NULL WHEN s.b BETWEEN 95 AND 96 THEN 1 ELSE 0 END,
                CASE WHEN s.b = 97 THEN 'insufficient_credits' END,
                CASE WHEN s.b = 98 THEN now() + interval '1 day' END,
                CASE WHEN s.status = 'processing' THEN gen_random_uuid() END,
                CASE WHEN s.status = 'processing' THEN now() + (g % 7 - 3) * interval '1 minute' END,
                CASE WHEN s.status = 'processing' THEN 'ix-worker' END,
                CASE WHEN s.status = 'completed' THEN '{\"text\": \"done\"}'::jsonb END,
                CASE WHEN s.status = 'completed' THEN 1 END,
                CASE WHEN s.status IN ('completed', 'failed') THEN 10 + g % 90 END,
                now() - (g % 43200) * interval '1 minute' - interval '2 seconds',
                CASE WHEN s.status IN ('completed', 'failed', 'processing') THEN now() - (g % 43200) * interval '1 minute' - interval '1 second' END,
                CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN now() - (g % 43200) * interval '1 minute' END,
                CASE WHEN g % 20 = 0 THEN u.id END,
                CASE WHEN g % 50 = 0 THEN u.id END
           FROM generate_series(1, 20000) g
           JOIN LATERAL (SELECT id FROM workspaces ORDER BY slug OFFSET g % 100 LIMIT 1) w ON true
           JOIN users u ON u.workspace_id = w.id
          CROSS JOIN LATERAL (
                SELECT (g / 100) % 100 AS b,
                       CASE WHEN (g / 100) % 100 < 84 THEN 'completed'
                            WHEN (g / 100) % 100 < 87 THEN 'failed'
                            WHEN (g / 100) % 100 < 88 THEN 'cancelled'
                            WHEN (g / 100) % 100 < 91 THEN 'queued'
                            WHEN (g / 100) % 100 < 93 THEN 'processing'
                            ELSE 'pending' END AS status) s;
         UPDATE tasks c
            SET parent_task_id = (SELECT p.id
                                    FROM tasks p
                                   WHERE p.workspace_id = c.workspace_id
                                     AND p.status = 'completed'
                                   ORDER BY p.id
                                   LIMIT 1)
          WHERE c.status = 'cancelled';
         ANALYZE;",
    )
    .execute(pool)
    .await?;
    let row: (Uuid, Uuid, Uuid, Uuid) = sqlx::query_as(
        "SELECT c.workspace_id, u.id, u.auth_user_id, c.parent_task_id
           FROM tasks c
           JOIN users u ON u.workspace_id = c.workspace_id
          WHERE c.parent_task_id IS NOT NULL
          ORDER BY c.id
          LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// The shipped queries that read `tasks`, by the index each one is expected to use.
fn cases(ws: Uuid, user: Uuid, auth: Uuid, parent: Uuid) -> BTreeMap<&'static str, Vec<Case>> {
    let ws = format!("'{ws}'::uuid");
    let user = format!("'{user}'::uuid");
    let parent = format!("'{parent}'::uuid");
    let mut m: BTreeMap<&'static str, Vec<Case>> = BTreeMap::new();
    m.insert(
        "idx_tasks_admit",
        vec![case(
            "lifecycle::admit, its batch",
            ADMIT_SELECT_SQL,
            &["5000", "NULL::uuid"],
        )],
    );
    m.insert(
        "idx_tasks_promote",
        vec![case("lifecycle::promote", PROMOTE_SQL, &["5000"])],
    );
    m.insert(
        "idx_tasks_claim",
        vec![case(
            "lifecycle::claim",
            CLAIM_SQL,
            &["'w'", "256", "NULL::text[]", "60000", "false"],
        )],
    );
    m.insert(
        "idx_tasks_lease",
        vec![case(
            "lifecycle::reclaim_expired, its sweep",
            RECLAIM_SELECT_SQL,
            &["5000", "NULL::uuid"],
        )],
    );
    m.insert(
        "idx_tasks_credit_wait",
        vec![
            case("lifecycle::unpark", UNPARK_SQL, &[]),
            case("bizq stats, parked tasks", STATS_QUEUE_SQL, &[]),
        ],
    );
    m.insert(
        "idx_tasks_workspace_completed_at",
        vec![
            case(
                "bizq stats, completions of the last minute",
                STATS_QUEUE_SQL,
                &[],
            ),
            case(
                "bizq stats, completed tasks",
                STATS_BY_STATUS_SQL,
                &["50001"],
            ),
        ],
    );
    m.insert(
        "idx_tasks_workspace_status_created",
        vec![
            case(
                "bizq list -w <workspace> -s failed",
                LIST_SQL,
                &["'failed'", &ws, "NULL", "20"],
            ),
            case(
                "bizq stats, tasks by status",
                STATS_BY_STATUS_SQL,
                &["50001"],
            ),
            case("bizq stats, blocked tasks", STATS_QUEUE_SQL, &[]),
            as_member(
                case(
                    "workspace_dashboard, read by a member (RLS)",
                    "SELECT workspace_id, pending_tasks, processing_tasks, tasks_completed_today
                       FROM workspace_dashboard",
                    &[],
                ),
                auth,
            ),
            as_member(
                case(
                    "task_performance, read by a member (RLS)",
                    "SELECT workspace_id, task_type, total_executions, avg_processing_time,
                            avg_cost, avg_quality_score, success_rate, date
                       FROM task_performance",
                    &[],
                ),
                auth,
            ),
            as_member(
                case(
                    "a member's own newest tasks (RLS policy task_workspace_access)",
                    "SELECT id, status FROM tasks ORDER BY created_at DESC LIMIT 20",
                    &[],
                ),
                auth,
            ),
            case(
                "ON DELETE CASCADE of a workspace (PostgreSQL's foreign-key query)",
                "DELETE FROM ONLY tasks WHERE workspace_id = $1",
                &[&ws],
            ),
        ],
    );
    m.insert(
        "idx_tasks_created_by_set",
        vec![case(
            "ON DELETE SET NULL (created_by) of a user (PostgreSQL's foreign-key query)",
            "UPDATE ONLY tasks SET created_by = NULL WHERE created_by = $1 AND workspace_id = $2",
            &[&user, &ws],
        )],
    );
    m.insert(
        "idx_tasks_assigned_to_set",
        vec![case(
            "ON DELETE SET NULL (assigned_to) of a user (PostgreSQL's foreign-key query)",
            "UPDATE ONLY tasks SET assigned_to = NULL WHERE assigned_to = $1 AND workspace_id = $2",
            &[&user, &ws],
        )],
    );
    m.insert(
        "idx_tasks_parent_task_id_set",
        vec![case(
            "ON DELETE SET NULL (parent_task_id) of a task (PostgreSQL's foreign-key query)",
            "UPDATE ONLY tasks SET parent_task_id = NULL WHERE parent_task_id = $1 AND workspace_id = $2",
            &[&parent, &ws],
        )],
    );
    m
}

/// The plan of `c`, as its role would get it (EXPLAIN only: nothing runs).
async fn plan(pool: &PgPool, c: &Case) -> anyhow::Result<String> {
    let mut tx = pool.begin().await?;
    // A test database holds thousands of rows, not millions: without this the planner reads
    // the whole (small) table where production would use the index.
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await?;
    if let Some(auth) = c.member {
        sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, true)")
            .bind(auth.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL ROLE authenticated")
            .execute(&mut *tx)
            .await?;
    }
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {}", c.sql)))
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(lines.join("\n"))
}

/// The indexes on `tasks`, from the catalog.
async fn task_indexes(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = 'tasks'::regclass
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await?)
}

/// Pins the index set of migration 0012: for each index on `tasks` in the catalog, the plan of
/// every shipped query listed for it names it, on realistic data with the planner's own
/// choice among indexes (sequential scans off: a test holds thousands of rows, production
/// millions). An index with no such query, or a query whose plan does not use its index,
/// fails; the one exception is a unique index that a foreign key references (PostgreSQL
/// requires one: tasks_pkey for task_dependencies, tasks_id_workspace_key for the
/// same-workspace parent and analytics_events keys; checked from the catalog). `bizq inspect`
/// and the engine's writes by id use either of those two.
#[sqlx::test(migrations = "../migrations")]
async fn every_index_on_tasks_is_named_by_the_plan_of_a_shipped_query(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (ws, user, auth, parent) = load(&pool).await?;
    let cases = cases(ws, user, auth, parent);
    let mut failures = Vec::new();
    for index in task_indexes(&pool).await? {
        let fk_target: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint
                             WHERE contype = 'f' AND conindid = $1::regclass)",
        )
        .bind(&index)
        .fetch_one(&pool)
        .await?;
        let Some(queries) = cases.get(index.as_str()) else {
            if !fk_target {
                failures.push(format!(
                    "{index}: no shipped query in this file uses it (add one, or drop the index)"
                ));
            }
            continue;
        };
        for c in queries {
            let p = plan(&pool, c).await?;
            if !p.contains(&format!(" {index} ")) && !p.contains(&format!(" {index}\n")) {
                failures.push(format!("{index}: not in the plan of {}:\n{p}", c.what));
            }
        }
    }
    for index in cases.keys() {
        if !task_indexes(&pool).await?.iter().any(|i| i == index) {
            failures.push(format!("{index}: listed here but not in the catalog"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// Pins the seed-index cleanup of migration 0012: what remains on `tasks` is the two keys,
/// the queue's partial indexes, one composite index led by workspace_id, and partial ones
/// (so that most rows add no entry to them). An index added back fails here and in the test
/// above.
#[sqlx::test(migrations = "../migrations")]
async fn tasks_keeps_few_full_indexes(pool: PgPool) -> anyhow::Result<()> {
    let full: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = 'tasks'::regclass
            AND i.indpred IS NULL
          ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        full,
        [
            "idx_tasks_workspace_status_created",
            "tasks_id_workspace_key",
            "tasks_pkey"
        ],
        "indexes every row of tasks pays for"
    );
    Ok(())
}
