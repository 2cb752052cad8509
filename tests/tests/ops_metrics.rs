//! Metrics and health of real processes: `/metrics` scraped during a fleet run matches the
//! rows, `/readyz` turns false during a SIGTERM drain while the worker still exits 0, and
//! `--log-format json` lines about a task carry its id and workspace id. The queue gauges are
//! a sample shared by every scrape of an interval (issue 16, finding 7), counted in the
//! database's own statistics.

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
        ("ops.metrics_sample_max_age_ms", "200"),
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

    // The queue gauges are a sample at most ops.metrics_sample_max_age_ms (200 ms here) old.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&sched_addr).await?;
        let settled = sum(&m, "bizq_queue_depth", &["status=\"queued\""]) == 0.0
            && sum(
                &m,
                "bizq_workers",
                &["role=\"worker\"", "state=\"running\""],
            ) == 2.0;
        if settled || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        sum(&m, "bizq_queue_sample_age_seconds", &[]) < 10.0,
        "{m:?}"
    );
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

/// Pins the provider metrics of a real `bizq-worker` against two `wiremock` stand-ins (one
/// OpenAI-style, one Anthropic-style): calls by provider, model and outcome equal the
/// requests each stand-in received, the two 429s it answered are counted as `rate_limited`
/// (and as errors with status 429), the one 500 as a `provider_error`, latency observations
/// equal the calls, and tokens (input, cached, cache writes, output) and credits per provider
/// equal the sums of the completed rows' `cost_breakdown` and `actual_cost`.
#[sqlx::test(migrations = "../migrations")]
async fn provider_metrics_match_the_stand_ins_and_the_rows(pool: PgPool) -> anyhow::Result<()> {
    use bizq_tests::stand_in::{
        ai_task, anthropic_answer, model, openai_answer, provider, set_key,
    };
    use serde_json::json;
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let openai = MockServer::start().await;
    let anthropic = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("[429]"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after-ms", "50")
                .set_body_json(json!({"error": {"message": "slow down", "type": "requests"}})),
        )
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&openai)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("[500]"))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream hiccup"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&openai)
        .await;
    Mock::given(method("POST"))
        .respond_with(openai_answer("from openai", 120, 40, 15, "stop"))
        .with_priority(2)
        .mount(&openai)
        .await;
    Mock::given(method("POST"))
        .respond_with(anthropic_answer(
            &["from ", "anthropic"],
            50,
            20,
            300,
            7,
            "end_turn",
        ))
        .mount(&anthropic)
        .await;
    set_key("BIZQ_T_PM_OPENAI", "sk-pm-openai-key-0100");
    set_key("BIZQ_T_PM_ANTHROPIC", "sk-pm-anthropic-key-0101");
    let config = format!(
        "{}\n{}{}{}{}",
        config_toml(&[("retry.base_ms", "10"), ("retry.max_ms", "200")]),
        provider(
            "openai",
            "openai",
            &openai.uri(),
            "BIZQ_T_PM_OPENAI",
            "rpm = 6000"
        ),
        provider(
            "anthropic",
            "anthropic",
            &anthropic.uri(),
            "BIZQ_T_PM_ANTHROPIC",
            ""
        ),
        model("o-mini", "openai", 400.0, 100.0, 1600.0, ""),
        model("c-sonnet", "anthropic", 300.0, 300.0, 1500.0, ""),
    );
    let ws = workspace(&pool, 1_000_000).await?;
    let mut ids = Vec::new();
    for prompt in ["a", "b", "c", "d", "[429] e", "[429] f", "[500] g"] {
        let input = json!({"prompt": prompt, "max_tokens": 20});
        ids.push(ai_task(&pool, ws, input, None, Some("o-mini")).await?);
    }
    for prompt in ["h", "i", "j"] {
        let input = json!({"prompt": prompt, "max_tokens": 20});
        ids.push(ai_task(&pool, ws, input, None, Some("c-sonnet")).await?);
    }
    let url = url_of(&pool);
    let scheduler = Process::start("scheduler", &url, &config, &[])?;
    let worker = Process::start(
        "worker",
        &url,
        &config,
        &["--metrics-addr", "127.0.0.1:0", "--id", "pm-worker"],
    )?;
    let addr = metrics_addr_of(&pool, "pm-worker").await?;
    wait_for(
        &pool,
        "SELECT count(*) = 10 FROM tasks WHERE status = 'completed'",
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_text()))?;
    let m = scrape(&addr).await?;

    let to_openai = openai.received_requests().await.map_or(0, |r| r.len()) as f64;
    let to_anthropic = anthropic.received_requests().await.map_or(0, |r| r.len()) as f64;
    assert_eq!(to_openai, 10.0, "7 answers, 2 429s, 1 500");
    assert_eq!(to_anthropic, 3.0);
    let calls = |labels: &[&str]| sum(&m, "bizq_provider_calls_total", labels);
    let openai_l = "provider=\"openai\"";
    let anthropic_l = "provider=\"anthropic\"";
    assert_eq!(calls(&[openai_l]), to_openai, "{m:?}");
    assert_eq!(calls(&[anthropic_l]), to_anthropic);
    assert_eq!(
        calls(&[openai_l, "model=\"o-mini\"", "outcome=\"ok\""]),
        7.0
    );
    assert_eq!(calls(&[openai_l, "outcome=\"rate_limited\""]), 2.0);
    assert_eq!(calls(&[openai_l, "outcome=\"error\""]), 1.0);
    assert_eq!(
        calls(&[anthropic_l, "model=\"c-sonnet\"", "outcome=\"ok\""]),
        3.0
    );
    let errors = |labels: &[&str]| sum(&m, "bizq_provider_errors_total", labels);
    assert_eq!(errors(&["code=\"rate_limited\"", "status=\"429\""]), 2.0);
    assert_eq!(errors(&["code=\"provider_error\"", "status=\"500\""]), 1.0);
    assert_eq!(errors(&[]), 3.0);
    assert_eq!(
        sum(&m, "bizq_provider_latency_seconds_count", &[]),
        to_openai + to_anthropic
    );

    // Tokens and credits against the completed rows, provider by provider.
    for p in ["openai", "anthropic"] {
        let row: (f64, f64, f64, f64, f64) = sqlx::query_as(
            "SELECT sum((cost_breakdown ->> 'input_tokens')::float8),
                    sum((cost_breakdown ->> 'cached_input_tokens')::float8),
                    sum((cost_breakdown ->> 'cache_write_tokens')::float8),
                    sum((cost_breakdown ->> 'output_tokens')::float8),
                    sum(actual_cost)::float8
               FROM tasks
              WHERE status = 'completed' AND ai_provider = $1",
        )
        .bind(p)
        .fetch_one(&pool)
        .await?;
        let label = format!("provider=\"{p}\"");
        let tokens = |kind: &str| {
            sum(
                &m,
                "bizq_provider_tokens_total",
                &[&label, &format!("kind=\"{kind}\"")],
            )
        };
        let got = (
            tokens("input"),
            tokens("cached_input"),
            tokens("cache_write"),
            tokens("output"),
            sum(&m, "bizq_provider_credits_total", &[&label]),
        );
        assert_eq!(got, row, "{p}: tokens and credits against the rows");
        assert!(row.0 > 0.0 && row.4 > 0.0, "{p}: {row:?}");
    }
    assert_eq!(
        sum(&m, "bizq_provider_credits_total", &[]),
        sum(&m, "bizq_credits_charged_total", &[]),
        "every priced answer was charged"
    );
    let text = get(&addr, "/metrics").await?.body;
    assert!(!text.contains("sk-pm-"), "a key in the metrics");
    assert_eq!(worker.terminate().await?, Some(0));
    assert_eq!(scheduler.terminate().await?, Some(0));
    Ok(())
}

