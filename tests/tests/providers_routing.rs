//! Which provider and model a task goes to, against `wiremock` stand-ins: pins, the
//! workspace's `ai_preferences` (tier, cost sensitivity), `auto` routing around a parked
//! provider, unknown models, and the admission estimate that `max_task_cost` checks.

use std::time::Duration;

use bizq_tests::engine::*;
use bizq_tests::stand_in::*;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer};

const T: Duration = Duration::from_secs(30);

/// Two providers: `alpha` (model `a-std`, standard, the cheapest) and `beta` (`b-std`,
/// standard, dearer; `b-prem`, premium).
async fn two_providers(tag: &str) -> (MockServer, MockServer, bizq::Config) {
    let alpha = MockServer::start().await;
    let beta = MockServer::start().await;
    for (server, text) in [(&alpha, "from alpha"), (&beta, "from beta")] {
        Mock::given(method("POST"))
            .respond_with(openai_answer(text, 100, 0, 10, "stop"))
            .mount(server)
            .await;
    }
    set_key(&format!("BIZQ_T_ROUTE_A_{tag}"), "sk-alpha-key-0010");
    set_key(&format!("BIZQ_T_ROUTE_B_{tag}"), "sk-beta-key-0011");
    let config = config(&format!(
        "{}{}{}{}{}",
        provider(
            "alpha",
            "openai",
            &alpha.uri(),
            &format!("BIZQ_T_ROUTE_A_{tag}"),
            ""
        ),
        provider(
            "beta",
            "openai",
            &beta.uri(),
            &format!("BIZQ_T_ROUTE_B_{tag}"),
            ""
        ),
        model("a-std", "alpha", 1.0, 1.0, 2.0, "tier = \"standard\""),
        model("b-std", "beta", 2.0, 2.0, 4.0, "tier = \"standard\""),
        model("b-prem", "beta", 10.0, 10.0, 40.0, "tier = \"premium\""),
    ));
    (alpha, beta, config)
}

async fn prefs(pool: &PgPool, ws: Uuid, p: serde_json::Value) -> anyhow::Result<()> {
    sqlx::query("UPDATE workspaces SET ai_preferences = ai_preferences || $2 WHERE id = $1")
        .bind(ws)
        .bind(p)
        .execute(pool)
        .await?;
    Ok(())
}

fn route_of(row: &TaskRow) -> (Option<&str>, Option<&str>) {
    (row.ai_provider.as_deref(), row.ai_model.as_deref())
}

/// Under `auto`, a parked provider is skipped for another of the same tier: with `alpha`
/// parked, the standard-tier task goes to `beta`'s `b-std`; once the park is gone, the same
/// kind of task goes to the cheaper `alpha` again.
#[sqlx::test(migrations = "../migrations")]
async fn auto_routing_skips_a_parked_provider(pool: PgPool) -> anyhow::Result<()> {
    let (alpha, beta, config) = two_providers("PARK").await;
    sqlx::query(
        "INSERT INTO provider_status (provider, parked_until, reason)
         VALUES ('alpha', now() + interval '1 hour', 'provider_auth: test')",
    )
    .execute(&pool)
    .await?;
    let ws = workspace(&pool, 100).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    let first = ai_task(&pool, ws, json!({"prompt": "p"}), None, None).await?;
    let row = wait_status(&pool, first, "completed", T).await?;
    assert_eq!(route_of(&row), (Some("beta"), Some("b-std")));
    assert_eq!(row.output.as_ref().expect("output")["text"], "from beta");
    assert_eq!(alpha.received_requests().await.map(|r| r.len()), Some(0));

    sqlx::query("DELETE FROM provider_status")
        .execute(&pool)
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the worker re-reads parks each second
    let second = ai_task(&pool, ws, json!({"prompt": "p"}), Some("auto"), None).await?;
    let row = wait_status(&pool, second, "completed", T).await?;
    assert_eq!(route_of(&row), (Some("alpha"), Some("a-std")));
    fleet.shutdown().await?;
    assert_eq!(beta.received_requests().await.map(|r| r.len()), Some(1));
    Ok(())
}

