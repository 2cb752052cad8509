//! How provider failures move tasks, against `wiremock` stand-ins: 429s snooze without using
//! an attempt (retry-after-ms, an HTTP-date Retry-After, reset headers only), a 500 is
//! retried, a 400 fails at once with the provider's message, a timeout is an unknown outcome,
//! and a 401 parks the provider fleet-wide until its key is fixed.

use std::time::Duration;

use bizq_tests::engine::*;
use bizq_tests::stand_in::*;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const T: Duration = Duration::from_secs(30);

/// A config with one openai-kind provider `openai` at `server`, one model `m` (input $10,
/// output $30 per Mtok), one attempt per task unless `overrides` say otherwise, and long
/// waits allowed (so a snooze is not capped below the provider's ask).
fn one_provider(server: &MockServer, key_env: &str, overrides: &[(&str, &str)]) -> bizq::Config {
    let mut all = vec![
        ("retry.max_ms", "60000"),
        ("retry.jitter", "false"),
        ("worker.default_max_attempts", "1"),
    ];
    all.extend_from_slice(overrides);
    config_over(
        &all,
        &format!(
            "{}{}",
            provider(
                "openai",
                "openai",
                &server.uri(),
                key_env,
                "timeout_seconds = 1"
            ),
            model("m", "openai", 10.0, 10.0, 30.0, "")
        ),
    )
}

/// Runs one task against a stand-in that answers `first` once and then succeeds; checks the
/// task snoozed (pending, attempt given back, `rate_limited` with `until`, due between `lo`
/// and `hi` ms from the 429) and then completed on attempt 1 — with `max_attempts = 1`, an
/// attempt used by the 429 would have failed it instead.
async fn snoozes_then_completes(
    pool: &PgPool,
    first: ResponseTemplate,
    key_env: &str,
    lo_ms: f64,
    hi_ms: f64,
) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key(key_env, "sk-snooze-key-0004");
    Mock::given(method("POST"))
        .respond_with(first)
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(openai_answer("after the wait", 100, 0, 10, "stop"))
        .mount(&server)
        .await;
    let config = one_provider(&server, key_env, &[]);
    let ws = workspace(pool, 100).await?;
    let id = ai_task(
        pool,
        ws,
        json!({"prompt": "p", "max_tokens": 10}),
        None,
        Some("m"),
    )
    .await?;
    let engine = engine_pool(pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let deadline = std::time::Instant::now() + T;
    let (wait_ms, details): (f64, serde_json::Value) = loop {
        let r: Option<(f64, serde_json::Value)> = sqlx::query_as(
            "SELECT EXTRACT(EPOCH FROM scheduled_for - now())::float8 * 1000, error_details
               FROM tasks
              WHERE id = $1 AND status = 'pending' AND attempt = 0
                AND error_details ->> 'code' = 'rate_limited'",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        if let Some(r) = r {
            break r;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never snoozed: {:?}",
            task_row(pool, id).await?
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        wait_ms > lo_ms && wait_ms <= hi_ms,
        "due in {wait_ms} ms, expected ({lo_ms}, {hi_ms}]"
    );
    assert_eq!(details["http_status"], 429);
    assert!(details["until"].is_string(), "{details}");
    let row = wait_status(pool, id, "completed", T).await?;
    fleet.shutdown().await?;
    assert_eq!(row.attempt, 1, "the 429 did not use an attempt");
    assert_eq!(row.output.expect("output")["text"], "after the wait");
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(2));
    Ok(())
}

/// A 429 with `retry-after-ms` snoozes for exactly that long, without using an attempt.
#[sqlx::test(migrations = "../migrations")]
async fn a_429_with_retry_after_ms_snoozes(pool: PgPool) -> anyhow::Result<()> {
    let r429 = openai_error(
        429,
        "Rate limit reached for requests",
        "rate_limit_exceeded",
    )
    .insert_header("retry-after-ms", "3500");
    snoozes_then_completes(&pool, r429, "BIZQ_T_ERR_MS", 2500.0, 3500.0).await
}

