//! Credit deduction on task completion (deduct_task_credits_trigger).

use bizq_tests::schema_support::{
    act_as, act_as_service, connect, create_task, create_tenant, create_workspace, exec,
    expect_sqlstate,
};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, PartialEq, Eq)]
struct Credits {
    balance: i32,
    used: i32,
    overdrawn: i32,
}

async fn credits(pool: &PgPool, ws: Uuid) -> anyhow::Result<Credits> {
    let (balance, used, overdrawn) = sqlx::query_as::<_, (i32, i32, i32)>(
        "SELECT credits_balance, credits_used_this_month, credits_overdrawn FROM workspaces WHERE id = $1",
    )
    .bind(ws)
    .fetch_one(pool)
    .await?;
    Ok(Credits {
        balance,
        used,
        overdrawn,
    })
}

async fn set_balance(pool: &PgPool, ws: Uuid, balance: i32, limit: i32) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE workspaces SET credits_balance = $2, monthly_credit_limit = $3 WHERE id = $1",
    )
    .bind(ws)
    .bind(balance)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(())
}

async fn complete(pool: &PgPool, task: Uuid) -> anyhow::Result<()> {
    let n = sqlx::query("UPDATE tasks SET status = 'completed' WHERE id = $1")
        .bind(task)
        .execute(pool)
        .await?
        .rows_affected();
    assert_eq!(n, 1);
    Ok(())
}

async fn low_credit_events(pool: &PgPool, ws: Uuid) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(sqlx::query_scalar(
        "SELECT properties FROM analytics_events
         WHERE workspace_id = $1 AND event_type = 'system' AND event_name = 'low_credits'
         ORDER BY created_at, (properties->>'credits_remaining')::int DESC",
    )
    .bind(ws)
    .fetch_all(pool)
    .await?)
}

