//! Prometheus metrics: every metric's name, and the helpers the worker and scheduler call to
//! record them. Labels are bounded: task type, workspace *plan* (never a workspace id),
//! status, outcome.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ::metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use uuid::Uuid;

use crate::lifecycle::{ClaimedTask, Completion, Failure, FailureAction};
use crate::task::TaskStatus;

// Worker: tasks, by `type` and `plan`.
pub const TASKS_CLAIMED: &str = "bizq_tasks_claimed_total";
pub const TASKS_COMPLETED: &str = "bizq_tasks_completed_total";
/// Failed for good (permanent error, or the last attempt).
pub const TASKS_FAILED: &str = "bizq_tasks_failed_total";
/// Failed transiently and sent back to `pending` with a backoff.
pub const TASKS_RETRIED: &str = "bizq_tasks_retried_total";
/// Rate limited by the provider and sent back to `pending` until its reset, no attempt used.
pub const TASKS_SNOOZED: &str = "bizq_tasks_snoozed_total";
/// Sent back to `pending` to wait for a parked provider (bad key, quota), no attempt used.
pub const TASKS_PARKED: &str = "bizq_tasks_parked_total";
/// A result dropped because the lease was gone (cancelled or reclaimed meanwhile).
pub const TASKS_FENCED: &str = "bizq_tasks_fenced_total";
/// A run stopped without a result (cancelled, lease lost, shutting down).
pub const TASKS_ABORTED: &str = "bizq_tasks_aborted_total";
/// Released to `queued` at shutdown, attempt not counted.
pub const TASKS_RELEASED: &str = "bizq_tasks_released_total";
/// Credits charged by completions (`actual_cost`), by `type` and `plan`.
pub const CREDITS_CHARGED: &str = "bizq_credits_charged_total";
/// Handler run time of each attempt, by `type` and `outcome`.
pub const TASK_DURATION: &str = "bizq_task_duration_seconds";
/// From when a task was due (created or scheduled) to its claim, by `type`.
pub const PICKUP_LATENCY: &str = "bizq_task_pickup_latency_seconds";
pub const IN_FLIGHT: &str = "bizq_worker_in_flight";
pub const SLOTS: &str = "bizq_worker_slots";
pub const CLAIM_BATCH_SIZE: &str = "bizq_claim_batch_size";
pub const CLAIM_DURATION: &str = "bizq_claim_duration_seconds";
pub const RESULT_BATCH_SIZE: &str = "bizq_result_batch_size";
pub const RESULT_DURATION: &str = "bizq_result_batch_duration_seconds";

// Scheduler.
/// Live tasks by `status` (pending, queued, processing, escalated).
pub const QUEUE_DEPTH: &str = "bizq_queue_depth";
pub const OLDEST_QUEUED: &str = "bizq_queue_oldest_queued_seconds";
/// Pending tasks a workspace cannot pay for now, by `reason`.
pub const PARKED: &str = "bizq_queue_parked";
/// Pending tasks waiting for dependencies.
pub const BLOCKED: &str = "bizq_queue_blocked";
/// Registered processes by `role` and `state` (running, draining, lost).
pub const WORKERS: &str = "bizq_workers";
/// Times the queue gauges above were sampled from the database (at most once per
/// `ops.metrics_sample_max_age_ms`, however many scrapers ask).
pub const QUEUE_SAMPLES: &str = "bizq_queue_samples_total";
/// How old the queue gauges are when this scrape renders them.
pub const QUEUE_SAMPLE_AGE: &str = "bizq_queue_sample_age_seconds";
/// Tasks whose lease expired, by `outcome` (requeued, failed).
pub const LEASES_RECLAIMED: &str = "bizq_leases_reclaimed_total";
/// New tasks admitted, by `outcome` (queued, waiting, rejected, escalated, cancelled).
pub const ADMITTED: &str = "bizq_tasks_admitted_total";
pub const PASS_DURATION: &str = "bizq_scheduler_pass_duration_seconds";

