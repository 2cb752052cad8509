//! Every status change of a task, each one named function with its SQL beside it.
//!
//! ```text
//!            insert (product code, `enqueue`) ──► queued  (no dependency, due now, a type a
//!                 │                  worker registered, affordable: the INSERT's own trigger)
//!              pending ──admit──► failed      (unknown type, missing/foreign dependency, cycle)
//!                 │      admit──► escalated   (human task, estimated cost over the workspace's max)
//!                 │      admit──► cancelled   (a dependency already failed or was cancelled)
//!                 │ admit / promote (due, dependencies completed, not parked)
//!                 ▼
//!              queued ◄──────────── reclaim (lease expired, attempts left) / release (shutdown)
//!                 │ claim (priority, age; credits reserved)     │
//!                 │         └──► pending, parked (workspace cannot pay)   ──unpark──► pending
//!                 ▼                                               │
//!            processing ──heartbeat──► processing (lease extended)
//!                 │──complete──► completed  (credit-deduction trigger charges actual_cost)
//!                 │──fail──────► pending    (transient error, attempts left, backoff)
//!                 │──snooze────► pending    (rate limited: due at the provider's reset, attempt not used)
//!                 │──park──────► pending, provider_unavailable (attempt not used) ──unpark_providers──► pending
//!                 │──fail──────► failed     (permanent error or attempts exhausted)
//!                 └──cancel────► cancelled  (its worker is told to abort; nothing charged)
//! ```
//!
//! Invariants kept here and in migration 0006:
//! - The engine's statements set `updated_at = now()` themselves, so the row trigger that
//!   maintains it for clients skips them (migration 0012).
//! - Every worker write is fenced on `lease_token` and `status = 'processing'`: a worker that
//!   lost its lease cannot complete, fail or release the task; its late result is dropped.
//! - Credits are reserved at claim (`workspaces.credits_reserved`) and released by trigger when
//!   the task leaves `processing`; the charge happens in the completion's transaction.
//! - Dependents of a task are resolved by trigger when it completes, fails or is cancelled.
//! - Lock order, everywhere: task rows first (in id order, or with `SKIP LOCKED`), then
//!   workspace rows in id order. Workspace rows are the busiest rows of the database (every
//!   claim reserves on them, every completion charges them), so they are locked as late as
//!   possible: by the claim's `funds` step, and by the billing triggers at the end of each
//!   UPDATE of tasks (migration 0007), never for the length of a batch. Without one order, two
//!   workers completing tasks of two workspaces deadlock each other.
//! - Row locks are `FOR NO KEY UPDATE`, never `FOR UPDATE`: inserting a task takes a
//!   `KEY SHARE` lock on its workspace row (the foreign key check), which `FOR UPDATE` would
//!   block, so a product's multi-workspace `INSERT` would deadlock with a claim.
//!
//! One file per transition, each with its SQL beside it: `admit.rs` (insert and admission),
//! `promote.rs` (promote, unpark), `claim.rs` (claim, heartbeat, lease check), `finish.rs`
//! (complete, fail, snooze, park), `reclaim.rs` (release, reclaim), `admin.rs` (cancel, retry).
//! This module keeps the channels and the helpers they share, and re-exports their API.

mod admin;
mod admit;
mod claim;
mod finish;
mod promote;
mod reclaim;

pub use admin::{cancel, retry};
pub use admit::{ADMIT_SELECT_SQL, AdmitReport, NewTask, admit, admit_with_estimates, enqueue};
pub use claim::{
    CLAIM_SKIP_BUSY_SQL, CLAIM_SQL, CLAIM_WORKSPACE_LOCK_WAIT, ClaimRequest, ClaimedTask, claim,
    heartbeat, lease_is_held,
};
pub use finish::{Completion, Failure, FailureAction, finish_batch};
pub use promote::{PROMOTE_SQL, UNPARK_SQL, parked_providers, promote, unpark, unpark_providers};
pub use reclaim::{RECLAIM_SELECT_SQL, ReclaimReport, reclaim_expired, release};

