//! Housekeeping: analytics partitions ahead, the monthly credit reset, single-flight.

use bizq::config::SchedulerConfig;
use bizq::housekeeping;
use bizq_tests::engine::workspace;
use sqlx::PgPool;

#[sqlx::test(migrations = "../migrations")]
async fn housekeeping_creates_partitions_and_resets_months(pool: PgPool) -> anyhow::Result<()> {
    let stale = workspace(&pool, 100).await?;
    let current = workspace(&pool, 100).await?;
    sqlx::query(
        "UPDATE workspaces
            SET credits_used_this_month = 50,
                credits_month_start = (date_trunc('month', now()) - interval '1 month')::date
          WHERE id = $1",
    )
    .bind(stale)
    .execute(&pool)
    .await?;
    sqlx::query("UPDATE workspaces SET credits_used_this_month = 7 WHERE id = $1")
        .bind(current)
        .execute(&pool)
        .await?;

    let config = SchedulerConfig {
        partitions_ahead: 5,
        ..Default::default()
    };
    let report = housekeeping::run(&pool, &config)
        .await?
        .expect("not locked elsewhere");
    assert!(report.partitions_created >= 1, "{report:?}");
    assert_eq!(report.workspaces_reset, 1, "{report:?}");

    let months_ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'analytics_events'::regclass
            AND c.relname = ANY (SELECT to_char(now() + make_interval(months => m), '\"analytics_events_y\"YYYY\"m\"MM')
                                   FROM generate_series(0, 5) m)",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        months_ahead, 6,
        "this month and the next five have partitions"
    );

    let rows: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT credits_used_this_month, credits_month_start = date_trunc('month', now() AT TIME ZONE timezone)::date
           FROM workspaces WHERE id = ANY($1) ORDER BY id = $2 DESC",
    )
    .bind(vec![stale, current])
    .bind(stale)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        rows,
        vec![(0, true), (7, true)],
        "only the stale workspace was reset"
    );

    // A second run has nothing left to do.
    let again = housekeeping::run(&pool, &config)
        .await?
        .expect("not locked elsewhere");
    assert_eq!((again.partitions_created, again.workspaces_reset), (0, 0));
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn only_one_scheduler_keeps_house_at_a_time(pool: PgPool) -> anyhow::Result<()> {
    let mut other = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(housekeeping::LOCK_KEY)
        .execute(&mut *other)
        .await?;
    let config = SchedulerConfig::default();
    assert!(
        housekeeping::run(&pool, &config).await?.is_none(),
        "another scheduler holds the lock"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(housekeeping::LOCK_KEY)
        .execute(&mut *other)
        .await?;
    assert!(housekeeping::run(&pool, &config).await?.is_some());
    Ok(())
}
