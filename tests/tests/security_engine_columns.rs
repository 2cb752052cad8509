//! The engine's columns belong to the engine (issue 8, attacks 1–3): a member's session
//! (`SET ROLE authenticated` + `request.jwt.claim.sub`) inserts tasks only as `pending` with
//! product columns and never writes status, costs, reservations, leases, attempts or
//! dependency counters; it cancels and retries through `bizq_cancel_task` / `bizq_retry_task`,
//! which run the same SQL bodies as `bizq cancel` / `bizq retry`. Pinned by migration 0009's
//! column grants on `tasks`, the `tasks_check_inserts` / `tasks_protect_engine_columns`
//! triggers and the cancel/retry functions.

use std::time::Duration;

use bizq::config::DependencyFailurePolicy;
use bizq::lifecycle::{self, ClaimRequest, Completion};
use bizq_tests::schema_support::{
    act_as, act_as_service, connect, create_task, create_tenant, exec, expect_sqlstate,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

const INSUFFICIENT_PRIVILEGE: &str = "42501";
const KNOWN_TYPES: &[&str] = &["ai.generate", "content.write_blog_post"];

async fn admit(pool: &PgPool) -> anyhow::Result<lifecycle::AdmitReport> {
    Ok(lifecycle::admit(pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?)
}

async fn claim(pool: &PgPool, limit: i64) -> anyhow::Result<Vec<lifecycle::ClaimedTask>> {
    Ok(lifecycle::claim(
        pool,
        &ClaimRequest {
            worker_id: "security-test",
            limit,
            type_patterns: None,
            lease: Duration::from_secs(60),
        },
    )
    .await?)
}

async fn credits(pool: &PgPool, ws: Uuid) -> anyhow::Result<(i32, i32)> {
    Ok(
        sqlx::query_as("SELECT credits_balance, credits_reserved FROM workspaces WHERE id = $1")
            .bind(ws)
            .fetch_one(pool)
            .await?,
    )
}

async fn status(pool: &PgPool, id: Uuid) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?)
}

async fn call_text(conn: &mut PgConnection, sql: &str, id: Uuid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(id)
        .fetch_one(conn)
        .await
}

/// Attack 1 (unpaid completion): a member sets its own running task to `completed` with
/// `actual_cost = 0`. Rejected; the task is still processing and its reservation stands.
#[sqlx::test(migrations = "../migrations")]
async fn member_cannot_complete_a_task_for_free(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "free-ride").await?;
    let task = create_task(&pool, a.id, Some(5)).await?;
    admit(&pool).await?;
    assert_eq!(claim(&pool, 10).await?.len(), 1);
    assert_eq!(credits(&pool, a.id).await?, (100, 5));

    let mut conn = connect(&pool).await?;
    for who in [a.member.auth_id, a.owner.auth_id] {
        act_as(&mut conn, who).await?;
        let r = exec(
            &mut conn,
            &format!("UPDATE tasks SET status = 'completed', actual_cost = 0 WHERE id = '{task}'"),
        )
        .await;
        expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "unpaid completion");
        let r = exec(
            &mut conn,
            &format!("UPDATE tasks SET actual_cost = 0 WHERE id = '{task}'"),
        )
        .await;
        expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "rewriting the cost");
    }
    assert_eq!(status(&pool, task).await?, "processing");
    assert_eq!(
        credits(&pool, a.id).await?,
        (100, 5),
        "nothing charged, reservation kept"
    );
    Ok(())
}

