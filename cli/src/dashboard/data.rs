//! The dashboard's reads: every query behind its pages, and the task filter shared by the
//! task list and the bulk actions.

use bizq::TaskStatus;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Task counts by status, the oldest queued task's age, and the last hour per minute.
pub struct Overview {
    /// Every status, with its count and whether that count is the planner's estimate
    /// (`completed` above `queries::EXACT_COUNT_LIMIT`, as in `bizq stats`).
    pub by_status: Vec<(TaskStatus, i64, bool)>,
    pub oldest_queued_s: Option<f64>,
    pub parked: Vec<(String, i64)>,
    pub blocked: i64,
    pub scheduled: i64,
    /// (minutes ago, 0 = this minute .. 59, completed, failed)
    pub last_hour: Vec<(i32, i64, i64)>,
}

pub async fn overview(pool: &PgPool) -> anyhow::Result<Overview> {
    let counts = {
        let mut tx = pool.begin().await?;
        sqlx::query(bizq::queries::STATS_SETTINGS_SQL)
            .execute(&mut *tx)
            .await?;
        let counts = bizq::queries::status_counts(&mut tx).await?;
        tx.commit().await?;
        counts
    };
    let by_status = TaskStatus::ALL
        .into_iter()
        .map(|s| {
            counts
                .iter()
                .find(|c| c.status == s)
                .map_or((s, 0, false), |c| (s, c.n, c.estimated))
        })
        .collect();
    let (oldest_queued_s, blocked, scheduled): (Option<f64>, i64, i64) = sqlx::query_as(
        "SELECT (SELECT EXTRACT(EPOCH FROM now() - min(created_at))::float8
                   FROM tasks WHERE status = 'queued'),
                (SELECT count(*) FROM tasks WHERE status = 'pending' AND deps_remaining > 0),
                (SELECT count(*) FROM tasks WHERE status = 'pending' AND scheduled_for > now())",
    )
    .fetch_one(pool)
    .await?;
    let parked: Vec<(String, i64)> = sqlx::query_as(
        "SELECT wait_reason, count(*)
           FROM tasks
          WHERE status = 'pending' AND wait_reason IS NOT NULL
          GROUP BY wait_reason
          ORDER BY wait_reason",
    )
    .fetch_all(pool)
    .await?;
    let minutes: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT floor(EXTRACT(EPOCH FROM now() - completed_at) / 60)::int AS ago,
                count(*) FILTER (WHERE status = 'completed'),
                count(*) FILTER (WHERE status = 'failed')
           FROM tasks
          WHERE completed_at > now() - interval '1 hour'
            AND status IN ('completed', 'failed')
          GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let last_hour = (0..60)
        .map(|m| {
            minutes
                .iter()
                .find(|(ago, _, _)| *ago == m)
                .copied()
                .unwrap_or((m, 0, 0))
        })
        .collect();
    Ok(Overview {
        by_status,
        oldest_queued_s,
        parked,
        blocked,
        scheduled,
        last_hour,
    })
}

/// One workspace's queue and credits.
#[derive(sqlx::FromRow)]
pub struct WorkspaceRow {
    pub id: Uuid,
    pub slug: String,
    pub plan: String,
    pub subscription_status: Option<String>,
    pub backlog: i64,
    pub in_flight: i64,
    pub waiting_credits: i64,
    pub waiting_provider: i64,
    pub waiting_dependencies: i64,
    pub waiting_schedule: i64,
    pub escalated: i64,
    pub credits_balance: i32,
    pub credits_reserved: i32,
    pub credits_used_this_month: Option<i32>,
    pub monthly_credit_limit: Option<i32>,
}

