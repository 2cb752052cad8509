//! No tenant's dependency graph or bad row can fail the engine's batches (issue 8, attack 4).
//! Pinned by migration 0009's set-based `bizq_resolve_dependents` (one recursive CTE, one
//! UPDATE, no trigger level per link) and by the per-row fallbacks of `lifecycle::reclaim_expired`,
//! `finish_batch` and `admit` (`isolate_rows` / `set_aside`).

use std::time::{Duration, Instant};

use bizq::config::DependencyFailurePolicy;
use bizq::lifecycle::{self, ClaimRequest, Completion, Failure};
use bizq_tests::engine::workspace;
use sqlx::PgPool;
use uuid::Uuid;

const KNOWN_TYPES: &[&str] = &["ai.generate"];

fn claim_req(limit: i64) -> ClaimRequest<'static> {
    ClaimRequest {
        worker_id: "cascade-test",
        limit,
        type_patterns: None,
        lease: Duration::from_secs(60),
    }
}

/// A queued task (the head) and `n` tasks waiting on it, in the state admission leaves them:
/// a chain (each waits on the previous one) or a fan-out (all wait on the head). Returns the
/// head's id.
async fn graph(pool: &PgPool, ws: Uuid, n: i64, chain: bool) -> anyhow::Result<Uuid> {
    let head: Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, deps_remaining,
                            has_dependents, estimated_cost)
         VALUES ($1, 'ai.generate', 'content', 'head', '{\"prompt\": \"head\"}', 'queued', 0, TRUE, 1)
         RETURNING id",
    )
    .bind(ws)
    .fetch_one(pool)
    .await?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "CREATE TEMP TABLE g ON COMMIT DROP AS
         SELECT i, gen_random_uuid() AS id FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "CREATE TEMP TABLE e ON COMMIT DROP AS
         SELECT g.id AS task_id,
                CASE WHEN $1 THEN COALESCE(lag(g.id) OVER (ORDER BY g.i), $2) ELSE $2 END AS dep,
                g.i
           FROM g",
    )
    .bind(chain)
    .bind(head)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO tasks (id, workspace_id, type, category, name, input, status, deps_remaining,
                            has_dependents, depends_on)
         SELECT e.task_id, $1, 'ai.generate', 'content', 'dependent ' || e.i, '{}', 'pending', 1,
                $2 AND e.i < $3, ARRAY[e.dep]
           FROM e",
    )
    .bind(ws)
    .bind(chain)
    .bind(n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO task_dependencies (task_id, depends_on_id) SELECT task_id, dep FROM e",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(head)
}

async fn count_status(pool: &PgPool, ws: Uuid, status: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE workspace_id = $1 AND status = $2")
            .bind(ws)
            .bind(status)
            .fetch_one(pool)
            .await?,
    )
}

