//! The providers through the real binaries and an in-process fleet: configuration mistakes
//! stop `bizq-worker` at start-up, API keys never reach a log line, `error_details` or the
//! CLI (`bizq providers` shows a park and why), and cancelling a task aborts its in-flight
//! HTTP call. Two worker processes share one fleet-wide rate budget.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bizq::lifecycle;
use bizq_tests::engine::*;
use bizq_tests::stand_in::*;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const T: Duration = Duration::from_secs(30);

/// A `bizq-worker` child with `config` and the given environment; its output goes to a file.
fn spawn_worker(
    url: &str,
    config: &str,
    env: &[(&str, &str)],
    rust_log: &str,
) -> anyhow::Result<(tokio::process::Child, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("bizq-prov-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("config.toml");
    std::fs::write(&path, config)?;
    let log = dir.join("worker.log");
    let file = std::fs::File::create(&log)?;
    let mut cmd = tokio::process::Command::new(binary("bizq-worker"));
    cmd.arg("--config")
        .arg(&path)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok((cmd.spawn()?, log))
}

/// Exit code and output of a worker that must stop on its own.
async fn run_to_exit(
    url: &str,
    config: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(i32, String)> {
    let (mut child, log) = spawn_worker(url, config, env, "info,sqlx=warn")?;
    let status = tokio::time::timeout(T, child.wait()).await??;
    Ok((status.code().unwrap_or(-1), std::fs::read_to_string(log)?))
}

/// Start-up validation: a model without prices, a model naming an unknown provider, and a
/// key variable that is not set each stop the worker with a configuration error naming the
/// problem (never a key).
#[sqlx::test(migrations = "../migrations")]
async fn configuration_mistakes_stop_the_worker_at_start_up(pool: PgPool) -> anyhow::Result<()> {
    let url = url_of(&pool);
    let p = provider(
        "openai",
        "openai",
        "http://127.0.0.1:9",
        "BIZQ_T_PROC_KEY",
        "",
    );
    let unpriced = config_text(
        &[],
        &format!("{p}[models.\"free\"]\nprovider = \"openai\"\noutput_usd_per_mtok = 1.0\n"),
    );
    let (code, out) = run_to_exit(&url, &unpriced, &[("BIZQ_T_PROC_KEY", "k")]).await?;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("models.\"free\" has no input_usd_per_mtok"),
        "{out}"
    );

    let orphan = config_text(&[], &model("m", "nowhere", 1.0, 1.0, 1.0, ""));
    let (code, out) = run_to_exit(&url, &orphan, &[]).await?;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("'nowhere', which is not a configured provider"),
        "{out}"
    );

    let keyless = config_text(
        &[],
        &format!("{p}{}", model("m", "openai", 1.0, 1.0, 1.0, "")),
    );
    let (code, out) = run_to_exit(&url, &keyless, &[]).await?;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("BIZQ_T_PROC_KEY, which is not set"), "{out}");
    Ok(())
}

const CANARY: &str = "sk-bizq-canary-7f3e9a1c5b2d4e6f8a0b";