// Providers, by `provider` (its `[providers]` name) and `model` (its `[models]` name, or
// `other` for a name outside `[models]` that only the mock answers): never a key or a
// workspace id.
/// Calls made (one HTTP attempt each), by `outcome`: `ok`, `rate_limited` (a 429), `error`.
pub const PROVIDER_CALLS: &str = "bizq_provider_calls_total";
/// Failed calls by `code` (`error_details.code`: provider_error, connect_error, bad_request,
/// rate_limited, provider_auth, …) and `status` (the HTTP status, `none` without an answer).
pub const PROVIDER_ERRORS: &str = "bizq_provider_errors_total";
/// Send to last byte of each call, by `outcome`.
pub const PROVIDER_LATENCY: &str = "bizq_provider_latency_seconds";
/// Tokens answered, by `kind`: `input`, `cached_input`, `cache_write`, `output` (the figures of
/// `cost_breakdown`: as the provider reported them).
pub const PROVIDER_TOKENS: &str = "bizq_provider_tokens_total";
/// Credits the answers were priced at (what their tasks are charged when their results land).
pub const PROVIDER_CREDITS: &str = "bizq_provider_credits_total";
/// Calls not made because the fleet-wide budget refused them, by `reason`: `rate_budget`
/// (a bucket is empty), `rate_limited` (blocked after a 429), `max_in_flight`, `too_large`.
pub const PROVIDER_BUDGET_REFUSALS: &str = "bizq_provider_budget_refusals_total";
/// Calls sent to another provider of the same tier because the routed one was out of budget
/// (`auto` routing), by `from` and `to` provider.
pub const PROVIDER_REROUTED: &str = "bizq_provider_rerouted_total";

/// One provider call that answered: its latency, tokens and the credits it was priced at.
pub fn provider_answered(
    provider: &str,
    model: &str,
    latency: Duration,
    usage: &crate::providers::Usage,
    credits: i32,
) {
    if !enabled() {
        return;
    }
    let (p, m) = (provider.to_string(), model.to_string());
    counter!(PROVIDER_CALLS, "provider" => p.clone(), "model" => m.clone(), "outcome" => "ok")
        .increment(1);
    histogram!(PROVIDER_LATENCY, "provider" => p.clone(), "model" => m.clone(), "outcome" => "ok")
        .record(latency.as_secs_f64());
    for (kind, n) in [
        ("input", usage.input_tokens),
        ("cached_input", usage.cached_input_tokens),
        ("cache_write", usage.cache_write_tokens),
        ("output", usage.output_tokens),
    ] {
        counter!(PROVIDER_TOKENS, "provider" => p.clone(), "model" => m.clone(), "kind" => kind)
            .increment(n);
    }
    counter!(PROVIDER_CREDITS, "provider" => p, "model" => m).increment(credits.max(0) as u64);
}

/// One provider call that failed (after it was sent, or while sending it).
pub fn provider_failed(
    provider: &str,
    model: &str,
    latency: Duration,
    error: &crate::providers::TaskError,
) {
    if !enabled() {
        return;
    }
    let (p, m) = (provider.to_string(), model.to_string());
    let outcome = if error.http_status == Some(429) {
        "rate_limited"
    } else {
        "error"
    };
    let status = error
        .http_status
        .map_or_else(|| "none".to_string(), |s| s.to_string());
    counter!(PROVIDER_CALLS, "provider" => p.clone(), "model" => m.clone(), "outcome" => outcome)
        .increment(1);
    histogram!(PROVIDER_LATENCY, "provider" => p.clone(), "model" => m.clone(), "outcome" => outcome)
        .record(latency.as_secs_f64());
    counter!(PROVIDER_ERRORS, "provider" => p, "model" => m, "code" => error.code, "status" => status)
        .increment(1);
}

/// A call the fleet-wide budget did not let through (no HTTP request was made).
pub fn provider_budget_refused(provider: &str, reason: &'static str) {
    if !enabled() {
        return;
    }
    counter!(PROVIDER_BUDGET_REFUSALS, "provider" => provider.to_string(), "reason" => reason)
        .increment(1);
}

/// A call rerouted from an out-of-budget provider to another of the same tier.
pub fn provider_rerouted(from: &str, to: &str) {
    if !enabled() {
        return;
    }
    counter!(PROVIDER_REROUTED, "from" => from.to_string(), "to" => to.to_string()).increment(1);
}

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// Without it every helper here is a no-op, as in the CLI and in-process test fleets.
pub fn install() -> crate::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let bad = |e: metrics_exporter_prometheus::BuildError| crate::Error::Config(e.to_string());
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(bad)?
        .set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
        .map_err(bad)?
        .build_recorder();
    let handle = recorder.handle();
    if ::metrics::set_global_recorder(recorder).is_err() {
        return Err(crate::Error::Config(
            "a metrics recorder is already installed".into(),
        ));
    }
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// Whether this process serves metrics. Without a listener nothing is recorded, and the
/// per-task bookkeeping (and its query per claim) is skipped, so a fleet without
/// `--metrics-addr` (the benchmark's) does exactly the work it did before.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// What the worker remembers about a task between its claim and its result, for labels.
struct Tracked {
    task_type: String,
    workspace_id: Uuid,
}

