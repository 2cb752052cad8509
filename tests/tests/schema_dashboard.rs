//! workspace_dashboard and task_performance views.

use bizq_tests::schema_support::{
    act_as, connect, count, create_task, create_tenant, create_workspace,
};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Dashboard {
    workspace_name: String,
    credits_balance: i32,
    pending_tasks: i64,
    processing_tasks: i64,
    tasks_completed_today: i64,
    revenue_30d: String,
    orders_today: i64,
    total_products: i64,
    active_products: i64,
}

async fn dashboard(pool: &PgPool, ws: Uuid) -> anyhow::Result<Dashboard> {
    Ok(sqlx::query_as(
        "SELECT workspace_name, credits_balance, pending_tasks, processing_tasks, tasks_completed_today,
                revenue_30d::text AS revenue_30d, orders_today, total_products, active_products
         FROM workspace_dashboard WHERE workspace_id = $1",
    )
    .bind(ws)
    .fetch_one(pool)
    .await?)
}

/// SQL for the start of today in workspace `$1`'s timezone, computed as the dashboard does.
// Never after now() and always today, so a row stamped with it is today's even just after
// midnight (`now() - interval '1 minute'` is yesterday's in the first minute of the day).
const TODAY_START: &str =
    "(SELECT (now() AT TIME ZONE w.timezone)::date::timestamp AT TIME ZONE w.timezone
        FROM workspaces w
       WHERE w.id = $1)";

/// Adds an order placed `before_today` (an interval, `'0'` for today) before local midnight.
async fn add_order(
    pool: &PgPool,
    ws: Uuid,
    amount: &str,
    status: &str,
    before_today: &str,
) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO orders (workspace_id, external_id, total_amount, status, order_date, line_items)
         VALUES ($1, gen_random_uuid()::text, $2::numeric, $3, {TODAY_START} - $4::interval, '[]')"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ws)
        .bind(amount)
        .bind(status)
        .bind(before_today)
        .execute(pool)
        .await?;
    Ok(())
}

async fn add_product(pool: &PgPool, ws: Uuid, status: &str) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO products (workspace_id, name, status) VALUES ($1, 'p', $2)")
        .bind(ws)
        .bind(status)
        .execute(pool)
        .await?;
    Ok(())
}

