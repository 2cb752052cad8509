//! analytics_events is range-partitioned by month; ensure_analytics_partitions() manages it.

use bizq_tests::schema_support::{
    act_as, act_as_service, connect, create_tenant, create_workspace, exec, expect_sqlstate,
};
use chrono::{Datelike, Months, Utc};
use sqlx::PgPool;
use uuid::Uuid;

fn partition_name(months_from_now: u32) -> String {
    let first = Utc::now().date_naive().with_day(1).expect("day 1");
    let d = first
        .checked_add_months(Months::new(months_from_now))
        .expect("month");
    format!("analytics_events_y{:04}m{:02}", d.year(), d.month())
}

async fn partitions(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'analytics_events'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await?)
}

/// Inserts an event `months_from_now` months ahead (day 15, noon UTC); returns (id, partition).
async fn insert_event(
    pool: &PgPool,
    ws: Uuid,
    months_from_now: i32,
) -> anyhow::Result<(Uuid, String)> {
    Ok(sqlx::query_as(
        "INSERT INTO analytics_events (workspace_id, event_type, event_name, occurred_at)
         VALUES ($1, 'test', 'future', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                                       + make_interval(months => $2, days => 14, hours => 12))
         RETURNING id, tableoid::regclass::text",
    )
    .bind(ws)
    .bind(months_from_now)
    .fetch_one(pool)
    .await?)
}

async fn partition_of(pool: &PgPool, id: Uuid) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM analytics_events WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

#[sqlx::test(migrations = "../migrations")]
async fn migration_creates_default_and_three_monthly_partitions(
    pool: PgPool,
) -> anyhow::Result<()> {
    let parts = partitions(&pool).await?;
    for expected in [
        "analytics_events_default".to_string(),
        partition_name(0),
        partition_name(1),
        partition_name(2),
    ] {
        assert!(parts.contains(&expected), "missing {expected} in {parts:?}");
    }
    let strategy: String = sqlx::query_scalar(
        "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'analytics_events'::regclass",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(strategy, "r");
    let pk: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'analytics_events'::regclass AND contype = 'p'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(pk, "PRIMARY KEY (id, occurred_at)");

    // Routing: now -> current month; far past and far future -> default; never an error.
    let ws = create_workspace(&pool, "routing").await?;
    assert_eq!(insert_event(&pool, ws, 0).await?.1, partition_name(0));
    assert_eq!(insert_event(&pool, ws, 2).await?.1, partition_name(2));
    assert_eq!(
        insert_event(&pool, ws, 40).await?.1,
        "analytics_events_default"
    );
    assert_eq!(
        insert_event(&pool, ws, -30).await?.1,
        "analytics_events_default"
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn ensure_moves_rows_out_of_the_default_partition(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "move").await?;
    let (early, p) = insert_event(&pool, ws, 4).await?;
    assert_eq!(p, "analytics_events_default");
    let (later, _) = insert_event(&pool, ws, 5).await?;
    let (far, _) = insert_event(&pool, ws, 9).await?;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics_events")
        .fetch_one(&pool)
        .await?;

    // Months +3..+6 are new.
    let created: i32 = sqlx::query_scalar("SELECT ensure_analytics_partitions(6)")
        .fetch_one(&pool)
        .await?;
    assert_eq!(created, 4);
    assert_eq!(partition_of(&pool, early).await?, partition_name(4));
    assert_eq!(partition_of(&pool, later).await?, partition_name(5));
    assert_eq!(partition_of(&pool, far).await?, "analytics_events_default");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics_events")
        .fetch_one(&pool)
        .await?;
    assert_eq!(after, before, "rows lost or duplicated while moving");

    // Idempotent.
    let again: i32 = sqlx::query_scalar("SELECT ensure_analytics_partitions(6)")
        .fetch_one(&pool)
        .await?;
    assert_eq!(again, 0);

    // The attached partition has the parent's indexes and foreign keys, and RLS enabled.
    let name = partition_name(4);
    let (indexes, fks, rls): (i64, i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_index WHERE indrelid = c.oid),
                (SELECT count(*) FROM pg_constraint WHERE conrelid = c.oid AND contype = 'f'),
                c.relrowsecurity
         FROM pg_class c WHERE c.relname = $1",
    )
    .bind(&name)
    .fetch_one(&pool)
    .await?;
    let parent_indexes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'analytics_events'::regclass",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(indexes, parent_indexes);
    assert!(fks >= 6, "{name} has {fks} foreign keys");
    assert!(rls, "{name} has RLS disabled");
    let leftover: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'",
    )
    .bind(&name)
    .fetch_one(&pool)
    .await?;
    assert_eq!(leftover, 0, "temporary range constraint left behind");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_calls_create_each_partition_once(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "concurrent").await?;
    for m in 3..=8 {
        insert_event(&pool, ws, m).await?;
    }
    let mut handles = Vec::new();
    for _ in 0..6 {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = connect(&pool).await?;
            let n: i32 = sqlx::query_scalar("SELECT ensure_analytics_partitions(8)")
                .fetch_one(&mut conn)
                .await?;
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await??;
    }
    assert_eq!(total, 6, "months +3..+8 created exactly once overall");
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics_events_default")
        .fetch_one(&pool)
        .await?;
    assert_eq!(in_default, 0);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn only_service_role_manages_partitions(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "partition-perms").await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.owner.auth_id).await?;
    expect_sqlstate(
        exec(&mut conn, "SELECT ensure_analytics_partitions(12)").await,
        "42501",
        "authenticated",
    );
    act_as_service(&mut conn).await?;
    let n: i32 = sqlx::query_scalar("SELECT ensure_analytics_partitions(3)")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(n, 1);
    assert!(partitions(&pool).await?.contains(&partition_name(3)));
    Ok(())
}