/// Attack 2 (admission bypass): a member inserts a `human` task over `max_task_cost`,
/// depending on another workspace's task, directly as `queued` with `deps_remaining = 0`.
/// Rejected at insert; the same task inserted as product code would be is escalated by
/// admission and never claimed.
#[sqlx::test(migrations = "../migrations")]
async fn member_cannot_skip_admission(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "skipper").await?;
    let b = create_tenant(&pool, "victim").await?;
    let foreign = create_task(&pool, b.id, Some(1)).await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let r = exec(
        &mut conn,
        &format!(
            "INSERT INTO tasks (workspace_id, type, category, name, input, worker_type, estimated_cost,
                                depends_on, status, deps_remaining)
             VALUES ('{}', 'content.write_blog_post', 'content', 'bypass', '{{}}', 'human', 999999,
                     ARRAY['{foreign}']::uuid[], 'queued', 0)",
            a.id
        ),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "insert as queued");
    // Only the foreign workspace's own task is there to claim; nothing of A.
    admit(&pool).await?;
    let claimed = claim(&pool, 10).await?;
    assert!(
        claimed.iter().all(|t| t.workspace_id == b.id),
        "a task of A was claimed: {claimed:?}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE workspace_id = $1")
        .bind(a.id)
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 0);
    Ok(())
}

/// Attack 3 (reservation wipe): a member inserts a fake `processing` task holding
/// 2,000,000,000 reserved credits, or inflates its real task's reservation, and cancels it to
/// wipe the workspace's `credits_reserved`. Both writes are rejected; cancelling through
/// `bizq_cancel_task` releases exactly the real reservation.
#[sqlx::test(migrations = "../migrations")]
async fn member_cannot_wipe_reservations(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "wiper").await?;
    let real = create_task(&pool, a.id, Some(7)).await?;
    let other = create_task(&pool, a.id, Some(3)).await?;
    admit(&pool).await?;
    assert_eq!(claim(&pool, 10).await?.len(), 2);
    assert_eq!(credits(&pool, a.id).await?, (100, 10));

    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let r = exec(
        &mut conn,
        &format!(
            "INSERT INTO tasks (workspace_id, type, category, name, input, status, reserved_credits)
             VALUES ('{}', 'ai.generate', 'content', 'fake', '{{}}', 'processing', 2000000000)",
            a.id
        ),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "fake processing task");
    let r = exec(
        &mut conn,
        &format!("UPDATE tasks SET reserved_credits = 2000000000 WHERE id = '{real}'"),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "inflated reservation");

    assert_eq!(
        call_text(
            &mut conn,
            "SELECT bizq_cancel_task($1, 'changed my mind')",
            real
        )
        .await?,
        "processing"
    );
    assert_eq!(status(&pool, real).await?, "cancelled");
    assert_eq!(
        credits(&pool, a.id).await?,
        (100, 3),
        "only the cancelled task's 7 credits were released"
    );
    assert_eq!(status(&pool, other).await?, "processing");
    Ok(())
}

