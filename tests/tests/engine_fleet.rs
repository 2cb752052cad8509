//! The fleet as ops run it: real `bizq-scheduler` and `bizq-worker` processes against one
//! PostgreSQL — many of each, a worker killed with SIGKILL, the database restarted.

use std::time::Duration;

use bizq_tests::engine::*;
use sqlx::PgPool;
use uuid::Uuid;

/// Logs every transition into `completed`, so "completed exactly once" is counted, not assumed.
async fn audit_completions(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE completion_log (task_id uuid NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION log_completion() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO completion_log (task_id) VALUES (NEW.id); RETURN NULL; END $$;
         CREATE TRIGGER zz_log_completion AFTER UPDATE OF status ON tasks FOR EACH ROW
           WHEN (NEW.status = 'completed' AND OLD.status IS DISTINCT FROM 'completed')
           EXECUTE FUNCTION log_completion();",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Every completed task was completed once, and each workspace was charged exactly the sum of
/// its completed tasks' actual_cost (balance and credits_used_this_month alike).
async fn assert_charged_once(pool: &PgPool, start_balance: i32) -> anyhow::Result<i64> {
    let (log, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT task_id) FROM completion_log")
            .fetch_one(pool)
            .await?;
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'completed'")
            .fetch_one(pool)
            .await?;
    assert_eq!(
        (log, distinct),
        (completed, completed),
        "every completion happened exactly once"
    );
    let wrong: Vec<(Uuid, i32, i32, i64)> = sqlx::query_as(
        "SELECT w.id, w.credits_balance, w.credits_used_this_month,
                COALESCE((SELECT sum(actual_cost) FROM tasks t WHERE t.workspace_id = w.id AND t.status = 'completed'), 0)
           FROM workspaces w
          WHERE w.credits_balance <> $1 - COALESCE((SELECT sum(actual_cost) FROM tasks t
                                                      WHERE t.workspace_id = w.id AND t.status = 'completed'), 0)
             OR w.credits_used_this_month <> COALESCE((SELECT sum(actual_cost) FROM tasks t
                                                        WHERE t.workspace_id = w.id AND t.status = 'completed'), 0)
             OR w.credits_reserved <> 0",
    )
    .bind(start_balance)
    .fetch_all(pool)
    .await?;
    assert!(wrong.is_empty(), "workspaces charged wrongly: {wrong:?}");
    Ok(completed)
}

#[sqlx::test(migrations = "../migrations")]
async fn two_schedulers_and_four_workers_complete_2000_tasks_exactly_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    audit_completions(&pool).await?;
    let mut workspaces = Vec::new();
    for _ in 0..4 {
        workspaces.push(workspace(&pool, 1_000_000).await?);
    }
    // 2,000 tasks: priorities 1..10, 5% of the provider calls fail transiently so retries are
    // in the mix. The first 1,000 one by one, 4 in every 50 waiting for the workspace's
    // previous task ...
    let mut last_in_workspace: Vec<Option<Uuid>> = vec![None; 4];
    for i in 0..1000usize {
        let w = i % 4;
        let deps: Vec<Uuid> = if i % 50 >= 46 {
            last_in_workspace[w].into_iter().collect()
        } else {
            Vec::new()
        };
        let id = generate(
            &pool,
            workspaces[w],
            &format!("task {i}"),
            (i % 10) as i32 + 1,
            &deps,
        )
        .await?;
        last_in_workspace[w] = Some(id);
    }
    let url = url_of(&pool);
    let config = config_toml(&[
        ("providers.mock.failure_rate", "0.05"),
        ("retry.base_ms", "20"),
    ]);
    let mut fleet = Vec::new();
    for _ in 0..2 {
        fleet.push(Process::start("scheduler", &url, &config, &[])?);
    }
    for i in 0..4 {
        fleet.push(Process::start(
            "worker",
            &url,
            &config,
            &["--id", &format!("fleet-worker-{i}")],
        )?);
    }
    // ... and 1,000 more while the fleet runs, as product code would: multi-row INSERTs that
    // span all four workspaces (their foreign-key checks lock the workspace rows that claims
    // and completions lock too).
    for chunk in 0..10 {
        sqlx::query(
            "INSERT INTO tasks (workspace_id, type, category, name, input, priority)
             SELECT ($1::uuid[])[1 + g % 4], 'ai.generate', 'content', 'bulk',
                    jsonb_build_object('prompt', 'bulk ' || g), 1 + g % 10
               FROM generate_series($2::int, $2::int + 99) g",
        )
        .bind(workspaces.clone())
        .bind(chunk * 100)
        .execute(&pool)
        .await?;
    }
    let waited = wait_for(
        &pool,
        "SELECT count(*) = 0 FROM tasks WHERE status IN ('pending', 'queued', 'processing')",
        Duration::from_secs(180),
    )
    .await;
    let mut logs = String::new();
    for p in fleet {
        logs.push_str(&p.log_text());
        assert_eq!(
            p.terminate().await?,
            Some(0),
            "every process exits 0 on SIGTERM"
        );
    }
    waited.map_err(|e| anyhow::anyhow!("{e}\nlogs:\n{logs}"))?;
    let completed = assert_charged_once(&pool, 1_000_000).await?;
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status <> 'completed'")
        .fetch_one(&pool)
        .await?;
    // With 3 attempts at 5% failure, a task fails for good with probability 1/8000.
    assert!(
        completed >= 1995 && completed + failed == 2000,
        "completed {completed}, other {failed}"
    );
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT locked_by) FROM tasks WHERE status = 'completed'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(workers, 4, "all four workers took a share");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn a_worker_killed_mid_task_loses_nothing_and_charges_nothing_twice(
    pool: PgPool,
) -> anyhow::Result<()> {
    audit_completions(&pool).await?;
    let ws = workspace(&pool, 1000).await?;
    for i in 0..8 {
        generate(&pool, ws, &format!("task {i}"), 5, &[]).await?;
    }
    let url = url_of(&pool);
    let slow = config_toml(&[
        ("providers.mock.latency_ms", "60000"),
        ("worker.concurrency", "4"),
    ]);
    let scheduler = Process::start("scheduler", &url, &config_toml(&[]), &[])?;
    let victim = Process::start("worker", &url, &slow, &["--id", "victim"])?;
    wait_for(
        &pool,
        "SELECT count(*) = 4 FROM tasks WHERE status = 'processing' AND locked_by = 'victim'",
        Duration::from_secs(30),
    )
    .await?;
    victim.signal("-KILL")?;
    let rescuer = Process::start("worker", &url, &config_toml(&[]), &["--id", "rescuer"])?;
    wait_for(
        &pool,
        "SELECT count(*) = 8 FROM tasks WHERE status = 'completed'",
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(rescuer.terminate().await?, Some(0));
    assert_eq!(scheduler.terminate().await?, Some(0));
    assert_charged_once(&pool, 1000).await?;
    let retaken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE attempt = 2 AND locked_by = 'rescuer' AND error_details ->> 'code' = 'lease_expired'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        retaken, 4,
        "the victim's four tasks were reclaimed and completed on their second attempt"
    );
    Ok(())
}

/// Runs `scripts/db.sh` for a throwaway cluster in `dir`.
fn db_sh(dir: &std::path::Path, cmd: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/db.sh"))
        .arg(cmd)
        .env_remove("DATABASE_URL")
        .env("BIZQ_PG_DIR", dir)
        .env("BIZQ_DB_NAME", "bizq_restart")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "db.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[tokio::test]
async fn the_fleet_reconnects_after_postgres_restarts() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("bizq-restart-{}", Uuid::new_v4().simple()));
    let url = db_sh(&dir, "url")?;
    let result = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        bizq::db::migrate(&pool).await?;
        let ws = workspace(&pool, 1_000_000).await?;
        for i in 0..300 {
            generate(&pool, ws, &format!("before {i}"), 5, &[]).await?;
        }
        let config = config_toml(&[("providers.mock.latency_ms", "20")]);
        let fleet = vec![
            Process::start("scheduler", &url, &config, &[])?,
            Process::start("worker", &url, &config, &[])?,
            Process::start("worker", &url, &config, &[])?,
        ];
        wait_for(
            &pool,
            "SELECT count(*) >= 50 FROM tasks WHERE status = 'completed'",
            Duration::from_secs(60),
        )
        .await?;
        db_sh(&dir, "restart")?;
        // The test's own pool reconnects too; then more work arrives.
        let mut enqueued = 0;
        while enqueued < 300 {
            match generate(&pool, ws, &format!("after {enqueued}"), 5, &[]).await {
                Ok(_) => enqueued += 1,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        wait_for(
            &pool,
            "SELECT count(*) = 600 FROM tasks WHERE status = 'completed'",
            Duration::from_secs(90),
        )
        .await?;
        for p in fleet {
            let log = p.log_text();
            assert_eq!(p.terminate().await?, Some(0), "log:\n{log}");
        }
        let stuck: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status <> 'completed'")
                .fetch_one(&pool)
                .await?;
        assert_eq!(stuck, 0);
        anyhow::Ok(())
    }
    .await;
    let _ = db_sh(&dir, "destroy");
    result
}
