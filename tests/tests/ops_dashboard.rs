//! The web dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
//! installed by scripts/ci-browser-deps.sh), driven over WebDriver with fantoccini, against a
//! real `bizq dashboard` process and a database with tasks.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bizq::lifecycle::{self, NewTask};
use bizq_tests::engine::*;
use bizq_tests::ops::{get, http};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

/// An API key in the dashboard's environment; no page may show it.
const DASH_CANARY: &str = "sk-bizq-dash-canary-4b1d7e9f2a6c8e0d";

/// A free TCP port on loopback (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// chromedriver on a free port, and a WebDriver session of headless Chromium. chromedriver
/// runs in a process group of its own, and dropping this kills the whole group, so a test
/// that fails half-way leaves no browser behind.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    profile: std::path::PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    async fn start() -> anyhow::Result<Self> {
        let port = free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("chromedriver missing ({e}): run scripts/ci-browser-deps.sh")
            })?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Up once it accepts connections (its /status keeps the connection open).
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("bizq-chromium-{}", Uuid::new_v4()));
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("chromium");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": binary,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--window-size=1100,760",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::rustls()?
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await?;
        Ok(Self {
            client,
            driver,
            profile,
        })
    }

    /// Ends the WebDriver session (Chromium quits); dropping then stops chromedriver.
    async fn close(self) -> anyhow::Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

/// A running `bizq dashboard`, and the address it printed.
struct Dashboard {
    child: tokio::process::Child,
    addr: String,
}

impl Dashboard {
    async fn start(pool: &PgPool, addr: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = tokio::process::Command::new(binary("bizq"));
        cmd.args(["dashboard", "--addr", addr, "--actor", "test-admin"])
            .env_remove("BIZQ_CONFIG")
            .env_remove("BIZQ_DASHBOARD_TOKEN")
            .env("DATABASE_URL", url_of(pool))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await??
            .unwrap_or_default();
        let addr = first
            .strip_prefix("bizq dashboard on http://")
            .and_then(|s| s.strip_suffix('/'))
            .ok_or_else(|| anyhow::anyhow!("unexpected first line: {first:?}"))?
            .to_string();
        Ok(Self { child, addr })
    }

    /// The address a browser on this machine reaches it by.
    fn local(&self) -> String {
        let port = self.addr.rsplit(':').next().unwrap_or("0");
        format!("127.0.0.1:{port}")
    }
}

