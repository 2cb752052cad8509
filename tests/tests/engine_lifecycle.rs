//! Every transition of the task lifecycle, driven through the engine's own functions and
//! in-process fleets, against a real PostgreSQL.

use std::time::Duration;

use bizq::config::DependencyFailurePolicy;
use bizq::handlers::KNOWN_TYPES;
use bizq::lifecycle::{self, ClaimRequest, Completion, NewTask};
use bizq_tests::engine::*;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

async fn admit(pool: &PgPool) -> anyhow::Result<lifecycle::AdmitReport> {
    Ok(lifecycle::admit(pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?)
}

fn claim_req(limit: i64) -> ClaimRequest<'static> {
    ClaimRequest {
        worker_id: "t",
        limit,
        type_patterns: None,
        lease: Duration::from_secs(30),
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn admission_queues_due_tasks_and_holds_back_the_rest(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let now = generate(&pool, ws, "now", 5, &[]).await?;
    let mut later = NewTask::generate(ws, "later");
    later.scheduled_for = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let later = lifecycle::enqueue(&pool, &later).await?;
    let child = generate(&pool, ws, "child", 5, &[now]).await?;

    let r = admit(&pool).await?;
    assert_eq!((r.queued, r.waiting), (1, 1), "{r:?}");
    assert_eq!(status(&pool, now).await?, "queued");
    assert_eq!(status(&pool, later).await?, "pending");
    assert_eq!(status(&pool, child).await?, "pending");
    // Nothing more is due, and the blocked child is not promotable.
    assert_eq!(lifecycle::promote(&pool, 100).await?, 0);
    sqlx::query("UPDATE tasks SET scheduled_for = now() - interval '1 second' WHERE id = $1")
        .bind(later)
        .execute(&pool)
        .await?;
    assert_eq!(lifecycle::promote(&pool, 100).await?, 1);
    assert_eq!(status(&pool, later).await?, "queued");
    // A blocked task is not in the claimable set at all.
    let claimed = lifecycle::claim(&pool, &claim_req(10)).await?;
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    assert!(!ids.contains(&child) && ids.len() == 2, "{ids:?}");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn claim_takes_priority_then_age_and_sets_the_lease(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let mut ids = Vec::new();
    for p in [7, 1, 10, 1, 3] {
        ids.push(generate(&pool, ws, &format!("p{p}"), p, &[]).await?);
    }
    admit(&pool).await?;
    let mut order = Vec::new();
    for _ in 0..5 {
        let c = lifecycle::claim(&pool, &claim_req(1)).await?;
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].attempt, 1);
        order.push(c[0].id);
    }
    assert_eq!(order, vec![ids[1], ids[3], ids[4], ids[0], ids[2]]);
    let row: (String, Option<String>, bool, bool, i32) = sqlx::query_as(
        "SELECT status, worker_type, started_at IS NOT NULL, lease_expires_at > now() + interval '20 seconds', attempt
           FROM tasks WHERE id = $1",
    )
    .bind(ids[1])
    .fetch_one(&pool)
    .await?;
    assert_eq!(row, ("processing".into(), Some("ai".into()), true, true, 1));
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn one_slot_runs_tasks_in_priority_order(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[("worker.concurrency", "1"), ("worker.claim_batch", "1")]);
    let ws = workspace(&pool, 1000).await?;
    let mut expected = Vec::new();
    for (i, p) in [9, 2, 5, 1, 10, 2, 7].iter().enumerate() {
        expected.push((
            *p,
            i,
            generate(&pool, ws, &format!("task {i}"), *p, &[]).await?,
        ));
    }
    admit(&pool).await?; // all queued before the worker starts
    expected.sort();
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 0, 1);
    wait_for(
        &pool,
        "SELECT count(*) = 7 FROM tasks WHERE status = 'completed'",
        T,
    )
    .await?;
    fleet.shutdown().await?;
    let order: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tasks ORDER BY started_at")
        .fetch_all(&pool)
        .await?;
    assert_eq!(order, expected.iter().map(|e| e.2).collect::<Vec<_>>());
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn completion_writes_everything_and_charges_once(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "hello world", 5, &[]).await?;
    admit(&pool).await?;
    let c = lifecycle::claim(&pool, &claim_req(1)).await?.remove(0);
    let reserved = credits(&pool, ws).await?.reserved;
    assert_eq!(
        reserved, 1,
        "the claim reserves the estimated cost (at least 1)"
    );
    let done = Completion {
        id,
        lease_token: c.lease_token,
        output: json!({"text": "hi", "usage": {"total_tokens": 7}}),
        actual_cost: 4,
        cost_breakdown: json!({"credits": 4}),
        processing_time_ms: 12,
        ai_provider: Some("mock".into()),
        ai_model: Some("mock-1".into()),
    };
    assert_eq!(
        lifecycle::finish_batch(&pool, std::slice::from_ref(&done), &[]).await?,
        vec![id]
    );
    // The same result again (a duplicate delivery) is fenced out.
    assert!(
        lifecycle::finish_batch(&pool, &[done], &[])
            .await?
            .is_empty()
    );
    let row: (String, i32, i32, String, String, bool, serde_json::Value) = sqlx::query_as(
        "SELECT status, actual_cost, processing_time_ms, ai_provider, ai_model, completed_at IS NOT NULL, output
           FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(row.0, "completed");
    assert_eq!((row.1, row.2), (4, 12));
    assert_eq!(
        (row.3.as_str(), row.4.as_str(), row.5),
        ("mock", "mock-1", true)
    );
    assert_eq!(row.6["text"], "hi");
    let Credits {
        balance,
        used,
        reserved,
    } = credits(&pool, ws).await?;
    assert_eq!((balance, used, reserved), (96, 4, 0));
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn expired_lease_is_reclaimed_and_the_late_worker_is_fenced(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "slow", 5, &[]).await?;
    admit(&pool).await?;
    let first = lifecycle::claim(&pool, &claim_req(1)).await?.remove(0);
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    let r = lifecycle::reclaim_expired(&pool, 100, &[], 3).await?;
    assert_eq!((r.requeued, r.failed), (1, 0));
    assert_state(&pool, id, "queued", Some("lease_expired")).await?;
    // The first worker's heartbeat says it lost the lease.
    assert!(
        lifecycle::heartbeat(&pool, &[(id, first.lease_token)], Duration::from_secs(30))
            .await?
            .is_empty()
    );
    let second = lifecycle::claim(&pool, &claim_req(1)).await?.remove(0);
    assert_eq!(second.attempt, 2);
    let result = |token| Completion {
        id,
        lease_token: token,
        output: json!({"text": "x"}),
        actual_cost: 5,
        cost_breakdown: json!({}),
        processing_time_ms: 1,
        ai_provider: None,
        ai_model: None,
    };
    // The late first worker cannot write; the second can, once.
    assert!(
        lifecycle::finish_batch(&pool, &[result(first.lease_token)], &[])
            .await?
            .is_empty()
    );
    assert_eq!(
        lifecycle::finish_batch(&pool, &[result(second.lease_token)], &[]).await?,
        vec![id]
    );
    let balance = credits(&pool, ws).await?.balance;
    assert_eq!(balance, 95, "charged exactly once");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn reclaim_fails_a_task_on_its_last_attempt(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 100).await?;
    let mut t = NewTask::generate(ws, "x");
    t.max_attempts = Some(1);
    let id = lifecycle::enqueue(&pool, &t).await?;
    admit(&pool).await?;
    lifecycle::claim(&pool, &claim_req(1)).await?;
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    let r = lifecycle::reclaim_expired(&pool, 100, &[], 3).await?;
    assert_eq!((r.requeued, r.failed), (0, 1));
    assert_eq!(status(&pool, id).await?, "failed");
    let reserved = credits(&pool, ws).await?.reserved;
    assert_eq!(reserved, 0, "the reservation is released");
    Ok(())
}

/// Pins the backoff: each transient failure sends the task back to `pending` with
/// `scheduled_for = now() + retry::delay(...)`, growing by `retry.factor` up to `retry.max_ms`,
/// and the last attempt fails with the details. The delays are read from the audit trigger
/// after the run (exactly what the engine wrote), not sampled from a live window.
#[sqlx::test(migrations = "../migrations")]
async fn transient_errors_retry_with_backoff_then_fail_with_details(
    pool: PgPool,
) -> anyhow::Result<()> {
    let config = config_with(&[
        ("providers.mock.failure_rate", "1.0"),
        ("retry.base_ms", "100"),
        ("retry.max_ms", "300"),
        ("retry.factor", "2.0"),
        ("retry.jitter", "false"),
    ]);
    bizq_tests::audit::install(&pool).await?;
    let ws = workspace(&pool, 100).await?;
    let mut t = NewTask::generate(ws, "always fails");
    t.max_attempts = Some(5);
    let id = lifecycle::enqueue(&pool, &t).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(&pool, "SELECT status = 'failed' FROM tasks", T).await?;
    fleet.shutdown().await?;
    let delays: Vec<i64> = bizq_tests::audit::retry_delays(&pool, id)
        .await?
        .into_iter()
        .map(|d| d.round() as i64)
        .collect();
    assert_eq!(
        delays,
        vec![100, 200, 300, 300],
        "exponential backoff (factor 2 from 100 ms), capped at 300 ms"
    );
    let details: serde_json::Value =
        sqlx::query_scalar("SELECT error_details FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        details["code"], "provider_error",
        "a 5xx is a transient provider error"
    );
    assert_eq!(details["attempt"], 5);
    assert_eq!(details["http_status"], 503);
    assert!(
        details["message"]
            .as_str()
            .unwrap_or("")
            .contains("gave up after 5 attempts"),
        "{details}"
    );
    assert!(details["body_excerpt"].as_str().is_some());
    let Credits {
        balance, reserved, ..
    } = credits(&pool, ws).await?;
    assert_eq!((balance, reserved), (100, 0), "a failed task costs nothing");
    Ok(())
}

/// A 429 snoozes the task until the provider's `retry-after-ms` (not the computed backoff),
/// and the snooze gives back the claim's attempt.
#[sqlx::test(migrations = "../migrations")]
async fn a_429_retry_after_wins_over_the_backoff(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[
        ("providers.mock.rate_limit_marker", "\"[slow]\""),
        ("providers.mock.rate_limit_retry_after_ms", "1500"),
        ("retry.base_ms", "50"),
        ("retry.max_ms", "60000"),
        ("retry.jitter", "false"),
    ]);
    bizq_tests::audit::install(&pool).await?;
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "[slow] rate limited once", 5, &[]).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(&pool, "SELECT status = 'completed' FROM tasks", T).await?;
    fleet.shutdown().await?;
    // The provider's Retry-After (1.5 s), not the computed backoff (50 ms), set the wait.
    let history = bizq_tests::audit::history(&pool, id).await?;
    let waits: Vec<(i64, Option<&str>)> = history
        .iter()
        .filter(|t| t.old_status.as_deref() == Some("processing") && t.new_status == "pending")
        .map(|t| {
            (
                t.delay_ms.unwrap_or(-1.0).round() as i64,
                t.error_code.as_deref(),
            )
        })
        .collect();
    // The snooze lasts until the moment the provider named (1.5 s after its answer), so the
    // delay written is 1.5 s less the few ms between the answer and the write.
    assert!(
        matches!(waits.as_slice(), [(d, Some("rate_limited"))] if (1400..=1500).contains(d)),
        "{history:?}"
    );
    let http: Option<i32> = sqlx::query_scalar(
        "SELECT (error_details ->> 'http_status')::int FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(http, Some(429));
    let (attempt, cost): (i32, i32) =
        sqlx::query_as("SELECT attempt, actual_cost FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        attempt, 1,
        "a 429 snoozes the task without using an attempt: it completes on attempt 1"
    );
    let Credits {
        balance, reserved, ..
    } = credits(&pool, ws).await?;
    assert_eq!((balance, reserved), (100 - cost, 0), "charged once");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn permanent_errors_fail_at_once(pool: PgPool) -> anyhow::Result<()> {
    let config = test_config();
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "[reject] please", 5, &[]).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(&pool, "SELECT status = 'failed' FROM tasks", T).await?;
    fleet.shutdown().await?;
    let (attempt, code, http): (i32, String, i32) = sqlx::query_as(
        "SELECT attempt, error_details ->> 'code', (error_details ->> 'http_status')::int FROM tasks WHERE id = $1",
    )
    .bind(id).fetch_one(&pool).await?;
    assert_eq!((attempt, code.as_str(), http), (1, "bad_request", 400));
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn fan_in_waits_for_all_three_parents(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[("providers.mock.latency_ms", "100")]);
    let ws = workspace(&pool, 1000).await?;
    let parents = [
        generate(&pool, ws, "a", 5, &[]).await?,
        generate(&pool, ws, "b", 5, &[]).await?,
        generate(&pool, ws, "c", 5, &[]).await?,
    ];
    let child = generate(&pool, ws, "child", 1, &parents).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 3);
    wait_for(
        &pool,
        "SELECT count(*) = 4 FROM tasks WHERE status = 'completed'",
        T,
    )
    .await?;
    fleet.shutdown().await?;
    let ok: bool = sqlx::query_scalar(
        "SELECT c.started_at >= (SELECT max(completed_at) FROM tasks WHERE id = ANY($2))
           FROM tasks c WHERE c.id = $1",
    )
    .bind(child)
    .bind(parents.to_vec())
    .fetch_one(&pool)
    .await?;
    assert!(ok, "the child started only after its last parent completed");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_chain_of_100_runs_in_order(pool: PgPool) -> anyhow::Result<()> {
    let config = test_config();
    let ws = workspace(&pool, 1000).await?;
    let mut prev: Option<Uuid> = None;
    let mut chain = Vec::new();
    for i in 0..100 {
        let deps: Vec<Uuid> = prev.into_iter().collect();
        let id = generate(&pool, ws, &format!("step {i}"), 5, &deps).await?;
        chain.push(id);
        prev = Some(id);
    }
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 2);
    wait_for(
        &pool,
        "SELECT count(*) = 100 FROM tasks WHERE status = 'completed'",
        Duration::from_secs(60),
    )
    .await?;
    fleet.shutdown().await?;
    let order: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tasks ORDER BY started_at")
        .fetch_all(&pool)
        .await?;
    assert_eq!(order, chain);
    let overlaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks c JOIN tasks p ON p.id = ANY(c.depends_on) WHERE c.started_at < p.completed_at",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(overlaps, 0);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn failure_cascades_to_dependents_transitively(pool: PgPool) -> anyhow::Result<()> {
    let config = test_config();
    let ws = workspace(&pool, 1000).await?;
    let root = generate(&pool, ws, "[reject] root", 5, &[]).await?;
    let child = generate(&pool, ws, "child", 5, &[root]).await?;
    let grandchild = generate(&pool, ws, "grandchild", 5, &[child]).await?;
    let bystander = generate(&pool, ws, "unrelated", 5, &[]).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(
        &pool,
        "SELECT count(*) = 0 FROM tasks WHERE status IN ('pending', 'queued', 'processing')",
        T,
    )
    .await?;
    fleet.shutdown().await?;
    assert_eq!(status(&pool, root).await?, "failed");
    assert_eq!(status(&pool, child).await?, "cancelled");
    assert_eq!(status(&pool, grandchild).await?, "cancelled");
    assert_eq!(status(&pool, bystander).await?, "completed");
    let (code, dep): (String, String) = sqlx::query_as(
        "SELECT error_details ->> 'code', error_details ->> 'dependency' FROM tasks WHERE id = $1",
    )
    .bind(child)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        (code.as_str(), dep),
        ("dependency_failed", root.to_string())
    );
    let dep: String =
        sqlx::query_scalar("SELECT error_details ->> 'dependency' FROM tasks WHERE id = $1")
            .bind(grandchild)
            .fetch_one(&pool)
            .await?;
    assert_eq!(dep, child.to_string());
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn escalate_policy_escalates_dependents_instead(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[("scheduler.dependency_failure", "\"escalate\"")]);
    let ws = workspace(&pool, 1000).await?;
    let root = generate(&pool, ws, "[reject] root", 5, &[]).await?;
    let child = generate(&pool, ws, "child", 5, &[root]).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(
        &pool,
        "SELECT count(*) = 0 FROM tasks WHERE status IN ('pending', 'queued', 'processing')",
        T,
    )
    .await?;
    fleet.shutdown().await?;
    assert_state(&pool, child, "escalated", Some("dependency_failed")).await?;
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn cycles_and_missing_dependencies_are_rejected(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let other_ws = workspace(&pool, 1000).await?;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, dep) in [(a, b), (b, a)] {
        sqlx::query(
            "INSERT INTO tasks (id, workspace_id, type, category, name, input, depends_on)
             VALUES ($1, $2, 'ai.generate', 'content', 'cyclic', '{\"prompt\": \"x\"}', ARRAY[$3]::uuid[])",
        )
        .bind(id).bind(ws).bind(dep).execute(&pool).await?;
    }
    let own = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO tasks (id, workspace_id, type, category, name, input, depends_on)
         VALUES ($1, $2, 'ai.generate', 'content', 'self', '{\"prompt\": \"x\"}', ARRAY[$1]::uuid[])",
    )
    .bind(own).bind(ws).execute(&pool).await?;
    let missing = generate(&pool, ws, "missing", 5, &[Uuid::new_v4()]).await?;
    let foreign_parent = generate(&pool, other_ws, "someone else's", 5, &[]).await?;
    let foreign = generate(&pool, ws, "foreign", 5, &[foreign_parent]).await?;
    admit(&pool).await?;
    admit(&pool).await?;
    assert_state(&pool, a, "failed", Some("dependency_cycle")).await?;
    assert_eq!(status(&pool, b).await?, "failed");
    assert_state(&pool, own, "failed", Some("dependency_cycle")).await?;
    assert_state(&pool, missing, "failed", Some("missing_dependency")).await?;
    assert_eq!(
        status(&pool, foreign).await?,
        "failed",
        "a task of another workspace counts as missing"
    );
    assert_eq!(
        status(&pool, foreign_parent).await?,
        "queued",
        "the other workspace is not disturbed"
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_tasks_fail_clearly_and_disturb_nothing(pool: PgPool) -> anyhow::Result<()> {
    let config = test_config();
    let ws = workspace(&pool, 1000).await?;
    let good = generate(&pool, ws, "fine", 5, &[]).await?;
    let mut unknown = NewTask::generate(ws, "x");
    unknown.task_type = "video.render".into();
    let unknown = lifecycle::enqueue(&pool, &unknown).await?;
    let mut bad = NewTask::generate(ws, "x");
    bad.input = json!({"prompt": 42});
    let bad = lifecycle::enqueue(&pool, &bad).await?;
    let mut negative = NewTask::generate(ws, "x");
    negative.estimated_cost = Some(-5);
    let err = lifecycle::enqueue(&pool, &negative)
        .await
        .expect_err("negative cost is rejected");
    assert!(err.to_string().contains("valid_estimated_cost"), "{err}");

    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(
        &pool,
        "SELECT count(*) = 0 FROM tasks WHERE status IN ('pending', 'queued', 'processing')",
        T,
    )
    .await?;
    fleet.shutdown().await?;
    assert_eq!(status(&pool, good).await?, "completed");
    assert_state(&pool, unknown, "failed", Some("unknown_task_type")).await?;
    assert_eq!(status(&pool, bad).await?, "failed");
    assert_eq!(error_code(&pool, bad).await?.as_deref(), Some("bad_input"));
    let msg: String =
        sqlx::query_scalar("SELECT error_details ->> 'message' FROM tasks WHERE id = $1")
            .bind(bad)
            .fetch_one(&pool)
            .await?;
    assert!(msg.contains("\"prompt\" that is not a string"), "{msg}");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn human_and_expensive_tasks_are_escalated(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let mut human = NewTask::generate(ws, "call the supplier");
    human.worker_type = Some("human".into());
    let human = lifecycle::enqueue(&pool, &human).await?;
    // The default ai_preferences.max_task_cost is 10.
    let mut pricey = NewTask::generate(ws, "a novel");
    pricey.estimated_cost = Some(11);
    let pricey = lifecycle::enqueue(&pool, &pricey).await?;
    let mut fine = NewTask::generate(ws, "a haiku");
    fine.estimated_cost = Some(10);
    let fine = lifecycle::enqueue(&pool, &fine).await?;
    admit(&pool).await?;
    assert_state(&pool, human, "escalated", Some("human_task")).await?;
    assert_state(&pool, pricey, "escalated", Some("over_max_task_cost")).await?;
    assert_eq!(status(&pool, fine).await?, "queued");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn cancel_pending_queued_and_running_tasks(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[
        ("providers.mock.latency_ms", "20000"),
        ("worker.concurrency", "1"),
    ]);
    let ws = workspace(&pool, 100).await?;
    let running = generate(&pool, ws, "slow", 1, &[]).await?;
    let queued = generate(&pool, ws, "waiting", 9, &[]).await?;
    let next = generate(&pool, ws, "next", 5, &[]).await?;
    let mut later = NewTask::generate(ws, "later");
    later.scheduled_for = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let pending = lifecycle::enqueue(&pool, &later).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(
        &pool,
        "SELECT count(*) = 1 FROM tasks WHERE status = 'processing'",
        T,
    )
    .await?;
    assert_eq!(status(&pool, running).await?, "processing");

    assert_eq!(lifecycle::cancel(&pool, pending, "test").await?, "pending");
    assert_eq!(lifecycle::cancel(&pool, queued, "test").await?, "queued");
    assert_eq!(
        lifecycle::cancel(&pool, running, "test").await?,
        "processing"
    );
    assert!(
        lifecycle::cancel(&pool, running, "again").await.is_err(),
        "a cancelled task cannot be cancelled again"
    );
    // The worker aborted the 20 s provider call: its only slot took the next task. (That
    // the abort comes through NOTIFY, not the heartbeat, is pinned in engine_notify.rs.)
    wait_for(
        &pool,
        "SELECT status = 'processing' FROM tasks WHERE input ->> 'prompt' = 'next'",
        T,
    )
    .await?;
    assert_eq!(lifecycle::cancel(&pool, next, "test").await?, "processing");
    let stats = fleet.shutdown().await?;
    assert_eq!(stats[0].aborted, 2, "{stats:?}");
    assert_eq!(stats[0].completed, 0, "{stats:?}");
    for id in [running, queued, pending, next] {
        assert_eq!(status(&pool, id).await?, "cancelled");
    }
    let Credits {
        balance, reserved, ..
    } = credits(&pool, ws).await?;
    assert_eq!(
        (balance, reserved),
        (100, 0),
        "nothing charged, reservation released"
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_workspace_out_of_credits_waits_and_resumes_when_topped_up(
    pool: PgPool,
) -> anyhow::Result<()> {
    let config = test_config();
    bizq_tests::audit::install(&pool).await?;
    let ws = workspace(&pool, 2).await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(generate(&pool, ws, &format!("t{i}"), 5, &[]).await?);
    }
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 2);
    wait_for(
        &pool,
        "SELECT count(*) = 2 FROM tasks WHERE status = 'completed'",
        T,
    )
    .await?;
    wait_for(&pool, "SELECT count(*) = 3 FROM tasks WHERE status = 'pending' AND wait_reason = 'insufficient_credits'", T).await?;
    sqlx::query("UPDATE workspaces SET credits_balance = 100 WHERE id = $1")
        .bind(ws)
        .execute(&pool)
        .await?;
    wait_for(
        &pool,
        "SELECT count(*) = 5 FROM tasks WHERE status = 'completed'",
        T,
    )
    .await?;
    fleet.shutdown().await?;
    let balance = credits(&pool, ws).await?.balance;
    assert_eq!(balance, 97);
    // What the engine decided while the workspace could not pay, from the audit: three
    // tasks were parked once each (no busy loop), none was claimed while parked or failed,
    // and every task ran exactly once.
    let mut parked = 0;
    for id in &ids {
        let history = bizq_tests::audit::history(&pool, *id).await?;
        let parks = history
            .iter()
            .filter(|t| t.wait_reason.as_deref() == Some("insufficient_credits"))
            .count();
        let runs = history
            .iter()
            .filter(|t| t.new_status == "processing")
            .count();
        assert!(parks <= 1, "parked at most once: {history:?}");
        assert_eq!(runs, 1, "claimed exactly once: {history:?}");
        assert!(
            history.iter().all(|t| t.new_status != "failed"),
            "{history:?}"
        );
        parked += parks;
    }
    assert_eq!(
        parked, 3,
        "the three tasks the 2 credits could not pay for waited"
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_suspended_workspace_waits_with_the_reason(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 100).await?;
    sqlx::query("UPDATE workspaces SET subscription_status = 'suspended' WHERE id = $1")
        .bind(ws)
        .execute(&pool)
        .await?;
    let id = generate(&pool, ws, "x", 5, &[]).await?;
    admit(&pool).await?;
    assert!(lifecycle::claim(&pool, &claim_req(10)).await?.is_empty());
    let (st, why): (String, Option<String>) =
        sqlx::query_as("SELECT status, wait_reason FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        (st.as_str(), why.as_deref()),
        ("pending", Some("subscription_inactive"))
    );
    assert_eq!(lifecycle::unpark(&pool).await?, 0);
    sqlx::query("UPDATE workspaces SET subscription_status = 'active' WHERE id = $1")
        .bind(ws)
        .execute(&pool)
        .await?;
    assert_eq!(lifecycle::unpark(&pool).await?, 1);
    assert_eq!(lifecycle::promote(&pool, 10).await?, 1);
    assert_eq!(lifecycle::claim(&pool, &claim_req(10)).await?.len(), 1);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_claims_never_overspend(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 10).await?;
    for i in 0..60 {
        generate(&pool, ws, &format!("t{i}"), 5, &[]).await?;
    }
    admit(&pool).await?;
    let mut handles = Vec::new();
    for _ in 0..6 {
        let p = pool.clone();
        handles.push(tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..10 {
                n += lifecycle::claim(&p, &claim_req(3)).await?.len();
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await??;
    }
    assert_eq!(total, 10, "exactly the 10 credits' worth were claimed");
    let reserved = credits(&pool, ws).await?.reserved;
    assert_eq!(reserved, 10);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn shutdown_releases_unfinished_tasks_without_counting_the_attempt(
    pool: PgPool,
) -> anyhow::Result<()> {
    let config = config_with(&[
        ("providers.mock.latency_ms", "20000"),
        ("worker.shutdown_grace_seconds", "0"),
    ]);
    let ws = workspace(&pool, 100).await?;
    for i in 0..3 {
        generate(&pool, ws, &format!("t{i}"), 5, &[]).await?;
    }
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(
        &pool,
        "SELECT count(*) = 3 FROM tasks WHERE status = 'processing'",
        T,
    )
    .await?;
    let stats = fleet.shutdown().await?;
    assert_eq!(stats[0].released, 3, "{stats:?}");
    let rows: Vec<(String, i32, Option<Uuid>)> =
        sqlx::query_as("SELECT status, attempt, lease_token FROM tasks")
            .fetch_all(&pool)
            .await?;
    assert!(
        rows.iter()
            .all(|r| r.0 == "queued" && r.1 == 0 && r.2.is_none()),
        "{rows:?}"
    );
    let reserved = credits(&pool, ws).await?.reserved;
    assert_eq!(reserved, 0);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn type_patterns_make_specialised_pools(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "x", 5, &[]).await?;
    admit(&pool).await?;
    let content_only = vec![bizq::config::glob_to_like("content.*")];
    let req = ClaimRequest {
        type_patterns: Some(&content_only),
        ..claim_req(10)
    };
    assert!(
        lifecycle::claim(&pool, &req).await?.is_empty(),
        "ai.generate is not content.*"
    );
    let ai = vec![bizq::config::glob_to_like("ai.*")];
    let req = ClaimRequest {
        type_patterns: Some(&ai),
        ..claim_req(10)
    };
    assert_eq!(lifecycle::claim(&pool, &req).await?[0].id, id);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn admin_retry_starts_a_failed_task_over(pool: PgPool) -> anyhow::Result<()> {
    let config = test_config();
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "x", 5, &[Uuid::new_v4()]).await?;
    admit(&pool).await?;
    assert_eq!(status(&pool, id).await?, "failed");
    assert!(lifecycle::retry(&pool, Uuid::new_v4()).await.is_err());
    sqlx::query("UPDATE tasks SET depends_on = '{}' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    assert_eq!(lifecycle::retry(&pool, id).await?, "failed");
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(&pool, "SELECT status = 'completed' FROM tasks", T).await?;
    fleet.shutdown().await?;
    let e = lifecycle::retry(&pool, id)
        .await
        .expect_err("completed tasks are not retried");
    assert!(e.to_string().contains("is completed"), "{e}");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_handler_over_its_timeout_fails_the_attempt(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[
        ("providers.mock.latency_ms", "60000"),
        ("worker.task_timeout_seconds", "1"),
    ]);
    let ws = workspace(&pool, 100).await?;
    let mut t = NewTask::generate(ws, "slow");
    t.max_attempts = Some(1);
    let id = lifecycle::enqueue(&pool, &t).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(&pool, "SELECT status = 'failed' FROM tasks", T).await?;
    fleet.shutdown().await?;
    assert_state(&pool, id, "failed", Some("timeout")).await?;
    let ms: i32 = sqlx::query_scalar("SELECT processing_time_ms FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await?;
    assert!(
        (1000..60_000).contains(&ms),
        "stopped at the 1 s timeout, not at the end of the 60 s call: {ms} ms"
    );
    Ok(())
}

#[tokio::test]
async fn a_wrong_database_url_fails_fast_with_the_cause_and_no_password() -> anyhow::Result<()> {
    let settings = bizq::db::PoolSettings {
        application_name: "test".into(),
        max_connections: 1,
        dependency_failure: Default::default(),
    };
    let err = bizq::db::connect(
        "postgres://someone:topsecret@127.0.0.1:1/nowhere",
        &settings,
    )
    .await
    .expect_err("nothing listens on port 1");
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.1:1/nowhere") && msg.contains("refused"),
        "{msg}"
    );
    // "refused" is the real cause, reported at once: not the probe's "no answer within
    // 10 s", nor a pool timeout.
    assert!(!msg.contains("no answer"), "{msg}");
    assert!(!msg.contains("topsecret"), "{msg}");
    Ok(())
}
