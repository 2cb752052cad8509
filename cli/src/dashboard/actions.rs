//! The dashboard's writes: retry and cancel, of one task or of every task a filter matches
//! (after a confirmation page showing the count), through the same `bizq::lifecycle`
//! functions as the CLI, each recorded in `admin_events` with its actor.

use std::net::SocketAddr;

use axum::Form;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bizq::{TaskStatus, lifecycle};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::data::{self, Filter};
use super::{PageError, Shared, pages, same_secret};

/// Most tasks one bulk action touches; the confirmation page says when a filter matches more.
pub const BULK_CAP: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Retry,
    Cancel,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retry" => Some(Self::Retry),
            "cancel" => Some(Self::Cancel),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Cancel => "cancel",
        }
    }

    /// The statuses the lifecycle function accepts.
    pub fn applies_to(self) -> &'static [TaskStatus] {
        match self {
            Self::Retry => &[
                TaskStatus::Failed,
                TaskStatus::Cancelled,
                TaskStatus::Escalated,
            ],
            Self::Cancel => &[
                TaskStatus::Pending,
                TaskStatus::Queued,
                TaskStatus::Processing,
                TaskStatus::Escalated,
            ],
        }
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        "missing or wrong CSRF token: reload the page and try again\n",
    )
        .into_response()
}

fn actor(app: &Shared, peer: SocketAddr) -> String {
    format!("{} (dashboard, from {})", app.actor, peer.ip())
}

/// Runs `action` on each task through the lifecycle functions; returns (done, skipped with
/// the reason each was skipped).
async fn apply(
    app: &Shared,
    action: Action,
    ids: &[Uuid],
    reason: &str,
) -> (Vec<Uuid>, Vec<(Uuid, String)>) {
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    for id in ids {
        let r = match action {
            Action::Retry => lifecycle::retry(&app.pool, *id).await,
            Action::Cancel => lifecycle::cancel(&app.pool, *id, reason).await,
        };
        match r {
            Ok(_) => done.push(*id),
            Err(e) => skipped.push((*id, e.to_string())),
        }
    }
    (done, skipped)
}

async fn record(
    app: &Shared,
    actor: &str,
    action: &str,
    target: serde_json::Value,
    done: &[Uuid],
    skipped: &[(Uuid, String)],
) -> anyhow::Result<()> {
    let skipped: Vec<_> = skipped
        .iter()
        .map(|(id, why)| json!({"task": id, "reason": why}))
        .collect();
    sqlx::query(
        "INSERT INTO admin_events (actor, action, target, task_ids, done, skipped)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(done)
    .bind(done.len() as i32)
    .bind(serde_json::Value::Array(skipped))
    .execute(&app.pool)
    .await?;
    tracing::info!(%actor, action, done = done.len(), "admin action");
    Ok(())
}

async fn one(
    app: Shared,
    peer: SocketAddr,
    id: Uuid,
    action: Action,
    form: CsrfForm,
) -> Result<Response, PageError> {
    if !same_secret(&form.csrf, &app.csrf) {
        return Ok(csrf_refused());
    }
    let reason = match form.reason.trim() {
        "" => "by an admin (dashboard)".to_string(),
        r => r.to_string(),
    };
    let (done, skipped) = apply(&app, action, &[id], &reason).await;
    let actor = actor(&app, peer);
    record(
        &app,
        &actor,
        action.as_str(),
        json!({"task": id}),
        &done,
        &skipped,
    )
    .await?;
    let note = match skipped.first() {
        Some((_, why)) => format!("not done: {why}"),
        None => format!("{} done", action.as_str()),
    };
    Ok((
        StatusCode::SEE_OTHER,
        [(
            header::LOCATION,
            format!("/tasks/{id}?note={}", data::encode(&note)),
        )],
    )
        .into_response())
}

pub async fn retry_one(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<Uuid>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    one(app, peer, id, Action::Retry, form).await
}

pub async fn cancel_one(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<Uuid>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    one(app, peer, id, Action::Cancel, form).await
}

#[derive(Deserialize)]
pub struct BulkQuery {
    #[serde(default)]
    action: String,
    #[serde(flatten)]
    filter: Filter,
}

/// GET /tasks/bulk?action=…&filter…: how many tasks the action would touch, and a form to
/// confirm it.
pub async fn confirm_bulk(
    State(app): State<Shared>,
    Query(q): Query<BulkQuery>,
) -> Result<Response, PageError> {
    let Some(action) = Action::parse(&q.action) else {
        return Ok((StatusCode::BAD_REQUEST, "unknown action\n").into_response());
    };
    let bound = match q.filter.bind(&app.pool).await {
        Ok(b) => b,
        Err(e) => return Ok((StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()),
    };
    let ids = data::matching_ids(&app.pool, &bound, action.applies_to(), BULK_CAP + 1).await?;
    Ok(pages::confirm_page(&app, action, &q.filter, ids.len() as i64).into_response())
}

#[derive(Deserialize)]
pub struct BulkForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    /// The count the admin confirmed; the action runs only if the filter still matches it.
    #[serde(default)]
    expected: String,
    #[serde(default)]
    reason: String,
    #[serde(flatten)]
    filter: Filter,
}

/// POST /tasks/bulk: runs the confirmed action on every matching task.
pub async fn bulk(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<BulkForm>,
) -> Result<Response, PageError> {
    if !same_secret(&form.csrf, &app.csrf) {
        return Ok(csrf_refused());
    }
    let Some(action) = Action::parse(&form.action) else {
        return Ok((StatusCode::BAD_REQUEST, "unknown action\n").into_response());
    };
    if form.filter.is_empty() {
        return Ok((
            StatusCode::BAD_REQUEST,
            "a bulk action needs at least one filter\n",
        )
            .into_response());
    }
    let bound = match form.filter.bind(&app.pool).await {
        Ok(b) => b,
        Err(e) => return Ok((StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()),
    };
    let ids = data::matching_ids(&app.pool, &bound, action.applies_to(), BULK_CAP).await?;
    let expected: i64 = form.expected.trim().parse().unwrap_or(0);
    if ids.len() as i64 > expected {
        // More tasks match than the admin saw: confirm again with the new count.
        return Ok(
            pages::confirm_page(&app, action, &form.filter, ids.len() as i64).into_response(),
        );
    }
    let reason = match form.reason.trim() {
        "" => "by an admin (dashboard, bulk)".to_string(),
        r => r.to_string(),
    };
    let (done, skipped) = apply(&app, action, &ids, &reason).await;
    let actor = actor(&app, peer);
    let target = json!({
        "workspace": form.filter.workspace,
        "status": form.filter.status,
        "type": form.filter.task_type,
        "since": form.filter.since,
        "until": form.filter.until,
    });
    record(
        &app,
        &actor,
        &format!("bulk_{}", action.as_str()),
        target,
        &done,
        &skipped,
    )
    .await?;
    let note = format!(
        "bulk {}: {} done, {} skipped",
        action.as_str(),
        done.len(),
        skipped.len()
    );
    let query = form.filter.query();
    let sep = if query.is_empty() { "" } else { "&" };
    Ok((
        StatusCode::SEE_OTHER,
        [(
            header::LOCATION,
            format!("/tasks?{query}{sep}note={}", data::encode(&note)),
        )],
    )
        .into_response())
}