/// API keys stay secret: the stand-in echoes the key back in a 400 body and a 401 body (as
/// real providers do with "Incorrect API key provided: sk-…"), the worker runs with debug
/// logging, and the key appears in no worker log line, no `error_details`, and no output of
/// `bizq inspect` / `bizq list`.
#[sqlx::test(migrations = "../migrations")]
async fn the_api_key_never_appears_in_logs_details_or_cli(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    let echo = format!("Incorrect API key provided: {CANARY}. You can find your key at …");
    Mock::given(method("POST"))
        .and(body_string_contains("bad input"))
        .respond_with(openai_error(400, &echo, "invalid_request_error"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(openai_error(401, &echo, "invalid_api_key"))
        .mount(&server)
        .await;
    let config = config_text(
        &[("worker.default_max_attempts", "1")],
        &format!(
            "{}{}",
            provider("openai", "openai", &server.uri(), "BIZQ_T_CANARY_KEY", ""),
            model("m", "openai", 1.0, 1.0, 1.0, "")
        ),
    );
    let ws = workspace(&pool, 100).await?;
    let bad = ai_task(&pool, ws, json!({"prompt": "bad input"}), None, Some("m")).await?;
    let auth = ai_task(&pool, ws, json!({"prompt": "anything"}), None, Some("m")).await?;
    let url = url_of(&pool);
    let scheduler = Process::start("scheduler", &url, &config, &[])?;
    let (mut worker, log) = spawn_worker(
        &url,
        &config,
        &[("BIZQ_T_CANARY_KEY", CANARY)],
        "debug,sqlx=warn",
    )?;
    wait_status(&pool, bad, "failed", T).await?;
    wait_for(
        &pool,
        "SELECT bool_and(wait_reason = 'provider_unavailable') FROM tasks WHERE status = 'pending'",
        T,
    )
    .await?;
    assert_eq!(
        task_row(&pool, auth).await?.wait_reason.as_deref(),
        Some("provider_unavailable")
    );
    // The stand-in really did get the key, so there was something to leak.
    let sent = server.received_requests().await.expect("recording");
    assert!(sent.iter().all(|r| {
        r.headers
            .get("authorization")
            .is_some_and(|v| v.to_str().is_ok_and(|s| s == format!("Bearer {CANARY}")))
    }));

    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().unwrap_or(0).to_string())
        .status();
    tokio::time::timeout(T, worker.wait()).await??;
    scheduler.terminate().await?;
    let worker_log = std::fs::read_to_string(&log)?;
    assert!(
        worker_log.contains("provider parked"),
        "the log is the one we think: {worker_log}"
    );
    assert!(
        !worker_log.contains(CANARY),
        "key in the worker log:\n{worker_log}"
    );
    assert!(
        !worker_log.contains("7f3e9a1c5b2d4e6f8a0b"),
        "key fragment in the worker log"
    );

    let details: Vec<String> =
        sqlx::query_scalar("SELECT COALESCE(error_details::text, '') FROM tasks")
            .fetch_all(&pool)
            .await?;
    assert!(
        details
            .iter()
            .any(|d| d.contains("Incorrect API key provided")),
        "{details:?}"
    );
    for d in &details {
        assert!(
            !d.contains(CANARY) && !d.contains("7f3e9a1c5b2d4e6f8a0b"),
            "{d}"
        );
    }
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM provider_status")
        .fetch_all(&pool)
        .await?;
    assert_eq!(reasons.len(), 1);
    assert!(!reasons[0].contains(CANARY), "{reasons:?}");

    for args in [
        vec!["inspect".to_string(), bad.to_string()],
        vec!["inspect".to_string(), auth.to_string()],
        vec!["list".to_string()],
        vec!["providers".to_string()],
    ] {
        let out = std::process::Command::new(binary("bizq"))
            .arg("--database-url")
            .arg(&url)
            .args(&args)
            .env("BIZQ_T_CANARY_KEY", CANARY)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "bizq {args:?}: {text}");
        assert!(!text.contains(CANARY), "key in `bizq {args:?}`:\n{text}");
        if args[0] == "providers" {
            // `bizq providers` shows the park and why.
            assert!(
                text.contains("openai") && text.contains("provider_auth"),
                "{text}"
            );
        }
    }
    Ok(())
}