fn tracked() -> &'static Mutex<HashMap<Uuid, Tracked>> {
    static T: OnceLock<Mutex<HashMap<Uuid, Tracked>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Workspace plans, looked up once per workspace and kept for [`PLAN_TTL`].
fn plans() -> &'static RwLock<HashMap<Uuid, (String, Instant)>> {
    static P: OnceLock<RwLock<HashMap<Uuid, (String, Instant)>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

const PLAN_TTL: Duration = Duration::from_secs(300);

/// The plans of these workspaces: from the cache, the rest in one query. A workspace whose
/// plan cannot be read is labelled `unknown`.
async fn plans_of(pool: &PgPool, workspaces: &[Uuid]) -> HashMap<Uuid, String> {
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    if let Ok(cache) = plans().read() {
        for ws in workspaces {
            match cache.get(ws) {
                Some((plan, at)) if at.elapsed() < PLAN_TTL => {
                    out.insert(*ws, plan.clone());
                }
                _ => missing.push(*ws),
            }
        }
    }
    missing.sort();
    missing.dedup();
    if !missing.is_empty() {
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT id, plan FROM workspaces WHERE id = ANY($1)")
                .bind(&missing)
                .fetch_all(pool)
                .await
                .unwrap_or_default();
        if let Ok(mut cache) = plans().write() {
            for (id, plan) in rows {
                cache.insert(id, (plan.clone(), Instant::now()));
                out.insert(id, plan);
            }
        }
    }
    for ws in workspaces {
        out.entry(*ws).or_insert_with(|| "unknown".into());
    }
    out
}

