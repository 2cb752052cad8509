//! Each of the engine's wake-up and liveness mechanisms proven on its own: NOTIFY/LISTEN
//! (with the poll and tick set to a minute, so nothing else can explain a fast pickup), the
//! poll (with no notification at all), LISTEN surviving a killed connection, cancel
//! notifications as hints checked against the database, and heartbeats extending a lease.
//!
//! Latencies are read from the rows' own timestamps (`created_at`, `started_at`,
//! `completed_at`, written by PostgreSQL), and compared with the mechanism they rule out: a
//! pickup within [`FAST`] when the poll is 60 s can only be a notification. Latency figures
//! themselves belong in the benchmark.

use std::time::Duration;

use anyhow::Context;
use bizq::config::Config;
use bizq::lifecycle;
use bizq_tests::engine::*;
use sqlx::PgPool;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

/// What counts as "at once": far under the 60 s poll, tick and heartbeat of [`slow_loops`],
/// with room for a loaded 2-core machine.
const FAST: f64 = 5.0;

/// Poll, tick and heartbeat so slow that only a notification can wake anything within
/// [`FAST`]; a long lease so nothing expires meanwhile.
fn slow_loops(extra: &[(&str, &str)]) -> Config {
    let mut overrides = vec![
        ("worker.poll_interval_ms", "60000"),
        ("scheduler.tick_ms", "60000"),
        ("worker.lease_seconds", "300"),
        ("worker.heartbeat_ms", "60000"),
        ("worker.task_timeout_seconds", "600"),
    ];
    overrides.extend_from_slice(extra);
    config_with(&overrides)
}

/// Backend pids of the connections currently LISTENing on `channel`.
async fn listeners(pool: &PgPool, channel: &str) -> anyhow::Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT pid
           FROM pg_stat_activity
          WHERE datname = current_database()
            AND pid <> pg_backend_pid()
            AND query ILIKE '%LISTEN%' || $1 || '%'
          ORDER BY pid",
    )
    .bind(channel)
    .fetch_all(pool)
    .await?)
}

/// Waits until someone LISTENs on each of `channels`, then lets the start-up passes (and the
/// wake-up each listener gives after connecting) finish. This pause only removes an
/// alternative explanation; it cannot make a test fail.
async fn wait_until_listening_on(pool: &PgPool, channels: &[&str]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + T;
    for channel in channels {
        while listeners(pool, channel).await?.is_empty() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nobody LISTENed on {channel}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// The scheduler (`bizq_pending`) and the worker (`bizq_queued`) are listening.
async fn wait_until_listening(pool: &PgPool) -> anyhow::Result<()> {
    wait_until_listening_on(pool, &["bizq_pending", "bizq_queued"]).await
}

/// Seconds from a task's insert to its claim, by the database's clock.
async fn pickup_seconds(pool: &PgPool, id: Uuid) -> anyhow::Result<f64> {
    Ok(sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM started_at - created_at)::float8 FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// Pins NOTIFY/LISTEN for new work: `bizq_pending` wakes the scheduler (insert trigger) and
/// `bizq_queued` wakes the worker (admission). With a 60 s tick and poll, three tasks
/// inserted one after another are each admitted and claimed within seconds. The first
/// could have ridden a start-up pass; the later ones cannot. Remove either `pg_notify`
/// (the insert trigger's, or `notify(.., CHANNEL_QUEUED)` in `admit`) or either LISTEN and
/// this fails.
#[sqlx::test(migrations = "../migrations")]
async fn notifications_wake_the_scheduler_and_the_worker_at_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    let config = slow_loops(&[]);
    let ws = workspace(&pool, 100).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_until_listening(&pool).await?;
    for round in 0..3 {
        let id = generate(&pool, ws, &format!("round {round}"), 5, &[]).await?;
        wait_status(&pool, id, "completed")
            .await
            .with_context(|| format!("round {round}"))?;
        let s = pickup_seconds(&pool, id).await?;
        assert!(
            s < FAST,
            "round {round}: picked up after {s:.3} s; with a 60 s poll and tick only NOTIFY \
             explains a fast pickup"
        );
    }
    fleet.shutdown().await?;
    Ok(())
}

/// Pins the poll as the backstop: a task made claimable by a raw UPDATE, which sends no
/// notification to workers (only admission and promotion do), is still found, by the
/// worker's `poll_interval_ms` (200 ms here). No scheduler runs. Set the poll to a minute
/// and this times out. Two rounds: the second cannot ride the worker's start-up claim.
#[sqlx::test(migrations = "../migrations")]
async fn the_poll_finds_work_that_no_one_announced(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[("worker.poll_interval_ms", "200")]);
    let ws = workspace(&pool, 100).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 0, 1);
    wait_until_listening_on(&pool, &["bizq_queued"]).await?;
    for round in 0..2 {
        let id = generate(&pool, ws, &format!("unannounced {round}"), 5, &[]).await?;
        // What admission would write, minus its NOTIFY.
        sqlx::query(
            "UPDATE tasks
                SET status = 'queued',
                    deps_remaining = 0
              WHERE id = $1",
        )
        .bind(id)
        .execute(&pool)
        .await?;
        wait_status(&pool, id, "completed")
            .await
            .with_context(|| format!("round {round}"))?;
    }
    fleet.shutdown().await?;
    Ok(())
}

