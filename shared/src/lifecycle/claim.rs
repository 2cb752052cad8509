//! **Claim**, **heartbeat** and the lease check: a worker takes queued tasks (reserving
//! credits) and keeps its leases alive.

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::end_transaction;
use crate::{Error, Result};

/// A task a worker holds.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub task_type: String,
    pub input: Value,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
    pub max_attempts: Option<i32>,
    /// The fence: every later write about this attempt must present it.
    pub lease_token: Uuid,
    pub ai_provider: Option<String>,
    pub ai_model: Option<String>,
    /// The workspace's `ai_preferences` (routing reads them).
    pub ai_preferences: Option<Value>,
}

/// What a worker asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub worker_id: &'a str,
    pub limit: i64,
    /// SQL `LIKE` patterns of the types this worker runs; `None` for all.
    pub type_patterns: Option<&'a [String]>,
    pub lease: Duration,
}

/// The claim statement, in two variants that differ only in how the `funds` step locks the
/// workspace rows (see [`claim`]). Parameters: `$1` worker id, `$2` most tasks, `$3` type
/// `LIKE` patterns (NULL for all), `$4` lease in milliseconds, `$5` whether to park the tasks
/// of a workspace whose row is locked elsewhere (`wait_reason = 'workspace_busy'`) instead of
/// leaving them queued (only the skipping variant can skip a row). Returns the claimed tasks,
/// plus one row with `skipped` true (all else NULL) when some workspace's row was skipped.
macro_rules! claim_sql {
    ($workspace_lock:literal) => {
        concat!(
            "WITH candidates AS (
             SELECT id, workspace_id, priority, created_at,
                    GREATEST(COALESCE(estimated_cost, 0), 1) AS cost
               FROM tasks
              WHERE status = 'queued'
                AND ($3::text[] IS NULL OR type LIKE ANY ($3::text[]))
              ORDER BY priority, created_at
              LIMIT $2
                FOR NO KEY UPDATE SKIP LOCKED
         ),
         funds AS (
             SELECT w.id,
                    LEAST(w.credits_balance - w.credits_reserved,
                          COALESCE(w.monthly_credit_limit, 2147483647)
                            - COALESCE(w.credits_used_this_month, 0) - w.credits_reserved) AS available,
                    COALESCE(w.subscription_status, 'active') IN ('active', 'trial')
                      AND (w.subscription_status IS DISTINCT FROM 'trial'
                           OR w.trial_ends_at IS NULL OR w.trial_ends_at > now())
                      AND w.deleted_at IS NULL AS in_good_standing,
                    w.ai_preferences
               FROM workspaces w
              WHERE w.id IN (SELECT workspace_id FROM candidates)
              ORDER BY w.id
                ",
            $workspace_lock,
            "
         ),
         ranked AS (
             SELECT c.id, c.workspace_id, c.cost,
                    SUM(c.cost) OVER (PARTITION BY c.workspace_id
                                      ORDER BY c.priority, c.created_at, c.id) AS running
               FROM candidates c
         ),
         granted AS (
             SELECT r.id, r.workspace_id, r.cost
               FROM ranked r
               JOIN funds f ON f.id = r.workspace_id
              WHERE f.in_good_standing
                AND r.running <= f.available
         ),
         reserved AS (
             UPDATE workspaces w
                SET credits_reserved = w.credits_reserved + g.total
               FROM (SELECT workspace_id, SUM(cost)::int AS total FROM granted GROUP BY workspace_id) g
              WHERE w.id = g.workspace_id
         ),
         parked AS (
             UPDATE tasks t
                SET status = 'pending',
                    wait_reason = CASE WHEN f.id IS NULL THEN 'workspace_busy'
                                       WHEN f.in_good_standing THEN 'insufficient_credits'
                                       ELSE 'subscription_inactive' END,
                    updated_at = now()
               FROM candidates c
               LEFT JOIN funds f ON f.id = c.workspace_id
              WHERE t.id = c.id
                AND c.id NOT IN (SELECT id FROM granted)
                AND (f.id IS NOT NULL OR $5::boolean)
         ),
         claimed AS (
         UPDATE tasks t
            SET status = 'processing',
                started_at = now(),
                attempt = t.attempt + 1,
                lease_token = gen_random_uuid(),
                lease_expires_at = now() + $4::bigint * interval '1 millisecond',
                locked_by = $1,
                reserved_credits = g.cost,
                worker_type = COALESCE(t.worker_type, 'ai'),
                wait_reason = NULL,
                updated_at = now()
           FROM granted g
           JOIN funds f ON f.id = g.workspace_id
          WHERE t.id = g.id
         RETURNING t.id, t.workspace_id, t.type, t.input, t.attempt, t.max_attempts,
                   t.lease_token, t.ai_provider, t.ai_model, f.ai_preferences
         )
         SELECT id, workspace_id, type, input, attempt, max_attempts, lease_token, ai_provider,
                ai_model, ai_preferences, FALSE AS skipped
           FROM claimed
         UNION ALL
         (SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, TRUE
            FROM candidates c
           WHERE c.workspace_id NOT IN (SELECT id FROM funds)
           LIMIT 1)"
        )
    };
}