/// Cancelling a processing task aborts its HTTP call: with one slot and a stand-in that
/// would answer in 60 s, the cancelled row stays cancelled (not completed, nothing charged),
/// the worker's slot is free for the next task long before the 60 s are up, and the worker
/// counts the attempt as aborted.
#[sqlx::test(migrations = "../migrations")]
async fn cancelling_a_task_aborts_its_request(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("slow"))
        .respond_with(
            openai_answer("never seen", 10, 0, 10, "stop").set_delay(Duration::from_secs(60)),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(openai_answer("fast", 10, 0, 10, "stop"))
        .mount(&server)
        .await;
    set_key("BIZQ_T_CANCEL", "sk-cancel-key-0013");
    let config = config_over(
        &[("worker.concurrency", "1")],
        &format!(
            "{}{}",
            provider(
                "openai",
                "openai",
                &server.uri(),
                "BIZQ_T_CANCEL",
                "timeout_seconds = 120"
            ),
            model("m", "openai", 1.0, 1.0, 1.0, "")
        ),
    );
    let ws = workspace(&pool, 100).await?;
    let slow = ai_task(&pool, ws, json!({"prompt": "slow one"}), None, Some("m")).await?;
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_status(&pool, slow, "processing", T).await?;
    let deadline = std::time::Instant::now() + T;
    while server.received_requests().await.map_or(0, |r| r.len()) == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    assert_eq!(lifecycle::cancel(&pool, slow, "test").await?, "processing");
    let fast = ai_task(&pool, ws, json!({"prompt": "fast one"}), None, Some("m")).await?;
    wait_status(&pool, fast, "completed", T).await?;
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "the only slot was freed before the slow answer could arrive"
    );
    let stats = fleet.shutdown().await?;
    assert_eq!((stats[0].aborted, stats[0].completed), (1, 1), "{stats:?}");
    let row = task_row(&pool, slow).await?;
    assert_eq!((row.status.as_str(), row.actual_cost), ("cancelled", None));
    assert_eq!(
        credits(&pool, ws).await?.balance,
        99,
        "only the fast task is charged"
    );
    Ok(())
}

/// A stand-in that answers every call alike and records when each arrived.
struct Clocked {
    at: Arc<Mutex<Vec<Instant>>>,
    answer: ResponseTemplate,
}

impl Respond for Clocked {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.at.lock().expect("not poisoned").push(Instant::now());
        self.answer.clone()
    }
}

/// Fleet-wide rate budget: two `bizq-worker` processes (16 slots each) share `rpm = 120`
/// through PostgreSQL. Counted at the stand-in, no 10-second window gets more than its share
/// (20, plus the one-request burst), the 40 calls take at least the ~19.5 s the budget
/// allows (unbudgeted, they all go in about a second), and tasks refused a take snooze
/// without using an attempt.
#[sqlx::test(migrations = "../migrations")]
async fn two_workers_share_one_rpm_budget(pool: PgPool) -> anyhow::Result<()> {
    let server = MockServer::start().await;
    let at = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .respond_with(Clocked {
            at: at.clone(),
            answer: openai_answer("paced", 10, 0, 10, "stop"),
        })
        .mount(&server)
        .await;
    let config = config_text(
        &[],
        &format!(
            "{}{}",
            provider(
                "openai",
                "openai",
                &server.uri(),
                "BIZQ_T_RPM_KEY",
                "rpm = 120"
            ),
            model("m", "openai", 1.0, 1.0, 1.0, "")
        ),
    );
    let ws = workspace(&pool, 10_000).await?;
    const N: usize = 40;
    for i in 0..N {
        ai_task(
            &pool,
            ws,
            json!({"prompt": format!("p{i}"), "max_tokens": 10}),
            None,
            Some("m"),
        )
        .await?;
    }
    let url = url_of(&pool);
    let scheduler = Process::start("scheduler", &url, &config, &[])?;
    let env = [("BIZQ_T_RPM_KEY", "sk-rpm-key-0014")];
    let (mut w1, _) = spawn_worker(&url, &config, &env, "info,sqlx=warn")?;
    let (mut w2, _) = spawn_worker(&url, &config, &env, "info,sqlx=warn")?;
    wait_for(
        &pool,
        "SELECT count(*) = 40 FROM tasks WHERE status = 'completed'",
        Duration::from_secs(120),
    )
    .await?;
    for w in [&mut w1, &mut w2] {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(w.id().unwrap_or(0).to_string())
            .status();
        tokio::time::timeout(T, w.wait()).await??;
    }
    scheduler.terminate().await?;

    let mut times = at.lock().expect("not poisoned").clone();
    times.sort();
    assert_eq!(times.len(), N, "one call per task");
    let worst = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(10))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        worst <= 21,
        "{worst} calls in one 10 s window; the budget allows 20 (+1 burst)"
    );
    let span = times[N - 1] - times[0];
    assert!(
        span >= Duration::from_millis(19_000),
        "40 calls in {span:?}: over budget"
    );
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT attempt FROM tasks")
        .fetch_all(&pool)
        .await?;
    assert_eq!(attempts, vec![1], "waiting for the budget used no attempt");
    Ok(())
}
