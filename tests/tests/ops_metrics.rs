//! Metrics and health of real processes: `/metrics` scraped during a fleet run matches the
//! rows, `/readyz` turns false during a SIGTERM drain while the worker still exits 0, and
//! `--log-format json` lines about a task carry its id and workspace id.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bizq_tests::engine::*;
use bizq_tests::ops::{get, metrics_addr_of, parse_metrics, sum};
use sqlx::PgPool;

async fn scrape(addr: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let r = get(addr, "/metrics").await?;
    anyhow::ensure!(r.status == 200, "GET /metrics: {r:?}");
    Ok(parse_metrics(&r.body))
}

async fn scalar(pool: &PgPool, sql: &'static str) -> anyhow::Result<f64> {
    let v: Option<f64> = sqlx::query_scalar(sql).fetch_one(pool).await?;
    Ok(v.unwrap_or(0.0))
}

/// What the workers' counters must equal, read from the rows.
#[derive(Debug, PartialEq)]
struct Facts {
    completed_growth: f64,
    completed_starter: f64,
    failed_starter: f64,
    failed_growth: f64,
    retried: f64,
    claimed: f64,
    charged: f64,
}

async fn facts_from_rows(pool: &PgPool) -> anyhow::Result<Facts> {
    Ok(Facts {
        completed_growth: scalar(pool, "SELECT count(*)::float8 FROM tasks t JOIN workspaces w ON w.id = t.workspace_id WHERE t.status = 'completed' AND w.plan = 'growth'").await?,
        completed_starter: scalar(pool, "SELECT count(*)::float8 FROM tasks t JOIN workspaces w ON w.id = t.workspace_id WHERE t.status = 'completed' AND w.plan = 'starter'").await?,
        failed_starter: scalar(pool, "SELECT count(*)::float8 FROM tasks t JOIN workspaces w ON w.id = t.workspace_id WHERE t.status = 'failed' AND w.plan = 'starter'").await?,
        failed_growth: scalar(pool, "SELECT count(*)::float8 FROM tasks t JOIN workspaces w ON w.id = t.workspace_id WHERE t.status = 'failed' AND w.plan = 'growth'").await?,
        // Every attempt before the last one of a finished task was a transient failure.
        retried: scalar(pool, "SELECT sum(attempt - 1)::float8 FROM tasks WHERE status IN ('completed', 'failed')").await?,
        claimed: scalar(pool, "SELECT sum(attempt)::float8 FROM tasks WHERE status IN ('completed', 'failed')").await?,
        charged: scalar(pool, "SELECT sum(actual_cost)::float8 FROM tasks WHERE status = 'completed'").await?,
    })
}

fn facts_from_metrics(m: &BTreeMap<String, f64>) -> Facts {
    let growth = "plan=\"growth\"";
    let starter = "plan=\"starter\"";
    Facts {
        completed_growth: sum(m, "bizq_tasks_completed_total", &[growth]),
        completed_starter: sum(m, "bizq_tasks_completed_total", &[starter]),
        failed_starter: sum(m, "bizq_tasks_failed_total", &[starter]),
        failed_growth: sum(m, "bizq_tasks_failed_total", &[growth]),
        retried: sum(m, "bizq_tasks_retried_total", &[]),
        claimed: sum(m, "bizq_tasks_claimed_total", &["type=\"ai.generate\""]),
        charged: sum(m, "bizq_credits_charged_total", &[]),
    }
}

/// Adds up the same series of several processes.
fn merge(all: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for m in all {
        for (k, v) in m {
            *out.entry(k.clone()).or_insert(0.0) += v;
        }
    }
    out
}