/// Pins and preferences: `ai_model` pins the model, `ai_provider` the provider; otherwise the
/// workspace's `quality_tier` picks the tier and `cost_sensitivity` the cheapest (≥ 0.5) or
/// dearest (< 0.5) model of it. A model without a `[models]` entry, or one the pinned
/// provider does not serve, fails the task at once with `unknown_model`.
#[sqlx::test(migrations = "../migrations")]
async fn pins_and_preferences_choose_the_model(pool: PgPool) -> anyhow::Result<()> {
    let (_alpha, _beta, config) = two_providers("PREFS").await;
    let default_ws = workspace(&pool, 1000).await?;
    let premium_ws = workspace(&pool, 1000).await?;
    prefs(&pool, premium_ws, json!({"quality_tier": "premium"})).await?;
    let lavish_ws = workspace(&pool, 1000).await?;
    prefs(&pool, lavish_ws, json!({"cost_sensitivity": 0.0})).await?;
    let beta_ws = workspace(&pool, 1000).await?;
    prefs(&pool, beta_ws, json!({"preferred_provider": "beta"})).await?;

    let p = json!({"prompt": "p", "max_tokens": 10});
    let cases = [
        (default_ws, None, None, Some(("alpha", "a-std"))),
        (premium_ws, None, None, Some(("beta", "b-prem"))),
        (lavish_ws, None, None, Some(("beta", "b-std"))),
        (beta_ws, None, None, Some(("beta", "b-std"))),
        (default_ws, Some("beta"), None, Some(("beta", "b-std"))),
        (default_ws, None, Some("b-prem"), Some(("beta", "b-prem"))),
        (default_ws, None, Some("gpt-nonexistent"), None),
        (default_ws, Some("alpha"), Some("b-prem"), None),
    ];
    let mut ids = Vec::new();
    for (ws, provider, model, _) in &cases {
        ids.push(ai_task(&pool, *ws, p.clone(), *provider, *model).await?);
    }
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    for (id, (_, provider, model, expected)) in ids.iter().zip(&cases) {
        match expected {
            Some((ep, em)) => {
                let row = wait_status(&pool, *id, "completed", T).await?;
                assert_eq!(
                    route_of(&row),
                    (Some(*ep), Some(*em)),
                    "provider {provider:?} model {model:?}"
                );
            }
            None => {
                let row = wait_status(&pool, *id, "failed", T).await?;
                let d = row.error_details.expect("details");
                assert_eq!(d["code"], "unknown_model", "{d}");
                assert_eq!(row.attempt, 1);
            }
        }
    }
    fleet.shutdown().await?;
    let msg: String =
        sqlx::query_scalar("SELECT error_details ->> 'message' FROM tasks WHERE id = $1")
            .bind(ids[6])
            .fetch_one(&pool)
            .await?;
    assert!(msg.contains("unknown model 'gpt-nonexistent'"), "{msg}");
    Ok(())
}

/// Admission fills a NULL `estimated_cost` of an `ai.generate` task from the prompt (4
/// characters a token) and `max_tokens` at the routed model's prices, and the workspace's
/// `max_task_cost` escalates on that estimate; an estimate product code gave is kept.
#[sqlx::test(migrations = "../migrations")]
async fn admission_estimates_ai_costs_and_escalates_over_max_task_cost(
    pool: PgPool,
) -> anyhow::Result<()> {
    set_key("BIZQ_T_ROUTE_EST", "sk-est-key-0012");
    let config = config(&format!(
        "{}{}",
        provider(
            "openai",
            "openai",
            "http://127.0.0.1:9",
            "BIZQ_T_ROUTE_EST",
            ""
        ),
        model("pricey", "openai", 10.0, 10.0, 30.0, ""),
    ));
    let cheap_ws = workspace(&pool, 1000).await?;
    prefs(&pool, cheap_ws, json!({"max_task_cost": 3})).await?;
    let ws = workspace(&pool, 1000).await?;
    // 400 chars → 100 tokens × $10 + 1,000 × $30 per Mtok = $0.031 → 3.1 credits → 4.
    let input = json!({"prompt": "x".repeat(400), "max_tokens": 1000});
    let over = ai_task(&pool, cheap_ws, input.clone(), None, Some("pricey")).await?;
    let fits = ai_task(&pool, ws, input.clone(), None, Some("pricey")).await?;
    let given: Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, ai_model, estimated_cost)
         VALUES ($1, 'ai.generate', 'content', 'generate', $2, 'pricey', 2)
         RETURNING id",
    )
    .bind(ws)
    .bind(input)
    .fetch_one(&pool)
    .await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 0); // a scheduler, no worker
    let row = wait_status(&pool, over, "escalated", T).await?;
    assert_eq!(row.estimated_cost, Some(4));
    assert_eq!(
        row.error_details.expect("details")["code"],
        "over_max_task_cost"
    );
    let row = wait_status(&pool, fits, "queued", T).await?;
    assert_eq!(row.estimated_cost, Some(4));
    let row = wait_status(&pool, given, "queued", T).await?;
    assert_eq!(
        row.estimated_cost,
        Some(2),
        "product code's estimate is kept"
    );
    fleet.shutdown().await?;
    Ok(())
}

