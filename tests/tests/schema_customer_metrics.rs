//! Customer metrics maintained by update_customer_metrics_trigger on orders.

use bizq_tests::schema_support::{connect, create_workspace, exec};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, PartialEq)]
struct Metrics {
    total_orders: i32,
    total_spent: String,
    average_order_value: String,
    lifetime_value: String,
    first_order_at: Option<String>,
    last_order_at: Option<String>,
}

async fn metrics(pool: &PgPool, customer: Uuid) -> anyhow::Result<Metrics> {
    let row: (i32, String, String, String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT total_orders, total_spent::text, average_order_value::text, lifetime_value::text,
                to_char(first_order_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), to_char(last_order_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
         FROM customers WHERE id = $1",
    )
    .bind(customer)
    .fetch_one(pool)
    .await?;
    Ok(Metrics {
        total_orders: row.0,
        total_spent: row.1,
        average_order_value: row.2,
        lifetime_value: row.3,
        first_order_at: row.4,
        last_order_at: row.5,
    })
}

fn m(orders: i32, spent: &str, avg: &str, first: Option<&str>, last: Option<&str>) -> Metrics {
    Metrics {
        total_orders: orders,
        total_spent: spent.into(),
        average_order_value: avg.into(),
        lifetime_value: spent.into(),
        first_order_at: first.map(Into::into),
        last_order_at: last.map(Into::into),
    }
}

async fn customer(pool: &PgPool, ws: Uuid) -> anyhow::Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO customers (workspace_id, email) VALUES ($1, gen_random_uuid() || '@example.com') RETURNING id",
    )
    .bind(ws)
    .fetch_one(pool)
    .await?)
}

async fn order(
    pool: &PgPool,
    ws: Uuid,
    customer: Uuid,
    amount: &str,
    status: &str,
    date: &str,
) -> anyhow::Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO orders (workspace_id, customer_id, external_id, total_amount, status, order_date, line_items)
         VALUES ($1, $2, gen_random_uuid()::text, $3::numeric, $4, $5::timestamptz, '[]') RETURNING id",
    )
    .bind(ws)
    .bind(customer)
    .bind(amount)
    .bind(status)
    .bind(date)
    .fetch_one(pool)
    .await?)
}

#[sqlx::test(migrations = "../migrations")]
async fn metrics_follow_inserts_updates_reassignments_and_deletes(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "metrics").await?;
    let alice = customer(&pool, ws).await?;
    let bob = customer(&pool, ws).await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(0, "0.00", "0.00", None, None)
    );

    let o1 = order(
        &pool,
        ws,
        alice,
        "100.00",
        "confirmed",
        "2026-01-10T12:00:00Z",
    )
    .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(
            1,
            "100.00",
            "100.00",
            Some("2026-01-10"),
            Some("2026-01-10")
        )
    );

    let o2 = order(
        &pool,
        ws,
        alice,
        "50.00",
        "delivered",
        "2026-02-20T12:00:00Z",
    )
    .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(2, "150.00", "75.00", Some("2026-01-10"), Some("2026-02-20"))
    );

    // Cancelled and refunded orders are excluded from every metric, dates included.
    order(
        &pool,
        ws,
        alice,
        "999.00",
        "cancelled",
        "2026-03-01T12:00:00Z",
    )
    .await?;
    order(
        &pool,
        ws,
        alice,
        "888.00",
        "refunded",
        "2025-12-01T12:00:00Z",
    )
    .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(2, "150.00", "75.00", Some("2026-01-10"), Some("2026-02-20"))
    );

    // Amount change.
    sqlx::query("UPDATE orders SET total_amount = 70 WHERE id = $1")
        .bind(o2)
        .execute(&pool)
        .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(2, "170.00", "85.00", Some("2026-01-10"), Some("2026-02-20"))
    );

    // Status change to cancelled.
    sqlx::query("UPDATE orders SET status = 'cancelled' WHERE id = $1")
        .bind(o1)
        .execute(&pool)
        .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(1, "70.00", "70.00", Some("2026-02-20"), Some("2026-02-20"))
    );
    sqlx::query("UPDATE orders SET status = 'confirmed' WHERE id = $1")
        .bind(o1)
        .execute(&pool)
        .await?;

    // Reassign o2 from alice to bob: both are recomputed.
    sqlx::query("UPDATE orders SET customer_id = $2 WHERE id = $1")
        .bind(o2)
        .bind(bob)
        .execute(&pool)
        .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(
            1,
            "100.00",
            "100.00",
            Some("2026-01-10"),
            Some("2026-01-10")
        )
    );
    assert_eq!(
        metrics(&pool, bob).await?,
        m(1, "70.00", "70.00", Some("2026-02-20"), Some("2026-02-20"))
    );

    // Reassign o1 away: alice goes back to zero.
    sqlx::query("UPDATE orders SET customer_id = $2 WHERE id = $1")
        .bind(o1)
        .bind(bob)
        .execute(&pool)
        .await?;
    assert_eq!(
        metrics(&pool, alice).await?,
        m(0, "0.00", "0.00", None, None)
    );
    assert_eq!(
        metrics(&pool, bob).await?,
        m(2, "170.00", "85.00", Some("2026-01-10"), Some("2026-02-20"))
    );

    // Delete.
    sqlx::query("DELETE FROM orders WHERE id = $1")
        .bind(o2)
        .execute(&pool)
        .await?;
    assert_eq!(
        metrics(&pool, bob).await?,
        m(
            1,
            "100.00",
            "100.00",
            Some("2026-01-10"),
            Some("2026-01-10")
        )
    );

    // Detach (customer_id -> NULL).
    sqlx::query("UPDATE orders SET customer_id = NULL WHERE id = $1")
        .bind(o1)
        .execute(&pool)
        .await?;
    assert_eq!(metrics(&pool, bob).await?, m(0, "0.00", "0.00", None, None));

    // average_order_value = total_spent / total_orders, rounded to cents.
    for amount in ["10.00", "10.00", "10.01"] {
        order(&pool, ws, bob, amount, "confirmed", "2026-04-01T00:00:00Z").await?;
    }
    let b = metrics(&pool, bob).await?;
    assert_eq!(
        (
            b.total_orders,
            b.total_spent.as_str(),
            b.average_order_value.as_str()
        ),
        (3, "30.01", "10.00")
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn deleting_a_customer_keeps_its_orders(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "delete-customer").await?;
    let c = customer(&pool, ws).await?;
    let o = order(&pool, ws, c, "10.00", "confirmed", "2026-01-01T00:00:00Z").await?;
    sqlx::query("DELETE FROM customers WHERE id = $1")
        .bind(c)
        .execute(&pool)
        .await?;
    let owner: Option<Uuid> = sqlx::query_scalar("SELECT customer_id FROM orders WHERE id = $1")
        .bind(o)
        .fetch_one(&pool)
        .await?;
    assert_eq!(owner, None);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_orders_for_one_customer_are_all_counted(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "concurrent-orders").await?;
    let c = customer(&pool, ws).await?;
    let mut handles = Vec::new();
    for _ in 0..20 {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = connect(&pool).await?;
            exec(
                &mut conn,
                &format!(
                    "INSERT INTO orders (workspace_id, customer_id, external_id, total_amount, status, order_date, line_items)
                     VALUES ('{ws}', '{c}', gen_random_uuid()::text, 5, 'confirmed', now(), '[]')"
                ),
            )
            .await?;
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let got = metrics(&pool, c).await?;
    assert_eq!((got.total_orders, got.total_spent.as_str()), (20, "100.00"));
    Ok(())
}
