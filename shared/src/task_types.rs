//! The `task_types` registry: which task types some worker serves, so an INSERT can queue a
//! task that needs no scheduler decision (migration 0012).

use sqlx::PgPool;

use crate::Result;
use crate::handlers::Handlers;

/// The `tasks.worker_type` a `bizq-worker` runs its handlers as.
pub const WORKER_KIND: &str = "ai";

/// Registers the built-in handlers' types ([`Handlers::builtin`]) this worker serves; see
/// [`register_types`].
pub async fn register(
    pool: &PgPool,
    type_patterns: Option<&[String]>,
    worker_id: &str,
    estimate_at_admission: bool,
) -> Result<Vec<String>> {
    register_types(
        pool,
        &Handlers::shared().types(),
        type_patterns,
        worker_id,
        estimate_at_admission,
    )
    .await
}

/// Registers the handler types (`types`, a worker's registry) this worker serves (those its `LIKE` patterns match, or all
/// for `None`) as served by [`WORKER_KIND`] workers, and returns them. From now on an insert
/// of such a task, with no dependency, due now and affordable, is `queued` at once.
///
/// `estimate_at_admission` (the worker prices AI models: `[models]` in its config) keeps tasks
/// that come without an `estimated_cost` on the admission path, which estimates them.
pub async fn register_types(
    pool: &PgPool,
    types: &[&str],
    type_patterns: Option<&[String]>,
    worker_id: &str,
    estimate_at_admission: bool,
) -> Result<Vec<String>> {
    // The upsert runs every trigger on task_types with this role's rights. Lock the table
    // against CREATE TRIGGER (SHARE ROW EXCLUSIVE conflicts with ROW EXCLUSIVE) before
    // looking, so what was checked is what runs.
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE task_types IN ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let untrusted: Vec<String> = sqlx::query_scalar(
        "SELECT format('trigger %s runs %s, owned by %s', trigger_name, function_name,
                       function_owner)
           FROM bizq_untrusted_triggers()
          WHERE table_name = 'task_types'",
    )
    .fetch_all(&mut *tx)
    .await?;
    if !untrusted.is_empty() {
        return Err(crate::Error::UntrustedTriggers {
            table: "task_types".into(),
            triggers: untrusted.join("; "),
        });
    }
    let registered = sqlx::query_scalar(
        "INSERT INTO task_types (type, worker_kind, estimate_at_admission, registered_by,
                                 registered_at)
         SELECT k.type, $3, $5, $4, now()
           FROM unnest($1::text[]) AS k(type)
          WHERE $2::text[] IS NULL OR k.type LIKE ANY ($2::text[])
         ON CONFLICT (type) DO UPDATE
            SET worker_kind = EXCLUDED.worker_kind,
                estimate_at_admission = EXCLUDED.estimate_at_admission,
                registered_by = EXCLUDED.registered_by,
                registered_at = EXCLUDED.registered_at
         RETURNING type",
    )
    .bind(types.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    .bind(type_patterns.map(|p| p.to_vec()))
    .bind(WORKER_KIND)
    .bind(worker_id.to_string())
    .bind(estimate_at_admission)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(registered)
}
