//! Limits on the work one task can cause (issue 8, attack 6), from the engine-only table
//! `bizq_limits` (migration 0009): `input` size and `depends_on` length are rejected at insert
//! by the `tasks_check_inserts` trigger; chain depth and dependents per task are rejected by
//! admission (`lifecycle::admit`), whose cycle check walks at most `max_chain_depth` levels
//! through unadmitted tasks only.

use std::time::Instant;

use bizq::config::DependencyFailurePolicy;
use bizq::lifecycle;
use bizq_tests::engine::{error_code, status, workspace};
use bizq_tests::schema_support::{
    act_as, act_as_service, connect, create_tenant, exec, expect_sqlstate,
};
use sqlx::PgPool;
use uuid::Uuid;

const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
const KNOWN_TYPES: &[&str] = &["ai.generate"];

async fn admit(pool: &PgPool) -> anyhow::Result<lifecycle::AdmitReport> {
    Ok(lifecycle::admit(pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?)
}

async fn set_limit(pool: &PgPool, column: &str, value: i32) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE bizq_limits SET {column} = $1"
    )))
    .bind(value)
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts a task with an explicit id depending on `deps` (as the engine).
async fn task(pool: &PgPool, ws: Uuid, id: Uuid, deps: &[Uuid]) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tasks (id, workspace_id, type, category, name, input, depends_on)
         VALUES ($1, $2, 'ai.generate', 'content', 'n', '{\"prompt\": \"p\"}', $3)",
    )
    .bind(id)
    .bind(ws)
    .bind(deps.to_vec())
    .execute(pool)
    .await?;
    Ok(())
}

/// A 100 MB input used to be accepted (and a claim hands up to 200 inputs to one worker);
/// a 1,000,001-byte one is now a clear error at insert, for a member and for the engine
/// alike, and 1,000 dependencies pass while 1,001 do not. Both limits follow `bizq_limits`,
/// which only the engine and service_role can read or change.
#[sqlx::test(migrations = "../migrations")]
async fn input_size_and_depends_on_length_are_limited_at_insert(
    pool: PgPool,
) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "big-spender").await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(1_048_576));
    let r = sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input) VALUES ($1, 'ai.generate', 'content', 'big', $2::jsonb)",
    )
    .bind(a.id)
    .bind(&big)
    .execute(&mut conn)
    .await;
    let msg = expect_sqlstate(r, PROGRAM_LIMIT_EXCEEDED, "1 MB input");
    assert!(msg.contains("max_input_bytes"), "{msg}");
    let r = sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input) VALUES ($1, 'ai.generate', 'content', 'big', $2::jsonb)",
    )
    .bind(a.id)
    .bind(&big)
    .execute(&pool)
    .await;
    expect_sqlstate(
        r,
        PROGRAM_LIMIT_EXCEEDED,
        "1 MB input inserted by the engine",
    );

    let deps = |n: usize| (0..n).map(|_| Uuid::new_v4()).collect::<Vec<_>>();
    let insert_deps = "INSERT INTO tasks (workspace_id, type, category, name, input, depends_on)
                       VALUES ($1, 'ai.generate', 'content', 'wide', '{}', $2)";
    let ok = sqlx::query(insert_deps)
        .bind(a.id)
        .bind(deps(1000))
        .execute(&mut conn)
        .await?;
    assert_eq!(ok.rows_affected(), 1);
    let r = sqlx::query(insert_deps)
        .bind(a.id)
        .bind(deps(1001))
        .execute(&mut conn)
        .await;
    let msg = expect_sqlstate(r, PROGRAM_LIMIT_EXCEEDED, "1,001 dependencies");
    assert!(msg.contains("max_depends_on"), "{msg}");

    // Tenants can neither read nor raise the limits.
    expect_sqlstate(
        exec(&mut conn, "SELECT max_input_bytes FROM bizq_limits").await,
        "42501",
        "member reads bizq_limits",
    );
    expect_sqlstate(
        exec(
            &mut conn,
            "UPDATE bizq_limits SET max_input_bytes = 2000000000",
        )
        .await,
        "42501",
        "member raises a limit",
    );
    // The service can; the new limit applies at once.
    act_as_service(&mut conn).await?;
    exec(&mut conn, "UPDATE bizq_limits SET max_input_bytes = 20").await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let r = exec(
        &mut conn,
        &format!(
            "INSERT INTO tasks (workspace_id, type, category, name, input)
             VALUES ('{}', 'ai.generate', 'content', 'n', '{{\"prompt\": \"twenty-one bytes\"}}')",
            a.id
        ),
    )
    .await;
    expect_sqlstate(r, PROGRAM_LIMIT_EXCEEDED, "input over a lowered limit");
    Ok(())
}