/// Pins LISTEN's reconnect (`listen::listen`): both LISTEN connections are killed with
/// `pg_terminate_backend`; new ones appear (other pids), and notifications work again,
/// with the 60 s poll and tick that make anything else too slow.
#[sqlx::test(migrations = "../migrations")]
async fn listen_comes_back_after_its_connection_is_killed(pool: PgPool) -> anyhow::Result<()> {
    let config = slow_loops(&[]);
    let ws = workspace(&pool, 100).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_until_listening(&pool).await?;
    let mut old = listeners(&pool, "bizq_pending").await?;
    old.extend(listeners(&pool, "bizq_queued").await?);
    for pid in &old {
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&pool)
            .await?;
        assert!(killed, "terminated LISTEN backend {pid}");
    }
    // New LISTEN connections, none of them the killed ones.
    let deadline = std::time::Instant::now() + T;
    loop {
        let pending = listeners(&pool, "bizq_pending").await?;
        let queued = listeners(&pool, "bizq_queued").await?;
        let fresh = |v: &Vec<i32>| !v.is_empty() && v.iter().all(|p| !old.contains(p));
        if fresh(&pending) && fresh(&queued) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "LISTEN did not come back: pending {pending:?}, queued {queued:?}, killed {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..2 {
        let id = generate(&pool, ws, &format!("after reconnect {round}"), 5, &[]).await?;
        wait_status(&pool, id, "completed")
            .await
            .with_context(|| format!("round {round}"))?;
        let s = pickup_seconds(&pool, id).await?;
        assert!(s < FAST, "round {round}: picked up after {s:.3} s");
    }
    fleet.shutdown().await?;
    Ok(())
}

/// Seconds between two of the database's own timestamps: `a_col` of task `a` and `b_col` of
/// task `b` (b − a).
async fn seconds_between(
    pool: &PgPool,
    a: Uuid,
    a_col: &str,
    b: Uuid,
    b_col: &str,
) -> anyhow::Result<f64> {
    let sql = format!(
        "SELECT EXTRACT(EPOCH FROM (SELECT {b_col} FROM tasks WHERE id = $2)
                                 - (SELECT {a_col} FROM tasks WHERE id = $1))::float8"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(a)
        .bind(b)
        .fetch_one(pool)
        .await?)
}