/// The matrix over every engine column: a member can neither insert a task with it set nor
/// change it afterwards, and the guard trigger holds even when a role was granted table-wide
/// INSERT/UPDATE (as Supabase's default privileges do), while the engine and service_role
/// keep full access.
#[sqlx::test(migrations = "../migrations")]
async fn every_engine_column_is_the_engines(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "matrix").await?;
    let task = create_task(&pool, a.id, Some(1)).await?;
    let insert_only = [
        ("status", "'queued'"),
        ("deps_remaining", "0"),
        ("attempt", "1"),
        ("reserved_credits", "5"),
        ("has_dependents", "true"),
        ("dependents_count", "1"),
        ("chain_depth", "1"),
        ("lease_token", "gen_random_uuid()"),
        ("lease_expires_at", "now()"),
        ("locked_by", "'me'"),
        ("wait_reason", "'none'"),
        ("output", "'{}'"),
        ("error_details", "'{}'"),
        ("actual_cost", "0"),
        ("cost_breakdown", "'{}'"),
        ("processing_time_ms", "1"),
        ("started_at", "now()"),
        ("completed_at", "now()"),
    ];
    // Checked by admission, so frozen once the task exists.
    let admission_inputs = [
        ("estimated_cost", "0"),
        ("input", "'{\"prompt\": \"changed\"}'"),
        ("type", "'ai.generate'"),
        ("depends_on", "ARRAY[gen_random_uuid()]"),
        ("worker_type", "'human'"),
        ("scheduled_for", "now()"),
        ("ai_provider", "'mock'"),
        ("max_attempts", "9"),
        ("created_at", "now() - interval '1 year'"),
    ];
    let mut conn = connect(&pool).await?;
    for table_wide_grant in [false, true] {
        if table_wide_grant {
            sqlx::query("GRANT INSERT, UPDATE ON TABLE tasks TO authenticated")
                .execute(&pool)
                .await?;
        }
        act_as(&mut conn, a.member.auth_id).await?;
        for (col, value) in insert_only {
            let r = exec(
                &mut conn,
                &format!(
                    "INSERT INTO tasks (workspace_id, type, category, name, input, {col})
                     VALUES ('{}', 'ai.generate', 'content', 'x', '{{}}', {value})",
                    a.id
                ),
            )
            .await;
            expect_sqlstate(
                r,
                INSUFFICIENT_PRIVILEGE,
                &format!("insert with {col} (table-wide grant: {table_wide_grant})"),
            );
        }
        for (col, value) in insert_only.iter().chain(admission_inputs.iter()) {
            let r = exec(
                &mut conn,
                &format!("UPDATE tasks SET {col} = {value} WHERE id = '{task}'"),
            )
            .await;
            expect_sqlstate(
                r,
                INSUFFICIENT_PRIVILEGE,
                &format!("update of {col} (table-wide grant: {table_wide_grant})"),
            );
        }
    }
    // The engine (this pool's owner) and service_role still write them.
    sqlx::query("UPDATE tasks SET wait_reason = 'engine', attempt = 2 WHERE id = $1")
        .bind(task)
        .execute(&pool)
        .await?;
    act_as_service(&mut conn).await?;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE tasks SET wait_reason = NULL, attempt = 0 WHERE id = '{task}'")
        )
        .await?,
        1
    );
    Ok(())
}