/// Pins the worker's counters (claimed / completed / failed / retried by type and plan,
/// credits charged), its histograms (task duration, pickup latency, claim batch sizes) and
/// slot gauge, and the scheduler's queue gauges (depth by status, blocked, workers by
/// state): each scraped from real processes and compared with the rows. Labels carry the
/// plan, never a workspace id.
#[sqlx::test(migrations = "../migrations")]
async fn metrics_scraped_from_a_running_fleet_match_the_rows(pool: PgPool) -> anyhow::Result<()> {
    let growth = workspace(&pool, 1_000_000).await?;
    let starter = workspace(&pool, 1_000_000).await?;
    sqlx::query("UPDATE workspaces SET plan = 'growth' WHERE id = $1")
        .bind(growth)
        .execute(&pool)
        .await?;
    for i in 0..40 {
        generate(&pool, growth, &format!("growth {i}"), 5, &[]).await?;
    }
    for i in 0..30 {
        let prompt = if i < 5 {
            format!("[reject] starter {i}")
        } else {
            format!("starter {i}")
        };
        generate(&pool, starter, &prompt, 5, &[]).await?;
    }
    // One task due tomorrow and one waiting for it: pending, and blocked.
    let later = bizq::lifecycle::NewTask {
        scheduled_for: Some(chrono::Utc::now() + chrono::Duration::days(1)),
        ..bizq::lifecycle::NewTask::generate(starter, "tomorrow")
    };
    let later = bizq::lifecycle::enqueue(&pool, &later).await?;
    generate(&pool, starter, "after tomorrow", 5, &[later]).await?;

    let url = url_of(&pool);
    let config = config_toml(&[
        ("providers.mock.failure_rate", "0.2"),
        ("providers.mock.latency_ms", "5"),
        ("retry.base_ms", "10"),
        ("retry.max_ms", "50"),
        ("worker.concurrency", "4"),
    ]);
    let metrics = ["--metrics-addr", "127.0.0.1:0"];
    let scheduler = Process::start(
        "scheduler",
        &url,
        &config,
        &[&metrics[..], &["--id", "m-sched"]].concat(),
    )?;
    let sched_addr = metrics_addr_of(&pool, "m-sched").await?;
    wait_for(
        &pool,
        "SELECT count(*) = 70 FROM tasks WHERE status = 'queued'",
        Duration::from_secs(30),
    )
    .await?;
    let m = scrape(&sched_addr).await?;
    assert_eq!(
        sum(&m, "bizq_queue_depth", &["status=\"queued\""]),
        70.0,
        "{m:?}"
    );
    assert_eq!(sum(&m, "bizq_queue_depth", &["status=\"pending\""]), 2.0);
    assert_eq!(sum(&m, "bizq_queue_depth", &["status=\"processing\""]), 0.0);
    assert_eq!(sum(&m, "bizq_queue_blocked", &[]), 1.0);
    assert!(sum(&m, "bizq_queue_oldest_queued_seconds", &[]) > 0.0);
    assert_eq!(
        sum(
            &m,
            "bizq_workers",
            &["role=\"scheduler\"", "state=\"running\""]
        ),
        1.0
    );
    // The pass counts what it admitted when it ends, just after the admission committed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut m = m;
    while sum(&m, "bizq_tasks_admitted_total", &["outcome=\"queued\""]) != 70.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = scrape(&sched_addr).await?;
    }
    assert_eq!(
        sum(&m, "bizq_tasks_admitted_total", &["outcome=\"queued\""]),
        70.0
    );

    let mut workers = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let id = format!("m-worker-{i}");
        workers.push(Process::start(
            "worker",
            &url,
            &config,
            &[&metrics[..], &["--id", &id]].concat(),
        )?);
        addrs.push(metrics_addr_of(&pool, &id).await?);
    }
    wait_for(
        &pool,
        "SELECT count(*) = 70 FROM tasks WHERE status IN ('completed', 'failed')",
        Duration::from_secs(120),
    )
    .await?;
    let rows = facts_from_rows(&pool).await?;
    assert!(
        rows.completed_growth > 30.0 && rows.failed_starter >= 5.0 && rows.retried > 0.0,
        "{rows:?}"
    );
    // Claimed counts are recorded just after the claim (they need the plan): poll briefly.
    let deadline = Instant::now() + Duration::from_secs(20);
    let merged = loop {
        let mut all = Vec::new();
        for a in &addrs {
            all.push(scrape(a).await?);
        }
        let merged = merge(&all);
        let settled = facts_from_metrics(&merged) == rows
            && sum(&merged, "bizq_worker_in_flight", &[]) == 0.0;
        if settled || Instant::now() > deadline {
            break merged;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        facts_from_metrics(&merged),
        rows,
        "worker counters against the rows"
    );
    assert_eq!(
        sum(
            &merged,
            "bizq_task_duration_seconds_count",
            &["outcome=\"completed\""]
        ),
        rows.completed_growth + rows.completed_starter
    );
    assert_eq!(
        sum(&merged, "bizq_task_pickup_latency_seconds_count", &[]),
        rows.claimed
    );
    assert_eq!(sum(&merged, "bizq_claim_batch_size_sum", &[]), rows.claimed);
    assert_eq!(
        sum(&merged, "bizq_result_batch_size_sum", &[]),
        rows.claimed
    );
    assert_eq!(sum(&merged, "bizq_worker_slots", &[]), 8.0);
    assert_eq!(sum(&merged, "bizq_worker_in_flight", &[]), 0.0);

    let m = scrape(&sched_addr).await?;
    assert_eq!(sum(&m, "bizq_queue_depth", &["status=\"queued\""]), 0.0);
    assert_eq!(
        sum(
            &m,
            "bizq_workers",
            &["role=\"worker\"", "state=\"running\""]
        ),
        2.0
    );
    // Bounded labels: no workspace id anywhere.
    for a in addrs.iter().chain([&sched_addr]) {
        let text = get(a, "/metrics").await?.body;
        for ws in [growth, starter] {
            assert!(
                !text.contains(&ws.to_string()),
                "a workspace id in the metrics of {a}"
            );
        }
    }
    for p in workers.into_iter().chain([scheduler]) {
        let log = p.log_text();
        assert_eq!(p.terminate().await?, Some(0), "{log}");
    }
    Ok(())
}

