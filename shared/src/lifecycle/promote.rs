//! **Promote** and **unpark**: admitted `pending` tasks become `queued` when due and ready,
//! and parked ones (credits, standing, provider) become promotable again.

use sqlx::PgPool;

use super::{CHANNEL_QUEUED, notify};
use crate::Result;

/// Promotion (`$1` most rows): due, ready, unparked `pending` tasks become `queued`. Public so
/// the index tests EXPLAIN the very SQL.
pub const PROMOTE_SQL: &str = "WITH due AS (
             SELECT id
               FROM tasks
              WHERE status = 'pending'
                AND deps_remaining = 0
                AND wait_reason IS NULL
                AND COALESCE(scheduled_for, '-infinity'::timestamptz) <= now()
              ORDER BY COALESCE(scheduled_for, '-infinity'::timestamptz)
              LIMIT $1
                FOR NO KEY UPDATE SKIP LOCKED
         ),
         promoted AS (
             UPDATE tasks t
                SET status = 'queued',
                    updated_at = now()
               FROM due
              WHERE t.id = due.id
             RETURNING t.id
         )
         SELECT count(*) FROM promoted";

/// **Promote** (scheduler): admitted `pending` tasks that are due, whose dependencies all
/// completed and that are not parked become `queued`. `FOR NO KEY UPDATE SKIP LOCKED` lets several
/// schedulers promote side by side; the range scan on the due time stops at `now()`, so tasks
/// scheduled for later cost nothing.
pub async fn promote(pool: &PgPool, batch: i64) -> Result<u64> {
    let promoted: i64 = sqlx::query_scalar(PROMOTE_SQL)
        .bind(batch)
        .fetch_one(pool)
        .await?;
    if promoted > 0 {
        notify(&mut *pool.acquire().await?, CHANNEL_QUEUED).await?;
    }
    Ok(promoted as u64)
}

/// Unparking: parked tasks whose workspace can pay again. Public so the index tests EXPLAIN
/// the very SQL.
pub const UNPARK_SQL: &str = "UPDATE tasks t
            SET wait_reason = NULL,
                updated_at = now()
           FROM workspaces w
          WHERE t.status = 'pending'
            AND t.wait_reason IN ('insufficient_credits', 'subscription_inactive', 'workspace_busy')
            AND w.id = t.workspace_id
            AND COALESCE(w.subscription_status, 'active') IN ('active', 'trial')
            AND (w.subscription_status IS DISTINCT FROM 'trial' OR w.trial_ends_at IS NULL OR w.trial_ends_at > now())
            AND w.deleted_at IS NULL
            AND GREATEST(COALESCE(t.estimated_cost, 0), 1)
                <= LEAST(w.credits_balance - w.credits_reserved,
                         COALESCE(w.monthly_credit_limit, 2147483647) - COALESCE(w.credits_used_this_month, 0) - w.credits_reserved)";

/// **Unpark** (scheduler): tasks parked because their workspace could not pay, was not in
/// good standing, or was locked by someone else at claim time (`workspace_busy`), become
/// promotable again once it can pay for them. Provider waits are [`unpark_providers`]'.
pub async fn unpark(pool: &PgPool) -> Result<u64> {
    let done = sqlx::query(UNPARK_SQL).execute(pool).await?;
    Ok(done.rows_affected())
}

/// **Unpark providers** (scheduler): tasks waiting with `wait_reason = 'provider_unavailable'`
/// become promotable again once their provider's park (`provider_status.parked_until`) has
/// expired; the first of them to run is the probe, which parks the provider again if it still
/// refuses.
pub async fn unpark_providers(pool: &PgPool) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE tasks t
            SET wait_reason = NULL
          WHERE t.status = 'pending'
            AND t.wait_reason = 'provider_unavailable'
            AND NOT EXISTS (SELECT 1
                              FROM provider_status p
                             WHERE p.provider = t.error_details ->> 'provider'
                               AND p.parked_until > now())",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Providers parked right now, and until when (the worker's routing skips them).
pub async fn parked_providers(
    pool: &PgPool,
) -> Result<std::collections::HashMap<String, chrono::DateTime<chrono::Utc>>> {
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT provider, parked_until
           FROM provider_status
          WHERE parked_until > now()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}