/// Chain depth: with `max_chain_depth = 5`, a chain stops at depth 5 whether its links are
/// admitted one by one (depth carried by the stored `chain_depth`; a task on top of an admitted
/// depth-5 task is refused at insert) or in one pass (depth found by the walk through
/// unadmitted tasks); deeper tasks fail admission with `dependency_chain_too_deep`.
#[sqlx::test(migrations = "../migrations")]
async fn chain_depth_is_limited(pool: PgPool) -> anyhow::Result<()> {
    set_limit(&pool, "max_chain_depth", 5).await?;
    let ws = workspace(&pool, 1000).await?;
    // Link by link; the head is held back (scheduled later) so the chain stays unfinished.
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = Uuid::new_v4();
        let deps: Vec<Uuid> = ids.last().copied().into_iter().collect();
        task(&pool, ws, id, &deps).await?;
        if i == 0 {
            sqlx::query("UPDATE tasks SET scheduled_for = now() + interval '1 hour' WHERE id = $1")
                .bind(id)
                .execute(&pool)
                .await?;
        }
        admit(&pool).await?;
        ids.push(id);
    }
    // Depth 5 and 6 inserted before admission sees depth 5: both pass the insert check
    // (depth 4 is the deepest admitted task), admission takes depth 5 and rejects depth 6:
    // the walk through unadmitted depth 5 continues with depth 4's stored chain_depth.
    let (d5, d6) = (Uuid::new_v4(), Uuid::new_v4());
    task(&pool, ws, d5, &[ids[4]]).await?;
    task(&pool, ws, d6, &[d5]).await?;
    admit(&pool).await?;
    ids.extend([d5, d6]);
    for (depth, id) in ids.iter().enumerate() {
        let code = error_code(&pool, *id).await?;
        if depth <= 5 {
            assert_eq!(code, None, "depth {depth}");
            assert_eq!(status(&pool, *id).await?, "pending", "depth {depth}");
        } else {
            assert_eq!(
                code.as_deref(),
                Some("dependency_chain_too_deep"),
                "depth {depth}"
            );
        }
    }
    // Now depth 5 is admitted: a task on top of it is refused at insert.
    let r = task(&pool, ws, Uuid::new_v4(), &[d5]).await;
    let msg = format!("{:#}", r.expect_err("depth 6 inserted"));
    assert!(msg.contains("max_chain_depth"), "{msg}");

    // All at once: one statement, one admission pass.
    let ws = workspace(&pool, 1000).await?;
    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let deps: Vec<Vec<Uuid>> = (0..8)
        .map(|i| if i == 0 { vec![] } else { vec![ids[i - 1]] })
        .collect();
    for (id, d) in ids.iter().zip(&deps) {
        task(&pool, ws, *id, d).await?;
    }
    admit(&pool).await?;
    for (depth, id) in ids.iter().enumerate() {
        let code = error_code(&pool, *id).await?;
        assert_eq!(
            code.as_deref() == Some("dependency_chain_too_deep"),
            depth > 5,
            "depth {depth}: {code:?}"
        );
    }
    Ok(())
}