/// A 429 whose `Retry-After` is an HTTP date snoozes until that date.
#[sqlx::test(migrations = "../migrations")]
async fn a_429_with_an_http_date_retry_after_snoozes(pool: PgPool) -> anyhow::Result<()> {
    let at = chrono::Utc::now() + chrono::Duration::seconds(5);
    let r429 = openai_error(429, "slow down", "rate_limit_exceeded").insert_header(
        "retry-after",
        at.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
    );
    // Whole seconds on the wire: the wait is between 4 and 5 s (less what the call took).
    snoozes_then_completes(&pool, r429, "BIZQ_T_ERR_DATE", 2500.0, 5000.0).await
}

/// A 429 with only OpenAI's reset headers (Go durations) snoozes until the later reset.
#[sqlx::test(migrations = "../migrations")]
async fn a_429_with_only_reset_headers_snoozes(pool: PgPool) -> anyhow::Result<()> {
    let r429 = openai_error(429, "slow down", "rate_limit_exceeded")
        .insert_header("x-ratelimit-reset-requests", "1.5s")
        .insert_header("x-ratelimit-reset-tokens", "0m3.5s");
    snoozes_then_completes(&pool, r429, "BIZQ_T_ERR_RESET", 2500.0, 3500.0).await
}

/// A 500 is transient: the task is retried with backoff and completes on attempt 2.
#[sqlx::test(migrations = "../migrations")]
async fn a_500_then_success_completes_on_the_second_attempt(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key("BIZQ_T_ERR_500", "sk-500-key-0005");
    Mock::given(method("POST"))
        .respond_with(openai_error(500, "The server had an error", "server_error"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(openai_answer("second time lucky", 1000, 0, 100, "stop"))
        .mount(&server)
        .await;
    let config = one_provider(
        &server,
        "BIZQ_T_ERR_500",
        &[("worker.default_max_attempts", "3")],
    );
    let ws = workspace(&pool, 100).await?;
    let id = ai_task(
        &pool,
        ws,
        json!({"prompt": "p", "max_tokens": 100}),
        None,
        Some("m"),
    )
    .await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let row = wait_status(&pool, id, "completed", T).await?;
    fleet.shutdown().await?;
    assert_eq!(row.attempt, 2);
    // 1000 × $10 + 100 × $30 per Mtok = $0.013 → 1.3 credits → 2.
    assert_eq!(row.actual_cost, Some(2));
    assert_eq!(
        credits(&pool, ws).await?.balance,
        98,
        "only the success is charged"
    );
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(2));
    Ok(())
}

/// A 400 fails the task at once (attempts left or not), with the provider's message and
/// request id in `error_details`; nothing is charged.
#[sqlx::test(migrations = "../migrations")]
async fn a_400_fails_at_once_with_the_providers_message(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key("BIZQ_T_ERR_400", "sk-400-key-0006");
    Mock::given(method("POST"))
        .respond_with(openai_error(
            400,
            "This model's maximum context length is 8192 tokens.",
            "context_length_exceeded",
        ))
        .mount(&server)
        .await;
    let config = one_provider(
        &server,
        "BIZQ_T_ERR_400",
        &[("worker.default_max_attempts", "3")],
    );
    let ws = workspace(&pool, 100).await?;
    let id = ai_task(&pool, ws, json!({"prompt": "p"}), None, Some("m")).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let row = wait_status(&pool, id, "failed", T).await?;
    fleet.shutdown().await?;
    assert_eq!(row.attempt, 1, "no retry of a permanent error");
    let d = row.error_details.expect("details");
    assert_eq!(d["code"], "bad_request");
    assert_eq!(d["http_status"], 400);
    assert_eq!(d["request_id"], "req_err_1");
    assert!(
        d["message"]
            .as_str()
            .is_some_and(|m| m.contains("maximum context length is 8192 tokens")),
        "{d}"
    );
    assert_eq!(credits(&pool, ws).await?.balance, 100);
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(1));
    Ok(())
}

