//! The dashboard's pages as maud templates. maud escapes every interpolated value, so task
//! input and output (and anything else from the database) render as text, never as markup.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bizq::TaskStatus;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::actions::{Action, BULK_CAP};
use super::data::{self, Filter};
use super::{App, PageError, Shared};

fn layout(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · BizQ" }
                link rel="stylesheet" href="/static/dashboard.css";
                script src="/static/dashboard.js" defer {}
            }
            body {
                header {
                    strong { "BizQ" }
                    nav {
                        a href="/" { "Overview" }
                        a href="/workspaces" { "Workspaces" }
                        a href="/tasks" { "Tasks" }
                        a href="/workers" { "Workers" }
                    }
                }
                main id="content" data-refresh=[refresh.then_some("5")] {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// `/tasks?key=value&…`, every key and value percent-encoded. Every link to the task list
/// is built here; a workspace is always named by its id, never its slug.
fn tasks_href(params: &[(&str, &str)]) -> String {
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", data::encode(k), data::encode(v)))
        .collect();
    if query.is_empty() {
        "/tasks".into()
    } else {
        format!("/tasks?{}", query.join("&"))
    }
}

/// `/tasks/<id>` followed by `parts` (e.g. `retry`), each path segment percent-encoded.
fn task_href(id: Uuid, parts: &[&str]) -> String {
    let mut href = format!("/tasks/{}", data::encode(&id.to_string()));
    for p in parts {
        href.push('/');
        href.push_str(&data::encode(p));
    }
    href
}

fn ts(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}

fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.1} s"),
        Some(s) if s < 7200.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn pretty(v: &Option<Value>) -> String {
    match v {
        None => "-".into(),
        Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

fn status_badge(s: TaskStatus) -> Markup {
    let s = s.as_str();
    html! { span class={ "status " (s) } { (s) } }
}

/// Throughput and failures per minute over the last hour, as an inline SVG bar chart.
fn chart(last_hour: &[(i32, i64, i64)]) -> Markup {
    let max = last_hour
        .iter()
        .map(|(_, c, f)| c + f)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let (w, h, bar) = (600.0, 120.0, 10.0);
    html! {
        svg class="chart" viewBox={ "0 0 " (w) " " (h + 16.0) } role="img"
            aria-label="completed and failed tasks per minute, last hour" {
            @for (ago, completed, failed) in last_hour {
                @let x = w - (f64::from(*ago) + 1.0) * bar;
                @let hc = *completed as f64 / max * h;
                @let hf = *failed as f64 / max * h;
                rect class="completed" x=(x) y=(h - hc - hf) width=(bar - 1.0) height=(hc) {
                    title { (ago) " min ago: " (completed) " completed, " (failed) " failed" }
                }
                rect class="failed" x=(x) y=(h - hf) width=(bar - 1.0) height=(hf) {}
            }
            text x="0" y=(h + 14.0) { "60 min ago" }
            text x=(w - 30.0) y=(h + 14.0) { "now" }
            text x="0" y="10" { "max " (max as i64) "/min" }
        }
    }
}

/// The providers table of the overview: budgets left per dimension, calls in flight, a 429's
/// block, the park and its reason, and the tasks waiting for the provider.
fn providers_panel(providers: &[data::ProviderPanel]) -> Markup {
    html! {
        @if providers.is_empty() {
            p { "none configured" }
        } @else {
            table id="providers" {
                tr {
                    th { "provider" } th { "kind" } th { "budget left" } th { "in flight" }
                    th { "state" } th { "tasks waiting" }
                }
                @for p in providers {
                    tr data-provider=(p.name) {
                        td { (p.name) }
                        td { (p.kind.unwrap_or("not in this config")) }
                        td {
                            @if p.budgets.is_empty() {
                                "unlimited"
                            } @else {
                                @for (dimension, level, per_minute) in &p.budgets {
                                    div { (dimension) ": " (format!("{:.0}", level.max(0.0))) " left now, " (per_minute) "/min" }
                                }
                            }
                            @if let Some(until) = p.blocked_until {
                                div class="warn" { "blocked after a 429 until " (ts(Some(until))) }
                            }
                        }
                        td { (p.in_flight) " / " (p.max_in_flight.map_or("no cap".to_string(), |m| m.to_string())) }
                        td class="provider-state" {
                            @if p.parked_now {
                                span class="status failed" { "parked" }
                                " until " (ts(p.parked_until))
                                @if let Some(r) = &p.park_reason { div class="reason" { (r) } }
                            } @else if let Some(r) = &p.park_reason {
                                span class="status queued" { "probing" }
                                div class="muted" { "last parked until " (ts(p.parked_until)) ": " (r) }
                            } @else {
                                span class="status completed" { "available" }
                            }
                        }
                        td {
                            @if p.waiting > 0 {
                                a href=(tasks_href(&[("status", "pending")])) { (p.waiting) }
                            } @else { "0" }
                        }
                    }
                }
            }
        }
    }
}

pub async fn overview(State(app): State<Shared>) -> Result<Markup, PageError> {
    let o = data::overview(&app.pool).await?;
    let workers = bizq::registry::list(&app.pool, &app.config.ops).await?;
    let alive = workers.iter().filter(|w| w.state != "lost").count();
    let lost = workers.len() - alive;
    let events = data::admin_events(&app.pool, 10).await?;
    let providers = data::providers(&app.pool, &app.config).await?;
    let (done, failed) = o
        .last_hour
        .iter()
        .fold((0, 0), |(d, f), (_, c, x)| (d + c, f + x));
    Ok(layout(
        "Overview",
        true,
        html! {
            section class="cards" {
                @for (status, n, estimated) in &o.by_status {
                    a class="card" href=(tasks_href(&[("status", status.as_str())])) {
                        @if *estimated {
                            div class="n" title="estimated from the planner's statistics" { "~" (n) }
                        } @else {
                            div class="n" { (n) }
                        }
                        (status_badge(*status))
                    }
                }
            }
            section class="cards" {
                div class="card" { div class="n" id="oldest-queued" { (age(o.oldest_queued_s)) } "oldest queued" }
                div class="card" { div class="n" id="workers-alive" { (alive) } "workers alive" }
                div class="card" { div class="n" { (lost) } "workers lost" }
                div class="card" { div class="n" { (o.blocked) } "waiting on dependencies" }
                div class="card" { div class="n" { (o.scheduled) } "scheduled later" }
            }
            h2 { "Last hour: " (done) " completed, " (failed) " failed" }
            (chart(&o.last_hour))
            h2 { "Parked (workspace cannot run them now)" }
            @if o.parked.is_empty() {
                p { "none" }
            } @else {
                table { tr { th { "reason" } th { "tasks" } }
                    @for (reason, n) in &o.parked { tr { td { (reason) } td { (n) } } }
                }
            }
            h2 { "Providers" }
            (providers_panel(&providers))
            h2 { "Recent admin actions" }
            @if events.is_empty() {
                p { "none" }
            } @else {
                table {
                    tr { th { "at" } th { "actor" } th { "action" } th { "tasks" } th { "target" } }
                    @for (at, actor, action, n, target) in &events {
                        tr { td { (ts(Some(*at))) } td { (actor) } td { (action) } td { (n) } td { code { (target) } } }
                    }
                }
            }
        },
    ))
}

pub async fn workspaces(State(app): State<Shared>) -> Result<Markup, PageError> {
    let rows = data::workspaces(&app.pool).await?;
    Ok(layout(
        "Workspaces",
        true,
        html! {
            table {
                tr {
                    th { "workspace" } th { "plan" } th { "backlog" } th { "in flight" }
                    th { "waiting: credits" } th { "provider" } th { "dependencies" } th { "schedule" } th { "escalated" }
                    th { "balance" } th { "reserved" } th { "used this month" } th { "monthly limit" }
                }
                @for w in &rows {
                    @let ws = w.id.to_string();
                    tr data-workspace=(ws) {
                        td { a class="workspace" href=(tasks_href(&[("workspace", &ws)])) { (w.slug) }
                             @if let Some(s) = &w.subscription_status { @if s != "active" { " " span class="muted" { "(" (s) ")" } } } }
                        td { (w.plan) }
                        td { a href=(tasks_href(&[("workspace", &ws), ("status", "queued")])) { (w.backlog) } }
                        td { (w.in_flight) }
                        td { (w.waiting_credits) } td { (w.waiting_provider) } td { (w.waiting_dependencies) } td { (w.waiting_schedule) }
                        td { (w.escalated) }
                        td { (w.credits_balance) } td { (w.credits_reserved) }
                        td { (opt(w.credits_used_this_month)) } td { (opt(w.monthly_credit_limit)) }
                    }
                }
            }
            p class="muted" { "Backlog = pending + queued. Waiting: credits = the workspace cannot pay, is not in good standing or was locked at claim; provider = its provider is parked (bad key, quota; see the overview); schedule = due later, including tasks snoozed until a provider's rate limit resets." }
        },
    ))
}

pub async fn workers(State(app): State<Shared>) -> Result<Markup, PageError> {
    let rows = bizq::registry::list(&app.pool, &app.config.ops).await?;
    Ok(layout(
        "Workers",
        true,
        html! {
            table {
                tr { th { "id" } th { "role" } th { "state" } th { "host" } th { "pid" } th { "version" }
                     th { "in flight" } th { "last seen" } th { "last claim" } th { "types" } }
                @for w in &rows {
                    tr class=[(w.state == "lost").then_some("lost")] {
                        td { (w.id) } td { (w.role) } td { (w.state) } td { (w.host) } td { (w.pid) }
                        td { (w.version) } td { (w.in_flight) "/" (w.concurrency) }
                        td { (age(Some(w.seen_ago_s))) " ago" } td { (ts(w.last_claim_at)) }
                        td { (w.types.join(", ")) }
                    }
                }
            }
            p class="muted" { "Lost = not seen for " (app.config.ops.worker_lost_after_seconds) " s; deleted after "
                (app.config.ops.worker_forget_after_seconds) " s." }
        },
    ))
}

#[derive(Deserialize)]
pub struct TasksQuery {
    #[serde(flatten)]
    filter: Filter,
    #[serde(default)]
    note: String,
    #[serde(default)]
    limit: String,
}

fn filter_form(f: &Filter) -> Markup {
    html! {
        form class="filter" method="get" action="/tasks" {
            label { "workspace " input name="workspace" value=(f.workspace) placeholder="slug or id"; }
            label { "status "
                select name="status" {
                    option value="" { "any" }
                    @for s in TaskStatus::ALL.map(TaskStatus::as_str) { option value=(s) selected[f.status == s] { (s) } }
                }
            }
            label { "type " input name="type" value=(f.task_type) placeholder="ai.generate"; }
            label { "created from " input name="since" value=(f.since) placeholder="2026-11-27T09:00"; }
            label { "until " input name="until" value=(f.until) placeholder="UTC"; }
            button type="submit" { "Filter" }
        }
    }
}

pub async fn tasks(
    State(app): State<Shared>,
    Query(q): Query<TasksQuery>,
) -> Result<Response, PageError> {
    let bound = match q.filter.bind(&app.pool).await {
        Ok(b) => b,
        Err(e) => {
            let page = layout(
                "Tasks",
                false,
                html! { (filter_form(&q.filter)) p class="error" { (e.to_string()) } },
            );
            return Ok((StatusCode::BAD_REQUEST, page).into_response());
        }
    };
    let limit = q.limit.parse::<i64>().unwrap_or(100).clamp(1, 1000);
    let rows = data::tasks(&app.pool, &bound, limit).await?;
    let query = q.filter.query();
    let sep = if query.is_empty() { "" } else { "&" };
    Ok(layout(
        "Tasks",
        false,
        html! {
            @if !q.note.is_empty() { p class="note" id="note" { (q.note) } }
            (filter_form(&q.filter))
            @if !q.filter.is_empty() {
                p class="bulk" {
                    "Every task this filter matches: "
                    a class="button" id="bulk-retry" href={ "/tasks/bulk?action=retry" (sep) (query) } { "Retry matching…" }
                    " "
                    a class="button" id="bulk-cancel" href={ "/tasks/bulk?action=cancel" (sep) (query) } { "Cancel matching…" }
                }
            }
            p class="muted" { (rows.len()) " shown (newest first, at most " (limit) ")" }
            table id="tasks" {
                tr { th { "task" } th { "workspace" } th { "type" } th { "status" } th { "pri" } th { "att" } th { "created" } th { "note" } }
                @for t in &rows {
                    tr {
                        td { a href=(task_href(t.id, &[])) { (t.name) } br; code class="id" { (t.id) } }
                        td { a href=(tasks_href(&[("workspace", &t.workspace_id.to_string())])) { (t.slug) } } td { (t.task_type) } td { (status_badge(t.status)) }
                        td { (t.priority) } td { (t.attempt) } td { (ts(Some(t.created_at))) }
                        td { (opt(t.note.as_deref())) }
                    }
                }
            }
        },
    )
    .into_response())
}

#[derive(Deserialize)]
pub struct TaskQuery {
    #[serde(default)]
    note: String,
}

fn links(items: &[data::Link]) -> Markup {
    html! {
        @if items.is_empty() { p { "none" } } @else {
            ul {
                @for (id, name, status) in items {
                    li { a href=(task_href(*id, &[])) { (name) } " " (status_badge(*status)) " " code class="id" { (id) } }
                }
            }
        }
    }
}

fn action_button(app: &App, id: Uuid, action: Action) -> Markup {
    let label = match action {
        Action::Retry => "Retry",
        Action::Cancel => "Cancel",
    };
    html! {
        form class="inline" method="post" action=(task_href(id, &[action.as_str()])) {
            input type="hidden" name="csrf" value=(app.csrf);
            button type="submit" id={ (action.as_str()) "-button" } { (label) }
        }
    }
}

pub async fn task(
    State(app): State<Shared>,
    Path(id): Path<Uuid>,
    Query(q): Query<TaskQuery>,
) -> Result<Response, PageError> {
    let Some(t) = data::task(&app.pool, id).await? else {
        let page = layout("Task not found", false, html! { p { "No task " (id) "." } });
        return Ok((StatusCode::NOT_FOUND, page).into_response());
    };
    let (deps, dependents) = data::relatives(&app.pool, id).await?;
    Ok(layout(
        &format!("Task {}", t.name),
        false,
        html! {
            @if !q.note.is_empty() { p class="note" id="note" { (q.note) } }
            p class="actions" {
                (status_badge(t.status)) " "
                @if Action::Retry.applies_to().contains(&t.status) { (action_button(&app, t.id, Action::Retry)) }
                @if Action::Cancel.applies_to().contains(&t.status) { (action_button(&app, t.id, Action::Cancel)) }
            }
            div class="task-grid" {
            div {
            table class="facts" {
                tr { th { "id" } td { code { (t.id) } } }
                tr { th { "workspace" } td { a href=(tasks_href(&[("workspace", &t.workspace_id.to_string())])) { (t.slug) } " " code class="id" { (t.workspace_id) } } }
                tr { th { "type" } td { (t.task_type) } }
                tr { th { "status" } td { span id="status" { (t.status.as_str()) } @if let Some(w) = &t.wait_reason { " (" (w) ")" } } }
                tr { th { "priority" } td { (t.priority) } }
                tr { th { "attempt" } td { (t.attempt) " of " (opt(t.max_attempts)) } }
                tr { th { "worker / lease" } td { (opt(t.locked_by.as_deref())) ", until " (ts(t.lease_expires_at)) } }
                tr { th { "scheduled for" } td { (ts(t.scheduled_for)) } }
                tr { th { "created" } td { (ts(Some(t.created_at))) } }
                tr { th { "started" } td { (ts(t.started_at)) } }
                tr { th { "finished" } td { (ts(t.completed_at)) } }
                tr { th { "run time" } td { (opt(t.processing_time_ms)) " ms" } }
                tr { th { "provider / model" } td { (opt(t.ai_provider.as_deref())) " / " (opt(t.ai_model.as_deref())) } }
                tr { th { "credits" } td { "estimated " (opt(t.estimated_cost)) ", actual " (opt(t.actual_cost)) ", reserved " (t.reserved_credits) } }
            }
            h2 { "Depends on" @if let Some(n) = t.deps_remaining { " (" (n) " unfinished)" } }
            div id="dependencies" { (links(&deps)) }
            h2 { "Dependents" }
            div id="dependents" { (links(&dependents)) }
            }
            div {
            h2 { "Input" }
            pre id="input" { (pretty(&Some(t.input.clone()))) }
            h2 { "Output" }
            pre id="output" { (pretty(&t.output)) }
            h2 { "Cost breakdown" }
            pre id="cost" { (pretty(&t.cost_breakdown)) }
            h2 { "Error (latest attempt)" }
            pre id="error" { (pretty(&t.error_details)) }
            }
            }
        },
    )
    .into_response())
}

/// The confirmation page of a bulk action: the count, the filter, and the form that runs it.
pub fn confirm_page(app: &App, action: Action, f: &Filter, count: i64) -> Markup {
    let over = count > BULK_CAP;
    let count = count.min(BULK_CAP);
    layout(
        &format!("Confirm: {} {} tasks", action.as_str(), count),
        false,
        html! {
            p id="confirm-count" {
                strong { (count) } " task(s) match and can be " (action.as_str()) @if action == Action::Retry { "ied" } @else { "led" } ":"
                " workspace " code { (if f.workspace.is_empty() { "any" } else { &f.workspace }) }
                ", status " code { (if f.status.is_empty() { "any" } else { &f.status }) }
                ", type " code { (if f.task_type.is_empty() { "any" } else { &f.task_type }) }
                ", created " code { (if f.since.is_empty() { "-" } else { &f.since }) } " to " code { (if f.until.is_empty() { "-" } else { &f.until }) }
            }
            @if over { p class="error" { "More than " (BULK_CAP) " match: this runs on the oldest " (BULK_CAP) "; repeat for the rest." } }
            @if f.is_empty() {
                p class="error" { "A bulk action needs at least one filter." }
            } @else if count == 0 {
                p { "Nothing to do." }
            } @else {
                form method="post" action="/tasks/bulk" {
                    input type="hidden" name="csrf" value=(app.csrf);
                    input type="hidden" name="action" value=(action.as_str());
                    input type="hidden" name="expected" value=(count);
                    input type="hidden" name="workspace" value=(f.workspace);
                    input type="hidden" name="status" value=(f.status);
                    input type="hidden" name="type" value=(f.task_type);
                    input type="hidden" name="since" value=(f.since);
                    input type="hidden" name="until" value=(f.until);
                    @if action == Action::Cancel { label { "reason " input name="reason" placeholder="by an admin"; } " " }
                    button type="submit" id="confirm-button" { "Yes, " (action.as_str()) " " (count) " task(s)" }
                }
            }
            p { a href={ "/tasks?" (f.query()) } { "Back to the list" } }
        },
    )
}

pub fn login_page(_app: &App, message: Option<&str>) -> Markup {
    layout(
        "Sign in",
        false,
        html! {
            @if let Some(m) = message { p class="error" { (m) } }
            form method="post" action="/login" {
                label { "Dashboard token " input type="password" name="token" autocomplete="off"; }
                " "
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub async fn login(State(app): State<Shared>) -> Markup {
    login_page(&app, None)
}
