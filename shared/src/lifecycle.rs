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

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::config::DependencyFailurePolicy;
use crate::{Error, Result};

/// Channel the scheduler listens on: new or unblocked pending tasks.
pub const CHANNEL_PENDING: &str = "bizq_pending";
/// Channel workers listen on: tasks became claimable.
pub const CHANNEL_QUEUED: &str = "bizq_queued";
/// Channel workers listen on: payload is the id of a processing task that was cancelled.
pub const CHANNEL_CANCEL: &str = "bizq_cancel";

/// A task as product code creates it. Everything not named here takes the schema's default.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub workspace_id: Uuid,
    pub task_type: String,
    pub category: String,
    pub name: String,
    pub input: Value,
    pub priority: i32,
    pub depends_on: Vec<Uuid>,
    pub scheduled_for: Option<chrono::DateTime<chrono::Utc>>,
    pub estimated_cost: Option<i32>,
    pub worker_type: Option<String>,
    pub ai_provider: Option<String>,
    pub max_attempts: Option<i32>,
}

impl NewTask {
    /// An `ai.generate` task with the given prompt, priority 5.
    pub fn generate(workspace_id: Uuid, prompt: &str) -> Self {
        Self {
            workspace_id,
            task_type: "ai.generate".into(),
            category: "content".into(),
            name: "generate".into(),
            input: json!({ "prompt": prompt }),
            priority: 5,
            depends_on: Vec::new(),
            scheduled_for: None,
            estimated_cost: None,
            worker_type: None,
            ai_provider: None,
            max_attempts: None,
        }
    }
}

/// Inserts a task exactly as product code would with plain SQL. The row is `queued` by its
/// own INSERT when it needs no scheduler decision (migration 0012), else `pending`.
pub async fn enqueue(pool: &PgPool, task: &NewTask) -> Result<Uuid> {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, priority, depends_on,
                            scheduled_for, estimated_cost, worker_type, ai_provider, max_attempts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, 'ai'), $11, $12)
         RETURNING id",
    )
    .bind(task.workspace_id)
    .bind(task.task_type.clone())
    .bind(task.category.clone())
    .bind(task.name.clone())
    .bind(task.input.clone())
    .bind(task.priority)
    .bind(task.depends_on.clone())
    .bind(task.scheduled_for)
    .bind(task.estimated_cost)
    .bind(task.worker_type.clone())
    .bind(task.ai_provider.clone())
    .bind(task.max_attempts)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// What one admission pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AdmitReport {
    pub queued: u64,
    pub waiting: u64,
    pub rejected: u64,
    pub escalated: u64,
    pub cancelled: u64,
    /// Left for the next pass because a dependency row was locked by another transaction.
    pub deferred: u64,
}

impl AdmitReport {
    pub fn handled(&self) -> u64 {
        self.queued + self.waiting + self.rejected + self.escalated + self.cancelled
    }
}

/// The verdict of admission on one task.
enum Verdict {
    /// No unfinished dependency: `queued` if due, else `pending` until `promote`.
    Ready,
    /// Waits for this many unfinished dependencies.
    Blocked(Vec<Uuid>),
    Reject(Value),
    Escalate(Value),
    /// A dependency already failed or was cancelled.
    DependencyFailed(Value),
}

/// Admission's batch of new `pending` tasks, oldest first (`$1` most rows), with the
/// workspace's `max_task_cost`. Public so the index tests EXPLAIN the very SQL.
pub const ADMIT_SELECT_SQL: &str =
    "SELECT t.id, t.workspace_id, t.type, t.worker_type, t.estimated_cost, t.depends_on,
                t.input, t.ai_provider, t.ai_model, w.ai_preferences,
                CASE WHEN jsonb_typeof(w.ai_preferences -> 'max_task_cost') = 'number'
                     THEN (w.ai_preferences ->> 'max_task_cost')::float8 END AS max_task_cost
           FROM tasks t
           JOIN workspaces w ON w.id = t.workspace_id
          WHERE t.status = 'pending'
            AND t.deps_remaining IS NULL
            AND ($2::uuid IS NULL OR t.id = $2)
          ORDER BY t.created_at
          LIMIT $1
            FOR NO KEY UPDATE OF t SKIP LOCKED";