/// A provider slower than `timeout_seconds`: the call is abandoned and recorded as
/// `outcome_unknown` (the request was sent; it may have been billed), a retryable failure.
#[sqlx::test(migrations = "../migrations")]
async fn a_timeout_after_send_is_an_unknown_outcome(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key("BIZQ_T_ERR_TIMEOUT", "sk-timeout-key-0007");
    Mock::given(method("POST"))
        .respond_with(
            openai_answer("too late", 10, 0, 10, "stop").set_delay(Duration::from_secs(5)),
        )
        .mount(&server)
        .await;
    let config = one_provider(&server, "BIZQ_T_ERR_TIMEOUT", &[]);
    let ws = workspace(&pool, 100).await?;
    let id = ai_task(&pool, ws, json!({"prompt": "p"}), None, Some("m")).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let row = wait_status(&pool, id, "failed", T).await?;
    fleet.shutdown().await?;
    let d = row.error_details.expect("details");
    assert_eq!(d["code"], "outcome_unknown", "{d}");
    assert_eq!(d["retryable"], true, "{d}");
    assert!(
        d["message"]
            .as_str()
            .is_some_and(|m| m.contains("gave up after 1 attempts")),
        "{d}"
    );
    assert_eq!(row.actual_cost, None);
    Ok(())
}

async fn waiting_for_provider(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*)
           FROM tasks
          WHERE id = ANY($1)
            AND status = 'pending'
            AND wait_reason = 'provider_unavailable'
            AND attempt = 0
            AND error_details ->> 'provider' = 'openai'
            AND error_details ->> 'code' = 'provider_auth'",
    )
    .bind(ids.to_vec())
    .fetch_one(pool)
    .await?;
    Ok(n == ids.len() as i64)
}

/// A 401 parks the provider fleet-wide: its tasks wait (`wait_reason =
/// 'provider_unavailable'`, no attempt used, nothing failed), `provider_status` says why, the
/// provider is probed again after `park_seconds`; once the key is fixed (a fleet restarted
/// with the right key), the same tasks complete on their first attempt.
#[sqlx::test(migrations = "../migrations")]
async fn a_401_parks_the_provider_until_the_key_is_fixed(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/chat/completions"))
        .and(header("authorization", "Bearer sk-good-key-0008"))
        .respond_with(openai_answer("with the right key", 100, 0, 10, "stop"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(openai_error(
            401,
            "Incorrect API key provided.",
            "invalid_api_key",
        ))
        .mount(&server)
        .await;
    set_key("BIZQ_T_ERR_401", "sk-bad-key-0008");
    let config = one_provider(
        &server,
        "BIZQ_T_ERR_401",
        &[("providers.park_seconds", "2")],
    );
    let ws = workspace(&pool, 100).await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            ai_task(
                &pool,
                ws,
                json!({"prompt": format!("p{i}")}),
                None,
                Some("m"),
            )
            .await?,
        );
    }
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let deadline = std::time::Instant::now() + T;
    while !waiting_for_provider(&pool, &ids).await? {
        anyhow::ensure!(std::time::Instant::now() < deadline, "tasks never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (reason, parked_for): (String, f64) = sqlx::query_as(
        "SELECT reason, EXTRACT(EPOCH FROM parked_until - now())::float8
           FROM provider_status WHERE provider = 'openai'",
    )
    .fetch_one(&pool)
    .await?;
    assert!(reason.contains("provider_auth"), "{reason}");
    assert!(parked_for > 0.0 && parked_for <= 2.0, "{parked_for}");
    let first_calls = server.received_requests().await.map_or(0, |r| r.len());
    // Past the park: the provider is probed again, refuses again, and the tasks keep waiting.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later_calls = server.received_requests().await.map_or(0, |r| r.len());
    assert!(later_calls > first_calls, "probed after the cool-down");
    // A probe may be in flight right now; the tasks are back to waiting once it is refused.
    let deadline = std::time::Instant::now() + T;
    while !waiting_for_provider(&pool, &ids).await? {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "tasks never parked again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let finished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status IN ('failed', 'completed')")
            .fetch_one(&pool)
            .await?;
    assert_eq!(finished, 0, "waiting for a parked provider fails nothing");
    fleet.shutdown().await?;

    set_key("BIZQ_T_ERR_401", "sk-good-key-0008");
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    for id in &ids {
        let row = wait_status(&pool, *id, "completed", T).await?;
        assert_eq!(row.attempt, 1, "waiting for the provider used no attempt");
        assert_eq!(row.wait_reason, None);
    }
    fleet.shutdown().await?;
    Ok(())
}