/// A task pinned to a provider that is already parked waits for the recorded park without
/// calling it and without extending it (`provider_parked`, `parked_until` unchanged), so
/// tasks arriving during a park cannot postpone the probe; when the park expires it runs on
/// its first attempt.
#[sqlx::test(migrations = "../migrations")]
async fn a_task_for_a_parked_provider_waits_without_extending_the_park(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (alpha, _beta, config) = two_providers("WAIT").await;
    let parked_until: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "INSERT INTO provider_status (provider, parked_until, reason)
         VALUES ('alpha', now() + interval '3 seconds', 'provider_auth: test')
         RETURNING parked_until",
    )
    .fetch_one(&pool)
    .await?;
    let ws = workspace(&pool, 100).await?;
    let id = ai_task(&pool, ws, json!({"prompt": "p"}), Some("alpha"), None).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(
        &pool,
        "SELECT wait_reason = 'provider_unavailable' AND error_details ->> 'code' = 'provider_parked'
           FROM tasks",
        T,
    )
    .await?;
    let now_until: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT parked_until FROM provider_status WHERE provider = 'alpha'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(now_until, parked_until, "the park was not extended");
    assert_eq!(alpha.received_requests().await.map(|r| r.len()), Some(0));
    let row = wait_status(&pool, id, "completed", T).await?;
    fleet.shutdown().await?;
    assert_eq!(
        (row.attempt, row.ai_provider.as_deref()),
        (1, Some("alpha"))
    );
    Ok(())
}

