//! Real HTTP stand-ins (`wiremock`) for OpenAI, Anthropic and Azure: what the worker sends
//! (path, headers, body) and what a completed task records (text, exact token-priced
//! `actual_cost`, the full `cost_breakdown`, the workspace charged).

use std::time::Duration;

use bizq_tests::engine::*;
use bizq_tests::stand_in::*;
use serde_json::{Value, json};
use sqlx::PgPool;
use wiremock::matchers::{body_partial_json, header, method, path, query_param};
use wiremock::{Mock, MockServer};

const T: Duration = Duration::from_secs(30);

/// The OpenAI wire format and pricing: `POST {base}/chat/completions` with `Bearer KEY`, the
/// upstream model name and `max_completion_tokens`; `choices[0].message.content` becomes the
/// output; cached tokens (inside `prompt_tokens`) are charged at the cached price; a
/// `length` finish completes, flagged `truncated`, and is charged.
#[sqlx::test(migrations = "../migrations")]
async fn openai_request_shape_and_token_priced_cost(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key("BIZQ_T_WIRE_OPENAI", "sk-wire-openai-0001");
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer sk-wire-openai-0001"))
        .and(body_partial_json(json!({
            "model": "gpt-test-2026-01",
            "messages": [{"role": "user", "content": "Write a haiku"}],
            "max_completion_tokens": 20000,
        })))
        .respond_with(openai_answer(
            "An old silent pond",
            200_000,
            50_000,
            20_000,
            "length",
        ))
        .expect(1)
        .mount(&server)
        .await;
    let config = config(&format!(
        "{}{}",
        provider(
            "openai",
            "openai",
            &format!("{}/v1", server.uri()),
            "BIZQ_T_WIRE_OPENAI",
            ""
        ),
        model(
            "gpt-test",
            "openai",
            2.0,
            0.5,
            8.0,
            "upstream = \"gpt-test-2026-01\""
        )
    ));
    let ws = workspace(&pool, 1000).await?;
    // The admission estimate (17 credits, below) is over the seed's max_task_cost of 10.
    sqlx::query(
        "UPDATE workspaces SET ai_preferences = ai_preferences || '{\"max_task_cost\": 100}' WHERE id = $1",
    )
    .bind(ws)
    .execute(&pool)
    .await?;
    let id = ai_task(
        &pool,
        ws,
        json!({"prompt": "Write a haiku", "max_tokens": 20000}),
        None,
        Some("gpt-test"),
    )
    .await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let row = wait_status(&pool, id, "completed", T).await?;
    fleet.shutdown().await?;

    // 150,000 uncached × $2 + 50,000 cached × $0.50 + 20,000 out × $8 per Mtok
    // = 0.30 + 0.025 + 0.16 = $0.485 → 48.5 credits → 49.
    assert_eq!(row.actual_cost, Some(49));
    // Estimated at admission: 13 chars → 4 tokens × $2 + 20,000 × $8 = $0.160008 → 17.
    assert_eq!(row.estimated_cost, Some(17));
    assert_eq!(
        row.cost_breakdown,
        Some(json!({
            "provider": "openai",
            "model": "gpt-test",
            "upstream": "gpt-test-2026-01",
            "input_tokens": 200_000,
            "cached_input_tokens": 50_000,
            "cache_write_tokens": 0,
            "output_tokens": 20_000,
            "usd_micros": 485_000,
            "prices_usd_micros_per_mtok": {"input": 2_000_000, "cached_input": 500_000, "output": 8_000_000},
            "credits_per_usd": 100,
            "credits": 49,
            "request_id": "req_openai_123",
            "finish_reason": "length",
            "truncated": true,
        }))
    );
    let output = row.output.expect("output");
    assert_eq!(output["text"], "An old silent pond");
    assert_eq!(output["truncated"], true);
    assert_eq!(
        (
            row.ai_provider.as_deref(),
            row.ai_model.as_deref(),
            row.attempt
        ),
        (Some("openai"), Some("gpt-test"), 1)
    );
    let c = credits(&pool, ws).await?;
    assert_eq!(
        (c.balance, c.reserved),
        (1000 - 49, 0),
        "charged exactly once"
    );
    server.verify().await;
    Ok(())
}