/// **Admit** (scheduler): checks new `pending` tasks once — type known, dependencies exist in
/// the same workspace and form no cycle, escalation rules — and records how many unfinished
/// dependencies each waits for. Tasks with none and due now go straight to `queued`; the
/// others stay `pending`, out of every claim index, until `promote`.
///
/// Rows are taken with `FOR NO KEY UPDATE SKIP LOCKED`, so schedulers run side by side. Dependency
/// rows are locked the same way (`SKIP LOCKED`); a task whose dependency is locked right now
/// is deferred to the next pass, which rules out deadlocks between schedulers. Taking that
/// lock before counting is what makes counting race-free against a dependency completing at
/// the same moment: either its completion committed first (and we see `completed`), or its
/// trigger waits for our edges and decrements the count we wrote.
///
/// One tenant's row never fails the pass for everyone: if the batch statement errors, the
/// batch is admitted task by task, and a task that fails on its own is set aside as `failed`
/// with `code = 'admission_error'` (see [`isolate_rows`]).
pub async fn admit(
    pool: &PgPool,
    batch: i64,
    known_types: &[&str],
    policy: DependencyFailurePolicy,
) -> Result<AdmitReport> {
    admit_with_estimates(pool, batch, known_types, policy, None).await
}

/// **Admit**, and fill in `estimated_cost` where product code left it NULL on an
/// `ai.generate` task: the routed model's prices × (prompt characters / 4 input tokens +
/// `max_tokens` output tokens), so the claim's reservation and the `max_task_cost`
/// escalation below work on real numbers. Tasks routed to the unpriced mock keep NULL.
pub async fn admit_with_estimates(
    pool: &PgPool,
    batch: i64,
    known_types: &[&str],
    policy: DependencyFailurePolicy,
    providers: Option<&crate::providers::Providers>,
) -> Result<AdmitReport> {
    match admit_batch(pool, batch, None, known_types, policy, providers).await {
        Err(e) if is_statement_error(&e) => {
            tracing::warn!(error = %e, "admission batch failed; admitting task by task");
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM tasks WHERE status = 'pending' AND deps_remaining IS NULL
                  ORDER BY created_at LIMIT $1",
            )
            .bind(batch)
            .fetch_all(pool)
            .await?;
            let mut report = AdmitReport::default();
            for id in ids {
                match admit_batch(pool, 1, Some(id), known_types, policy, providers).await {
                    Ok(r) => {
                        report.queued += r.queued;
                        report.waiting += r.waiting;
                        report.rejected += r.rejected;
                        report.escalated += r.escalated;
                        report.cancelled += r.cancelled;
                        report.deferred += r.deferred;
                    }
                    Err(e) if is_statement_error(&e) => {
                        set_aside(pool, id, "admission_error", &e).await?;
                        report.rejected += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(report)
        }
        other => other,
    }
}

/// True when the database rejected a statement (as opposed to a lost connection, a pool
/// timeout, ...): retrying the rows one by one can isolate the offending one.
fn is_statement_error(e: &Error) -> bool {
    matches!(e, Error::Database(db) if db.as_database_error().is_some())
}

/// A task that fails a statement on its own is taken out of the engine's way: `failed`, with
/// the database's message in `error_details`, so no batch selects it again. If even that
/// write fails, the task is logged and left alone.
async fn set_aside(pool: &PgPool, id: Uuid, code: &str, cause: &Error) -> Result<()> {
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
async fn isolate_rows<T, F, Fut>(
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

async fn admit_batch(
    pool: &PgPool,
    batch: i64,
    only: Option<Uuid>,
    known_types: &[&str],
    policy: DependencyFailurePolicy,
    providers: Option<&crate::providers::Providers>,
) -> Result<AdmitReport> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(ADMIT_SELECT_SQL)
        .bind(batch)
        .bind(only)
        .fetch_all(&mut *tx)
        .await?;
    if rows.is_empty() {
        return Ok(AdmitReport::default());
    }
    // The engine's limits (migration 0009): how deep an unfinished dependency chain may get,
    // and how many tasks may wait on one task.
    let (max_chain_depth, max_dependents): (i32, i32) =
        sqlx::query_as("SELECT max_chain_depth, max_dependents FROM bizq_limits")
            .fetch_one(&mut *tx)
            .await?;

    struct Candidate {
        id: Uuid,
        workspace_id: Uuid,
        task_type: String,
        worker_type: Option<String>,
        estimated_cost: Option<i32>,
        depends_on: Vec<Uuid>,
        max_task_cost: Option<f64>,
        /// Filled in here (NULL before).
        estimate: Option<i32>,
    }
    let mut candidates = Vec::with_capacity(rows.len());
    for r in rows {
        let mut deps: Vec<Uuid> = r
            .try_get::<Option<Vec<Uuid>>, _>("depends_on")?
            .unwrap_or_default();
        deps.sort();
        deps.dedup();
        let task_type: String = r.try_get("type")?;
        let mut estimated_cost: Option<i32> = r.try_get("estimated_cost")?;
        let mut estimate = None;
        if estimated_cost.is_none()
            && task_type == "ai.generate"
            && let Some(providers) = providers
            && let Ok(input) = crate::handlers::parse_generate(&r.try_get::<Value, _>("input")?)
        {
            let ai_provider: Option<String> = r.try_get("ai_provider")?;
            let ai_model: Option<String> = r.try_get("ai_model")?;
            let prefs: Option<Value> = r.try_get("ai_preferences")?;
            estimate = providers.estimate(&crate::providers::RouteRequest {
                ai_provider: ai_provider.as_deref(),
                ai_model: ai_model.as_deref(),
                preferences: &crate::providers::Preferences::from_json(prefs.as_ref()),
                prompt_chars: input.prompt.chars().count(),
                max_tokens: input.max_tokens,
            });
            estimated_cost = estimate;
        }
        candidates.push(Candidate {
            id: r.try_get("id")?,
            workspace_id: r.try_get("workspace_id")?,
            task_type,
            worker_type: r.try_get("worker_type")?,
            estimated_cost,
            depends_on: deps,
            max_task_cost: r.try_get("max_task_cost")?,
            estimate,
        });
    }

    // Lock every dependency of the batch (skipping rows locked elsewhere) and read its
    // latest status. `has_dependents` tells the completion trigger it has work to do.
    let mut all_deps: Vec<Uuid> = candidates
        .iter()
        .flat_map(|c| c.depends_on.iter().copied())
        .collect();
    all_deps.sort();
    all_deps.dedup();
    let mut dep_state: std::collections::HashMap<Uuid, (String, Uuid)> = Default::default();
    // Tasks already admitted waiting on each dependency (tasks.dependents_count).
    let mut dependents: std::collections::HashMap<Uuid, i64> = Default::default();
    let mut dep_exists_locked: std::collections::HashSet<Uuid> = Default::default();
    if !all_deps.is_empty() {
        let locked = sqlx::query(
            "UPDATE tasks t
                SET has_dependents = TRUE,
                    updated_at = now()
              WHERE t.id IN (SELECT id FROM tasks WHERE id = ANY($1) FOR NO KEY UPDATE SKIP LOCKED)
             RETURNING t.id, t.status, t.workspace_id, t.dependents_count",
        )
        .bind(all_deps.clone())
        .fetch_all(&mut *tx)
        .await?;
        for r in locked {
            dependents.insert(
                r.try_get("id")?,
                i64::from(r.try_get::<i32, _>("dependents_count")?),
            );
            dep_state.insert(
                r.try_get("id")?,
                (r.try_get("status")?, r.try_get("workspace_id")?),
            );
        }
        let unseen: Vec<Uuid> = all_deps
            .iter()
            .filter(|d| !dep_state.contains_key(d))
            .copied()
            .collect();
        if !unseen.is_empty() {
            let existing: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = ANY($1)")
                .bind(unseen)
                .fetch_all(&mut *tx)
                .await?;
            dep_exists_locked.extend(existing);
        }
    }

    // Cycle check and chain depth, one bounded walk. A cycle needs every member to be
    // unadmitted when its first member is admitted (an admitted task's dependencies existed
    // and are fixed; `depends_on` cannot change after insert), so the walk goes on only
    // through unadmitted tasks (`pending`, `deps_remaining IS NULL`) and at most
    // `max_chain_depth + 1` levels deep. Where it reaches an admitted task that still waits,
    // that task's recorded `chain_depth` continues the chain. The cost per pass is bounded by
    // batch x depth limit, not by the length of the chains behind the batch.
    let roots: Vec<Uuid> = candidates
        .iter()
        .filter(|c| !c.depends_on.is_empty())
        .map(|c| c.id)
        .collect();
    let mut in_cycle: std::collections::HashSet<Uuid> = Default::default();
    let mut depth_of: std::collections::HashMap<Uuid, i32> = Default::default();
    if !roots.is_empty() {
        let walked = sqlx::query(
            "WITH RECURSIVE walk(root, id, depth) AS (
                 SELECT r.root, d.dep, 1
                   FROM unnest($1::uuid[]) AS r(root)
                   JOIN tasks t ON t.id = r.root
                  CROSS JOIN LATERAL unnest(t.depends_on) AS d(dep)
               UNION
                 SELECT w.root, d.dep, w.depth + 1
                   FROM walk w
                   JOIN tasks t ON t.id = w.id
                  CROSS JOIN LATERAL unnest(t.depends_on) AS d(dep)
                  WHERE w.id <> w.root
                    AND t.status = 'pending'
                    AND t.deps_remaining IS NULL
                    AND w.depth <= $2
             )
             SELECT w.root,
                    bool_or(w.id = w.root) AS in_cycle,
                    max(w.depth + CASE WHEN t.status = 'pending' AND t.deps_remaining > 0
                                       THEN COALESCE(t.chain_depth, 0) ELSE 0 END) AS depth
               FROM walk w
               LEFT JOIN tasks t ON t.id = w.id
              GROUP BY w.root",
        )
        .bind(roots)
        .bind(max_chain_depth)
        .fetch_all(&mut *tx)
        .await?;
        for r in walked {
            let root: Uuid = r.try_get("root")?;
            if r.try_get::<Option<bool>, _>("in_cycle")?.unwrap_or(false) {
                in_cycle.insert(root);
            }
            depth_of.insert(root, r.try_get::<Option<i32>, _>("depth")?.unwrap_or(0));
        }
    }

    let mut report = AdmitReport::default();
    let mut ids = Vec::new();
    let mut kinds: Vec<&'static str> = Vec::new();
    let mut remaining: Vec<i32> = Vec::new();
    let mut details: Vec<Option<Value>> = Vec::new();
    let mut depths: Vec<i32> = Vec::new();
    let mut estimates: Vec<Option<i32>> = Vec::new();
    let mut edge_task = Vec::new();
    let mut edge_dep = Vec::new();
    for c in &candidates {
        let depth = depth_of.get(&c.id).copied().unwrap_or(0);
        let verdict = if !known_types.contains(&c.task_type.as_str()) {
            Verdict::Reject(json!({
                "message": format!("unknown task type '{}' (known: {})", c.task_type, known_types.join(", ")),
                "code": "unknown_task_type", "attempt": 0,
            }))
        } else if c.depends_on.contains(&c.id) || in_cycle.contains(&c.id) {
            Verdict::Reject(json!({
                "message": "depends_on forms a cycle: this task (indirectly) depends on itself",
                "code": "dependency_cycle", "attempt": 0,
            }))
        } else if depth > max_chain_depth {
            Verdict::Reject(json!({
                "message": format!("the chain of unfinished dependencies ending at this task is deeper than the limit of {max_chain_depth} (bizq_limits.max_chain_depth)"),
                "code": "dependency_chain_too_deep", "limit": max_chain_depth, "attempt": 0,
            }))
        } else if c.depends_on.iter().any(|d| dep_exists_locked.contains(d)) {
            report.deferred += 1;
            continue;
        } else if let Some(missing) = c.depends_on.iter().find(|d| match dep_state.get(d) {
            None => true,
            Some((_, ws)) => *ws != c.workspace_id,
        }) {
            Verdict::Reject(json!({
                "message": format!("depends_on names task {missing}, which does not exist in this workspace"),
                "code": "missing_dependency", "dependency": missing, "attempt": 0,
            }))
        } else if c.worker_type.as_deref() == Some("human") {
            Verdict::Escalate(json!({
                "message": "worker_type is 'human': waiting for a person",
                "code": "human_task", "attempt": 0,
            }))
        } else if let (Some(cost), Some(max)) = (c.estimated_cost, c.max_task_cost)
            && f64::from(cost) > max
        {
            Verdict::Escalate(json!({
                "message": format!("estimated cost {cost} exceeds the workspace's max_task_cost {max}"),
                "code": "over_max_task_cost", "estimated_cost": cost, "attempt": 0,
            }))
        } else if let Some((dep, (status, _))) = c
            .depends_on
            .iter()
            .filter_map(|d| dep_state.get(d).map(|s| (d, s)))
            .find(|(_, (s, _))| s == "failed" || s == "cancelled")
        {
            Verdict::DependencyFailed(json!({
                "message": format!("dependency {dep} {status}"),
                "code": format!("dependency_{status}"), "dependency": dep,
                "dependency_status": status, "attempt": 0,
            }))
        } else {
            let open: Vec<Uuid> = c
                .depends_on
                .iter()
                .filter(|d| dep_state.get(d).is_some_and(|(s, _)| s != "completed"))
                .copied()
                .collect();
            if open.is_empty() {
                Verdict::Ready
            } else if let Some(full) = open
                .iter()
                .find(|d| dependents.get(d).copied().unwrap_or(0) >= i64::from(max_dependents))
            {
                Verdict::Reject(json!({
                    "message": format!("task {full} already has {max_dependents} dependents, the limit (bizq_limits.max_dependents)"),
                    "code": "too_many_dependents", "dependency": full, "limit": max_dependents,
                    "attempt": 0,
                }))
            } else {
                for d in &open {
                    *dependents.entry(*d).or_insert(0) += 1;
                }
                Verdict::Blocked(open)
            }
        };
        ids.push(c.id);
        depths.push(depth);
        estimates.push(c.estimate);
        match verdict {
            Verdict::Ready => {
                kinds.push("ready");
                remaining.push(0);
                details.push(None);
            }
            Verdict::Blocked(open) => {
                report.waiting += 1;
                kinds.push("blocked");
                remaining.push(open.len() as i32);
                details.push(None);
                for d in open {
                    edge_task.push(c.id);
                    edge_dep.push(d);
                }
            }
            Verdict::Reject(d) => {
                report.rejected += 1;
                kinds.push("failed");
                remaining.push(0);
                details.push(Some(d));
            }
            Verdict::Escalate(d) => {
                report.escalated += 1;
                kinds.push("escalated");
                remaining.push(0);
                details.push(Some(d));
            }
            Verdict::DependencyFailed(d) => {
                let kind = match policy {
                    DependencyFailurePolicy::Cancel => {
                        report.cancelled += 1;
                        "cancelled"
                    }
                    DependencyFailurePolicy::Escalate => {
                        report.escalated += 1;
                        "escalated"
                    }
                };
                kinds.push(kind);
                remaining.push(0);
                details.push(Some(d));
            }
        }
    }

    // Edges first, so that a task failing in this same statement cascades to dependents
    // admitted alongside it.
    // Each dependency counts the tasks newly waiting on it (rows already locked above).
    if !edge_task.is_empty() {
        sqlx::query(
            "WITH added AS (
                 INSERT INTO task_dependencies (task_id, depends_on_id)
                 SELECT task_id, depends_on_id FROM unnest($1::uuid[], $2::uuid[]) AS e(task_id, depends_on_id)
                 ON CONFLICT DO NOTHING
                 RETURNING depends_on_id
             )
             UPDATE tasks t
                SET dependents_count = t.dependents_count + a.n
               FROM (SELECT depends_on_id, count(*)::int AS n FROM added GROUP BY depends_on_id) a
              WHERE t.id = a.depends_on_id",
        )
        .bind(edge_task)
        .bind(edge_dep)
        .execute(&mut *tx)
        .await?;
    }
    let kinds: Vec<String> = kinds.into_iter().map(String::from).collect();
    let queued: i64 = sqlx::query_scalar(
        "WITH verdict AS (
             SELECT id, kind, deps, details, depth, estimate
               FROM unnest($1::uuid[], $2::text[], $3::int[], $4::jsonb[], $5::int[], $6::int[])
                    AS v(id, kind, deps, details, depth, estimate)
         ),
         admitted AS (
             UPDATE tasks t
                SET deps_remaining = v.deps,
                    chain_depth = v.depth,
                    status = CASE
                               WHEN v.kind = 'ready'
                                    AND COALESCE(t.scheduled_for, '-infinity') <= now() THEN 'queued'
                               WHEN v.kind IN ('ready', 'blocked') THEN 'pending'
                               ELSE v.kind
                             END,
                    error_details = COALESCE(v.details, t.error_details),
                    estimated_cost = COALESCE(t.estimated_cost, v.estimate),
                    completed_at = CASE WHEN v.kind IN ('failed', 'cancelled') THEN now() ELSE t.completed_at END,
                    updated_at = now()
               FROM verdict v
              WHERE t.id = v.id
             RETURNING t.status
         )
         SELECT count(*) FILTER (WHERE status = 'queued') FROM admitted",
    )
    .bind(ids)
    .bind(kinds)
    .bind(remaining)
    .bind(details)
    .bind(depths)
    .bind(estimates)
    .fetch_one(&mut *tx)
    .await?;
    report.queued = queued as u64;
    if queued > 0 {
        notify(&mut tx, CHANNEL_QUEUED).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Locks the given tasks in id order inside `tx`, before the caller's UPDATE of them, so two
/// statements over overlapping tasks (a heartbeat and a completion, say) take them in the
/// same order. Their workspace rows are locked later, by the billing triggers at the end of
/// that UPDATE, in id order (migration 0007), and held only until the commit.
async fn lock_for_update(tx: &mut sqlx::PgConnection, task_ids: &[Uuid]) -> Result<()> {
    sqlx::query("SELECT id FROM tasks WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(task_ids.to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn notify(conn: &mut sqlx::PgConnection, channel: &'static str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}

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
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", CLAIM_WORKSPACE_LOCK_WAIT.as_millis()))
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(CLAIM_SQL)
        .bind(req.worker_id.to_string())
        .bind(req.limit)
        .bind(req.type_patterns.map(|p| p.to_vec()))
        .bind(req.lease.as_millis() as i64)
        .bind(false)
        .fetch_all(&mut *tx)
        .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    claimed_rows(rows, &mut claimed)?;
    tx.commit().await?;
    Ok(claimed)
}

/// [`CLAIM_SKIP_BUSY_SQL`], tried again after 2, 4, 8 and 16 ms while some workspace row is
/// still locked elsewhere; the last try parks that workspace's tasks as `workspace_busy`, and
/// `unpark` brings them back.
async fn claim_skipping_busy(pool: &PgPool, req: &ClaimRequest<'_>) -> Result<Vec<ClaimedTask>> {
    let mut claimed = Vec::new();
    for round in 0..=CLAIM_BUSY_RETRIES {
        let last = round == CLAIM_BUSY_RETRIES;
        let rows = sqlx::query(CLAIM_SKIP_BUSY_SQL)
            .bind(req.worker_id.to_string())
            .bind(req.limit - claimed.len() as i64)
            .bind(req.type_patterns.map(|p| p.to_vec()))
            .bind(req.lease.as_millis() as i64)
            .bind(last)
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
    /// `{message, code, attempt, http_status?, body_excerpt?, provider?, until?}`.
    pub error_details: Value,
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
        kinds.push("completed".into());
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
            FailureAction::Fail => ("failed", None),
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
        details.push(Some(f.error_details.clone()));
    }
    let mut tx = pool.begin().await?;
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
    tx.commit().await?;
    Ok(written)
}

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
    let rows: Vec<String> = sqlx::query_scalar(
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
        requeued: rows.iter().filter(|s| *s == "queued").count() as u64,
        failed: rows.iter().filter(|s| *s == "failed").count() as u64,
    };
    if report.requeued > 0 {
        notify(&mut tx, CHANNEL_QUEUED).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// **Cancel** (admin): a pending, queued or escalated task is cancelled at once. A processing
/// task is cancelled too — its lease is void from this commit on, so nothing it writes later
/// lands and nothing is charged — and its worker is told over `bizq_cancel` to abort the
/// provider call (the heartbeat notices within one interval if the notification is lost).
/// Returns the status the task had.
///
/// The SQL body is `bizq_engine_cancel_task` (migration 0009), the very function members reach
/// through `bizq_cancel_task`: one path for the CLI and for product code. The dependents'
/// cascade follows this connection's `bizq.dependency_failure_policy`.
pub async fn cancel(pool: &PgPool, id: Uuid, reason: &str) -> Result<String> {
    let previous: Option<String> = sqlx::query_scalar("SELECT bizq_engine_cancel_task($1, $2)")
        .bind(id)
        .bind(reason)
        .fetch_one(pool)
        .await?;
    checked_previous(
        id,
        previous,
        "cancel",
        &["pending", "queued", "processing", "escalated"],
    )
}

/// The status an admin action found (`None`: no such task), or why the action did not apply:
/// the SQL bodies change nothing unless the status allows it.
fn checked_previous(
    id: Uuid,
    previous: Option<String>,
    action: &'static str,
    allowed: &'static [&'static str],
) -> Result<String> {
    let status = previous.ok_or(Error::TaskNotFound(id))?;
    if !allowed.contains(&status.as_str()) {
        return Err(Error::WrongStatus {
            id,
            status,
            action,
            expected: allowed.join(", "),
        });
    }
    Ok(status)
}

/// **Retry** (admin): a failed, cancelled or escalated task starts over as `pending` with
/// fresh attempts and no error; the scheduler admits it again (dependencies are re-checked).
///
/// The SQL body is `bizq_engine_retry_task` (migration 0009), shared with members'
/// `bizq_retry_task`.
pub async fn retry(pool: &PgPool, id: Uuid) -> Result<String> {
    let previous: Option<String> = sqlx::query_scalar("SELECT bizq_engine_retry_task($1)")
        .bind(id)
        .fetch_one(pool)
        .await?;
    checked_previous(id, previous, "retry", &["failed", "cancelled", "escalated"])
}