/// Pins `/readyz` following the SIGTERM token: ready while working, 503 "shutting down" for
/// the whole drain while `/healthz` stays 200 and the `workers` row reads `draining`; the
/// running task still completes within the grace period and the process exits 0.
#[sqlx::test(migrations = "../migrations")]
async fn readyz_turns_false_during_the_sigterm_drain_and_the_worker_exits_0(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let id = generate(&pool, ws, "slow", 5, &[]).await?;
    let url = url_of(&pool);
    let config = config_toml(&[
        ("providers.mock.latency_ms", "4000"),
        ("worker.shutdown_grace_seconds", "60"),
        ("worker.task_timeout_seconds", "60"),
    ]);
    let scheduler = Process::start("scheduler", &url, &config, &[])?;
    let mut worker = Process::start(
        "worker",
        &url,
        &config,
        &["--id", "drainer", "--metrics-addr", "127.0.0.1:0"],
    )?;
    let addr = metrics_addr_of(&pool, "drainer").await?;
    wait_for(
        &pool,
        "SELECT count(*) = 1 FROM tasks WHERE status = 'processing'",
        Duration::from_secs(30),
    )
    .await?;
    // Ready needs the LISTEN connection up: poll, it comes up right after start.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&addr, "/readyz").await?;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {r:?}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&addr, "/healthz").await?.status, 200);

    worker.signal("-TERM")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let drained = loop {
        let r = get(&addr, "/readyz").await?;
        if r.status == 503 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "still ready after SIGTERM: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(drained.body.contains("shutting down"), "{drained:?}");
    // Observed mid-drain: the process is alive, the task still running, liveness fine.
    assert!(
        worker.child.try_wait()?.is_none(),
        "the worker exited before the drain was seen"
    );
    assert_eq!(status(&pool, id).await?, "processing");
    assert_eq!(get(&addr, "/healthz").await?.status, 200);
    wait_for(
        &pool,
        "SELECT state = 'draining' FROM workers WHERE id = 'drainer'",
        Duration::from_secs(10),
    )
    .await?;

    let code = tokio::time::timeout(Duration::from_secs(60), worker.child.wait())
        .await??
        .code();
    assert_eq!(code, Some(0), "{}", worker.log_text());
    assert_eq!(
        status(&pool, id).await?,
        "completed",
        "finished within the grace period"
    );
    assert_eq!(scheduler.terminate().await?, Some(0));
    Ok(())
}

/// Pins `--log-format json`: every line the worker writes is one JSON object, and a line
/// about a task (an admin cancel aborting its run) names the task and its workspace.
#[sqlx::test(migrations = "../migrations")]
async fn json_log_lines_about_a_task_carry_its_id_and_workspace_id(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let id = generate(&pool, ws, "to be cancelled", 5, &[]).await?;
    let url = url_of(&pool);
    let config = config_toml(&[("providers.mock.latency_ms", "30000")]);
    let scheduler = Process::start("scheduler", &url, &config, &[])?;
    let worker = Process::start("worker", &url, &config, &["--log-format", "json"])?;
    wait_for(
        &pool,
        "SELECT count(*) = 1 FROM tasks WHERE status = 'processing'",
        Duration::from_secs(30),
    )
    .await?;
    bizq::lifecycle::cancel(&pool, id, "test").await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let line = loop {
        let log = worker.log_text();
        if let Some(l) = log.lines().find(|l| l.contains("cancelled by an admin")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no abort line:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(v["fields"]["task"], id.to_string(), "{line}");
    assert_eq!(v["fields"]["workspace"], ws.to_string(), "{line}");
    let log = worker.log_text();
    assert_eq!(worker.terminate().await?, Some(0));
    assert_eq!(scheduler.terminate().await?, Some(0));
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(l);
        assert!(parsed.is_ok(), "not JSON: {l}");
    }
    Ok(())
}
