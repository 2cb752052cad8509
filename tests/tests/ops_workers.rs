//! Live workers: real `bizq-worker` / `bizq-scheduler` processes register in `workers`,
//! heartbeat, show as LOST in `bizq workers` once unseen for the lost-after window, are
//! forgotten by housekeeping, and remove themselves on SIGTERM.

use std::time::Duration;

use bizq_tests::engine::*;
use bizq_tests::ops::bizq;
use sqlx::PgPool;

/// The line of `bizq workers` output naming `id`.
fn line_of<'a>(out: &'a str, id: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{out}"))
}

/// Pins registration at start-up (id, role, pid, types, concurrency), the heartbeat
/// (in-flight and last claim), `bizq workers` marking a row LOST by `last_seen_at` against
/// `ops.worker_lost_after_seconds`, housekeeping deleting it after the forget window, and
/// deregistration on SIGTERM. Time is driven by moving the dead worker's `last_seen_at`
/// back, not by sleeping through a lease.
#[sqlx::test(migrations = "../migrations")]
async fn bizq_workers_lists_the_fleet_marks_a_killed_worker_lost_and_sigterm_removes_rows(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let url = url_of(&pool);
    let config = config_toml(&[
        ("providers.mock.latency_ms", "60000"),
        ("worker.concurrency", "3"),
        ("scheduler.housekeeping_interval_seconds", "1"),
        ("ops.worker_lost_after_seconds", "30"),
        ("ops.worker_forget_after_seconds", "3600"),
    ]);
    let config_path = std::env::temp_dir().join(format!("bizq-ops-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&config_path, &config)?;
    let scheduler = Process::start("scheduler", &url, &config, &["--id", "ops-sched"])?;
    let w1 = Process::start(
        "worker",
        &url,
        &config,
        &["--id", "ops-w1", "--types", "ai.*"],
    )?;
    let w2 = Process::start("worker", &url, &config, &["--id", "ops-w2"])?;
    wait_for(
        &pool,
        "SELECT count(*) = 3 FROM workers",
        Duration::from_secs(30),
    )
    .await?;
    // Two slow tasks: whoever claims them reports them in flight.
    for i in 0..2 {
        generate(&pool, ws, &format!("slow {i}"), 5, &[]).await?;
    }
    wait_for(
        &pool,
        "SELECT sum(in_flight) = 2 AND count(last_claim_at) >= 1 FROM workers WHERE role = 'worker'",
        Duration::from_secs(30),
    )
    .await?;

    let run = bizq(&pool, Some(&config_path), &["workers"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;
    let sched = line_of(out, "ops-sched");
    assert!(
        sched.contains("scheduler") && sched.contains("running"),
        "{sched}"
    );
    assert!(sched.contains(&scheduler.pid().to_string()), "{sched}");
    let one = line_of(out, "ops-w1");
    assert!(one.contains(" worker ") && one.contains("running"), "{one}");
    assert!(
        one.contains(&w1.pid().to_string()) && one.ends_with("ai.*"),
        "{one}"
    );
    assert!(one.contains("/3"), "in flight out of 3 slots: {one}");
    assert!(out.contains("3 registered, 3 alive, 0 lost"), "{out}");
    let in_flight: i64 = sqlx::query_scalar("SELECT sum(in_flight)::int8 FROM workers")
        .fetch_one(&pool)
        .await?;
    assert_eq!(in_flight, 2);

    // kill -9: the row stays, still "running" until the lost-after window passes ...
    let mut w2 = w2;
    w2.signal("-KILL")?;
    w2.child.wait().await?;
    let out = bizq(&pool, Some(&config_path), &["workers"]).await.stdout;
    assert!(!line_of(&out, "ops-w2").contains("LOST"), "{out}");
    // ... which we move past instead of sleeping through it.
    sqlx::query(
        "UPDATE workers SET last_seen_at = now() - interval '31 seconds' WHERE id = 'ops-w2'",
    )
    .execute(&pool)
    .await?;
    let out = bizq(&pool, Some(&config_path), &["workers"]).await.stdout;
    assert!(line_of(&out, "ops-w2").contains("LOST"), "{out}");
    assert!(!line_of(&out, "ops-w1").contains("LOST"), "{out}");
    assert!(out.contains("3 registered, 2 alive, 1 lost"), "{out}");

    // Housekeeping (the real scheduler, every second here) forgets it after the forget
    // window, and only it.
    sqlx::query("UPDATE workers SET last_seen_at = now() - interval '2 hours' WHERE id = 'ops-w2'")
        .execute(&pool)
        .await?;
    wait_for(
        &pool,
        "SELECT NOT EXISTS (SELECT 1 FROM workers WHERE id = 'ops-w2')",
        Duration::from_secs(30),
    )
    .await?;
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM workers ORDER BY id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(left, ["ops-sched", "ops-w1"]);

    // SIGTERM: each process exits 0 and takes its row with it (the grace period is short
    // next to the mock's 60 s, so the worker releases its tasks and leaves).
    assert_eq!(w1.terminate().await?, Some(0));
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM workers ORDER BY id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(left, ["ops-sched"]);
    assert_eq!(scheduler.terminate().await?, Some(0));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM workers")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 0);
    let out = bizq(&pool, Some(&config_path), &["workers"]).await.stdout;
    assert!(
        out.contains("no worker or scheduler is registered"),
        "{out}"
    );
    Ok(())
}
