//! A test-only audit of what the engine decided: a trigger on `tasks` that records every
//! status change (and every re-scheduling) with the delay the engine chose, so tests assert
//! decisions after the run instead of sampling live windows with sleeps and wall clocks.
//!
//! `delay_ms` is `scheduled_for - now()` at the transition, where `now()` is the writing
//! transaction's own timestamp, the same one the engine's `now() + retry_in` used: for a
//! backoff or a `Retry-After` it is exactly the delay the worker asked for.

use sqlx::PgPool;
use uuid::Uuid;

/// Installs the audit table and trigger in the test's database (not in any migration:
/// production does not pay for it).
pub async fn install(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE test_task_audit (
             seq         bigserial PRIMARY KEY,
             task_id     uuid NOT NULL,
             old_status  text,
             new_status  text NOT NULL,
             attempt     int NOT NULL,
             wait_reason text,
             error_code  text,
             delay_ms    double precision,
             locked_by   text,
             at          timestamptz NOT NULL DEFAULT clock_timestamp()
         );

         CREATE FUNCTION test_audit_task() RETURNS trigger
         LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO test_task_audit
                  (task_id, old_status, new_status, attempt, wait_reason, error_code,
                   delay_ms, locked_by)
           VALUES (NEW.id,
                   CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
                   NEW.status,
                   NEW.attempt,
                   NEW.wait_reason,
                   NEW.error_details ->> 'code',
                   EXTRACT(EPOCH FROM NEW.scheduled_for - now()) * 1000,
                   NEW.locked_by);
           RETURN NULL;
         END;
         $$;

         CREATE TRIGGER test_audit_insert AFTER INSERT ON tasks
           FOR EACH ROW EXECUTE FUNCTION test_audit_task();
         CREATE TRIGGER test_audit_update AFTER UPDATE ON tasks
           FOR EACH ROW
           WHEN (OLD.status IS DISTINCT FROM NEW.status
                 OR OLD.scheduled_for IS DISTINCT FROM NEW.scheduled_for
                 OR OLD.wait_reason IS DISTINCT FROM NEW.wait_reason)
           EXECUTE FUNCTION test_audit_task();",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Transition {
    pub old_status: Option<String>,
    pub new_status: String,
    pub attempt: i32,
    pub wait_reason: Option<String>,
    pub error_code: Option<String>,
    pub delay_ms: Option<f64>,
    pub locked_by: Option<String>,
}

/// Every transition of one task, in order.
pub async fn history(pool: &PgPool, task: Uuid) -> anyhow::Result<Vec<Transition>> {
    Ok(sqlx::query_as(
        "SELECT old_status, new_status, attempt, wait_reason, error_code, delay_ms, locked_by
           FROM test_task_audit
          WHERE task_id = $1
          ORDER BY seq",
    )
    .bind(task)
    .fetch_all(pool)
    .await?)
}

/// The statuses a task went through, in order (`pending`, `queued`, …).
pub async fn statuses(pool: &PgPool, task: Uuid) -> anyhow::Result<Vec<String>> {
    Ok(history(pool, task)
        .await?
        .into_iter()
        .filter(|t| t.old_status.as_deref() != Some(t.new_status.as_str()))
        .map(|t| t.new_status)
        .collect())
}

/// The delays (ms) the engine chose each time a failed attempt sent the task back to
/// `pending` to wait.
pub async fn retry_delays(pool: &PgPool, task: Uuid) -> anyhow::Result<Vec<f64>> {
    Ok(history(pool, task)
        .await?
        .into_iter()
        .filter(|t| t.old_status.as_deref() == Some("processing") && t.new_status == "pending")
        .filter_map(|t| t.delay_ms)
        .collect())
}
