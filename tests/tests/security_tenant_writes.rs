//! What else a tenant may not write (issue 8, item 9): an auth identity that is not the
//! caller's own (protect_user_privileges in migration 0009), the engine's analytics events
//! (`analytics_events_protect_engine_*` triggers) and customer metrics (column grants on
//! `customers` and `customers_protect_metrics_*`).

use bizq_tests::schema_support::{
    act_as, act_as_service, connect, create_tenant, exec, expect_sqlstate,
};
use sqlx::PgPool;
use uuid::Uuid;

const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// An admin used to be able to bind any not-yet-registered auth id to a user of their
/// workspace, and so own whoever later signs up with it. Now tenants may only leave
/// `auth_user_id` NULL (an invitation) or set their own; the service binds invitees.
#[sqlx::test(migrations = "../migrations")]
async fn admins_cannot_bind_foreign_auth_ids(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "binder").await?;
    let stranger = Uuid::new_v4();
    let mut conn = connect(&pool).await?;
    for who in [a.owner.auth_id, a.admin.auth_id] {
        act_as(&mut conn, who).await?;
        let r = exec(
            &mut conn,
            &format!(
                "INSERT INTO users (workspace_id, email, role, auth_user_id)
                 VALUES ('{}', 'x-' || gen_random_uuid() || '@example.com', 'member', '{stranger}')",
                a.id
            ),
        )
        .await;
        expect_sqlstate(
            r,
            INSUFFICIENT_PRIVILEGE,
            "binding a stranger's auth id at insert",
        );
        let r = exec(
            &mut conn,
            &format!(
                "UPDATE users SET auth_user_id = '{stranger}' WHERE id = '{}'",
                a.viewer.user_id
            ),
        )
        .await;
        expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "rebinding a user to a stranger");
    }
    // Inviting (no auth id) still works, and the service binds the invitee.
    act_as(&mut conn, a.admin.auth_id).await?;
    let invited: Uuid = sqlx::query_scalar(
        "INSERT INTO users (workspace_id, email, role) VALUES ($1, 'invitee@example.com', 'member') RETURNING id",
    )
    .bind(a.id)
    .fetch_one(&mut conn)
    .await?;
    act_as_service(&mut conn).await?;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE users SET auth_user_id = '{stranger}' WHERE id = '{invited}'")
        )
        .await?,
        1
    );
    Ok(())
}

/// Members used to insert `system` / `low_credits` / `billing` events (faking billing history
/// or silencing the warning). Now only the engine's functions and the service write, change
/// or delete them; members still write their own product events.
#[sqlx::test(migrations = "../migrations")]
async fn engine_events_are_the_engines(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "events").await?;
    let real: Uuid = sqlx::query_scalar(
        "INSERT INTO analytics_events (workspace_id, event_type, event_name, source)
         VALUES ($1, 'system', 'low_credits', 'billing') RETURNING id",
    )
    .bind(a.id)
    .fetch_one(&pool)
    .await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    for (event_type, name, source) in [
        ("system", "anything", "dashboard"),
        ("billing", "charge", "dashboard"),
        ("page_view", "low_credits", "dashboard"),
        ("page_view", "view", "billing"),
    ] {
        let r = exec(
            &mut conn,
            &format!(
                "INSERT INTO analytics_events (workspace_id, event_type, event_name, source)
                 VALUES ('{}', '{event_type}', '{name}', '{source}')",
                a.id
            ),
        )
        .await;
        expect_sqlstate(
            r,
            INSUFFICIENT_PRIVILEGE,
            &format!("member inserts {event_type}/{name}/{source}"),
        );
    }
    let r = exec(
        &mut conn,
        &format!("UPDATE analytics_events SET properties = '{{}}' WHERE id = '{real}'"),
    )
    .await;
    expect_sqlstate(
        r,
        INSUFFICIENT_PRIVILEGE,
        "member edits a low_credits event",
    );
    let r = exec(
        &mut conn,
        &format!("DELETE FROM analytics_events WHERE id = '{real}'"),
    )
    .await;
    expect_sqlstate(
        r,
        INSUFFICIENT_PRIVILEGE,
        "member deletes a low_credits event",
    );
    // Product events are fine.
    assert_eq!(
        exec(
            &mut conn,
            &format!(
                "INSERT INTO analytics_events (workspace_id, event_type, event_name, source)
                 VALUES ('{}', 'page_view', 'home', 'dashboard')",
                a.id
            )
        )
        .await?,
        1
    );
    Ok(())
}

/// Members used to overwrite a customer's totals. The metrics are derived from orders by
/// `recompute_customer_metrics`; members write every other column, and orders they insert
/// still update the metrics.
#[sqlx::test(migrations = "../migrations")]
async fn customer_metrics_are_derived_only(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "metrics").await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.member.auth_id).await?;
    let customer: Uuid = sqlx::query_scalar(
        "INSERT INTO customers (workspace_id, email, first_name) VALUES ($1, 'c@example.com', 'C') RETURNING id",
    )
    .bind(a.id)
    .fetch_one(&mut conn)
    .await?;
    for set in [
        "total_orders = 99",
        "total_spent = 1000000",
        "average_order_value = 5",
        "lifetime_value = 1000000",
        "first_order_at = now()",
        "last_order_at = now()",
    ] {
        let r = exec(
            &mut conn,
            &format!("UPDATE customers SET {set} WHERE id = '{customer}'"),
        )
        .await;
        expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, set);
    }
    let r = exec(
        &mut conn,
        &format!(
            "INSERT INTO customers (workspace_id, email, lifetime_value) VALUES ('{}', 'd@example.com', 5000)",
            a.id
        ),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "insert with metrics");
    assert_eq!(
        exec(
            &mut conn,
            &format!(
                "UPDATE customers SET first_name = 'Cee', tags = '{{vip}}' WHERE id = '{customer}'"
            )
        )
        .await?,
        1
    );
    exec(
        &mut conn,
        &format!(
            "INSERT INTO orders (workspace_id, customer_id, external_id, total_amount, status, order_date, line_items)
             VALUES ('{}', '{customer}', 'o-1', 40, 'confirmed', now(), '[]')",
            a.id
        ),
    )
    .await?;
    let (orders, spent): (i32, f64) =
        sqlx::query_as("SELECT total_orders, total_spent::float8 FROM customers WHERE id = $1")
            .bind(customer)
            .fetch_one(&pool)
            .await?;
    assert_eq!((orders, spent), (1, 40.0));
    Ok(())
}