/// Attack 4 as reported: a 600-task chain whose head fails, in a result batch that also
/// holds another workspace's completion. The old per-level trigger hit `stack depth limit
/// exceeded` and lost the whole batch; now both results are written and the whole chain is
/// cancelled, each task naming the dependency that doomed it.
#[sqlx::test(migrations = "../migrations")]
async fn a_long_chain_failing_does_not_fail_the_result_batch(pool: PgPool) -> anyhow::Result<()> {
    let a = workspace(&pool, 1000).await?;
    let b = workspace(&pool, 1000).await?;
    let head = graph(&pool, a, 600, true).await?;
    let other: Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, deps_remaining, estimated_cost)
         VALUES ($1, 'ai.generate', 'content', 'b', '{}', 'queued', 0, 1) RETURNING id",
    )
    .bind(b)
    .fetch_one(&pool)
    .await?;
    let claimed = lifecycle::claim(&pool, &claim_req(10)).await?;
    assert_eq!(claimed.len(), 2);
    let token = |id: Uuid| claimed.iter().find(|c| c.id == id).map(|c| c.lease_token);
    let written = lifecycle::finish_batch(
        &pool,
        &[Completion {
            id: other,
            lease_token: token(other).expect("b claimed"),
            output: serde_json::json!({"text": "fine"}),
            actual_cost: 1,
            cost_breakdown: serde_json::json!({}),
            processing_time_ms: 1,
            ai_provider: None,
            ai_model: None,
        }],
        &[Failure {
            id: head,
            lease_token: token(head).expect("head claimed"),
            action: bizq::lifecycle::FailureAction::Fail,
            error_details: bizq::ErrorDetails::new("bad_request", "boom", 1),
            processing_time_ms: 1,
        }],
    )
    .await?;
    assert_eq!(written.len(), 2, "both results written");
    assert_eq!(count_status(&pool, b, "completed").await?, 1);
    assert_eq!(count_status(&pool, a, "failed").await?, 1);
    assert_eq!(count_status(&pool, a, "cancelled").await?, 600);
    // The head's direct dependent names the head as failed; the next names a cancelled one.
    let (first, second): (serde_json::Value, serde_json::Value) = sqlx::query_as(
        "SELECT (SELECT error_details FROM tasks WHERE name = 'dependent 1' AND workspace_id = $1),
                (SELECT error_details FROM tasks WHERE name = 'dependent 2' AND workspace_id = $1)",
    )
    .bind(a)
    .fetch_one(&pool)
    .await?;
    assert_eq!(first["dependency"], head.to_string());
    assert_eq!(first["code"], "dependency_failed");
    assert_eq!(second["code"], "dependency_cancelled");
    Ok(())
}

/// Reclaim of a chain head whose last attempt expired: the cascade inside the reclaim batch
/// must not fail it (the old trigger failed the same id-ordered batch on every pass, so no
/// tenant's expired task was requeued again).
#[sqlx::test(migrations = "../migrations")]
async fn reclaim_survives_a_long_chain(pool: PgPool) -> anyhow::Result<()> {
    let a = workspace(&pool, 1000).await?;
    let b = workspace(&pool, 1000).await?;
    let head = graph(&pool, a, 600, true).await?;
    sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, deps_remaining, estimated_cost)
         VALUES ($1, 'ai.generate', 'content', 'b', '{}', 'queued', 0, 1)",
    )
    .bind(b)
    .execute(&pool)
    .await?;
    assert_eq!(lifecycle::claim(&pool, &claim_req(10)).await?.len(), 2);
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 minute', max_attempts = 1 WHERE id = $1")
        .bind(head)
        .execute(&pool)
        .await?;
    sqlx::query(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 minute' WHERE workspace_id = $1",
    )
    .bind(b)
    .execute(&pool)
    .await?;
    let report = lifecycle::reclaim_expired(&pool, 100, &[], 3).await?;
    assert_eq!((report.requeued, report.failed), (1, 1), "{report:?}");
    assert_eq!(count_status(&pool, a, "cancelled").await?, 600);
    assert_eq!(count_status(&pool, b, "queued").await?, 1);
    Ok(())
}

/// A 100,000-task chain and a 100,000-task fan-out are cancelled in one pass, by one
/// `bizq cancel` of their head. Times are printed, not asserted.
#[sqlx::test(migrations = "../migrations")]
async fn hundred_thousand_dependents_cancel_in_one_pass(pool: PgPool) -> anyhow::Result<()> {
    // The default allows 10,000 dependents per task; the engine raises it for this fan-out.
    sqlx::query("UPDATE bizq_limits SET max_dependents = 1000000")
        .execute(&pool)
        .await?;
    for (label, chain) in [("chain", true), ("fan-out", false)] {
        let ws = workspace(&pool, 1000).await?;
        let head = graph(&pool, ws, 100_000, chain).await?;
        let started = Instant::now();
        assert_eq!(lifecycle::cancel(&pool, head, "test").await?, "queued");
        println!(
            "cancel of a 100,000-task {label}: {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(
            count_status(&pool, ws, "cancelled").await?,
            100_001,
            "{label}"
        );
    }
    Ok(())
}