/// Scans of `tasks` (sequential and index) in the statistics of the database, after the
/// single connection of `pool` flushed its own: every query of the test and of the sampler
/// runs on that connection, so the difference between two readings is what they did.
async fn task_scans(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await?;
    Ok(sqlx::query_scalar(
        "SELECT (seq_scan + COALESCE(idx_scan, 0))::bigint
           FROM pg_stat_user_tables
          WHERE relid = 'tasks'::regclass",
    )
    .fetch_one(pool)
    .await?)
}

/// `n` scrapes of `addr` at once; each one's pending depth.
async fn scrape_burst(addr: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let addr = addr.to_string();
        set.spawn(async move { scrape(&addr).await });
    }
    let mut depths = Vec::new();
    while let Some(m) = set.join_next().await {
        depths.push(sum(&m??, "bizq_queue_depth", &["status=\"pending\""]));
    }
    Ok(depths)
}

/// A `/metrics` listener serving the scheduler's queue gauges from `pool`, sampled at most
/// once per `max_age_ms`.
async fn queue_listener(pool: &PgPool, max_age_ms: u64) -> anyhow::Result<String> {
    let ops = bizq::config::OpsConfig {
        metrics_sample_max_age_ms: max_age_ms,
        ..Default::default()
    };
    let sampler = bizq::metrics::QueueSampler::new(pool.clone(), ops).into_sampler();
    let addr = bizq::health::serve(
        "127.0.0.1:0",
        pool.clone(),
        tokio_util::sync::CancellationToken::new(),
        Some(sampler),
    )
    .await?;
    Ok(addr.to_string())
}