/// Positive controls: a member inserts a task with every product column and reads it back,
/// renames it, cancels and retries it through the functions (the CLI's path is the same SQL:
/// `lifecycle::cancel` afterwards sees the status the function left); the owner reads the
/// engine's result. Other workspaces' members and viewers get "not found".
#[sqlx::test(migrations = "../migrations")]
async fn members_still_do_their_work(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "worker-bees").await?;
    let b = create_tenant(&pool, "neighbours").await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, description, priority, input,
                            worker_type, ai_model, ai_provider, estimated_cost, created_by,
                            scheduled_for, context, tags, max_attempts, depends_on)
         VALUES ($1, 'ai.generate', 'content', 'mine', 'd', 3, '{\"prompt\": \"hi\"}', 'ai',
                 'm', 'mock', 2, $2, NULL, '{}', '{a}', 2, '{}')
         RETURNING id",
    )
    .bind(a.id)
    .bind(a.member.user_id)
    .fetch_one(&mut conn)
    .await?;
    let seen: (String, String) = sqlx::query_as("SELECT name, status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(seen, ("mine".into(), "pending".into()));
    assert_eq!(
        exec(
            &mut conn,
            &format!(
                "UPDATE tasks SET name = 'renamed', priority = 1, tags = '{{b}}' WHERE id = '{id}'"
            )
        )
        .await?,
        1
    );

    assert_eq!(
        call_text(&mut conn, "SELECT bizq_cancel_task($1, 'not now')", id).await?,
        "pending"
    );
    let details: serde_json::Value =
        sqlx::query_scalar("SELECT error_details FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(details["message"], "cancelled: not now");
    let r = call_text(&mut conn, "SELECT bizq_cancel_task($1, 'again')", id).await;
    let msg = expect_sqlstate(r, "55000", "cancelling a cancelled task");
    assert!(msg.contains("is cancelled"), "{msg}");
    assert_eq!(
        call_text(&mut conn, "SELECT bizq_retry_task($1)", id).await?,
        "cancelled"
    );
    assert_eq!(status(&pool, id).await?, "pending");
    // The CLI's path is the same body: it sees the member's retry and cancels it.
    assert_eq!(lifecycle::cancel(&pool, id, "admin").await?, "pending");
    assert_eq!(lifecycle::retry(&pool, id).await?, "cancelled");

    // Strangers and viewers: not found.
    for who in [b.member.auth_id, b.owner.auth_id, a.viewer.auth_id] {
        act_as(&mut conn, who).await?;
        let r = call_text(&mut conn, "SELECT bizq_cancel_task($1, 'x')", id).await;
        expect_sqlstate(r, "P0002", "foreign cancel");
        let r = call_text(&mut conn, "SELECT bizq_retry_task($1)", id).await;
        expect_sqlstate(r, "P0002", "foreign retry");
    }
    assert_eq!(status(&pool, id).await?, "pending");

    // The engine runs it; the owner reads the result and its cost.
    admit(&pool).await?;
    let claimed = claim(&pool, 10).await?;
    assert_eq!(claimed.len(), 1);
    let written = lifecycle::finish_batch(
        &pool,
        &[Completion {
            id,
            lease_token: claimed[0].lease_token,
            output: serde_json::json!({"text": "hello"}),
            actual_cost: 2,
            cost_breakdown: serde_json::json!({"credits": 2}),
            processing_time_ms: 5,
            ai_provider: Some("mock".into()),
            ai_model: Some("m".into()),
        }],
        &[],
    )
    .await?;
    assert_eq!(written, vec![id]);
    act_as(&mut conn, a.owner.auth_id).await?;
    let (output, cost): (serde_json::Value, i32) =
        sqlx::query_as("SELECT output, actual_cost FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await?;
    assert_eq!(output["text"], "hello");
    assert_eq!(cost, 2);
    assert_eq!(credits(&pool, a.id).await?, (98, 0));

    // A member cannot delete a running task (it holds a reservation) but may delete a finished one.
    act_as(&mut conn, a.member.auth_id).await?;
    assert_eq!(
        exec(&mut conn, &format!("DELETE FROM tasks WHERE id = '{id}'")).await?,
        1
    );
    Ok(())
}

/// A member cancelling a running task goes through the same path as `bizq cancel`: the lease
/// is void, the worker is notified on `bizq_cancel`, the reservation is released, nothing is
/// charged; a member cannot delete the running task instead.
#[sqlx::test(migrations = "../migrations")]
async fn member_cancel_of_a_running_task_is_the_clis(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "canceller").await?;
    let task = create_task(&pool, a.id, Some(4)).await?;
    admit(&pool).await?;
    let claimed = claim(&pool, 1).await?;
    assert_eq!(claimed.len(), 1);
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen(lifecycle::CHANNEL_CANCEL).await?;

    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let r = exec(&mut conn, &format!("DELETE FROM tasks WHERE id = '{task}'")).await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "deleting a running task");
    assert_eq!(
        call_text(&mut conn, "SELECT bizq_cancel_task($1, 'stop')", task).await?,
        "processing"
    );
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await??;
    assert_eq!(n.payload(), task.to_string());
    assert_eq!(credits(&pool, a.id).await?, (100, 0));
    // The worker's late result is fenced out and nothing is charged.
    let written = lifecycle::finish_batch(
        &pool,
        &[Completion {
            id: task,
            lease_token: claimed[0].lease_token,
            output: serde_json::json!({}),
            actual_cost: 4,
            cost_breakdown: serde_json::json!({}),
            processing_time_ms: 1,
            ai_provider: None,
            ai_model: None,
        }],
        &[],
    )
    .await?;
    assert!(written.is_empty());
    assert_eq!(credits(&pool, a.id).await?, (100, 0));
    Ok(())
}
