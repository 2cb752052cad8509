//! **Cancel** and **retry**: the admin's transitions, shared with members' SQL functions.

use sqlx::PgPool;
use uuid::Uuid;

use crate::task::TaskStatus;
use crate::{Error, Result};

/// **Cancel** (admin): a pending, queued or escalated task is cancelled at once. A processing
/// task is cancelled too — its lease is void from this commit on, so nothing it writes later
/// lands and nothing is charged — and its worker is told over `bizq_cancel` to abort the
/// provider call (the heartbeat notices within one interval if the notification is lost).
/// Returns the status the task had.
///
/// The SQL body is `bizq_engine_cancel_task` (migration 0009), the very function members reach
/// through `bizq_cancel_task`: one path for the CLI and for product code. The dependents'
/// cascade follows this connection's `bizq.dependency_failure_policy`.
pub async fn cancel(pool: &PgPool, id: Uuid, reason: &str) -> Result<TaskStatus> {
    let previous: Option<TaskStatus> = sqlx::query_scalar("SELECT bizq_engine_cancel_task($1, $2)")
        .bind(id)
        .bind(reason)
        .fetch_one(pool)
        .await?;
    checked_previous(
        id,
        previous,
        "cancel",
        &[
            TaskStatus::Pending,
            TaskStatus::Queued,
            TaskStatus::Processing,
            TaskStatus::Escalated,
        ],
    )
}

/// The status an admin action found (`None`: no such task), or why the action did not apply:
/// the SQL bodies change nothing unless the status allows it.
fn checked_previous(
    id: Uuid,
    previous: Option<TaskStatus>,
    action: &'static str,
    allowed: &'static [TaskStatus],
) -> Result<TaskStatus> {
    let status = previous.ok_or(Error::TaskNotFound(id))?;
    if !allowed.contains(&status) {
        return Err(Error::WrongStatus {
            id,
            status,
            action,
            expected: allowed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(status)
}

/// **Retry** (admin): a failed, cancelled or escalated task starts over as `pending` with
/// fresh attempts and no error; the scheduler admits it again (dependencies are re-checked).
///
/// The SQL body is `bizq_engine_retry_task` (migration 0009), shared with members'
/// `bizq_retry_task`.
pub async fn retry(pool: &PgPool, id: Uuid) -> Result<TaskStatus> {
    let previous: Option<TaskStatus> = sqlx::query_scalar("SELECT bizq_engine_retry_task($1)")
        .bind(id)
        .fetch_one(pool)
        .await?;
    checked_previous(
        id,
        previous,
        "retry",
        &[
            TaskStatus::Failed,
            TaskStatus::Cancelled,
            TaskStatus::Escalated,
        ],
    )
}