async fn wait_status(pool: &PgPool, id: Uuid, want: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let s = status(pool, id).await?;
        if s == want {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "task {id}: waited for {want}, is {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pins the cancel path: `bizq_cancel` reaches the worker and it aborts the running call at
/// once; and the notification is only a hint, checked against the row
/// (`lifecycle::lease_is_held`), so a forged `pg_notify('bizq_cancel', id)` for a task
/// whose lease is still held aborts nothing.
///
/// One slot, provider calls of two minutes, a heartbeat of a minute: when a real cancel
/// frees the slot, the next queued task starts within seconds of the cancel (only the
/// notification explains that; the heartbeat would take up to a minute). A forged hint
/// for task `b` must not free the slot: `c` starts only after `b`'s real cancel. Remove the
/// lease check and `c` starts right after the forged hint, before `b` was cancelled.
#[sqlx::test(migrations = "../migrations")]
async fn cancel_notifications_abort_at_once_and_forged_ones_abort_nothing(
    pool: PgPool,
) -> anyhow::Result<()> {
    let config = slow_loops(&[
        ("providers.mock.latency_ms", "120000"),
        ("worker.concurrency", "1"),
        ("worker.claim_batch", "1"),
    ]);
    let ws = workspace(&pool, 100).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_until_listening(&pool).await?;
    let a = generate(&pool, ws, "a", 1, &[]).await?;
    wait_status(&pool, a, "processing").await?;
    let b = generate(&pool, ws, "b", 2, &[]).await?;
    let c = generate(&pool, ws, "c", 3, &[]).await?;
    wait_status(&pool, b, "queued").await?;
    wait_status(&pool, c, "queued").await?;

    // A real cancel: the slot frees at once and b starts.
    assert_eq!(lifecycle::cancel(&pool, a, "test").await?, "processing");
    wait_status(&pool, b, "processing").await?;
    let s = seconds_between(&pool, a, "completed_at", b, "started_at").await?;
    assert!(
        (0.0..FAST).contains(&s),
        "b started {s:.3} s after a's cancel; only the NOTIFY explains a fast abort"
    );

    // A forged hint for b, whose lease is held: nothing is aborted.
    sqlx::query("SELECT pg_notify('bizq_cancel', $1)")
        .bind(b.to_string())
        .execute(&pool)
        .await?;
    // Give a wrongly trusted hint every chance to free the slot (this pause can only hide
    // the bug, never fail a correct engine).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(&pool, c).await?, "queued", "c waits: b still runs");
    assert_eq!(lifecycle::cancel(&pool, b, "test").await?, "processing");
    wait_status(&pool, c, "processing").await?;
    let s = seconds_between(&pool, b, "completed_at", c, "started_at").await?;
    assert!(
        (0.0..FAST).contains(&s),
        "c started {s:.3} s after b's real cancel (negative: before it, on the forged hint)"
    );
    assert_eq!(lifecycle::cancel(&pool, c, "test").await?, "processing");
    let stats = fleet.shutdown().await?;
    assert_eq!((stats[0].aborted, stats[0].completed), (3, 0), "{stats:?}");
    Ok(())
}

/// Pins the heartbeat: a provider call lasting several leases (7 s against a 2 s lease,
/// with the scheduler reclaiming expired leases every 100 ms) completes on attempt 1,
/// is never reclaimed (the audit shows no `processing → queued`), and no result is fenced.
/// Stop the heartbeat and the task is reclaimed, run again and its first result dropped.
#[sqlx::test(migrations = "../migrations")]
async fn heartbeats_keep_a_call_longer_than_the_lease_alive(pool: PgPool) -> anyhow::Result<()> {
    let config = config_with(&[
        ("providers.mock.latency_ms", "7000"),
        ("worker.lease_seconds", "2"),
        ("worker.heartbeat_ms", "200"),
        ("scheduler.tick_ms", "100"),
    ]);
    bizq_tests::audit::install(&pool).await?;
    let ws = workspace(&pool, 100).await?;
    let id = generate(&pool, ws, "a long call", 5, &[]).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_status(&pool, id, "completed").await?;
    let stats = fleet.shutdown().await?;
    let (attempt, ran_ms): (i32, i32) =
        sqlx::query_as("SELECT attempt, processing_time_ms FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(attempt, 1);
    assert!(ran_ms >= 7000, "the call outlived the lease: {ran_ms} ms");
    assert_eq!(
        bizq_tests::audit::statuses(&pool, id).await?,
        vec!["pending", "queued", "processing", "completed"],
        "never reclaimed"
    );
    assert_eq!((stats[0].completed, stats[0].fenced), (1, 0), "{stats:?}");
    Ok(())
}