#[sqlx::test(migrations = "../migrations")]
async fn completions_charge_exact_costs_once(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "credits").await?;
    set_balance(&pool, ws, 500, 1000).await?;

    let t1 = create_task(&pool, ws, Some(30)).await?;
    let t2 = create_task(&pool, ws, Some(50)).await?;
    let t3 = create_task(&pool, ws, None).await?;
    let t4 = create_task(&pool, ws, Some(99)).await?;
    // actual_cost wins over estimated_cost.
    sqlx::query("UPDATE tasks SET actual_cost = 20 WHERE id = $1")
        .bind(t2)
        .execute(&pool)
        .await?;

    complete(&pool, t1).await?;
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 470,
            used: 30,
            overdrawn: 0
        }
    );
    complete(&pool, t2).await?;
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 450,
            used: 50,
            overdrawn: 0
        }
    );
    complete(&pool, t3).await?; // no cost at all
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 450,
            used: 50,
            overdrawn: 0
        }
    );

    // Updating an already completed task (status re-set, or other columns) charges nothing.
    complete(&pool, t1).await?;
    sqlx::query("UPDATE tasks SET output = '{\"ok\": true}', actual_cost = 35 WHERE id = $1")
        .bind(t1)
        .execute(&pool)
        .await?;
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 450,
            used: 50,
            overdrawn: 0
        }
    );

    // Other transitions charge nothing.
    sqlx::query("UPDATE tasks SET status = 'processing' WHERE id = $1")
        .bind(t4)
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE tasks SET status = 'failed' WHERE id = $1")
        .bind(t4)
        .execute(&pool)
        .await?;
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 450,
            used: 50,
            overdrawn: 0
        }
    );
    complete(&pool, t4).await?;
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 351,
            used: 149,
            overdrawn: 0
        }
    );

    // completed_at is filled in.
    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE status = 'completed' AND completed_at IS NULL",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(missing, 0);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn negative_costs_are_rejected(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "negative").await?;
    let task = create_task(&pool, ws, Some(5)).await?;
    let r = sqlx::query("UPDATE tasks SET actual_cost = -100, status = 'completed' WHERE id = $1")
        .bind(task)
        .execute(&pool)
        .await;
    let msg = expect_sqlstate(r, "23514", "negative actual_cost");
    assert!(msg.contains("valid_actual_cost"), "{msg}");
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 100,
            used: 0,
            overdrawn: 0
        }
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn cost_above_balance_keeps_task_completed_and_records_overdraft(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "overdraft").await?;
    set_balance(&pool, ws, 40, 1000).await?;
    let task = create_task(&pool, ws, Some(100)).await?;

    complete(&pool, task).await?;

    let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(task)
        .fetch_one(&pool)
        .await?;
    assert_eq!(
        status, "completed",
        "the completion must not be rolled back"
    );
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 0,
            used: 100,
            overdrawn: 60
        }
    );

    // A further task at balance 0 is entirely overdraft.
    let task2 = create_task(&pool, ws, Some(7)).await?;
    complete(&pool, task2).await?;
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 0,
            used: 107,
            overdrawn: 67
        }
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn low_credits_event_fires_once_per_crossing(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "low-credits").await?;
    // threshold = 10% of 1000 = 100
    set_balance(&pool, ws, 150, 1000).await?;

    let t = create_task(&pool, ws, Some(50)).await?; // 150 -> 100: not below the threshold
    complete(&pool, t).await?;
    assert!(low_credit_events(&pool, ws).await?.is_empty());

    let crossing = create_task(&pool, ws, Some(1)).await?; // 100 -> 99: crosses
    complete(&pool, crossing).await?;
    let events = low_credit_events(&pool, ws).await?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["credits_remaining"], 99);
    assert_eq!(events[0]["threshold"].as_f64(), Some(100.0));
    assert_eq!(events[0]["task_id"], crossing.to_string());
    let task_col: Option<Uuid> =
        sqlx::query_scalar("SELECT task_id FROM analytics_events WHERE event_name = 'low_credits'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(task_col, Some(crossing));

    for cost in [10, 20, 500] {
        // already below: no new event, including when hitting 0
        let t = create_task(&pool, ws, Some(cost)).await?;
        complete(&pool, t).await?;
    }
    assert_eq!(low_credit_events(&pool, ws).await?.len(), 1);
    assert_eq!(credits(&pool, ws).await?.balance, 0);

    // Top up, cross again: exactly one more event.
    set_balance(&pool, ws, 300, 1000).await?;
    let t = create_task(&pool, ws, Some(250)).await?; // 300 -> 50
    complete(&pool, t).await?;
    let events = low_credit_events(&pool, ws).await?;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["credits_remaining"], 50);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_completions_are_charged_exactly(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "concurrent").await?;
    set_balance(&pool, ws, 100_000, 100_000).await?;
    let mut tasks = Vec::new();
    let mut expected = 0;
    for i in 0..50 {
        let cost = 1 + i % 7;
        expected += cost;
        tasks.push(create_task(&pool, ws, Some(cost)).await?);
    }

    let mut handles = Vec::new();
    for task in tasks {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = connect(&pool).await?;
            exec(
                &mut conn,
                &format!("UPDATE tasks SET status = 'completed' WHERE id = '{task}'"),
            )
            .await?;
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    assert_eq!(
        credits(&pool, ws).await?,
        Credits {
            balance: 100_000 - expected,
            used: expected,
            overdrawn: 0
        }
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn members_completing_tasks_are_charged_despite_lacking_billing_rights(
    pool: PgPool,
) -> anyhow::Result<()> {
    // Since migration 0009 a member cannot complete a task at all (status is the engine's
    // column; security_engine_columns.rs covers that). The charge still fires in whichever
    // session completes the task, for the engine as for a service, without billing rights of
    // its own: the trigger is SECURITY DEFINER.
    let a = create_tenant(&pool, "member-completes").await?;
    set_balance(&pool, a.id, 100, 1000).await?;
    let task = create_task(&pool, a.id, Some(95)).await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let r = exec(
        &mut conn,
        &format!("UPDATE tasks SET status = 'completed' WHERE id = '{task}'"),
    )
    .await;
    assert!(r.is_err(), "a member completed a task: {r:?}");
    act_as_service(&mut conn).await?;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE tasks SET status = 'completed' WHERE id = '{task}'")
        )
        .await?,
        1
    );
    assert_eq!(
        credits(&pool, a.id).await?,
        Credits {
            balance: 5,
            used: 95,
            overdrawn: 0
        }
    );
    assert_eq!(low_credit_events(&pool, a.id).await?.len(), 1);
    Ok(())
}
