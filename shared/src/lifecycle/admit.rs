//! **Enqueue** and **admit**: a new task's insert, and the scheduler's one-time check of each
//! new `pending` task (type, dependencies, cycles, escalation) that queues it or makes it wait.

use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{CHANNEL_QUEUED, end_transaction, is_statement_error, notify, set_aside};
use crate::Result;
use crate::config::DependencyFailurePolicy;
use crate::handlers::{EstimateRequest, Handlers};
use crate::task::{ErrorDetails, TaskStatus};

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
    Reject(ErrorDetails),
    Escalate(ErrorDetails),
    /// A dependency already failed or was cancelled.
    DependencyFailed(ErrorDetails),
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

/// **Admit**, and fill in `estimated_cost` where product code left it NULL and the task's
/// handler gives an estimate ([`crate::handlers::Handler::estimate`]; `ai.generate`: the
/// routed model's prices × (prompt characters / 4 input tokens + `max_tokens` output
/// tokens)), so the claim's reservation and the `max_task_cost` escalation below work on
/// real numbers. Tasks routed to the unpriced mock keep NULL.
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

async fn admit_batch(
    pool: &PgPool,
    batch: i64,
    only: Option<Uuid>,
    known_types: &[&str],
    policy: DependencyFailurePolicy,
    providers: Option<&crate::providers::Providers>,
) -> Result<AdmitReport> {
    let mut tx = pool.begin().await?;
    let result: Result<AdmitReport> = async {
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
            && let Some(providers) = providers
        {
            let ai_provider: Option<String> = r.try_get("ai_provider")?;
            let ai_model: Option<String> = r.try_get("ai_model")?;
            let prefs: Option<Value> = r.try_get("ai_preferences")?;
            estimate = Handlers::shared().estimate(
                &task_type,
                &r.try_get::<Value, _>("input")?,
                &EstimateRequest {
                    ai_provider: ai_provider.as_deref(),
                    ai_model: ai_model.as_deref(),
                    preferences: &crate::providers::Preferences::from_json(prefs.as_ref()),
                },
                providers,
            );
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
    let mut dep_state: std::collections::HashMap<Uuid, (TaskStatus, Uuid)> = Default::default();
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
    // A verdict's kind: `ready` / `blocked` (both stay `pending` unless ready and due), or the
    // status it ends in.
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
            Verdict::Reject(ErrorDetails::new(
                "unknown_task_type",
                format!(
                    "unknown task type '{}' (known: {})",
                    c.task_type,
                    known_types.join(", ")
                ),
                0,
            ))
        } else if c.depends_on.contains(&c.id) || in_cycle.contains(&c.id) {
            Verdict::Reject(ErrorDetails::new(
                "dependency_cycle",
                "depends_on forms a cycle: this task (indirectly) depends on itself",
                0,
            ))
        } else if depth > max_chain_depth {
            Verdict::Reject(ErrorDetails {
                limit: Some(max_chain_depth),
                ..ErrorDetails::new(
                    "dependency_chain_too_deep",
                    format!(
                        "the chain of unfinished dependencies ending at this task is deeper than the limit of {max_chain_depth} (bizq_limits.max_chain_depth)"
                    ),
                    0,
                )
            })
        } else if c.depends_on.iter().any(|d| dep_exists_locked.contains(d)) {
            report.deferred += 1;
            continue;
        } else if let Some(missing) = c.depends_on.iter().find(|d| match dep_state.get(d) {
            None => true,
            Some((_, ws)) => *ws != c.workspace_id,
        }) {
            Verdict::Reject(ErrorDetails {
                dependency: Some(*missing),
                ..ErrorDetails::new(
                    "missing_dependency",
                    format!(
                        "depends_on names task {missing}, which does not exist in this workspace"
                    ),
                    0,
                )
            })
        } else if c.worker_type.as_deref() == Some("human") {
            Verdict::Escalate(ErrorDetails::new(
                "human_task",
                "worker_type is 'human': waiting for a person",
                0,
            ))
        } else if let (Some(cost), Some(max)) = (c.estimated_cost, c.max_task_cost)
            && f64::from(cost) > max
        {
            Verdict::Escalate(ErrorDetails {
                estimated_cost: Some(cost),
                ..ErrorDetails::new(
                    "over_max_task_cost",
                    format!("estimated cost {cost} exceeds the workspace's max_task_cost {max}"),
                    0,
                )
            })
        } else if let Some((dep, (status, _))) = c
            .depends_on
            .iter()
            .filter_map(|d| dep_state.get(d).map(|s| (d, s)))
            .find(|(_, (s, _))| matches!(s, TaskStatus::Failed | TaskStatus::Cancelled))
        {
            Verdict::DependencyFailed(ErrorDetails {
                dependency: Some(*dep),
                dependency_status: Some(*status),
                ..ErrorDetails::new(
                    format!("dependency_{status}"),
                    format!("dependency {dep} {status}"),
                    0,
                )
            })
        } else {
            let open: Vec<Uuid> = c
                .depends_on
                .iter()
                .filter(|d| {
                    dep_state
                        .get(d)
                        .is_some_and(|(s, _)| *s != TaskStatus::Completed)
                })
                .copied()
                .collect();
            if open.is_empty() {
                Verdict::Ready
            } else if let Some(full) = open
                .iter()
                .find(|d| dependents.get(d).copied().unwrap_or(0) >= i64::from(max_dependents))
            {
                Verdict::Reject(ErrorDetails {
                    dependency: Some(*full),
                    limit: Some(max_dependents),
                    ..ErrorDetails::new(
                        "too_many_dependents",
                        format!(
                            "task {full} already has {max_dependents} dependents, the limit (bizq_limits.max_dependents)"
                        ),
                        0,
                    )
                })
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
                kinds.push(TaskStatus::Failed.as_str());
                remaining.push(0);
                details.push(Some(d.to_json()));
            }
            Verdict::Escalate(d) => {
                report.escalated += 1;
                kinds.push(TaskStatus::Escalated.as_str());
                remaining.push(0);
                details.push(Some(d.to_json()));
            }
            Verdict::DependencyFailed(d) => {
                let kind = match policy {
                    DependencyFailurePolicy::Cancel => {
                        report.cancelled += 1;
                        TaskStatus::Cancelled.as_str()
                    }
                    DependencyFailurePolicy::Escalate => {
                        report.escalated += 1;
                        TaskStatus::Escalated.as_str()
                    }
                };
                kinds.push(kind);
                remaining.push(0);
                details.push(Some(d.to_json()));
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
    Ok(report)
    }
    .await;
    end_transaction(tx, result).await
}