pub async fn workspaces(pool: &PgPool) -> anyhow::Result<Vec<WorkspaceRow>> {
    Ok(sqlx::query_as(
        "SELECT w.id, w.slug, w.plan, w.subscription_status,
                COALESCE(q.backlog, 0) AS backlog,
                COALESCE(q.in_flight, 0) AS in_flight,
                COALESCE(q.waiting_credits, 0) AS waiting_credits,
                COALESCE(q.waiting_provider, 0) AS waiting_provider,
                COALESCE(q.waiting_dependencies, 0) AS waiting_dependencies,
                COALESCE(q.waiting_schedule, 0) AS waiting_schedule,
                COALESCE(q.escalated, 0) AS escalated,
                w.credits_balance, w.credits_reserved, w.credits_used_this_month,
                w.monthly_credit_limit
           FROM workspaces w
           LEFT JOIN (
                SELECT workspace_id,
                       count(*) FILTER (WHERE status IN ('pending', 'queued')) AS backlog,
                       count(*) FILTER (WHERE status = 'processing') AS in_flight,
                       count(*) FILTER (WHERE status = 'pending'
                                          AND wait_reason IN ('insufficient_credits',
                                                              'subscription_inactive',
                                                              'workspace_busy'))
                         AS waiting_credits,
                       count(*) FILTER (WHERE status = 'pending'
                                          AND wait_reason = 'provider_unavailable')
                         AS waiting_provider,
                       count(*) FILTER (WHERE status = 'pending' AND deps_remaining > 0)
                         AS waiting_dependencies,
                       count(*) FILTER (WHERE status = 'pending' AND scheduled_for > now())
                         AS waiting_schedule,
                       count(*) FILTER (WHERE status = 'escalated') AS escalated
                  FROM tasks
                 WHERE status IN ('pending', 'queued', 'processing', 'escalated')
                 GROUP BY workspace_id
           ) q ON q.workspace_id = w.id
          WHERE w.deleted_at IS NULL
          ORDER BY COALESCE(q.backlog, 0) + COALESCE(q.in_flight, 0) DESC, w.slug
          LIMIT 500",
    )
    .fetch_all(pool)
    .await?)
}

/// The task filter of the task list and of bulk actions (query string or form).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    /// Workspace slug or id.
    #[serde(default)]
    pub workspace: String,
    #[serde(default)]
    pub status: String,
    #[serde(default, rename = "type")]
    pub task_type: String,
    /// Created at or after (`YYYY-MM-DDTHH:MM`, UTC).
    #[serde(default)]
    pub since: String,
    /// Created before.
    #[serde(default)]
    pub until: String,
}

fn parse_time(s: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for fmt in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(Some(t.and_utc()));
        }
    }
    anyhow::bail!("cannot read the time '{s}' (use YYYY-MM-DDTHH:MM, UTC)")
}

/// The filter's values, checked: an unknown status or workspace is an error the page shows.
pub struct Bound {
    pub workspace: Option<Uuid>,
    pub status: Option<TaskStatus>,
    pub task_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        [
            &self.workspace,
            &self.status,
            &self.task_type,
            &self.since,
            &self.until,
        ]
        .iter()
        .all(|v| v.trim().is_empty())
    }

    /// The query string that reproduces this filter.
    pub fn query(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("workspace", &self.workspace),
            ("status", &self.status),
            ("type", &self.task_type),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if !v.trim().is_empty() {
                parts.push(format!("{k}={}", encode(v.trim())));
            }
        }
        parts.join("&")
    }

    pub async fn bind(&self, pool: &PgPool) -> anyhow::Result<Bound> {
        let status = match self.status.trim() {
            "" => None,
            s => Some(
                s.parse::<TaskStatus>()
                    .map_err(|_| anyhow::anyhow!("unknown status '{s}'"))?,
            ),
        };
        // A UUID is an id, anything else a slug: never both (see `admin::find_workspace`).
        let workspace = match self.workspace.trim() {
            "" => None,
            w => Some(
                crate::admin::find_workspace(pool, w)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no workspace '{w}'"))?,
            ),
        };
        Ok(Bound {
            workspace,
            status,
            task_type: Some(self.task_type.trim().to_string()).filter(|s| !s.is_empty()),
            since: parse_time(&self.since)?,
            until: parse_time(&self.until)?,
        })
    }
}

/// Percent-encodes a query-string value.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

const FILTER_SQL: &str = "($1::uuid IS NULL OR t.workspace_id = $1)
            AND ($2::text IS NULL OR t.status = $2)
            AND ($3::text IS NULL OR t.type = $3)
            AND ($4::timestamptz IS NULL OR t.created_at >= $4)
            AND ($5::timestamptz IS NULL OR t.created_at < $5)";

/// One line of the task list.
#[derive(sqlx::FromRow)]
pub struct TaskLine {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub slug: String,
    pub task_type: String,
    pub name: String,
    pub status: TaskStatus,
    pub priority: i32,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub note: Option<String>,
}