/// Pins finding 7's `/metrics`: the eight counts behind the queue gauges run at most once per
/// `ops.metrics_sample_max_age_ms`, however many scrapes arrive. Measured as scans of `tasks`
/// in pg_stat_user_tables: one sample costs at least eight (one per count); ten concurrent
/// scrapes finding no sample cost one sample, forty more within the interval none, where
/// forty with no cache (max age 0) cost forty samples. With a short interval the gauges follow the table (a new
/// task shows once the sample is older than the interval) and, over a measured stretch of
/// back-to-back scrapes, samples are never more than one per interval, plus the first.
#[sqlx::test(migrations = "../migrations")]
async fn scrapes_share_one_queue_sample_per_interval(pool: PgPool) -> anyhow::Result<()> {
    let options = pool.connect_options().as_ref().clone();
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let ws = workspace(&one, 1_000_000).await?;
    for i in 0..5 {
        generate(&one, ws, &format!("waiting {i}"), 5, &[]).await?;
    }
    let pending: f64 = scalar(
        &one,
        "SELECT count(*)::float8 FROM tasks WHERE status = 'pending'",
    )
    .await?;
    assert_eq!(pending, 5.0);

    // One sample, from a listener with no cache (max age 0): what it costs.
    let uncached = queue_listener(&one, 0).await?;
    let s0 = task_scans(&one).await?;
    assert_eq!(scrape_burst(&uncached, 1).await?, [5.0]);
    let per_sample = task_scans(&one).await? - s0;
    assert!(
        per_sample >= 8,
        "one sample scanned tasks {per_sample} times"
    );

    // With the default kind of interval: ten scrapes at once find no sample, and share one.
    let cached = queue_listener(&one, 60_000).await?;
    let s1 = task_scans(&one).await?;
    assert!(scrape_burst(&cached, 10).await?.iter().all(|d| *d == 5.0));
    let s2 = task_scans(&one).await?;
    assert_eq!(
        s2 - s1,
        per_sample,
        "ten concurrent first scrapes, not one sample"
    );
    // Forty more within the interval, ten at a time: no count runs again.
    for _ in 0..4 {
        assert!(scrape_burst(&cached, 10).await?.iter().all(|d| *d == 5.0));
    }
    let s3 = task_scans(&one).await?;
    assert_eq!(s3 - s2, 0, "40 scrapes within the interval scanned tasks");
    let m = scrape(&cached).await?;
    let age = sum(&m, "bizq_queue_sample_age_seconds", &[]);
    assert!((0.0..60.0).contains(&age), "sample age {age}");

    // The same forty scrapes with no cache: forty samples (the measure can tell).
    let s4 = task_scans(&one).await?;
    for _ in 0..4 {
        scrape_burst(&uncached, 10).await?;
    }
    let s5 = task_scans(&one).await?;
    assert!(
        s5 - s4 >= 40 * per_sample,
        "40 uncached scrapes scanned tasks {} times (one sample: {per_sample})",
        s5 - s4
    );

    // A short interval: the gauges follow the table, never more than once per interval.
    let short = Duration::from_millis(300);
    let fresh = queue_listener(&one, short.as_millis() as u64).await?;
    let samples = |m: &BTreeMap<String, f64>| sum(m, "bizq_queue_samples_total", &[]);
    let before = samples(&scrape(&fresh).await?);
    generate(&one, ws, "one more", 5, &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrape_burst(&fresh, 1).await? != [6.0] {
        assert!(Instant::now() < deadline, "the sample never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s6 = task_scans(&one).await?;
    let started = Instant::now();
    let mut scrapes = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        scrape_burst(&fresh, 3).await?;
        scrapes += 3;
    }
    let elapsed = started.elapsed();
    let s7 = task_scans(&one).await?;
    let taken = (s7 - s6) / per_sample;
    let allowed = (elapsed.as_millis() / short.as_millis()) as i64 + 1;
    assert!(
        (1..=allowed).contains(&taken),
        "{scrapes} scrapes in {elapsed:?} took {taken} samples (at most {allowed})"
    );
    // The exporter's own count agrees that samples were taken (and far fewer than scrapes).
    let after = samples(&scrape(&fresh).await?);
    assert!(
        after > before && after - before < f64::from(scrapes),
        "{before} -> {after}"
    );
    one.close().await;
    Ok(())
}