use sqlx::PgPool;
use uuid::Uuid;

use crate::{Error, Result};

/// Channel the scheduler listens on: new or unblocked pending tasks.
pub const CHANNEL_PENDING: &str = "bizq_pending";

/// Channel workers listen on: tasks became claimable.
pub const CHANNEL_QUEUED: &str = "bizq_queued";

/// Channel workers listen on: payload is the id of a processing task that was cancelled.
pub const CHANNEL_CANCEL: &str = "bizq_cancel";

/// True when the database rejected a statement (as opposed to a lost connection, a pool
/// timeout, ...): retrying the rows one by one can isolate the offending one.
pub(super) fn is_statement_error(e: &Error) -> bool {
    matches!(e, Error::Database(db) if db.as_database_error().is_some())
}

/// Ends a batch's transaction by its `result`: commits on success; on failure rolls back
/// *before* the error goes up. A dropped `Transaction` only queues its `ROLLBACK` for the
/// connection's next use, so the row locks of the failed batch would outlive it on an idle
/// pooled connection, and the row-by-row fallback, which takes its rows with `SKIP LOCKED`,
/// would silently skip the very rows it must retry or set aside.
pub(super) async fn end_transaction<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    result: Result<T>,
) -> Result<T> {
    match result {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            if let Err(rollback) = tx.rollback().await {
                tracing::warn!(error = %rollback, "rollback after a failed batch failed; the connection is dropped");
            }
            Err(e)
        }
    }
}

/// A task that fails a statement on its own is taken out of the engine's way: `failed`, with
/// the database's message in `error_details`, so no batch selects it again. If even that
/// write fails, the task is logged and left alone.
pub(super) async fn set_aside(pool: &PgPool, id: Uuid, code: &str, cause: &Error) -> Result<()> {
    tracing::error!(task = %id, error = %cause, code, "task fails every statement it is in; setting it aside as failed");
    let r = sqlx::query(
        "UPDATE tasks
            SET status = 'failed',
                completed_at = now(),
                deps_remaining = COALESCE(deps_remaining, 0),
                wait_reason = NULL,
                lease_token = NULL,
                lease_expires_at = NULL,
                error_details = jsonb_build_object(
                    'message', $2::text, 'code', $3::text, 'attempt', attempt)
          WHERE id = $1",
    )
    .bind(id)
    .bind(format!("the engine could not process this task: {cause}"))
    .bind(code)
    .execute(pool)
    .await;
    if let Err(e) = r {
        tracing::error!(task = %id, error = %e, "could not set the task aside either");
    }
    Ok(())
}

/// Runs `one` for each id separately (each in its own transaction): the fallback of a batch
/// statement that failed. Ids whose statement fails alone are set aside with `code`.
pub(super) async fn isolate_rows<T, F, Fut>(
    pool: &PgPool,
    ids: &[Uuid],
    code: &str,
    mut one: F,
) -> Result<Vec<T>>
where
    F: FnMut(Uuid) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>>>,
{
    let mut done = Vec::new();
    for &id in ids {
        match one(id).await {
            Ok(rows) => done.extend(rows),
            Err(e) if is_statement_error(&e) => set_aside(pool, id, code, &e).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Locks the given tasks in id order inside `tx`, before the caller's UPDATE of them, so two
/// statements over overlapping tasks (a heartbeat and a completion, say) take them in the
/// same order. Their workspace rows are locked later, by the billing triggers at the end of
/// that UPDATE, in id order (migration 0007), and held only until the commit.
pub(super) async fn lock_for_update(tx: &mut sqlx::PgConnection, task_ids: &[Uuid]) -> Result<()> {
    sqlx::query("SELECT id FROM tasks WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(task_ids.to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

pub(super) async fn notify(conn: &mut sqlx::PgConnection, channel: &'static str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}
