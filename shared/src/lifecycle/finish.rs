//! **Complete**, **fail**, **snooze** and **park**: a worker's batch of results, written in one
//! short transaction fenced on each lease.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    CHANNEL_PENDING, end_transaction, is_statement_error, isolate_rows, lock_for_update, notify,
};
use crate::Result;
use crate::task::{ErrorDetails, TaskStatus};

/// A finished attempt's result.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: Uuid,
    pub lease_token: Uuid,
    pub output: Value,
    pub actual_cost: i32,
    pub cost_breakdown: Value,
    pub processing_time_ms: i32,
    pub ai_provider: Option<String>,
    pub ai_model: Option<String>,
}

/// What happens to a task whose attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureAction {
    /// Back to `pending`, due after the delay; the attempt counts.
    Retry(Duration),
    /// `failed` for good.
    Fail,
    /// **Snooze**: back to `pending`, due after the delay, the attempt NOT counted (rate
    /// limited: the provider said when to come back).
    Snooze(Duration),
    /// **Park**: the task goes back to `pending` with `wait_reason = 'provider_unavailable'`,
    /// the attempt NOT counted, until `unpark_providers` sees the provider's park expire.
    /// `park: Some((for, reason))` parks the provider fleet-wide (it just refused a call);
    /// `None` waits for the park already recorded (the worker knew it was parked and did not
    /// call), so tasks arriving during a park never extend it and the probe still happens.
    Park {
        provider: String,
        park: Option<(Duration, String)>,
    },
}

/// A failed attempt, and what to do about it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: Uuid,
    pub lease_token: Uuid,
    pub action: FailureAction,
    /// What went wrong, as `error_details` records it.
    pub error_details: ErrorDetails,
    pub processing_time_ms: i32,
}

impl Failure {
    /// Whether the task goes back to `pending` (rather than `failed`).
    pub fn requeues(&self) -> bool {
        self.action != FailureAction::Fail
    }
}

/// **Complete**, **fail**, **snooze** and **park** (worker): writes a batch of results in ONE
/// short statement (and so one transaction). Completions set `output`, `actual_cost`,
/// `cost_breakdown`, timing and provider and become `completed`, which fires the
/// credit-deduction trigger inside this same transaction. Failures go back to `pending` with
/// a backoff or to `failed`; snoozed and parked tasks go back to `pending` with the claim's
/// attempt increment undone, and parked providers get their `provider_status` row in the same
/// transaction.
///
/// Every row is fenced on its lease token: the ids returned are the ones written; a result
/// whose lease was lost (cancelled, reclaimed) is dropped and the task is never charged twice.
///
/// Locks are taken in the module's order (tasks, then workspaces, each by id) before the
/// UPDATE, whose triggers then find every lock they need already held.
///
/// If the batch statement fails, its rows are written one by one, so one tenant's row cannot
/// lose the results of every other workspace in the batch; a row that fails alone is set
/// aside as `failed` (`code = 'result_error'`).
pub async fn finish_batch(
    pool: &PgPool,
    completions: &[Completion],
    failures: &[Failure],
) -> Result<Vec<Uuid>> {
    match finish_rows(pool, completions, failures).await {
        Err(e) if is_statement_error(&e) && completions.len() + failures.len() > 1 => {
            tracing::warn!(error = %e, "result batch failed; writing its results one by one");
            let ids: Vec<Uuid> = completions
                .iter()
                .map(|c| c.id)
                .chain(failures.iter().map(|f| f.id))
                .collect();
            isolate_rows(pool, &ids, "result_error", |id| {
                let c: Vec<Completion> =
                    completions.iter().filter(|c| c.id == id).cloned().collect();
                let f: Vec<Failure> = failures.iter().filter(|f| f.id == id).cloned().collect();
                async move { finish_rows(pool, &c, &f).await }
            })
            .await
        }
        other => other,
    }
}