/// A claim statement ran: batch size and duration now; claimed counts and pickup latency
/// in the background (they need the plans and due times, one small query), so the claim
/// loop never waits for metrics.
pub fn claimed(pool: &PgPool, tasks: &[ClaimedTask], took: Duration) {
    if !enabled() {
        return;
    }
    histogram!(CLAIM_DURATION).record(took.as_secs_f64());
    histogram!(CLAIM_BATCH_SIZE).record(tasks.len() as f64);
    if tasks.is_empty() {
        return;
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    if let Ok(mut map) = tracked().lock() {
        for t in tasks {
            map.insert(
                t.id,
                Tracked {
                    task_type: t.task_type.clone(),
                    workspace_id: t.workspace_id,
                },
            );
        }
    }
    let pool = pool.clone();
    tokio::spawn(async move {
        let rows: Vec<(Uuid, String, String, Option<f64>)> = sqlx::query_as(
            "SELECT t.id, t.type, w.plan,
                    EXTRACT(EPOCH FROM t.started_at
                                       - GREATEST(t.created_at, COALESCE(t.scheduled_for, t.created_at)))::float8
               FROM tasks t
               JOIN workspaces w ON w.id = t.workspace_id
              WHERE t.id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let mut by_label: HashMap<(String, String), u64> = HashMap::new();
        for (_, task_type, plan, pickup) in &rows {
            *by_label
                .entry((task_type.clone(), plan.clone()))
                .or_default() += 1;
            if let Some(s) = pickup {
                histogram!(PICKUP_LATENCY, "type" => task_type.clone()).record(s.max(0.0));
            }
        }
        // Tasks gone from the table meanwhile still count as claimed.
        let unknown = ids.len() as u64 - rows.len() as u64;
        if unknown > 0 {
            *by_label
                .entry(("unknown".into(), "unknown".into()))
                .or_default() += unknown;
        }
        for ((task_type, plan), n) in by_label {
            counter!(TASKS_CLAIMED, "type" => task_type, "plan" => plan).increment(n);
        }
    });
}

/// A batch of results was written: `written` holds the ids whose write landed (the others
/// were fenced). Counts each by type and plan, run times, credits, batch size and duration.
pub async fn results(
    pool: &PgPool,
    completions: &[Completion],
    failures: &[Failure],
    aborted: &[Uuid],
    written: &std::collections::HashSet<Uuid>,
    took: Duration,
) {
    if !enabled() {
        return;
    }
    histogram!(RESULT_DURATION).record(took.as_secs_f64());
    histogram!(RESULT_BATCH_SIZE).record((completions.len() + failures.len()) as f64);
    let mut labels: HashMap<Uuid, (String, Uuid)> = HashMap::new();
    if let Ok(mut map) = tracked().lock() {
        let ids = completions
            .iter()
            .map(|c| c.id)
            .chain(failures.iter().map(|f| f.id))
            .chain(aborted.iter().copied());
        for id in ids {
            if let Some(t) = map.remove(&id) {
                labels.insert(id, (t.task_type, t.workspace_id));
            }
        }
    }
    let workspaces: Vec<Uuid> = labels.values().map(|(_, ws)| *ws).collect();
    let plans = plans_of(pool, &workspaces).await;
    let label = |id: &Uuid| -> (String, String) {
        match labels.get(id) {
            Some((t, ws)) => (
                t.clone(),
                plans.get(ws).cloned().unwrap_or_else(|| "unknown".into()),
            ),
            None => ("unknown".into(), "unknown".into()),
        }
    };
    for c in completions {
        let (t, plan) = label(&c.id);
        let secs = f64::from(c.processing_time_ms.max(0)) / 1000.0;
        if written.contains(&c.id) {
            histogram!(TASK_DURATION, "type" => t.clone(), "outcome" => "completed").record(secs);
            counter!(CREDITS_CHARGED, "type" => t.clone(), "plan" => plan.clone())
                .increment(c.actual_cost.max(0) as u64);
            counter!(TASKS_COMPLETED, "type" => t, "plan" => plan).increment(1);
        } else {
            counter!(TASKS_FENCED, "type" => t, "plan" => plan).increment(1);
        }
    }
    for f in failures {
        let (t, plan) = label(&f.id);
        let secs = f64::from(f.processing_time_ms.max(0)) / 1000.0;
        if !written.contains(&f.id) {
            counter!(TASKS_FENCED, "type" => t, "plan" => plan).increment(1);
        } else {
            let (outcome, name) = match f.action {
                FailureAction::Retry(_) => ("retried", TASKS_RETRIED),
                FailureAction::Fail => ("failed", TASKS_FAILED),
                FailureAction::Snooze(_) => ("snoozed", TASKS_SNOOZED),
                FailureAction::Park { .. } => ("parked", TASKS_PARKED),
            };
            histogram!(TASK_DURATION, "type" => t.clone(), "outcome" => outcome).record(secs);
            counter!(name, "type" => t, "plan" => plan).increment(1);
        }
    }
    for id in aborted {
        let (t, plan) = label(id);
        counter!(TASKS_ABORTED, "type" => t, "plan" => plan).increment(1);
    }
}

/// Tasks released to the queue at shutdown.
pub fn released(ids: &[Uuid], n: u64) {
    if !enabled() {
        return;
    }
    if let Ok(mut map) = tracked().lock() {
        for id in ids {
            map.remove(id);
        }
    }
    counter!(TASKS_RELEASED).increment(n);
}

/// A worker's slots and tasks running now (set when `/metrics` is scraped).
pub fn worker_load(in_flight: usize, slots: usize) {
    gauge!(IN_FLIGHT).set(in_flight as f64);
    gauge!(SLOTS).set(slots as f64);
}

/// One scheduler pass: what admission and reclaim did (the difference between the totals
/// before and after it), and how long it took.
pub fn scheduler_pass_since(
    admitted_before: &crate::lifecycle::AdmitReport,
    reclaimed_before: &crate::lifecycle::ReclaimReport,
    now: &crate::scheduler::SchedulerStats,
    took: Duration,
) {
    histogram!(PASS_DURATION).record(took.as_secs_f64());
    let (a, b) = (&now.admitted, admitted_before);
    for (outcome, n) in [
        ("queued", a.queued - b.queued),
        ("waiting", a.waiting - b.waiting),
        ("rejected", a.rejected - b.rejected),
        ("escalated", a.escalated - b.escalated),
        ("cancelled", a.cancelled - b.cancelled),
    ] {
        counter!(ADMITTED, "outcome" => outcome).increment(n);
    }
    let (r, b) = (&now.reclaimed, reclaimed_before);
    for (outcome, n) in [
        ("requeued", r.requeued - b.requeued),
        ("failed", r.failed - b.failed),
    ] {
        counter!(LEASES_RECLAIMED, "outcome" => outcome).increment(n);
    }
}

/// The scheduler's queue gauges for `/metrics`, sampled at most once per `max_age`: a scrape
/// finding a sample younger than that serves it as is, and concurrent scrapes wait for the
/// one sample under way instead of running their own. A failed sample counts as one too (the
/// next attempt waits for the interval), so a struggling database is not asked more often.
pub struct QueueSampler {
    pool: PgPool,
    ops: crate::config::OpsConfig,
    max_age: Duration,
    /// When the last sample started (its counts are at least this old).
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl QueueSampler {
    pub fn new(pool: PgPool, ops: crate::config::OpsConfig) -> Self {
        Self {
            pool,
            max_age: Duration::from_millis(ops.metrics_sample_max_age_ms),
            ops,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Samples the queue unless the last sample is younger than `max_age`; then sets the
    /// sample's age.
    pub async fn refresh(&self) {
        let mut last = self.last.lock().await;
        let fresh = last.is_some_and(|at| at.elapsed() < self.max_age);
        if !fresh {
            let started = Instant::now();
            if let Err(e) = sample_queue(&self.pool, &self.ops).await {
                tracing::warn!(error = %e, "could not sample the queue for /metrics");
            }
            counter!(QUEUE_SAMPLES).increment(1);
            *last = Some(started);
        }
        if let Some(at) = *last {
            gauge!(QUEUE_SAMPLE_AGE).set(at.elapsed().as_secs_f64());
        }
    }

    /// As the ops listener's [`crate::health::Sampler`].
    pub fn into_sampler(self) -> crate::health::Sampler {
        let this = std::sync::Arc::new(self);
        std::sync::Arc::new(move || {
            let this = this.clone();
            Box::pin(async move { this.refresh().await })
        })
    }
}

/// The queue as the scheduler sees it now (through [`QueueSampler`], at most once per
/// `ops.metrics_sample_max_age_ms`). Only live rows are counted, through the queue's partial
/// indexes: millions of finished tasks cost nothing.
pub async fn sample_queue(pool: &PgPool, ops: &crate::config::OpsConfig) -> crate::Result<()> {
    // Each count names its status as a constant, so the planner can use the partial index
    // over that status (a join against a list of statuses could not).
    let row: (i64, i64, i64, i64, Option<f64>, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasks WHERE status = 'pending'),
                (SELECT count(*) FROM tasks WHERE status = 'queued'),
                (SELECT count(*) FROM tasks WHERE status = 'processing'),
                (SELECT count(*) FROM tasks WHERE status = 'escalated'),
                (SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8
                   FROM tasks WHERE status = 'queued'),
                (SELECT count(*) FROM tasks WHERE status = 'pending' AND deps_remaining > 0),
                (SELECT count(*) FROM tasks
                  WHERE status = 'pending' AND wait_reason = 'insufficient_credits'),
                (SELECT count(*) FROM tasks
                  WHERE status = 'pending' AND wait_reason = 'subscription_inactive')",
    )
    .fetch_one(pool)
    .await?;
    let (pending, queued, processing, escalated, oldest, blocked, no_credits, inactive) = row;
    for (status, n) in [
        (TaskStatus::Pending, pending),
        (TaskStatus::Queued, queued),
        (TaskStatus::Processing, processing),
        (TaskStatus::Escalated, escalated),
    ] {
        gauge!(QUEUE_DEPTH, "status" => status.as_str()).set(n as f64);
    }
    gauge!(OLDEST_QUEUED).set(oldest.unwrap_or(0.0).max(0.0));
    gauge!(BLOCKED).set(blocked as f64);
    gauge!(PARKED, "reason" => "insufficient_credits").set(no_credits as f64);
    gauge!(PARKED, "reason" => "subscription_inactive").set(inactive as f64);
    let mut workers: HashMap<(String, String), i64> = HashMap::new();
    for role in ["worker", "scheduler"] {
        for state in ["running", "draining", "lost"] {
            workers.insert((role.into(), state.into()), 0);
        }
    }
    for w in crate::registry::list(pool, ops).await? {
        *workers.entry((w.role, w.state)).or_default() += 1;
    }
    for ((role, state), n) in workers {
        gauge!(WORKERS, "role" => role, "state" => state).set(n as f64);
    }
    Ok(())
}