/// Dependents per task: with `max_dependents = 3`, three of five tasks inserted together and
/// waiting on one task are admitted and two fail at admission with `too_many_dependents`; once
/// three are admitted, the next is refused at insert.
#[sqlx::test(migrations = "../migrations")]
async fn dependents_per_task_are_limited(pool: PgPool) -> anyhow::Result<()> {
    set_limit(&pool, "max_dependents", 3).await?;
    let ws = workspace(&pool, 1000).await?;
    let head = Uuid::new_v4();
    task(&pool, ws, head, &[]).await?;
    sqlx::query("UPDATE tasks SET scheduled_for = now() + interval '1 hour' WHERE id = $1")
        .bind(head)
        .execute(&pool)
        .await?;
    admit(&pool).await?;
    for _ in 0..5 {
        task(&pool, ws, Uuid::new_v4(), &[head]).await?;
    }
    let report = admit(&pool).await?;
    assert_eq!((report.waiting, report.rejected), (3, 2), "{report:?}");
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE error_details ->> 'code' = 'too_many_dependents'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(n, 2);
    let count: i32 = sqlx::query_scalar("SELECT dependents_count FROM tasks WHERE id = $1")
        .bind(head)
        .fetch_one(&pool)
        .await?;
    assert_eq!(count, 3);
    // With three admitted, a sixth is refused at insert.
    let r = task(&pool, ws, Uuid::new_v4(), &[head]).await;
    let msg = format!("{:#}", r.expect_err("a fourth dependent inserted"));
    assert!(msg.contains("max_dependents"), "{msg}");
    Ok(())
}

/// The cycle check is bounded: a 6,000-task chain inserted in one statement used to cost 6 s
/// per admission pass (every task walked the whole chain behind it). Now each pass walks at
/// most batch x `max_chain_depth` rows; the chain beyond the default depth of 100 is
/// rejected, a real cycle is still found, and the passes' times are printed.
#[sqlx::test(migrations = "../migrations")]
async fn cycle_check_is_bounded(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    sqlx::query(
        "WITH g AS (SELECT i, gen_random_uuid() AS id FROM generate_series(1, 6000) AS i),
              l AS (SELECT i, id, lag(id) OVER (ORDER BY i) AS prev FROM g)
         INSERT INTO tasks (id, workspace_id, type, category, name, input, depends_on)
         SELECT id, $1, 'ai.generate', 'content', 'link ' || i, '{\"prompt\": \"p\"}',
                CASE WHEN prev IS NULL THEN '{}'::uuid[] ELSE ARRAY[prev] END
           FROM l",
    )
    .bind(ws)
    .execute(&pool)
    .await?;
    // A two-task cycle alongside.
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    task(&pool, ws, x, &[y]).await?;
    task(&pool, ws, y, &[x]).await?;
    let mut passes = 0;
    loop {
        let started = Instant::now();
        let report = admit(&pool).await?;
        if report.handled() == 0 {
            break;
        }
        passes += 1;
        println!(
            "admission pass {passes}: {} handled in {:.3} s",
            report.handled(),
            started.elapsed().as_secs_f64()
        );
        assert!(passes < 20, "admission does not finish");
    }
    let (too_deep, cycles): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE error_details ->> 'code' = 'dependency_chain_too_deep'),
                count(*) FILTER (WHERE error_details ->> 'code' = 'dependency_cycle')
           FROM tasks",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(cycles, 2);
    assert!(too_deep >= 1, "nothing rejected as too deep");
    let admitted_deepest: Option<i32> =
        sqlx::query_scalar("SELECT max(chain_depth) FROM tasks WHERE deps_remaining IS NOT NULL AND status = 'pending'")
            .fetch_one(&pool)
            .await?;
    assert!(admitted_deepest.unwrap_or(0) <= 100, "{admitted_deepest:?}");
    Ok(())
}
