//! **Release** and **reclaim**: processing tasks whose worker shut down or lost its lease go
//! back to the queue (or fail on their last attempt).

use sqlx::PgPool;
use uuid::Uuid;

use super::{
    CHANNEL_QUEUED, end_transaction, is_statement_error, isolate_rows, lock_for_update, notify,
};
use crate::Result;
use crate::task::TaskStatus;

/// **Release** (worker, at shutdown): tasks it will not finish go back to `queued` at once,
/// without counting the attempt, so another worker takes them without waiting for the lease.
pub async fn release(pool: &PgPool, leases: &[(Uuid, Uuid)]) -> Result<u64> {
    if leases.is_empty() {
        return Ok(0);
    }
    let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = leases.iter().copied().unzip();
    let mut tx = pool.begin().await?;
    lock_for_update(&mut tx, &ids).await?;
    let done = sqlx::query(
        "UPDATE tasks t
            SET status = 'queued',
                attempt = GREATEST(t.attempt - 1, 0),
                started_at = NULL,
                lease_token = NULL,
                lease_expires_at = NULL,
                locked_by = NULL,
                updated_at = now()
           FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
          WHERE t.id = l.id
            AND t.lease_token = l.token
            AND t.status = 'processing'",
    )
    .bind(ids)
    .bind(tokens)
    .execute(&mut *tx)
    .await?;
    notify(&mut tx, CHANNEL_QUEUED).await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// What a reclaim pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReclaimReport {
    pub requeued: u64,
    pub failed: u64,
}

/// The reclaim sweep's batch (`$1` most rows): processing tasks whose lease expired. Public so
/// the index tests EXPLAIN the very SQL.
pub const RECLAIM_SELECT_SQL: &str = "SELECT id
           FROM tasks
          WHERE status = 'processing'
            AND lease_expires_at < now()
            AND ($2::uuid IS NULL OR id = $2)
          ORDER BY id
          LIMIT $1
            FOR NO KEY UPDATE SKIP LOCKED";

/// **Reclaim** (scheduler): processing tasks whose lease expired — their worker was killed,
/// lost its host or its network — go back to `queued` with the attempt counted, or to
/// `failed` when it was the last attempt. The dead worker's late write, if any, is fenced out
/// because the lease token is cleared here.
///
/// Reclaim takes expired leases in id order, so a row that fails the statement would fail the
/// same batch on every pass and no tenant's task would be reclaimed again. If the batch
/// statement fails, the batch is reclaimed task by task and a task that fails alone is set
/// aside as `failed` (`code = 'reclaim_error'`).
pub async fn reclaim_expired(
    pool: &PgPool,
    batch: i64,
    max_attempts_by_type: &[(String, i32)],
    default_max_attempts: i32,
) -> Result<ReclaimReport> {
    match reclaim_pass(
        pool,
        batch,
        None,
        max_attempts_by_type,
        default_max_attempts,
    )
    .await
    {
        Err(e) if is_statement_error(&e) => {
            tracing::warn!(error = %e, "reclaim batch failed; reclaiming task by task");
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM tasks WHERE status = 'processing' AND lease_expires_at < now()
                  ORDER BY id LIMIT $1",
            )
            .bind(batch)
            .fetch_all(pool)
            .await?;
            let reports = isolate_rows(pool, &ids, "reclaim_error", |id| async move {
                reclaim_pass(
                    pool,
                    1,
                    Some(id),
                    max_attempts_by_type,
                    default_max_attempts,
                )
                .await
                .map(|r| vec![r])
            })
            .await?;
            Ok(ReclaimReport {
                requeued: reports.iter().map(|r| r.requeued).sum(),
                failed: reports.iter().map(|r| r.failed).sum::<u64>()
                    + (ids.len() - reports.len()) as u64,
            })
        }
        other => other,
    }
}

async fn reclaim_pass(
    pool: &PgPool,
    batch: i64,
    only: Option<Uuid>,
    max_attempts_by_type: &[(String, i32)],
    default_max_attempts: i32,
) -> Result<ReclaimReport> {
    let (types, maxes): (Vec<String>, Vec<i32>) = max_attempts_by_type.iter().cloned().unzip();
    let mut tx = pool.begin().await?;
    let result: Result<ReclaimReport> = async {
    let expired: Vec<Uuid> = sqlx::query_scalar(RECLAIM_SELECT_SQL)
        .bind(batch)
        .bind(only)
        .fetch_all(&mut *tx)
        .await?;
    if expired.is_empty() {
        return Ok(ReclaimReport::default());
    }
    // The expired rows are ours already (SKIP LOCKED above); the billing triggers of the
    // UPDATE below lock their workspaces, in id order, at its end.
    let rows: Vec<TaskStatus> = sqlx::query_scalar(
        "WITH limits AS (
             SELECT t.id,
                    COALESCE(t.max_attempts,
                             (SELECT m FROM unnest($2::text[], $3::int[]) AS c(type, m) WHERE c.type = t.type),
                             $4) AS max_attempts
               FROM tasks t
              WHERE t.id = ANY($1)
         )
         UPDATE tasks t
            SET status = CASE WHEN t.attempt >= l.max_attempts THEN 'failed' ELSE 'queued' END,
                completed_at = CASE WHEN t.attempt >= l.max_attempts THEN now() END,
                error_details = jsonb_build_object(
                    'message', format('lease expired: worker %s stopped heartbeating (attempt %s of %s)',
                                      t.locked_by, t.attempt, l.max_attempts),
                    'code', 'lease_expired',
                    'attempt', t.attempt,
                    'worker', t.locked_by),
                lease_token = NULL,
                lease_expires_at = NULL,
                updated_at = now()
           FROM limits l
          WHERE t.id = l.id
         RETURNING t.status",
    )
    .bind(expired)
    .bind(types)
    .bind(maxes)
    .bind(default_max_attempts)
    .fetch_all(&mut *tx)
    .await?;
    let report = ReclaimReport {
        requeued: rows.iter().filter(|s| **s == TaskStatus::Queued).count() as u64,
        failed: rows.iter().filter(|s| **s == TaskStatus::Failed).count() as u64,
    };
    if report.requeued > 0 {
        notify(&mut tx, CHANNEL_QUEUED).await?;
    }
    Ok(report)
    }
    .await;
    end_transaction(tx, result).await
}