/// The claim as a worker runs it first: it waits for workspace rows locked elsewhere, inside a
/// transaction whose `lock_timeout` is [`CLAIM_WORKSPACE_LOCK_WAIT`]. Public so the benchmark
/// runs the very same SQL through `pgbench` and the index tests EXPLAIN it.
pub const CLAIM_SQL: &str = claim_sql!("FOR NO KEY UPDATE");

/// The claim after a wait timed out: workspace rows locked elsewhere are skipped (their tasks
/// stay queued, or are parked as `workspace_busy` when `$5` is true).
pub const CLAIM_SKIP_BUSY_SQL: &str = claim_sql!("FOR NO KEY UPDATE SKIP LOCKED");

/// **Claim** (worker): takes up to `limit` queued tasks by priority (1 first), then age, with
/// `FOR NO KEY UPDATE SKIP LOCKED`, in one statement that also checks each workspace's standing
/// and reserves credits. Each task's reservation is its estimated cost (at least 1); tasks are
/// granted in priority order while the running sum fits the workspace's balance and its
/// monthly limit, both net of reservations already held. The workspace rows are locked
/// (`FOR NO KEY UPDATE`, in id order) so two workers reserving at once see each other's
/// reservations: concurrent workers cannot overspend. Tasks that cannot be paid for go back to
/// `pending` with `wait_reason` set, out of the claim index, until `unpark` sees funds again.
///
/// Workspace rows are the busiest rows of the database: other workers' claims and every
/// result batch's billing triggers lock them for a few milliseconds. So the claim first
/// *waits* for them ([`CLAIM_SQL`]), but only for [`CLAIM_WORKSPACE_LOCK_WAIT`]: a lock held
/// longer is not the engine's (a tenant's open transaction, say), and the claim is redone
/// skipping the rows locked elsewhere ([`CLAIM_SKIP_BUSY_SQL`]), retried a few times, then
/// parking the tasks of a workspace still locked as `workspace_busy` so they never hold the
/// head of the queue (see [`claim_skipping_busy`]). Skipping at once (0009's first form)
/// parked the tasks of one busy workspace whenever several workers claimed from it.
///
/// The tenancy work to come (fair share across workspaces, per-plan caps) fits into the
/// `candidates` and `granted` steps without changing the statement's shape.
pub async fn claim(pool: &PgPool, req: &ClaimRequest<'_>) -> Result<Vec<ClaimedTask>> {
    match claim_waiting(pool, req).await {
        Err(Error::Database(sqlx::Error::Database(e))) if e.code().as_deref() == Some("55P03") => {
            tracing::debug!(
                worker = req.worker_id,
                "a workspace row stayed locked past the claim's wait; claiming around it"
            );
            claim_skipping_busy(pool, req).await
        }
        other => other,
    }
}

/// How long a claim waits for a workspace row locked elsewhere before it claims around it.
/// The engine's own holds (a claim, a result batch's billing) last milliseconds.
pub const CLAIM_WORKSPACE_LOCK_WAIT: Duration = Duration::from_millis(100);

/// [`CLAIM_SQL`] in a transaction whose `lock_timeout` bounds the wait for workspace rows.
async fn claim_waiting(pool: &PgPool, req: &ClaimRequest<'_>) -> Result<Vec<ClaimedTask>> {
    let mut tx = pool.begin().await?;
    let result: Result<Vec<ClaimedTask>> = async {
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", CLAIM_WORKSPACE_LOCK_WAIT.as_millis()))
            .execute(&mut *tx)
            .await?;
        let rows = claim_query(CLAIM_SQL, req, req.limit, false)
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        claimed_rows(rows, &mut claimed)?;
        Ok(claimed)
    }
    .await;
    end_transaction(tx, result).await
}