/// Installs a trigger that makes every UPDATE of the task named `poison` fail unless it sets
/// it to `failed`: one tenant's row that fails any statement it is in.
async fn poison(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.name = 'poison' AND NEW.status <> 'failed' THEN
             RAISE EXCEPTION 'poisoned row';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER test_poison BEFORE UPDATE ON tasks
           FOR EACH ROW EXECUTE FUNCTION test_poison();",
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn insert_named(
    pool: &PgPool,
    ws: Uuid,
    name: &str,
    status: &str,
    admitted: bool,
) -> anyhow::Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, deps_remaining, estimated_cost)
         VALUES ($1, 'ai.generate', 'content', $2, '{\"prompt\": \"x\"}', $3, CASE WHEN $4 THEN 0 END, 1)
         RETURNING id",
    )
    .bind(ws)
    .bind(name)
    .bind(status)
    .bind(admitted)
    .fetch_one(pool)
    .await?)
}

async fn error_code(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT error_details ->> 'code' FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// One bad row in a reclaim, a result and an admission batch: the other workspaces' rows
/// are processed, the bad one is set aside as `failed` with the step's error code, and the
/// next pass is not blocked by it.
#[sqlx::test(migrations = "../migrations")]
async fn one_bad_row_never_fails_a_batch(pool: PgPool) -> anyhow::Result<()> {
    let a = workspace(&pool, 1000).await?;
    let b = workspace(&pool, 1000).await?;

    // Reclaim: three expired leases, one of them poisoned.
    let bad = insert_named(&pool, a, "poison", "queued", true).await?;
    let good1 = insert_named(&pool, b, "fine 1", "queued", true).await?;
    let good2 = insert_named(&pool, b, "fine 2", "queued", true).await?;
    assert_eq!(lifecycle::claim(&pool, &claim_req(10)).await?.len(), 3);
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 minute'")
        .execute(&pool)
        .await?;
    poison(&pool).await?;
    let report = lifecycle::reclaim_expired(&pool, 100, &[], 3).await?;
    assert_eq!(report.requeued, 2, "{report:?}");
    for id in [good1, good2] {
        assert_eq!(bizq_tests::engine::status(&pool, id).await?, "queued");
    }
    assert_eq!(bizq_tests::engine::status(&pool, bad).await?, "failed");
    assert_eq!(
        error_code(&pool, bad).await?.as_deref(),
        Some("reclaim_error")
    );

    // Results: B's two completions and the poisoned one, in one batch.
    sqlx::query("DROP TRIGGER test_poison ON tasks")
        .execute(&pool)
        .await?;
    let bad = insert_named(&pool, a, "poison", "queued", true).await?;
    let claimed = lifecycle::claim(&pool, &claim_req(10)).await?;
    assert_eq!(claimed.len(), 3);
    sqlx::query(
        "CREATE TRIGGER test_poison BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION test_poison()",
    )
    .execute(&pool)
    .await?;
    let completions: Vec<Completion> = claimed
        .iter()
        .map(|c| Completion {
            id: c.id,
            lease_token: c.lease_token,
            output: serde_json::json!({"text": "ok"}),
            actual_cost: 1,
            cost_breakdown: serde_json::json!({}),
            processing_time_ms: 1,
            ai_provider: None,
            ai_model: None,
        })
        .collect();
    let written = lifecycle::finish_batch(&pool, &completions, &[]).await?;
    assert_eq!(written.len(), 2, "the two good results are written");
    assert_eq!(count_status(&pool, b, "completed").await?, 2);
    assert_eq!(
        error_code(&pool, bad).await?.as_deref(),
        Some("result_error")
    );

    // Admission: a poisoned pending task among good ones.
    let bad = insert_named(&pool, a, "poison", "pending", false).await?;
    let good = insert_named(&pool, b, "fine 3", "pending", false).await?;
    let report = lifecycle::admit(&pool, 100, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    assert_eq!(report.queued, 1, "{report:?}");
    assert_eq!(bizq_tests::engine::status(&pool, good).await?, "queued");
    assert_eq!(
        error_code(&pool, bad).await?.as_deref(),
        Some("admission_error")
    );
    Ok(())
}