async fn finish_rows(
    pool: &PgPool,
    completions: &[Completion],
    failures: &[Failure],
) -> Result<Vec<Uuid>> {
    if completions.is_empty() && failures.is_empty() {
        return Ok(Vec::new());
    }
    let n = completions.len() + failures.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut kinds: Vec<String> = Vec::with_capacity(n);
    let mut outputs: Vec<Option<Value>> = Vec::with_capacity(n);
    let mut costs: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut breakdowns: Vec<Option<Value>> = Vec::with_capacity(n);
    let mut millis: Vec<i32> = Vec::with_capacity(n);
    let mut providers: Vec<Option<String>> = Vec::with_capacity(n);
    let mut models: Vec<Option<String>> = Vec::with_capacity(n);
    let mut retry_ms: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut details: Vec<Option<Value>> = Vec::with_capacity(n);
    for c in completions {
        ids.push(c.id);
        tokens.push(c.lease_token);
        kinds.push(TaskStatus::Completed.as_str().into());
        outputs.push(Some(c.output.clone()));
        costs.push(Some(c.actual_cost));
        breakdowns.push(Some(c.cost_breakdown.clone()));
        millis.push(c.processing_time_ms);
        providers.push(c.ai_provider.clone());
        models.push(c.ai_model.clone());
        retry_ms.push(None);
        details.push(None);
    }
    let mut parks: std::collections::BTreeMap<String, (i64, String)> = Default::default();
    for f in failures {
        ids.push(f.id);
        tokens.push(f.lease_token);
        let (kind, delay) = match &f.action {
            FailureAction::Retry(d) => ("retry", Some(d.as_millis() as i64)),
            FailureAction::Fail => (TaskStatus::Failed.as_str(), None),
            FailureAction::Snooze(d) => ("snooze", Some(d.as_millis() as i64)),
            FailureAction::Park { provider, park } => {
                if let Some((park_for, reason)) = park {
                    parks.insert(
                        provider.clone(),
                        (park_for.as_millis() as i64, reason.clone()),
                    );
                }
                ("park", None)
            }
        };
        kinds.push(kind.into());
        outputs.push(None);
        costs.push(None);
        breakdowns.push(None);
        millis.push(f.processing_time_ms);
        providers.push(None);
        models.push(None);
        retry_ms.push(delay);
        details.push(Some(f.error_details.to_json()));
    }
    let mut tx = pool.begin().await?;
    let result: Result<Vec<Uuid>> = async {
    lock_for_update(&mut tx, &ids).await?;
    let written: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE tasks t
            SET status = CASE WHEN r.kind IN ('retry', 'snooze', 'park') THEN 'pending' ELSE r.kind END,
                attempt = CASE WHEN r.kind IN ('snooze', 'park') THEN GREATEST(t.attempt - 1, 0)
                               ELSE t.attempt END,
                wait_reason = CASE WHEN r.kind = 'park' THEN 'provider_unavailable' ELSE t.wait_reason END,
                output = CASE WHEN r.kind = 'completed' THEN r.output ELSE t.output END,
                actual_cost = CASE WHEN r.kind = 'completed' THEN r.cost ELSE t.actual_cost END,
                cost_breakdown = CASE WHEN r.kind = 'completed' THEN r.breakdown ELSE t.cost_breakdown END,
                processing_time_ms = r.ms,
                ai_provider = COALESCE(r.provider, t.ai_provider),
                ai_model = COALESCE(r.model, t.ai_model),
                completed_at = CASE WHEN r.kind IN ('retry', 'snooze', 'park') THEN NULL ELSE now() END,
                scheduled_for = CASE WHEN r.kind IN ('retry', 'snooze')
                                     THEN now() + r.retry_ms * interval '1 millisecond'
                                     ELSE t.scheduled_for END,
                error_details = COALESCE(r.details, t.error_details),
                lease_token = NULL,
                lease_expires_at = NULL,
                updated_at = now()
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::int[], $6::jsonb[],
                       $7::int[], $8::text[], $9::text[], $10::bigint[], $11::jsonb[])
                AS r(id, token, kind, output, cost, breakdown, ms, provider, model, retry_ms, details)
          WHERE t.id = r.id
            AND t.lease_token = r.token
            AND t.status = 'processing'
         RETURNING t.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(kinds)
    .bind(outputs)
    .bind(costs)
    .bind(breakdowns)
    .bind(millis)
    .bind(providers)
    .bind(models)
    .bind(retry_ms)
    .bind(details)
    .fetch_all(&mut *tx)
    .await?;
    if !parks.is_empty() {
        let (names, rest): (Vec<String>, Vec<(i64, String)>) = parks.into_iter().unzip();
        let (park_ms, reasons): (Vec<i64>, Vec<String>) = rest.into_iter().unzip();
        sqlx::query(
            "INSERT INTO provider_status (provider, parked_until, reason, updated_at)
             SELECT p.provider, now() + p.ms * interval '1 millisecond', p.reason, now()
               FROM unnest($1::text[], $2::bigint[], $3::text[]) AS p(provider, ms, reason)
             ON CONFLICT (provider) DO UPDATE
                SET parked_until = EXCLUDED.parked_until,
                    reason = EXCLUDED.reason,
                    updated_at = EXCLUDED.updated_at",
        )
        .bind(names)
        .bind(park_ms)
        .bind(reasons)
        .execute(&mut *tx)
        .await?;
    }
    if failures.iter().any(Failure::requeues) {
        notify(&mut tx, CHANNEL_PENDING).await?;
    }
    Ok(written)
    }
    .await;
    end_transaction(tx, result).await
}