/// [`CLAIM_SKIP_BUSY_SQL`], tried again after 2, 4, 8 and 16 ms while some workspace row is
/// still locked elsewhere; the last try parks that workspace's tasks as `workspace_busy`, and
/// `unpark` brings them back.
async fn claim_skipping_busy(pool: &PgPool, req: &ClaimRequest<'_>) -> Result<Vec<ClaimedTask>> {
    let mut claimed = Vec::new();
    for round in 0..=CLAIM_BUSY_RETRIES {
        let last = round == CLAIM_BUSY_RETRIES;
        let rows = claim_query(
            CLAIM_SKIP_BUSY_SQL,
            req,
            req.limit - claimed.len() as i64,
            last,
        )
        .fetch_all(pool)
        .await?;
        let skipped = claimed_rows(rows, &mut claimed)?;
        if !skipped || claimed.len() as i64 >= req.limit {
            break;
        }
        if !last {
            tokio::time::sleep(Duration::from_millis(2 << round)).await;
        }
    }
    Ok(claimed)
}

/// One of the two claim statements with its parameters bound: `limit` tasks at most, and
/// whether to park the tasks of a workspace whose row is skipped (`$5`).
fn claim_query<'q>(
    sql: &'static str,
    req: &ClaimRequest<'_>,
    limit: i64,
    park_busy: bool,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(req.worker_id.to_string())
        .bind(limit)
        .bind(req.type_patterns.map(|p| p.to_vec()))
        .bind(req.lease.as_millis() as i64)
        .bind(park_busy)
}

/// Reads the claim statement's rows into `claimed`; true when it reported a skipped workspace.
fn claimed_rows(rows: Vec<sqlx::postgres::PgRow>, claimed: &mut Vec<ClaimedTask>) -> Result<bool> {
    let mut skipped = false;
    for r in rows {
        if r.try_get::<bool, _>("skipped")? {
            skipped = true;
            continue;
        }
        claimed.push(ClaimedTask {
            id: r.try_get("id")?,
            workspace_id: r.try_get("workspace_id")?,
            task_type: r.try_get("type")?,
            input: r.try_get("input")?,
            attempt: r.try_get("attempt")?,
            max_attempts: r.try_get("max_attempts")?,
            lease_token: r.try_get("lease_token")?,
            ai_provider: r.try_get("ai_provider")?,
            ai_model: r.try_get("ai_model")?,
            ai_preferences: r.try_get("ai_preferences")?,
        });
    }
    Ok(skipped)
}

/// How often a skipping claim tries again when a workspace row was locked elsewhere.
const CLAIM_BUSY_RETRIES: u32 = 4;

/// **Heartbeat** (worker): extends the leases this worker still holds and returns their ids.
/// A task missing from the answer was cancelled or reclaimed: its run must stop.
pub async fn heartbeat(
    pool: &PgPool,
    leases: &[(Uuid, Uuid)],
    lease: Duration,
) -> Result<Vec<Uuid>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
    let held = sqlx::query_scalar(
        "WITH held AS (
             SELECT t.id
               FROM tasks t
               JOIN unnest($1::uuid[], $2::uuid[]) AS l(id, token) ON l.id = t.id
              WHERE t.lease_token = l.token
                AND t.status = 'processing'
              ORDER BY t.id
                FOR NO KEY UPDATE OF t
         )
         UPDATE tasks t
            SET lease_expires_at = now() + $3::bigint * interval '1 millisecond',
                updated_at = now()
           FROM held
          WHERE t.id = held.id
         RETURNING t.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(lease.as_millis() as i64)
    .fetch_all(pool)
    .await?;
    Ok(held)
}

/// **Lease check** (worker): whether this worker still holds `id` under `lease_token`. A
/// `bizq_cancel` notification is only a hint (anyone may `pg_notify` that channel): the
/// worker aborts a run only when this says the lease is gone.
pub async fn lease_is_held(pool: &PgPool, id: Uuid, lease_token: Uuid) -> Result<bool> {
    let held = sqlx::query_scalar(
        "SELECT EXISTS (
                SELECT 1
                  FROM tasks
                 WHERE id = $1
                   AND lease_token = $2
                   AND status = 'processing')",
    )
    .bind(id)
    .bind(lease_token)
    .fetch_one(pool)
    .await?;
    Ok(held)
}