/// Sets a task's status (and fields) directly, as a fixture.
async fn force(pool: &PgPool, id: Uuid, sql_set: &'static str) -> anyhow::Result<()> {
    let sql = format!("UPDATE tasks SET {sql_set} WHERE id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

struct Fixture {
    failed: Uuid,
    failed_too: Uuid,
    queued: Uuid,
    xss: Uuid,
    dependent: Uuid,
}

async fn fixture(pool: &PgPool) -> anyhow::Result<Fixture> {
    let ws: Uuid = sqlx::query_scalar(
        "INSERT INTO workspaces (name, slug, plan, credits_balance, monthly_credit_limit)
         VALUES ('Acme', 'acme', 'growth', 5000, 100000) RETURNING id",
    )
    .fetch_one(pool)
    .await?;
    let task = |name: &str, prompt: &str| {
        let mut t = NewTask::generate(ws, prompt);
        t.name = name.to_string();
        t
    };
    let failed = lifecycle::enqueue(pool, &task("broken tagline", "tagline")).await?;
    force(
        pool,
        failed,
        "status = 'failed', attempt = 3, completed_at = now(),
         error_details = '{\"code\": \"provider_error\", \"message\": \"mock answered HTTP 400\"}'",
    )
    .await?;
    let failed_too = lifecycle::enqueue(pool, &task("broken summary", "summary")).await?;
    force(
        pool,
        failed_too,
        "status = 'failed', attempt = 1, completed_at = now(),
         error_details = '{\"code\": \"bad_input\", \"message\": \"no prompt\"}'",
    )
    .await?;
    let queued = lifecycle::enqueue(pool, &task("waiting description", "describe")).await?;
    force(pool, queued, "status = 'queued'").await?;
    let xss = lifecycle::enqueue(
        pool,
        &task(
            "hostile output",
            "<img src=x onerror=\"window.__xss='input'\">",
        ),
    )
    .await?;
    force(
        pool,
        xss,
        "status = 'completed', attempt = 1, created_at = now() - interval '3 seconds',
         started_at = now() - interval '2 seconds',
         completed_at = now(), actual_cost = 2, processing_time_ms = 1500,
         ai_provider = 'mock', ai_model = 'mock-1',
         cost_breakdown = '{\"credits\": 2, \"input_tokens\": 12, \"output_tokens\": 40}',
         output = '{\"text\": \"<script>window.__xss = \\\"output\\\"</script>\"}'",
    )
    .await?;
    let mut d = task("follow-up", "after the hostile one");
    d.depends_on = vec![xss];
    let dependent = lifecycle::enqueue(pool, &d).await?;
    // A registered worker for the overview and the workers page.
    let mut r = bizq::registry::Registration::this_process(
        "dash-worker-1",
        bizq::registry::Role::Worker,
        &["ai.*".into()],
        8,
    );
    r.metrics_addr = None;
    bizq::registry::register(pool, &r).await?;
    // Providers: `openai` parked after a refused key, with a fleet-wide budget (2 of its 4
    // slots held) and a task waiting for it; `anthropic` configured and available.
    let budgets = bizq::providers::limiter::Budgets::new(pool.clone());
    let limits = bizq::providers::limiter::Limits {
        rpm: Some(6000),
        max_in_flight: Some(4),
        ..Default::default()
    };
    budgets.configure("openai", &limits).await?;
    let ask = bizq::providers::limiter::Ask {
        input_tokens: 10,
        max_output_tokens: 10,
        max_wait: Duration::ZERO,
        hold_for: Duration::from_secs(600),
    };
    for _ in 0..2 {
        // Held until they expire: the panel shows them in flight.
        std::mem::forget(budgets.take("openai", &ask).await?);
    }
    sqlx::query(
        "INSERT INTO provider_status (provider, parked_until, reason)
         VALUES ('openai', now() + interval '1 hour',
                 'provider_auth: Incorrect API key provided: [redacted]')",
    )
    .execute(pool)
    .await?;
    let waiting = lifecycle::enqueue(pool, &task("waits for openai", "blocked")).await?;
    force(
        pool,
        waiting,
        "status = 'pending', wait_reason = 'provider_unavailable',
         error_details = '{\"code\": \"provider_auth\", \"provider\": \"openai\"}'",
    )
    .await?;
    Ok(Fixture {
        failed,
        failed_too,
        queued,
        xss,
        dependent,
    })
}

async fn page_text(c: &Client) -> anyhow::Result<String> {
    Ok(c.find(Locator::Css("body")).await?.text().await?)
}

/// Waits until `sql` (one boolean, `$1` = the task) holds.
async fn until_task(pool: &PgPool, id: Uuid, sql: &'static str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok: bool = sqlx::query_scalar(sql).bind(id).fetch_one(pool).await?;
        if ok {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out: {sql} for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where screenshots go: `docs/` with BIZQ_SCREENSHOTS=docs (to refresh the ones
/// docs/operations.md shows), else a temporary directory.
fn screenshot_dir() -> std::path::PathBuf {
    if std::env::var("BIZQ_SCREENSHOTS").as_deref() == Ok("docs") {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))
    } else {
        std::env::temp_dir()
    }
}

/// Pins, in a real browser: every page renders from the database (overview with counts and
/// workers alive, workspaces with credits, the task list with filters, a task page with its
/// input, output, cost breakdown, error and dependency links); Retry on a failed task moves
/// it to `pending` and Cancel on a queued one to `cancelled` through the lifecycle functions,
/// each recorded in `admin_events` with the actor; a bulk retry by filter shows the count
/// on a confirmation page first; a task whose output is `<script>` renders it as text and
/// runs nothing; a POST without the CSRF token is refused; no page shows DATABASE_URL.
#[sqlx::test(migrations = "../migrations")]
async fn the_dashboard_in_a_real_browser(pool: PgPool) -> anyhow::Result<()> {
    let f = fixture(&pool).await?;
    // The fleet's config names two providers; the key's variable is set, so a dashboard
    // that read keys could leak it.
    let config = std::env::temp_dir().join(format!("bizq-dash-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &config,
        "[providers.openai]\nkind = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\n\
         api_key_env = \"BIZQ_T_DASH_KEY\"\n\n\
         [providers.anthropic]\nkind = \"anthropic\"\nbase_url = \"https://api.anthropic.com\"\n\
         api_key_env = \"BIZQ_T_DASH_KEY\"\n",
    )?;
    let config_path = config.display().to_string();
    let dash = Dashboard::start(
        &pool,
        "127.0.0.1:0",
        &[
            ("BIZQ_CONFIG", &config_path),
            ("BIZQ_T_DASH_KEY", DASH_CANARY),
        ],
    )
    .await?;
    let base = format!("http://{}", dash.addr);
    let browser = Browser::start().await?;
    let c = &browser.client;
    let secret = url_of(&pool);
    let result = async {
        // Overview.
        c.goto(&format!("{base}/")).await?;
        let text = page_text(c).await?;
        assert!(
            text.contains("Overview") && text.contains("workers alive"),
            "{text}"
        );
        let alive = c.find(Locator::Id("workers-alive")).await?.text().await?;
        assert_eq!(alive, "1");
        assert!(text.contains("Last hour: 1 completed, 2 failed"), "{text}");
        // The providers panel: openai parked, why and until when, its budget, slots held and
        // the task waiting for it; anthropic available; no key anywhere on the page.
        let openai = c
            .find(Locator::Css("#providers tr[data-provider='openai']"))
            .await?
            .text()
            .await?;
        assert!(openai.contains("parked until"), "{openai}");
        assert!(
            openai.contains("provider_auth: Incorrect API key provided: [redacted]"),
            "{openai}"
        );
        assert!(
            openai.contains("requests:") && openai.contains("6000/min"),
            "{openai}"
        );
        assert!(openai.contains("2 / 4"), "slots held: {openai}");
        let waiting = c
            .find(Locator::Css(
                "#providers tr[data-provider='openai'] td:last-child",
            ))
            .await?
            .text()
            .await?;
        assert_eq!(waiting, "1", "{openai}");
        let anthropic = c
            .find(Locator::Css("#providers tr[data-provider='anthropic']"))
            .await?
            .text()
            .await?;
        assert!(
            anthropic.contains("anthropic") && anthropic.contains("available"),
            "{anthropic}"
        );
        assert!(
            !c.source().await?.contains(DASH_CANARY),
            "an API key on a page"
        );
        c.execute(
            "document.querySelector('h2 + #providers').previousElementSibling.scrollIntoView();",
            vec![],
        )
        .await?;
        std::fs::write(
            screenshot_dir().join("dashboard-providers.png"),
            c.screenshot().await?,
        )?;
        std::fs::write(
            screenshot_dir().join("dashboard-overview.png"),
            c.screenshot().await?,
        )?;
        assert!(
            !c.source().await?.contains(&secret),
            "DATABASE_URL on a page"
        );

        // Workspaces: backlog and credits.
        c.goto(&format!("{base}/workspaces")).await?;
        let text = page_text(c).await?;
        assert!(text.contains("acme") && text.contains("growth"), "{text}");
        assert!(
            text.contains("4998"),
            "balance after the 2-credit completion: {text}"
        );

        // Workers.
        c.goto(&format!("{base}/workers")).await?;
        assert!(page_text(c).await?.contains("dash-worker-1"));

        // Task list, filtered by status.
        c.goto(&format!("{base}/tasks?status=failed")).await?;
        let text = page_text(c).await?;
        assert!(
            text.contains("broken tagline") && text.contains("broken summary"),
            "{text}"
        );
        assert!(!text.contains("waiting description"), "{text}");

        // The hostile task: output and input are text, no script ran; the links work.
        c.goto(&format!("{base}/tasks/{}", f.xss)).await?;
        let output = c.find(Locator::Id("output")).await?.text().await?;
        assert!(
            output.contains(r#"<script>window.__xss = \"output\"</script>"#),
            "{output}"
        );
        let input = c.find(Locator::Id("input")).await?.text().await?;
        assert!(input.contains("<img src=x onerror="), "{input}");
        let ran = c
            .execute("return window.__xss === undefined;", vec![])
            .await?;
        assert_eq!(ran, json!(true), "a script from task data ran");
        let cost = c.find(Locator::Id("cost")).await?.text().await?;
        assert!(cost.contains("output_tokens"), "{cost}");
        std::fs::write(
            screenshot_dir().join("dashboard-task.png"),
            c.screenshot().await?,
        )?;
        c.find(Locator::Css(&format!(
            "#dependents a[href='/tasks/{}']",
            f.dependent
        )))
        .await?
        .click()
        .await?;
        assert!(
            c.current_url()
                .await?
                .path()
                .ends_with(&f.dependent.to_string())
        );
        let deps = c.find(Locator::Id("dependencies")).await?.text().await?;
        assert!(deps.contains("hostile output"), "{deps}");

        // Retry a failed task.
        c.goto(&format!("{base}/tasks/{}", f.failed)).await?;
        let err = c.find(Locator::Id("error")).await?.text().await?;
        assert!(err.contains("mock answered HTTP 400"), "{err}");
        c.find(Locator::Id("retry-button")).await?.click().await?;
        until_task(
            &pool,
            f.failed,
            "SELECT status = 'pending' AND attempt = 0 FROM tasks WHERE id = $1",
        )
        .await?;
        let note = c
            .wait()
            .for_element(Locator::Id("note"))
            .await?
            .text()
            .await?;
        assert_eq!(note, "retry done");

        // Cancel a queued one.
        c.goto(&format!("{base}/tasks/{}", f.queued)).await?;
        c.find(Locator::Id("cancel-button")).await?.click().await?;
        until_task(
            &pool,
            f.queued,
            "SELECT status = 'cancelled' FROM tasks WHERE id = $1",
        )
        .await?;

        // Bulk retry by filter: the confirmation shows the count (the other failed task is
        // pending now), then runs.
        c.goto(&format!("{base}/tasks?workspace=acme&status=failed"))
            .await?;
        c.find(Locator::Id("bulk-retry")).await?.click().await?;
        let count = c
            .wait()
            .for_element(Locator::Id("confirm-count"))
            .await?
            .text()
            .await?;
        assert!(count.starts_with("1 task(s) match"), "{count}");
        assert_eq!(
            status(&pool, f.failed_too).await?,
            "failed",
            "nothing before confirming"
        );
        c.find(Locator::Id("confirm-button")).await?.click().await?;
        until_task(
            &pool,
            f.failed_too,
            "SELECT status = 'pending' FROM tasks WHERE id = $1",
        )
        .await?;
        let note = c
            .wait()
            .for_element(Locator::Id("note"))
            .await?
            .text()
            .await?;
        assert_eq!(note, "bulk retry: 1 done, 0 skipped");

        // The admin events, with the actor.
        let events: Vec<(String, String, i32, Vec<Uuid>)> =
            sqlx::query_as("SELECT actor, action, done, task_ids FROM admin_events ORDER BY id")
                .fetch_all(&pool)
                .await?;
        let actions: Vec<(&str, i32, &[Uuid])> = events
            .iter()
            .map(|(_, a, n, ids)| (a.as_str(), *n, ids.as_slice()))
            .collect();
        assert_eq!(
            actions,
            [
                ("retry", 1, &[f.failed][..]),
                ("cancel", 1, &[f.queued][..]),
                ("bulk_retry", 1, &[f.failed_too][..]),
            ]
        );
        assert!(
            events
                .iter()
                .all(|(actor, ..)| actor.starts_with("test-admin (dashboard, from 127.0.0.1)")),
            "{events:?}"
        );

        // A forged POST without the CSRF token changes nothing.
        let forged = http(
            &dash.local(),
            "POST",
            &format!("/tasks/{}/cancel", f.dependent),
            &["Content-Type: application/x-www-form-urlencoded"],
            "reason=x",
        )
        .await?;
        assert_eq!(forged.status, 403, "{forged:?}");
        let cross = http(
            &dash.local(),
            "POST",
            &format!("/tasks/{}/cancel", f.dependent),
            &[
                "Content-Type: application/x-www-form-urlencoded",
                "Origin: http://evil.example",
            ],
            "csrf=x",
        )
        .await?;
        assert_eq!(cross.status, 403, "{cross:?}");
        assert_eq!(status(&pool, f.dependent).await?, "pending");
        for page in [
            "/",
            "/workspaces",
            "/workers",
            "/tasks",
            &format!("/tasks/{}", f.xss),
        ] {
            let r = get(&dash.local(), page).await?;
            assert_eq!(r.status, 200, "{page}");
            assert!(!r.body.contains(&secret), "DATABASE_URL on {page}");
        }
        anyhow::Ok(())
    }
    .await;
    browser.close().await?;
    drop(dash);
    result
}

/// Pins the access rule: beyond loopback the dashboard refuses to start without a token;
/// with one, a request without it (browser or plain HTTP) gets the sign-in page and 401 and
/// no data, a wrong bearer token too, and signing in with the right token in the browser
/// opens the overview.
#[sqlx::test(migrations = "../migrations")]
async fn beyond_loopback_the_dashboard_needs_its_token(pool: PgPool) -> anyhow::Result<()> {
    fixture(&pool).await?;
    let refused = tokio::process::Command::new(binary("bizq"))
        .args(["dashboard", "--addr", "0.0.0.0:0"])
        .env_remove("BIZQ_CONFIG")
        .env_remove("BIZQ_DASHBOARD_TOKEN")
        .env("DATABASE_URL", url_of(&pool))
        .output()
        .await?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("BIZQ_DASHBOARD_TOKEN"));

    let token = "s3cret-token-for-the-test-0123456789";
    let dash = Dashboard::start(&pool, "0.0.0.0:0", &[("BIZQ_DASHBOARD_TOKEN", token)]).await?;
    let local = dash.local();
    let anonymous = get(&local, "/tasks?status=failed").await?;
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.body.contains("Sign in") && !anonymous.body.contains("broken tagline"));
    let wrong = http(
        &local,
        "GET",
        "/",
        &["Authorization: Bearer s3cret-token-for-the-test-0123456780"],
        "",
    )
    .await?;
    assert_eq!(wrong.status, 401);
    let right = http(
        &local,
        "GET",
        "/tasks?status=failed",
        &[&format!("Authorization: Bearer {token}")],
        "",
    )
    .await?;
    assert_eq!(right.status, 200);
    assert!(right.body.contains("broken tagline"));

    let browser = Browser::start().await?;
    let c = &browser.client;
    let result = async {
        c.goto(&format!("http://{local}/tasks?status=failed"))
            .await?;
        let text = page_text(c).await?;
        assert!(
            text.contains("Sign in") && !text.contains("broken tagline"),
            "{text}"
        );
        c.find(Locator::Css("input[name=token]"))
            .await?
            .send_keys(token)
            .await?;
        c.find(Locator::Css("form[action='/login'] button"))
            .await?
            .click()
            .await?;
        c.wait().for_element(Locator::Id("workers-alive")).await?;
        c.goto(&format!("http://{local}/tasks?status=failed"))
            .await?;
        assert!(page_text(c).await?.contains("broken tagline"));
        anyhow::Ok(())
    }
    .await;
    browser.close().await?;
    let mut dash = dash;
    let _ = dash.child.kill().await;
    result
}