async fn set_status(pool: &PgPool, task: Uuid, status: &str) -> anyhow::Result<()> {
    sqlx::query("UPDATE tasks SET status = $2 WHERE id = $1")
        .bind(task)
        .bind(status)
        .execute(pool)
        .await?;
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn dashboard_counts_are_not_multiplied_by_joins(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "dash").await?;
    // 3 tasks: one pending, one processing, one completed now.
    create_task(&pool, ws, None).await?;
    let processing = create_task(&pool, ws, None).await?;
    set_status(&pool, processing, "processing").await?;
    let done = create_task(&pool, ws, Some(3)).await?;
    set_status(&pool, done, "completed").await?;
    // 2 orders: 120.50 today, 79.25 ten days before today.
    add_order(&pool, ws, "120.50", "confirmed", "0").await?;
    add_order(&pool, ws, "79.25", "delivered", "10 days").await?;
    // 4 products: 3 active, 1 draft.
    for status in ["active", "active", "active", "draft"] {
        add_product(&pool, ws, status).await?;
    }

    // Another workspace with data that must not leak into the first one's numbers.
    let other = create_workspace(&pool, "dash-other").await?;
    create_task(&pool, other, None).await?;
    add_order(&pool, other, "1000.00", "confirmed", "0").await?;
    add_product(&pool, other, "active").await?;

    assert_eq!(
        dashboard(&pool, ws).await?,
        Dashboard {
            workspace_name: "dash".into(),
            credits_balance: 97,
            pending_tasks: 1,
            processing_tasks: 1,
            tasks_completed_today: 1,
            revenue_30d: "199.75".into(),
            orders_today: 1,
            total_products: 4,
            active_products: 3,
        }
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn dashboard_windows_and_exclusions(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "windows").await?;
    add_order(&pool, ws, "10.00", "confirmed", "0").await?;
    add_order(&pool, ws, "500.00", "cancelled", "0").await?; // today, but not revenue
    add_order(&pool, ws, "600.00", "refunded", "2 days").await?; // not revenue
    add_order(&pool, ws, "700.00", "confirmed", "45 days").await?; // outside the window
    // An empty workspace still has a row, with zeros.
    let empty = create_workspace(&pool, "empty").await?;

    let d = dashboard(&pool, ws).await?;
    assert_eq!((d.revenue_30d.as_str(), d.orders_today), ("10.00", 2));
    let e = dashboard(&pool, empty).await?;
    assert_eq!(
        (
            e.pending_tasks,
            e.tasks_completed_today,
            e.revenue_30d.as_str(),
            e.orders_today,
            e.total_products
        ),
        (0, 0, "0", 0, 0)
    );

    // A task created long ago and completed now counts as completed today; one completed
    // yesterday does not (the seed used created_at).
    let old = create_task(&pool, ws, None).await?;
    sqlx::query("UPDATE tasks SET created_at = now() - interval '5 days', status = 'completed' WHERE id = $1")
        .bind(old)
        .execute(&pool)
        .await?;
    let yesterday = create_task(&pool, ws, None).await?;
    let sql = format!(
        "UPDATE tasks SET status = 'completed', completed_at = {TODAY_START} - interval '1 minute'
          WHERE id = $2"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ws)
        .bind(yesterday)
        .execute(&pool)
        .await?;
    assert_eq!(dashboard(&pool, ws).await?.tasks_completed_today, 1);

    // Soft-deleted workspaces are not shown.
    sqlx::query("UPDATE workspaces SET deleted_at = now() WHERE id = $1")
        .bind(empty)
        .execute(&pool)
        .await?;
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workspace_dashboard WHERE workspace_id = $1")
            .bind(empty)
            .fetch_one(&pool)
            .await?;
    assert_eq!(n, 0);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn today_is_the_workspace_local_day(pool: PgPool) -> anyhow::Result<()> {
    // Kiritimati is UTC+14, Pago Pago UTC-11: their "today" starts at different instants.
    for tz in ["Pacific/Kiritimati", "Pacific/Pago_Pago", "UTC"] {
        let ws = create_workspace(&pool, &format!("tz-{tz}")).await?;
        sqlx::query("UPDATE workspaces SET timezone = $2 WHERE id = $1")
            .bind(ws)
            .bind(tz)
            .execute(&pool)
            .await?;
        // Completed at local midnight (today's first instant: never after now, so this holds
        // even just after midnight) and one second before it.
        let local_midnight = "((now() AT TIME ZONE $2)::date::timestamp AT TIME ZONE $2)";
        for offset in ["interval '0'", "-interval '1 second'"] {
            let task = create_task(&pool, ws, None).await?;
            let sql = format!(
                "UPDATE tasks SET status = 'completed', completed_at = {local_midnight} + {offset} WHERE id = $1"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(task)
                .bind(tz)
                .execute(&pool)
                .await?;
        }
        assert_eq!(
            dashboard(&pool, ws).await?.tasks_completed_today,
            1,
            "timezone {tz}"
        );
    }
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn views_respect_row_level_security(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "view-a").await?;
    let b = create_tenant(&pool, "view-b").await?;
    create_task(&pool, b.id, None).await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM workspace_dashboard").await?,
        1
    );
    let sql = format!(
        "SELECT count(*) FROM workspace_dashboard WHERE workspace_id = '{}'",
        a.id
    );
    assert_eq!(count(&mut conn, &sql).await?, 1);
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM task_performance").await?,
        0
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn task_performance_success_rate(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "perf").await?;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create_task(&pool, ws, None).await?);
    }
    set_status(&pool, ids[0], "completed").await?;
    set_status(&pool, ids[1], "completed").await?;
    set_status(&pool, ids[2], "failed").await?;
    set_status(&pool, ids[3], "processing").await?; // unfinished: not in the rate
    sqlx::query("UPDATE tasks SET processing_time_ms = 100, actual_cost = 2 WHERE id = $1")
        .bind(ids[0])
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE tasks SET processing_time_ms = 300, actual_cost = 4 WHERE id = $1")
        .bind(ids[1])
        .execute(&pool)
        .await?;

    let (total, rate, avg_time): (i64, Option<f64>, Option<String>) = sqlx::query_as(
        "SELECT total_executions, success_rate, avg_processing_time::text FROM task_performance WHERE workspace_id = $1",
    )
    .bind(ws)
    .fetch_one(&pool)
    .await?;
    assert_eq!(total, 5);
    let rate = rate.expect("success rate");
    assert!((rate - 2.0 / 3.0).abs() < 1e-9, "rate {rate}");
    assert_eq!(
        avg_time.as_deref().map(|s| s.parse::<f64>().unwrap()),
        Some(200.0)
    );

    // Nothing finished: NULL, not a division by zero.
    let idle = create_workspace(&pool, "perf-idle").await?;
    create_task(&pool, idle, None).await?;
    let rate: Option<f64> =
        sqlx::query_scalar("SELECT success_rate FROM task_performance WHERE workspace_id = $1")
            .bind(idle)
            .fetch_one(&pool)
            .await?;
    assert_eq!(rate, None);
    Ok(())
}
