//! The `bizq` admin CLI end to end: the real binary run as a process against each test's own
//! database, every command checked by its output, its exit code and the rows it leaves —
//! including `bizq cancel` under both dependency-failure policies read from `--config` /
//! `$BIZQ_CONFIG`, the way the fleet reads them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bizq::config::DependencyFailurePolicy;
use bizq::handlers::KNOWN_TYPES;
use bizq::lifecycle::{self, ClaimRequest, Completion, Failure};
use bizq_tests::engine::*;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

/// What one `bizq` run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and returns stdout.
    fn ok(self) -> String {
        assert_eq!(
            self.code, 0,
            "bizq failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    /// Asserts a non-zero exit whose stderr contains `message`; returns stderr.
    fn fails_with(self, message: &str) -> String {
        assert_ne!(
            self.code, 0,
            "bizq should have failed; stdout:\n{}",
            self.stdout
        );
        assert!(
            self.stderr.contains(message),
            "stderr should say {message:?}, got:\n{}",
            self.stderr
        );
        self.stderr
    }
}

/// Runs `bizq args...` with `env` set and no inherited `BIZQ_CONFIG` / `DATABASE_URL`.
async fn bizq_env(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(binary("bizq"));
    cmd.args(args)
        .env_remove("BIZQ_CONFIG")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("bizq runs");
    Run {
        code: out.status.code().expect("bizq exited, not killed"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// Runs `bizq args...` against the test's database.
async fn bizq(pool: &PgPool, args: &[&str]) -> Run {
    bizq_env(&[("DATABASE_URL", &url_of(pool))], args).await
}

/// Writes the test config with `overrides` to a file of its own and returns its path.
fn config_file(overrides: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bizq-cli-test-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bizq.toml");
    std::fs::write(&path, config_toml(overrides)).expect("config written");
    path
}

fn escalate_config() -> PathBuf {
    config_file(&[("scheduler.dependency_failure", "\"escalate\"")])
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A workspace with credits, and its slug (what an admin types).
async fn workspace_slug(pool: &PgPool) -> anyhow::Result<(Uuid, String)> {
    let id = workspace(pool, 1000).await?;
    let slug = sqlx::query_scalar("SELECT slug FROM workspaces WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok((id, slug))
}

/// `bizq enqueue` with `args`, returning the id it printed.
async fn enqueue(pool: &PgPool, args: &[&str]) -> anyhow::Result<Uuid> {
    let mut all = vec!["enqueue"];
    all.extend_from_slice(args);
    let out = bizq(pool, &all).await.ok();
    Ok(out.trim().parse()?)
}

/// One admission pass, as the scheduler runs it (nothing in these tests has failed yet when
/// it runs, so the policy argument does not matter).
async fn admit(pool: &PgPool) -> anyhow::Result<()> {
    lifecycle::admit(pool, 100, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    Ok(())
}

/// Claims the one queued task as a worker would and returns its id and lease token.
async fn claim_one(pool: &PgPool) -> anyhow::Result<(Uuid, Uuid)> {
    let claimed = lifecycle::claim(
        pool,
        &ClaimRequest {
            worker_id: "cli-test",
            limit: 1,
            type_patterns: None,
            lease: Duration::from_secs(60),
        },
    )
    .await?;
    assert_eq!(claimed.len(), 1, "one task claimed");
    Ok((claimed[0].id, claimed[0].lease_token))
}

/// Claims the one queued task and fails it for good, as a worker does on a permanent error.
async fn fail_one(pool: &PgPool) -> anyhow::Result<Uuid> {
    let (id, lease_token) = claim_one(pool).await?;
    let written = lifecycle::finish_batch(
        pool,
        &[],
        &[Failure {
            id,
            lease_token,
            action: lifecycle::FailureAction::Fail,
            error_details: bizq::ErrorDetails::new("bad_input", "provider said no", 1),
            processing_time_ms: 12,
        }],
    )
    .await?;
    assert_eq!(written, vec![id]);
    Ok(id)
}

/// Status and `error_details` code/dependency of a task.
async fn outcome(
    pool: &PgPool,
    id: Uuid,
) -> anyhow::Result<(String, Option<String>, Option<String>)> {
    Ok(sqlx::query_as(
        "SELECT status, error_details ->> 'code', error_details ->> 'dependency'
           FROM tasks
          WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// The ids in `bizq list` output (first column of every line after the header).
fn listed(out: &str) -> Vec<Uuid> {
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    assert!(header.starts_with("id"), "header: {header}");
    lines
        .map(|l| {
            l.split_whitespace()
                .next()
                .expect("an id")
                .parse()
                .expect("a uuid")
        })
        .collect()
}

/// Pins `bizq migrate` (`admin::migrate`): on an empty database it applies every file of
/// `migrations/` and names each one; a second run applies nothing and says so.
#[sqlx::test(migrations = false)]
async fn migrate_applies_each_migration_once(pool: PgPool) -> anyhow::Result<()> {
    let mut files: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
    files.retain(|f| f.ends_with(".sql"));
    files.sort();
    let expected: Vec<String> = files
        .iter()
        .map(|f| {
            let (version, name) = f
                .trim_end_matches(".sql")
                .split_once('_')
                .expect("NNNN_name");
            format!("applied {version} {}", name.replace('_', " "))
        })
        .collect();
    let first = bizq(&pool, &["migrate"]).await.ok();
    assert_eq!(first.lines().collect::<Vec<_>>(), expected);
    let (applied, ok): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE success) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await?;
    assert_eq!((applied, ok), (files.len() as i64, files.len() as i64));

    let second = bizq(&pool, &["migrate"]).await.ok();
    assert_eq!(
        second.trim(),
        format!(
            "schema is current ({} migrations); nothing to do",
            files.len()
        )
    );
    Ok(())
}

/// The columns `bizq enqueue` sets: workspace, type, name, category, status, input, priority,
/// depends_on, scheduled_for, estimated_cost.
type EnqueuedRow = (
    Uuid,
    String,
    String,
    String,
    String,
    Value,
    i32,
    Vec<Uuid>,
    chrono::DateTime<chrono::Utc>,
    Option<i32>,
);

/// Pins `bizq enqueue` (`admin::enqueue`): every flag lands in its column of the row whose id
/// it prints; bad JSON, an unknown workspace and an out-of-range priority exit non-zero with
/// a message saying which, and insert nothing.
#[sqlx::test(migrations = "../migrations")]
async fn enqueue_writes_the_row_whose_id_it_prints(pool: PgPool) -> anyhow::Result<()> {
    let (ws, slug) = workspace_slug(&pool).await?;
    let a = enqueue(&pool, &["-w", &slug, "-i", r#"{"prompt": "a"}"#]).await?;
    // By workspace id as well as slug.
    let b = enqueue(&pool, &["-w", &ws.to_string(), "-i", r#"{"prompt": "b"}"#]).await?;
    let deps = format!("{a},{b}");
    let id = enqueue(
        &pool,
        &[
            "-w",
            &slug,
            "-t",
            "ai.generate",
            "-i",
            r#"{"prompt": "Write a tagline", "tone": "dry"}"#,
            "-p",
            "2",
            "--depends-on",
            &deps,
            "--at",
            "2030-01-02T09:30:00Z",
            "--estimated-cost",
            "7",
            "--name",
            "tagline",
            "--category",
            "marketing",
        ],
    )
    .await?;
    let row: EnqueuedRow = sqlx::query_as(
        "SELECT workspace_id, type, name, category, status, input, priority, depends_on,
                scheduled_for, estimated_cost
           FROM tasks
          WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        row,
        (
            ws,
            "ai.generate".to_string(),
            "tagline".to_string(),
            "marketing".to_string(),
            "pending".to_string(),
            json!({"prompt": "Write a tagline", "tone": "dry"}),
            2,
            vec![a, b],
            "2030-01-02T09:30:00Z".parse()?,
            Some(7),
        )
    );
    // Defaults: type ai.generate, priority 5, no dependencies, due now.
    let (ty, priority, deps, at): (
        String,
        i32,
        Option<Vec<Uuid>>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as("SELECT type, priority, depends_on, scheduled_for FROM tasks WHERE id = $1")
        .bind(a)
        .fetch_one(&pool)
        .await?;
    assert_eq!((ty.as_str(), priority), ("ai.generate", 5));
    assert!(deps.unwrap_or_default().is_empty());
    assert!(at.is_none_or(|at| at <= chrono::Utc::now()));

    bizq(&pool, &["enqueue", "-w", &slug, "-i", "{not json"])
        .await
        .fails_with("--input is not valid JSON");
    bizq(&pool, &["enqueue", "-w", "no-such-ws", "-i", "{}"])
        .await
        .fails_with("no workspace with slug or id 'no-such-ws'");
    bizq(&pool, &["enqueue", "-w", &slug, "-i", "{}", "-p", "11"])
        .await
        .fails_with("--priority must be between 1 (first) and 10 (last)");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 3, "the refused enqueues inserted nothing");
    Ok(())
}

/// Pins `bizq list` (`admin::list`): newest first, and each filter (status, workspace, type,
/// limit) keeps exactly the matching tasks; the note column shows a failed task's code.
#[sqlx::test(migrations = "../migrations")]
async fn list_shows_tasks_newest_first_and_filters_them(pool: PgPool) -> anyhow::Result<()> {
    let (_, one) = workspace_slug(&pool).await?;
    let (_, two) = workspace_slug(&pool).await?;
    let a = enqueue(&pool, &["-w", &one, "-i", r#"{"prompt": "a"}"#]).await?;
    let b = enqueue(&pool, &["-w", &one, "-t", "no.such.type", "-i", "{}"]).await?;
    let c = enqueue(&pool, &["-w", &two, "-i", r#"{"prompt": "c"}"#]).await?;
    admit(&pool).await?;
    assert_eq!(status(&pool, b).await?, "failed", "unknown type rejected");

    assert_eq!(listed(&bizq(&pool, &["list"]).await.ok()), vec![c, b, a]);
    let failed = bizq(&pool, &["list", "-s", "failed"]).await.ok();
    assert_eq!(listed(&failed), vec![b]);
    assert!(failed.contains("unknown_task_type"), "{failed}");
    assert_eq!(
        listed(&bizq(&pool, &["list", "-s", "queued"]).await.ok()),
        vec![c, a]
    );
    assert_eq!(
        listed(&bizq(&pool, &["list", "-w", &two]).await.ok()),
        vec![c]
    );
    assert_eq!(
        listed(&bizq(&pool, &["list", "-t", "no.such.type"]).await.ok()),
        vec![b]
    );
    assert_eq!(
        listed(
            &bizq(&pool, &["list", "-w", &one, "-s", "queued"])
                .await
                .ok()
        ),
        vec![a]
    );
    assert_eq!(
        listed(&bizq(&pool, &["list", "-n", "1"]).await.ok()),
        vec![c]
    );
    assert!(listed(&bizq(&pool, &["list", "-s", "cancelled"]).await.ok()).is_empty());
    bizq(&pool, &["list", "-w", "no-such-ws"])
        .await
        .fails_with("no workspace with slug or id 'no-such-ws'");
    Ok(())
}

/// Pins `bizq inspect` (`admin::inspect`): status, attempt, dependencies with the unfinished
/// count, error details and output of real tasks; an unknown id exits non-zero.
#[sqlx::test(migrations = "../migrations")]
async fn inspect_shows_status_attempts_dependencies_error_and_output(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (_, slug) = workspace_slug(&pool).await?;
    let parent = enqueue(&pool, &["-w", &slug, "-i", r#"{"prompt": "p"}"#]).await?;
    let child = enqueue(
        &pool,
        &[
            "-w",
            &slug,
            "-i",
            "{\"prompt\": \"c\"}",
            "--depends-on",
            &parent.to_string(),
        ],
    )
    .await?;
    admit(&pool).await?;
    let waiting = bizq(&pool, &["inspect", &child.to_string()]).await.ok();
    assert!(
        waiting.contains(&format!("task           {child}")),
        "{waiting}"
    );
    assert!(waiting.contains("status         pending\n"), "{waiting}");
    assert!(
        waiting.contains(&format!("depends on     {parent} (1 unfinished)")),
        "{waiting}"
    );
    assert!(waiting.contains("attempt        0 (max -)"), "{waiting}");

    fail_one(&pool).await?;
    let failed = bizq(&pool, &["inspect", &parent.to_string()]).await.ok();
    assert!(failed.contains("status         failed\n"), "{failed}");
    assert!(failed.contains("attempt        1 (max -)"), "{failed}");
    assert!(failed.contains("worker         cli-test"), "{failed}");
    assert!(
        failed.contains("\"message\": \"provider said no\""),
        "{failed}"
    );
    assert!(failed.contains("\"code\": \"bad_input\""), "{failed}");
    let cancelled = bizq(&pool, &["inspect", &child.to_string()]).await.ok();
    assert!(
        cancelled.contains("status         cancelled\n"),
        "{cancelled}"
    );
    assert!(
        cancelled.contains("\"code\": \"dependency_failed\""),
        "{cancelled}"
    );

    let done = enqueue(&pool, &["-w", &slug, "-i", r#"{"prompt": "d"}"#]).await?;
    admit(&pool).await?;
    let (id, lease_token) = claim_one(&pool).await?;
    assert_eq!(id, done);
    lifecycle::finish_batch(
        &pool,
        &[Completion {
            id,
            lease_token,
            output: json!({"text": "A tagline, dry."}),
            actual_cost: 3,
            cost_breakdown: json!({"tokens": 30}),
            processing_time_ms: 40,
            ai_provider: Some("mock".into()),
            ai_model: Some("mock-1".into()),
        }],
        &[],
    )
    .await?;
    let completed = bizq(&pool, &["inspect", &done.to_string()]).await.ok();
    assert!(
        completed.contains("status         completed\n"),
        "{completed}"
    );
    assert!(
        completed.contains("\"text\": \"A tagline, dry.\""),
        "{completed}"
    );
    assert!(completed.contains("estimated -, actual 3"), "{completed}");
    assert!(
        completed.contains("provider/model mock / mock-1"),
        "{completed}"
    );
    assert!(completed.contains("time           40 ms"), "{completed}");

    let unknown = Uuid::new_v4();
    bizq(&pool, &["inspect", &unknown.to_string()])
        .await
        .fails_with(&format!("task {unknown} not found"));
    bizq(&pool, &["inspect", "not-a-uuid"])
        .await
        .fails_with("invalid value 'not-a-uuid'");
    Ok(())
}

/// Pins `bizq retry` (`lifecycle::retry`): a task that failed on attempt 1 goes back to
/// `pending` with `attempt = 0` and no error, start or completion time, then runs through
/// the engine again and completes on attempt 1. A completed or unknown task is refused.
#[sqlx::test(migrations = "../migrations")]
async fn retry_starts_a_failed_task_over_and_it_completes(pool: PgPool) -> anyhow::Result<()> {
    let (_, slug) = workspace_slug(&pool).await?;
    let id = enqueue(&pool, &["-w", &slug, "-i", r#"{"prompt": "again"}"#]).await?;
    admit(&pool).await?;
    fail_one(&pool).await?;
    let (attempt, has_error, started, completed): (i32, bool, bool, bool) = sqlx::query_as(
        "SELECT attempt, error_details IS NOT NULL, started_at IS NOT NULL, completed_at IS NOT NULL
           FROM tasks
          WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        (attempt, has_error, started, completed),
        (1, true, true, true)
    );

    let out = bizq(&pool, &["retry", &id.to_string()]).await.ok();
    assert!(
        out.starts_with(&format!("task {id}: failed -> pending")),
        "{out}"
    );
    let row: (String, i32, Option<Value>, bool, bool, Option<i32>) = sqlx::query_as(
        "SELECT status, attempt, error_details, started_at IS NULL, completed_at IS NULL,
                deps_remaining
           FROM tasks
          WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(row, ("pending".into(), 0, None, true, true, None));

    let config = test_config();
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 1, 1);
    wait_for(&pool, "SELECT status = 'completed' FROM tasks", T).await?;
    fleet.shutdown().await?;
    let (attempt, error, output): (i32, Option<Value>, Option<Value>) =
        sqlx::query_as("SELECT attempt, error_details, output FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        attempt, 1,
        "the retried task completed on its first fresh attempt"
    );
    assert_eq!(error, None);
    assert!(output.is_some());

    bizq(&pool, &["retry", &id.to_string()])
        .await
        .fails_with(&format!(
            "task {id} is completed; retry needs it to be one of: failed, cancelled, escalated"
        ));
    let unknown = Uuid::new_v4();
    bizq(&pool, &["retry", &unknown.to_string()])
        .await
        .fails_with(&format!("task {unknown} not found"));
    Ok(())
}

/// Pins `bizq cancel` (`lifecycle::cancel`) on tasks without dependents: a pending and a
/// queued task are cancelled with the admin's reason; a task already cancelled, or unknown,
/// is refused with a message naming its status.
#[sqlx::test(migrations = "../migrations")]
async fn cancel_takes_pending_and_queued_tasks_and_refuses_the_rest(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (_, slug) = workspace_slug(&pool).await?;
    let later = enqueue(
        &pool,
        &[
            "-w",
            &slug,
            "-i",
            "{\"prompt\": \"l\"}",
            "--at",
            "2030-01-01T00:00:00Z",
        ],
    )
    .await?;
    let now = enqueue(&pool, &["-w", &slug, "-i", r#"{"prompt": "n"}"#]).await?;
    admit(&pool).await?;
    assert_eq!(
        (status(&pool, later).await?, status(&pool, now).await?),
        ("pending".to_string(), "queued".to_string())
    );

    let out = bizq(&pool, &["cancel", &later.to_string()]).await.ok();
    assert_eq!(out, format!("task {later}: pending -> cancelled\n"));
    let out = bizq(
        &pool,
        &["cancel", &now.to_string(), "--reason", "customer asked"],
    )
    .await
    .ok();
    assert_eq!(out, format!("task {now}: queued -> cancelled\n"));
    let rows: Vec<(Uuid, String, Value)> = sqlx::query_as(
        "SELECT id, status, error_details - 'attempt' FROM tasks WHERE id = ANY($1) ORDER BY created_at",
    )
    .bind(vec![later, now])
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        rows,
        vec![
            (
                later,
                "cancelled".into(),
                json!({"message": "cancelled: by an admin", "code": "cancelled", "previous_status": "pending"})
            ),
            (
                now,
                "cancelled".into(),
                json!({"message": "cancelled: customer asked", "code": "cancelled", "previous_status": "queued"})
            ),
        ]
    );

    bizq(&pool, &["cancel", &now.to_string()])
        .await
        .fails_with(&format!(
            "task {now} is cancelled; cancel needs it to be one of: pending, queued, processing, escalated"
        ));
    let unknown = Uuid::new_v4();
    bizq(&pool, &["cancel", &unknown.to_string()])
        .await
        .fails_with(&format!("task {unknown} not found"));
    Ok(())
}

/// A parent `queued`, its child and grandchild admitted and waiting (edges in
/// `task_dependencies`), all enqueued through `bizq`.
async fn chain(pool: &PgPool) -> anyhow::Result<(Uuid, Uuid, Uuid)> {
    let (_, slug) = workspace_slug(pool).await?;
    let parent = enqueue(pool, &["-w", &slug, "-i", r#"{"prompt": "p"}"#]).await?;
    let child = enqueue(
        pool,
        &[
            "-w",
            &slug,
            "-i",
            "{\"prompt\": \"c\"}",
            "--depends-on",
            &parent.to_string(),
        ],
    )
    .await?;
    let grandchild = enqueue(
        pool,
        &[
            "-w",
            &slug,
            "-i",
            "{\"prompt\": \"g\"}",
            "--depends-on",
            &child.to_string(),
        ],
    )
    .await?;
    admit(pool).await?;
    let deps: Vec<Option<i32>> = sqlx::query_scalar(
        "SELECT deps_remaining FROM tasks WHERE id = ANY($1) ORDER BY created_at",
    )
    .bind(vec![parent, child, grandchild])
    .fetch_all(pool)
    .await?;
    assert_eq!(deps, vec![Some(0), Some(1), Some(1)]);
    assert_eq!(status(pool, parent).await?, "queued");
    Ok((parent, child, grandchild))
}

/// Pins the default policy through the CLI: with no config (built-in defaults,
/// `dependency_failure = "cancel"`), `bizq cancel` of a parent cancels its waiting dependents
/// transitively, each naming the task it waited for.
#[sqlx::test(migrations = "../migrations")]
async fn cancel_cancels_dependents_transitively_under_the_default_policy(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (parent, child, grandchild) = chain(&pool).await?;
    let out = bizq(&pool, &["cancel", &parent.to_string()]).await.ok();
    let cancelled = Some("dependency_cancelled".to_string());
    assert_eq!(
        outcome(&pool, child).await?,
        (
            "cancelled".into(),
            cancelled.clone(),
            Some(parent.to_string())
        )
    );
    assert_eq!(
        outcome(&pool, grandchild).await?,
        ("cancelled".into(), cancelled, Some(child.to_string()))
    );
    assert_eq!(
        out,
        format!(
            "task {parent}: queued -> cancelled\n\
             1 dependent task(s) waiting for it cancelled (scheduler.dependency_failure = \"cancel\")\n"
        )
    );
    Ok(())
}

/// Pins the CLI reading `scheduler.dependency_failure` from its config (`admin::pool`):
/// under `"escalate"` given by `--config`, `bizq cancel` of a parent escalates its waiting
/// child for a person instead of cancelling it; the grandchild keeps waiting for the
/// escalated child, and when the admin then cancels that child (config from
/// `$BIZQ_CONFIG` this time), the grandchild is escalated in turn.
#[sqlx::test(migrations = "../migrations")]
async fn cancel_escalates_dependents_under_the_escalate_policy(pool: PgPool) -> anyhow::Result<()> {
    let config = escalate_config();
    let (parent, child, grandchild) = chain(&pool).await?;
    let out = bizq(
        &pool,
        &["--config", path_str(&config), "cancel", &parent.to_string()],
    )
    .await
    .ok();
    let cancelled = Some("dependency_cancelled".to_string());
    assert_eq!(
        outcome(&pool, child).await?,
        (
            "escalated".into(),
            cancelled.clone(),
            Some(parent.to_string())
        )
    );
    assert_eq!(
        out,
        format!(
            "task {parent}: queued -> cancelled\n\
             1 dependent task(s) waiting for it escalated (scheduler.dependency_failure = \"escalate\")\n"
        )
    );
    let (g_status, g_deps): (String, Option<i32>) =
        sqlx::query_as("SELECT status, deps_remaining FROM tasks WHERE id = $1")
            .bind(grandchild)
            .fetch_one(&pool)
            .await?;
    assert_eq!((g_status.as_str(), g_deps), ("pending", Some(1)));

    let env = [
        ("DATABASE_URL", url_of(&pool)),
        ("BIZQ_CONFIG", path_str(&config).to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = bizq_env(&env, &["cancel", &child.to_string()]).await.ok();
    assert!(
        out.starts_with(&format!("task {child}: escalated -> cancelled\n")),
        "{out}"
    );
    assert_eq!(
        outcome(&pool, grandchild).await?,
        ("escalated".into(), cancelled, Some(child.to_string()))
    );
    Ok(())
}

/// A parent enqueued with `bizq enqueue` fails at admission (unknown type) under a real
/// `bizq-scheduler` running with `config`; then a child enqueued through `bizq enqueue
/// --depends-on` that parent is admitted, and its final state is returned.
async fn child_of_a_failed_parent(
    pool: &PgPool,
    overrides: &[(&str, &str)],
) -> anyhow::Result<(Uuid, (String, Option<String>, Option<String>))> {
    let scheduler = Process::start("scheduler", &url_of(pool), &config_toml(overrides), &[])?;
    let (_, slug) = workspace_slug(pool).await?;
    let parent = enqueue(pool, &["-w", &slug, "-t", "no.such.type", "-i", "{}"]).await?;
    wait_for(pool, "SELECT bool_and(status = 'failed') FROM tasks", T).await?;
    let child = enqueue(
        pool,
        &[
            "-w",
            &slug,
            "-i",
            "{\"prompt\": \"c\"}",
            "--depends-on",
            &parent.to_string(),
        ],
    )
    .await?;
    wait_for(
        pool,
        "SELECT count(*) = 0 FROM tasks WHERE status IN ('pending', 'queued')",
        T,
    )
    .await?;
    let log = scheduler.log_text();
    assert_eq!(
        scheduler.terminate().await?,
        Some(0),
        "scheduler log:\n{log}"
    );
    assert_eq!(
        outcome(pool, parent).await?.1.as_deref(),
        Some("unknown_task_type")
    );
    Ok((parent, outcome(pool, child).await?))
}

/// Pins admission's policy (`lifecycle::admit`'s verdict for a dependency that already
/// failed) under the default config: the late child is cancelled, naming its parent.
#[sqlx::test(migrations = "../migrations")]
async fn a_child_enqueued_after_its_parent_failed_is_cancelled(pool: PgPool) -> anyhow::Result<()> {
    let (parent, child) = child_of_a_failed_parent(&pool, &[]).await?;
    assert_eq!(
        child,
        (
            "cancelled".into(),
            Some("dependency_failed".into()),
            Some(parent.to_string())
        )
    );
    Ok(())
}

/// Pins admission's policy under `dependency_failure = "escalate"`: the late child is
/// escalated, naming its parent.
#[sqlx::test(migrations = "../migrations")]
async fn a_child_enqueued_after_its_parent_failed_is_escalated_under_escalate(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (parent, child) =
        child_of_a_failed_parent(&pool, &[("scheduler.dependency_failure", "\"escalate\"")])
            .await?;
    assert_eq!(
        child,
        (
            "escalated".into(),
            Some("dependency_failed".into()),
            Some(parent.to_string())
        )
    );
    Ok(())
}

/// Pins `bizq stats`'s bounded count (`queries::status_counts`): with more completed tasks
/// than `EXACT_COUNT_LIMIT` it shows the planner's estimate, marked `~` and explained, close
/// to the truth; every other status is still counted exactly. Counting a million completed
/// tasks one by one took longer than the 50 ms `bizq stats` may take.
#[sqlx::test(migrations = "../migrations")]
async fn stats_estimates_completed_tasks_beyond_the_exact_limit(
    pool: PgPool,
) -> anyhow::Result<()> {
    let (ws, _) = workspace_slug(&pool).await?;
    let completed = bizq::queries::EXACT_COUNT_LIMIT + 10_000;
    sqlx::query(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, completed_at)
         SELECT $1, 'ai.generate', 'content', 'done', '{}',
                CASE WHEN g % 1000 = 0 THEN 'failed' ELSE 'completed' END, now()
           FROM generate_series(1, $2) g",
    )
    .bind(ws)
    .bind(completed + completed / 999)
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE tasks").execute(&pool).await?;
    let truth: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed')
           FROM tasks",
    )
    .fetch_one(&pool)
    .await?;
    let out = bizq(&pool, &["stats"]).await.ok();
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("completed "))
        .unwrap_or_else(|| panic!("no completed line in\n{out}"));
    assert!(line.contains("(estimated: more than 50000"), "{line}");
    let shown: i64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.strip_prefix('~'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ~count in {line:?}"));
    let off = (shown - truth.0).abs() as f64 / truth.0 as f64;
    assert!(off < 0.1, "estimate {shown} against {} completed", truth.0);
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["failed", &truth.1.to_string()]),
        "failed must stay exact ({}):\n{out}",
        truth.1
    );
    Ok(())
}

/// Pins `bizq stats` (`admin::stats`): counts by status, tasks blocked on dependencies, and
/// each workspace's credits.
#[sqlx::test(migrations = "../migrations")]
async fn stats_counts_tasks_by_status_and_shows_credits(pool: PgPool) -> anyhow::Result<()> {
    let (_, slug) = workspace_slug(&pool).await?;
    let parent = enqueue(&pool, &["-w", &slug, "-i", r#"{"prompt": "p"}"#]).await?;
    enqueue(
        &pool,
        &[
            "-w",
            &slug,
            "-i",
            "{\"prompt\": \"c\"}",
            "--depends-on",
            &parent.to_string(),
        ],
    )
    .await?;
    enqueue(&pool, &["-w", &slug, "-t", "no.such.type", "-i", "{}"]).await?;
    admit(&pool).await?;
    let out = bizq(&pool, &["stats"]).await.ok();
    let mut by_status = BTreeMap::new();
    let status_lines = out
        .lines()
        .skip_while(|l| *l != "tasks by status:")
        .skip(1)
        .take_while(|l| l.starts_with("  "));
    for l in status_lines {
        let (s, n) = l.trim().split_once(' ').expect("status count");
        by_status.insert(s.to_string(), n.trim().parse::<i64>()?);
    }
    assert_eq!(
        by_status,
        BTreeMap::from([
            ("failed".to_string(), 1),
            ("pending".to_string(), 1),
            ("queued".to_string(), 1),
        ]),
        "{out}"
    );
    assert!(out.contains("pending on dependencies: 1\n"), "{out}");
    assert!(
        out.contains("parked (workspace cannot pay / not active): 0\n"),
        "{out}"
    );
    let ws_line = out
        .lines()
        .find(|l| l.trim_start().starts_with(&slug))
        .unwrap_or_else(|| panic!("a line for {slug}:\n{out}"));
    let figures: Vec<&str> = ws_line.split_whitespace().collect();
    // slug, plan, balance / reserved / used / limit
    assert_eq!(
        figures[2..],
        ["1000", "/", "0", "/", "0", "/", "100000000"],
        "{ws_line}"
    );
    Ok(())
}

/// Pins `bizq demo` under `scheduler.dependency_failure = "escalate"`: the demo's failing
/// step escalates its dependents and their own dependents wait for a person. The demo counts
/// those as settled and says why, instead of waiting for its timeout and failing.
#[sqlx::test(migrations = "../migrations")]
async fn demo_settles_under_the_escalate_policy(pool: PgPool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("bizq-demo-test-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("demo-escalate.toml");
    let demo = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml"),
    )?;
    std::fs::write(
        &config,
        demo.replace(
            "[scheduler]\n",
            "[scheduler]\ndependency_failure = \"escalate\"\n",
        ),
    )?;
    let config = config.to_string_lossy().to_string();
    let out = bizq(
        &pool,
        &[
            "--config",
            &config,
            "demo",
            "--tasks",
            "4",
            "--timeout",
            "90",
        ],
    )
    .await
    .ok();
    assert!(out.contains("escalated"), "{out}");
    assert!(
        out.contains("waits behind an escalated task: a person decides"),
        "{out}"
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status IN ('queued', 'processing')")
            .fetch_one(&pool)
            .await?;
    assert_eq!(left, 0);
    Ok(())
}

/// Pins the top-level `--help` (clap docs in `cli/src/main.rs`): every command, and how the
/// database and the config — with the dependency-failure policy — are chosen. Also: no
/// database, or a config that cannot be read, is a clear error.
#[tokio::test]
async fn help_names_every_command_and_where_the_database_and_config_come_from() {
    let help = bizq_env(&[], &["--help"]).await.ok();
    for word in [
        "migrate",
        "enqueue",
        "list",
        "inspect",
        "retry",
        "cancel",
        "stats",
        "demo",
        "--database-url",
        "DATABASE_URL",
        "--config",
        "BIZQ_CONFIG",
        "scheduler.dependency_failure",
        "escalate",
    ] {
        assert!(help.contains(word), "--help should mention {word}:\n{help}");
    }
    bizq_env(&[], &["list"])
        .await
        .fails_with("no database: pass --database-url or set DATABASE_URL");
    let missing = "/nonexistent/bizq.toml";
    bizq_env(
        &[("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")],
        &["--config", missing, "list"],
    )
    .await
    .fails_with(&format!("cannot read {missing}"));
}