/// The Anthropic wire format and pricing: `POST {base}/v1/messages` with `x-api-key`,
/// `anthropic-version: 2023-06-01` and the required `max_tokens` (the model's default when
/// the task names none); text blocks are joined, other blocks skipped; cache writes (1.25×)
/// and cache reads (0.1×) are charged on top of `input_tokens`.
#[sqlx::test(migrations = "../migrations")]
async fn anthropic_request_shape_and_cache_priced_cost(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key("BIZQ_T_WIRE_ANTHROPIC", "sk-ant-wire-0002");
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", "sk-ant-wire-0002"))
        .and(header("anthropic-version", "2023-06-01"))
        .and(body_partial_json(json!({
            "model": "claude-sonnet-x",
            "max_tokens": 300,
            "messages": [{"role": "user", "content": "Summarise this"}],
        })))
        .respond_with(anthropic_answer(
            &["Hello, ", "world."],
            10_000,
            20_000,
            100_000,
            2_000,
            "end_turn",
        ))
        .expect(1)
        .mount(&server)
        .await;
    let config = config(&format!(
        "{}{}",
        provider(
            "claude",
            "anthropic",
            &server.uri(),
            "BIZQ_T_WIRE_ANTHROPIC",
            ""
        ),
        model(
            "claude-test",
            "claude",
            3.0,
            3.0,
            15.0,
            "upstream = \"claude-sonnet-x\"\nmax_tokens = 300\ntier = \"premium\""
        )
    ));
    let ws = workspace(&pool, 1000).await?;
    let id = ai_task(
        &pool,
        ws,
        json!({"prompt": "Summarise this"}),
        None,
        Some("claude-test"),
    )
    .await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let row = wait_status(&pool, id, "completed", T).await?;
    fleet.shutdown().await?;

    // 10,000 × $3 + 20,000 × $3 × 1.25 + 100,000 × $3 × 0.1 + 2,000 × $15 per Mtok
    // = 0.03 + 0.075 + 0.03 + 0.03 = $0.165 → 16.5 credits → 17.
    assert_eq!(row.actual_cost, Some(17));
    let b = row.cost_breakdown.expect("breakdown");
    assert_eq!(b["usd_micros"], 165_000);
    assert_eq!(b["input_tokens"], 10_000);
    assert_eq!(b["cache_write_tokens"], 20_000);
    assert_eq!(b["cached_input_tokens"], 100_000);
    assert_eq!(b["output_tokens"], 2_000);
    assert_eq!(b["request_id"], "req_anthropic_456");
    assert_eq!(b["provider"], "claude");
    assert_eq!(b["truncated"], false);
    assert_eq!(row.output.expect("output")["text"], "Hello, world.");
    assert_eq!(credits(&pool, ws).await?.balance, 1000 - 17);
    server.verify().await;
    Ok(())
}

/// Azure OpenAI through `kind = "openai"`: the deployment path in `base_url`, the key in an
/// `api-key` header (no `Authorization`), and `query` parameters on every request.
#[sqlx::test(migrations = "../migrations")]
async fn azure_style_api_key_header_and_query(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    set_key("BIZQ_T_WIRE_AZURE", "azure-key-0003");
    Mock::given(method("POST"))
        .and(path("/openai/deployments/my-deploy/chat/completions"))
        .and(query_param("api-version", "2024-10-21"))
        .and(header("api-key", "azure-key-0003"))
        .respond_with(openai_answer("from azure", 1000, 0, 100, "stop"))
        .expect(1)
        .mount(&server)
        .await;
    let config = config(&format!(
        "{}{}",
        provider(
            "azure",
            "openai",
            &format!("{}/openai/deployments/my-deploy", server.uri()),
            "BIZQ_T_WIRE_AZURE",
            "auth_header = \"api-key\"\nquery = { \"api-version\" = \"2024-10-21\" }"
        ),
        model(
            "gpt-azure",
            "azure",
            1.0,
            1.0,
            1.0,
            "upstream = \"my-deploy\""
        )
    ));
    let ws = workspace(&pool, 100).await?;
    let id = ai_task(&pool, ws, json!({"prompt": "hi"}), Some("azure"), None).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let row = wait_status(&pool, id, "completed", T).await?;
    fleet.shutdown().await?;
    assert_eq!(row.output.expect("output")["text"], "from azure");
    assert_eq!(row.ai_model.as_deref(), Some("gpt-azure"));
    let requests = server.received_requests().await.expect("recording is on");
    assert_eq!(requests.len(), 1, "exactly one HTTP attempt");
    assert!(
        requests[0].headers.get("authorization").is_none(),
        "the key goes in api-key only"
    );
    let body: Value = requests[0].body_json()?;
    assert_eq!(body["model"], "my-deploy");
    server.verify().await;
    Ok(())
}