pub async fn tasks(pool: &PgPool, f: &Bound, limit: i64) -> anyhow::Result<Vec<TaskLine>> {
    let sql = format!(
        "SELECT t.id, t.workspace_id, w.slug, t.type AS task_type, t.name, t.status, t.priority,
                t.attempt, t.created_at, COALESCE(t.wait_reason, t.error_details ->> 'code') AS note
           FROM tasks t
           JOIN workspaces w ON w.id = t.workspace_id
          WHERE {FILTER_SQL}
          ORDER BY t.created_at DESC, t.id
          LIMIT $6"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(f.workspace)
        .bind(f.status)
        .bind(&f.task_type)
        .bind(f.since)
        .bind(f.until)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Ids of the tasks matching the filter whose status is one of `statuses` (at most `cap`).
pub async fn matching_ids(
    pool: &PgPool,
    f: &Bound,
    statuses: &[TaskStatus],
    cap: i64,
) -> anyhow::Result<Vec<Uuid>> {
    let sql = format!(
        "SELECT t.id
           FROM tasks t
          WHERE {FILTER_SQL}
            AND t.status = ANY($6)
          ORDER BY t.created_at, t.id
          LIMIT $7"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(f.workspace)
        .bind(f.status)
        .bind(&f.task_type)
        .bind(f.since)
        .bind(f.until)
        .bind(statuses.to_vec())
        .bind(cap)
        .fetch_all(pool)
        .await?)
}

/// One task in full, for its page.
#[derive(sqlx::FromRow)]
pub struct TaskDetail {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub slug: String,
    pub task_type: String,
    pub name: String,
    pub status: TaskStatus,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: Option<i32>,
    pub locked_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub wait_reason: Option<String>,
    pub deps_remaining: Option<i32>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub processing_time_ms: Option<i32>,
    pub estimated_cost: Option<i32>,
    pub actual_cost: Option<i32>,
    pub reserved_credits: i32,
    pub ai_provider: Option<String>,
    pub ai_model: Option<String>,
    pub input: Value,
    pub output: Option<Value>,
    pub error_details: Option<Value>,
    pub cost_breakdown: Option<Value>,
}

pub async fn task(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<TaskDetail>> {
    Ok(sqlx::query_as(
        "SELECT t.id, t.workspace_id, w.slug, t.type AS task_type, t.name, t.status, t.priority,
                t.attempt, t.max_attempts, t.locked_by, t.lease_expires_at, t.wait_reason,
                t.deps_remaining, t.scheduled_for, t.created_at, t.started_at, t.completed_at,
                t.processing_time_ms, t.estimated_cost, t.actual_cost, t.reserved_credits,
                t.ai_provider, t.ai_model, t.input, t.output, t.error_details, t.cost_breakdown
           FROM tasks t
           JOIN workspaces w ON w.id = t.workspace_id
          WHERE t.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// A linked task: (id, name, status).
pub type Link = (Uuid, String, TaskStatus);

/// What the task waits for, and what waits for it.
pub async fn relatives(pool: &PgPool, id: Uuid) -> anyhow::Result<(Vec<Link>, Vec<Link>)> {
    let deps: Vec<Link> = sqlx::query_as(
        "SELECT d.id, d.name, d.status
           FROM tasks t
           JOIN tasks d ON d.id = ANY(t.depends_on)
          WHERE t.id = $1
          ORDER BY d.created_at",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    // Edges of admitted tasks are in task_dependencies; pending tasks not yet admitted only
    // name the task in depends_on (same workspace, so the workspace index narrows it).
    let dependents: Vec<Link> = sqlx::query_as(
        "SELECT c.id, c.name, c.status
           FROM tasks c
          WHERE c.id IN (SELECT task_id FROM task_dependencies WHERE depends_on_id = $1)
             OR (c.workspace_id = (SELECT workspace_id FROM tasks WHERE id = $1)
                 AND $1 = ANY(c.depends_on))
          ORDER BY c.created_at
          LIMIT 200",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok((deps, dependents))
}

/// Recent admin actions: (at, actor, action, done, target).
pub async fn admin_events(
    pool: &PgPool,
    limit: i64,
) -> anyhow::Result<Vec<(DateTime<Utc>, String, String, i32, Value)>> {
    Ok(sqlx::query_as(
        "SELECT at, actor, action, done, target
           FROM admin_events
          ORDER BY at DESC, id DESC
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One provider on the overview: whether this dashboard's config names it (and its kind),
/// what its fleet-wide budgets hold now, whether it is parked and why, and the tasks waiting
/// for it. Nothing about its key (not even the variable's name) or its URL (which may carry
/// credentials) is read.
pub struct ProviderPanel {
    pub name: String,
    /// `openai`, `anthropic`, `mock`; `None` when only the database knows the provider (the
    /// fleet's config differs from the dashboard's).
    pub kind: Option<&'static str>,
    /// Per dimension: (dimension, level now, per minute); unlimited dimensions are left out.
    pub budgets: Vec<(&'static str, f64, u64)>,
    /// A 429's block in force.
    pub blocked_until: Option<DateTime<Utc>>,
    /// Calls in flight now, and the fleet-wide cap (`None` = uncapped).
    pub in_flight: u64,
    pub max_in_flight: Option<u64>,
    /// `provider_status`: until when, whether that is still ahead, and why.
    pub parked_until: Option<DateTime<Utc>>,
    pub parked_now: bool,
    pub park_reason: Option<String>,
    /// Pending tasks with `wait_reason = 'provider_unavailable'` naming this provider.
    pub waiting: i64,
}

/// Every provider the config names, has a budget row, was ever parked, or has tasks waiting
/// for it, in name order.
pub async fn providers(pool: &PgPool, config: &bizq::Config) -> anyhow::Result<Vec<ProviderPanel>> {
    use std::collections::BTreeMap;
    let mut out: BTreeMap<String, ProviderPanel> = BTreeMap::new();
    let blank = |name: &str| ProviderPanel {
        name: name.to_string(),
        kind: None,
        budgets: Vec::new(),
        blocked_until: None,
        in_flight: 0,
        max_in_flight: None,
        parked_until: None,
        parked_now: false,
        park_reason: None,
        waiting: 0,
    };
    if config.providers.mock.enabled {
        out.insert(
            "mock".into(),
            ProviderPanel {
                kind: Some("mock"),
                ..blank("mock")
            },
        );
    }
    for (name, p) in &config.providers.endpoints {
        let kind = match p.kind {
            bizq::config::ProviderKind::OpenAi => "openai",
            bizq::config::ProviderKind::Anthropic => "anthropic",
            bizq::config::ProviderKind::Mock => "mock",
        };
        out.insert(
            name.clone(),
            ProviderPanel {
                kind: Some(kind),
                ..blank(name)
            },
        );
    }
    for b in bizq::providers::limiter::Budgets::new(pool.clone())
        .status()
        .await?
    {
        let p = out
            .entry(b.provider.clone())
            .or_insert_with(|| blank(&b.provider));
        if let (Some(per_minute), Some(level)) = (b.per_minute, b.level) {
            p.budgets.push((b.dimension.as_str(), level, per_minute));
        }
        p.blocked_until = p.blocked_until.max(b.blocked_until);
        p.in_flight = b.in_flight;
        p.max_in_flight = b.max_in_flight;
    }
    // The park and its reason (the provider's message, redacted before it was stored).
    let parks: Vec<(String, DateTime<Utc>, bool, String)> = sqlx::query_as(
        "SELECT provider, parked_until, parked_until > now(), reason
           FROM provider_status
          ORDER BY provider",
    )
    .fetch_all(pool)
    .await?;
    for (name, until, now, reason) in parks {
        let p = out.entry(name.clone()).or_insert_with(|| blank(&name));
        p.parked_until = Some(until);
        p.parked_now = now;
        p.park_reason = Some(reason);
    }
    // Waiting tasks are pending, so the count stays within the live rows; grouped by the
    // provider their error names, as `unpark_providers` matches them.
    let waiting: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT error_details ->> 'provider', count(*)
           FROM tasks
          WHERE status = 'pending'
            AND wait_reason = 'provider_unavailable'
          GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    for (name, n) in waiting {
        let name = name.unwrap_or_else(|| "(unnamed)".into());
        out.entry(name.clone())
            .or_insert_with(|| blank(&name))
            .waiting = n;
    }
    Ok(out.into_values().collect())
}