/// A task that snoozed: pending again with its attempt given back and `code = rate_limited`;
/// returns its `error_details` and how far ahead it is due, in seconds.
async fn snoozed(pool: &PgPool, id: Uuid) -> anyhow::Result<(serde_json::Value, f64)> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let r: Option<(serde_json::Value, f64)> = sqlx::query_as(
            "SELECT error_details, EXTRACT(EPOCH FROM scheduled_for - now())::float8
               FROM tasks
              WHERE id = $1 AND status = 'pending' AND attempt = 0
                AND error_details ->> 'code' = 'rate_limited'",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        if let Some(r) = r {
            return Ok(r);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never snoozed: {:?}",
            task_row(pool, id).await?
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Empties a provider's request bucket deep enough that it refills only in `secs` seconds
/// (at `rpm = 60`, one request a second).
async fn drain_requests(pool: &PgPool, provider: &str, secs: f64) -> anyhow::Result<()> {
    let n = sqlx::query(
        "UPDATE provider_budgets
            SET tokens = -$2, refilled_at = now()
          WHERE provider = $1 AND dimension = 'requests'",
    )
    .bind(provider)
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    anyhow::ensure!(n == 1, "no request budget for {provider}");
    Ok(())
}

/// Under `auto`, a provider that is out of budget is skipped for another of the same tier
/// instead of snoozing the task (issue 9): with `alpha` (the cheapest, so routed first) out
/// of request budget, then blocked after a 429, `auto` tasks complete on `beta` at once,
/// alpha's stand-in never called. A task pinned to alpha's model still snoozes, without
/// using an attempt. With both out of budget the `auto` task snoozes too, until the earlier
/// of the two (alpha's refill in ~10 min, not beta's block of an hour).
#[sqlx::test(migrations = "../migrations")]
async fn auto_routing_skips_a_provider_out_of_budget(pool: PgPool) -> anyhow::Result<()> {
    let alpha = MockServer::start().await;
    let beta = MockServer::start().await;
    for (server, text) in [(&alpha, "from alpha"), (&beta, "from beta")] {
        Mock::given(method("POST"))
            .respond_with(openai_answer(text, 100, 0, 10, "stop"))
            .mount(server)
            .await;
    }
    set_key("BIZQ_T_ROUTE_A_BUDGET", "sk-alpha-key-0012");
    set_key("BIZQ_T_ROUTE_B_BUDGET", "sk-beta-key-0013");
    // Snoozes uncapped (the test config caps them at 500 ms), so their due time shows which
    // budget they wait for.
    let config = config_over(
        &[("retry.max_ms", "3600000")],
        &format!(
            "{}{}{}{}",
            provider(
                "alpha",
                "openai",
                &alpha.uri(),
                "BIZQ_T_ROUTE_A_BUDGET",
                "rpm = 60"
            ),
            provider(
                "beta",
                "openai",
                &beta.uri(),
                "BIZQ_T_ROUTE_B_BUDGET",
                "rpm = 60"
            ),
            model("a-std", "alpha", 1.0, 1.0, 2.0, "tier = \"standard\""),
            model("b-std", "beta", 2.0, 2.0, 4.0, "tier = \"standard\""),
        ),
    );
    let ws = workspace(&pool, 1000).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    // The worker writes the budgets at start-up; drain alpha's once they exist.
    wait_for(
        &pool,
        "SELECT count(*) = 2 FROM provider_budgets WHERE dimension = 'requests' AND capacity = 60",
        T,
    )
    .await?;
    drain_requests(&pool, "alpha", 600.0).await?;

    let p = json!({"prompt": "p", "max_tokens": 10});
    let auto = ai_task(&pool, ws, p.clone(), None, None).await?;
    let row = wait_status(&pool, auto, "completed", T).await?;
    assert_eq!(route_of(&row), (Some("beta"), Some("b-std")));
    assert_eq!(row.attempt, 1);
    let cost = row.cost_breakdown.expect("cost_breakdown");
    assert_eq!(
        cost["prices_usd_micros_per_mtok"]["input"], 2_000_000,
        "priced at beta's model: {cost}"
    );

    // Pinned to alpha's model: no other provider may answer, so it snoozes.
    let pinned = ai_task(&pool, ws, p.clone(), None, Some("a-std")).await?;
    let (details, due) = snoozed(&pool, pinned).await?;
    assert_eq!(details["reason"], "rate_budget", "{details}");
    assert!(
        due > 500.0,
        "due when alpha's budget refills: {due} s {details}"
    );
    // Pinned to alpha by provider: the same.
    let pinned_provider = ai_task(&pool, ws, p.clone(), Some("alpha"), None).await?;
    snoozed(&pool, pinned_provider).await?;

    // Blocked after a 429 (alpha refilled, but blocked for an hour): skipped the same way.
    sqlx::query(
        "UPDATE provider_budgets SET tokens = burst, refilled_at = now()
          WHERE provider = 'alpha' AND dimension = 'requests'",
    )
    .execute(&pool)
    .await?;
    bizq::providers::limiter::Budgets::new(pool.clone())
        .block_until("alpha", chrono::Utc::now() + chrono::Duration::hours(1))
        .await?;
    let auto_blocked = ai_task(&pool, ws, p.clone(), Some("auto"), None).await?;
    let row = wait_status(&pool, auto_blocked, "completed", T).await?;
    assert_eq!(route_of(&row), (Some("beta"), Some("b-std")));

    // Both out: alpha empty for ~10 minutes (block lifted), beta blocked for an hour. The
    // task snoozes until the earlier of the two.
    sqlx::query("UPDATE provider_budgets SET blocked_until = NULL WHERE provider = 'alpha'")
        .execute(&pool)
        .await?;
    drain_requests(&pool, "alpha", 600.0).await?;
    bizq::providers::limiter::Budgets::new(pool.clone())
        .block_until("beta", chrono::Utc::now() + chrono::Duration::hours(1))
        .await?;
    let starved = ai_task(&pool, ws, p.clone(), None, None).await?;
    let (details, due) = snoozed(&pool, starved).await?;
    assert!(
        (500.0..700.0).contains(&due),
        "due at alpha's refill (~600 s), not beta's block (3600 s): {due} s, {details}"
    );
    fleet.shutdown().await?;
    assert_eq!(
        alpha.received_requests().await.map(|r| r.len()),
        Some(0),
        "alpha was never called while out of budget"
    );
    assert_eq!(beta.received_requests().await.map(|r| r.len()), Some(2));
    Ok(())
}
