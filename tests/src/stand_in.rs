//! Support for the provider tests: `wiremock` servers standing in for OpenAI and Anthropic,
//! their answers in each API's documented shape, configs pointing at them, API keys in the
//! environment, and reading back what a task row recorded.

use std::time::Duration;

use bizq::config::Config;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;
use wiremock::ResponseTemplate;

use crate::engine::config_toml;

/// `config/test.toml` with `overrides` (see [`config_toml`]) followed by `extra` (provider and
/// model tables).
pub fn config_text(overrides: &[(&str, &str)], extra: &str) -> String {
    format!("{}\n{extra}\n", config_toml(overrides))
}

/// [`config_text`] without overrides, parsed and validated.
pub fn config(extra: &str) -> Config {
    config_over(&[], extra)
}

/// [`config_text`] parsed and validated.
pub fn config_over(overrides: &[(&str, &str)], extra: &str) -> Config {
    Config::from_toml(&config_text(overrides, extra)).expect("the provider test config is valid")
}

/// Puts an API key in this process's environment, where the worker reads it at start-up.
/// Each test uses its own variable name, so tests running side by side never share one.
pub fn set_key(var: &str, value: &str) {
    // SAFETY: test-only; every test sets its own variable before starting its fleet, and no
    // code reads that variable concurrently with this write.
    unsafe { std::env::set_var(var, value) };
}

/// A `[providers.<name>]` table of kind openai or anthropic at `base_url`, with the key in
/// `key_env`, and `extra` lines (e.g. `timeout_seconds = 1`).
pub fn provider(name: &str, kind: &str, base_url: &str, key_env: &str, extra: &str) -> String {
    format!(
        "[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{base_url}\"\napi_key_env = \"{key_env}\"\n{extra}\n"
    )
}

/// A `[models."<name>"]` table.
pub fn model(
    name: &str,
    provider: &str,
    input: f64,
    cached: f64,
    output: f64,
    extra: &str,
) -> String {
    format!(
        "[models.\"{name}\"]\nprovider = \"{provider}\"\ninput_usd_per_mtok = {input}\n\
         cached_input_usd_per_mtok = {cached}\noutput_usd_per_mtok = {output}\n{extra}\n"
    )
}

/// An OpenAI Chat Completions answer.
pub fn openai_answer(
    text: &str,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    finish_reason: &str,
) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .insert_header("x-request-id", "req_openai_123")
        .set_body_json(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_764_000_000,
            "model": "gpt-test-2026",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "finish_reason": finish_reason,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }))
}

/// An Anthropic Messages answer with the given text blocks (and a non-text block between).
pub fn anthropic_answer(
    blocks: &[&str],
    input_tokens: u64,
    cache_creation: u64,
    cache_read: u64,
    output_tokens: u64,
    stop_reason: &str,
) -> ResponseTemplate {
    let mut content: Vec<Value> = blocks
        .iter()
        .map(|t| json!({"type": "text", "text": t}))
        .collect();
    content.insert(
        1.min(content.len()),
        json!({"type": "thinking", "thinking": "not part of the answer", "signature": "x"}),
    );
    ResponseTemplate::new(200)
        .insert_header("request-id", "req_anthropic_456")
        .set_body_json(json!({
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": content,
            "stop_reason": stop_reason,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": cache_creation,
                "cache_read_input_tokens": cache_read,
            },
        }))
}

/// An OpenAI-style error answer.
pub fn openai_error(status: u16, message: &str, code: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("x-request-id", "req_err_1")
        .set_body_json(json!({
            "error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}
        }))
}

/// Inserts an `ai.generate` task with plain SQL, the way product code does.
pub async fn ai_task(
    pool: &PgPool,
    ws: Uuid,
    input: Value,
    ai_provider: Option<&str>,
    ai_model: Option<&str>,
) -> anyhow::Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, ai_provider, ai_model)
         VALUES ($1, 'ai.generate', 'content', 'generate', $2, $3, $4)
         RETURNING id",
    )
    .bind(ws)
    .bind(input)
    .bind(ai_provider)
    .bind(ai_model)
    .fetch_one(pool)
    .await?)
}

/// What a task row recorded.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub status: String,
    pub attempt: i32,
    pub actual_cost: Option<i32>,
    pub estimated_cost: Option<i32>,
    pub cost_breakdown: Option<Value>,
    pub error_details: Option<Value>,
    pub output: Option<Value>,
    pub ai_provider: Option<String>,
    pub ai_model: Option<String>,
    pub wait_reason: Option<String>,
}

pub async fn task_row(pool: &PgPool, id: Uuid) -> anyhow::Result<TaskRow> {
    let r = sqlx::query(
        "SELECT status, attempt, actual_cost, estimated_cost, cost_breakdown, error_details,
                output, ai_provider, ai_model, wait_reason
           FROM tasks
          WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    Ok(TaskRow {
        status: r.try_get("status")?,
        attempt: r.try_get("attempt")?,
        actual_cost: r.try_get("actual_cost")?,
        estimated_cost: r.try_get("estimated_cost")?,
        cost_breakdown: r.try_get("cost_breakdown")?,
        error_details: r.try_get("error_details")?,
        output: r.try_get("output")?,
        ai_provider: r.try_get("ai_provider")?,
        ai_model: r.try_get("ai_model")?,
        wait_reason: r.try_get("wait_reason")?,
    })
}

/// Polls until the task's status is `status`, or fails after `timeout` with the row.
pub async fn wait_status(
    pool: &PgPool,
    id: Uuid,
    status: &str,
    timeout: Duration,
) -> anyhow::Result<TaskRow> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let row = task_row(pool, id).await?;
        if row.status == status {
            return Ok(row);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("task {id} is not {status} after {timeout:?}: {row:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
