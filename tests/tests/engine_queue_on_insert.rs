//! A task that needs no scheduler decision is queued by its own INSERT (migration 0012,
//! `tasks_queue_on_insert`), announced on `bizq_queued`; every other task still waits for
//! admission, which decides exactly as before. Workers register the types they serve.

use std::time::Duration;

use bizq::config::DependencyFailurePolicy;
use bizq::handlers::KNOWN_TYPES;
use bizq::lifecycle::{self, CHANNEL_PENDING, CHANNEL_QUEUED, ClaimRequest, NewTask};
use bizq::task_types;
use bizq_tests::engine::{
    InProcessFleet, assert_state, config_with, engine_pool, status, wait_for, workspace,
};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

/// The channels announced by everything committed before the marker, in order; the marker is
/// sent after, so its arrival proves every earlier notification has arrived too.
async fn notifications_until_marker(
    pool: &PgPool,
    listener: &mut PgListener,
) -> anyhow::Result<Vec<String>> {
    sqlx::query("SELECT pg_notify('bizq_test_marker', '')")
        .execute(pool)
        .await?;
    let mut seen = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await??;
        if n.channel() == "bizq_test_marker" {
            return Ok(seen);
        }
        seen.push(n.channel().to_string());
    }
}

async fn listener(pool: &PgPool) -> anyhow::Result<PgListener> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen_all([CHANNEL_QUEUED, CHANNEL_PENDING, "bizq_test_marker"])
        .await?;
    Ok(l)
}

async fn deps_remaining(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<i32>> {
    Ok(
        sqlx::query_scalar("SELECT deps_remaining FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

/// Pins the queue-on-insert trigger and the insert's notification: once a worker registered
/// `ai.generate`, a plain insert of one is `queued` (deps_remaining 0, as admission would set)
/// and claimable with no scheduler at all, and the insert announces `bizq_queued`, not
/// `bizq_pending`. Before the registration the same insert stays `pending`.
#[sqlx::test(migrations = "../migrations")]
async fn an_insert_that_needs_no_decision_is_queued_and_announced(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let mut l = listener(&pool).await?;

    let before = lifecycle::enqueue(&pool, &NewTask::generate(ws, "no worker yet")).await?;
    assert_eq!(status(&pool, before).await?, "pending");
    assert_eq!(deps_remaining(&pool, before).await?, None);
    assert_eq!(
        notifications_until_marker(&pool, &mut l).await?,
        [CHANNEL_PENDING]
    );

    let registered = task_types::register(&pool, None, "test", false).await?;
    assert_eq!(registered, KNOWN_TYPES);
    let id = lifecycle::enqueue(&pool, &NewTask::generate(ws, "hello")).await?;
    assert_eq!(status(&pool, id).await?, "queued");
    assert_eq!(deps_remaining(&pool, id).await?, Some(0));
    assert_eq!(
        notifications_until_marker(&pool, &mut l).await?,
        [CHANNEL_QUEUED]
    );

    // The claim's priority order puts the older pending task nowhere: it is not queued.
    let claimed = lifecycle::claim(
        &pool,
        &ClaimRequest {
            worker_id: "test",
            limit: 10,
            type_patterns: None,
            lease: Duration::from_secs(60),
        },
    )
    .await?;
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(ids, [id]);
    Ok(())
}

/// Pins each condition of the trigger: a dependency, a future schedule, a type no worker
/// registered, a type registered for another kind of worker, a human task, and a cost over the
/// workspace's max_task_cost each leave the task `pending` for admission (one `bizq_pending`
/// for the statement), and admission then decides as it always did. A cost within the max is
/// queued at once.
#[sqlx::test(migrations = "../migrations")]
async fn tasks_that_need_a_decision_wait_for_admission(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    task_types::register(&pool, None, "test", false).await?;
    sqlx::query("INSERT INTO task_types (type, worker_kind) VALUES ('ai.webhooked', 'webhook')")
        .execute(&pool)
        .await?;
    let parent = lifecycle::enqueue(&pool, &NewTask::generate(ws, "parent")).await?;
    assert_eq!(status(&pool, parent).await?, "queued");
    let mut l = listener(&pool).await?;

    let mut child = NewTask::generate(ws, "child");
    child.depends_on = vec![parent];
    let mut later = NewTask::generate(ws, "later");
    later.scheduled_for = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let mut unknown = NewTask::generate(ws, "unknown");
    unknown.task_type = "ai.unregistered".into();
    let mut other_kind = NewTask::generate(ws, "other kind");
    other_kind.task_type = "ai.webhooked".into();
    let mut human = NewTask::generate(ws, "call the supplier");
    human.worker_type = Some("human".into());
    // The default ai_preferences.max_task_cost is 10.
    let mut pricey = NewTask::generate(ws, "a novel");
    pricey.estimated_cost = Some(11);
    let mut fine = NewTask::generate(ws, "a haiku");
    fine.estimated_cost = Some(10);

    let mut ids = Vec::new();
    for t in [&child, &later, &unknown, &other_kind, &human, &pricey] {
        let id = lifecycle::enqueue(&pool, t).await?;
        assert_eq!(status(&pool, id).await?, "pending", "{}", t.name);
        assert_eq!(deps_remaining(&pool, id).await?, None, "{}", t.name);
        ids.push(id);
    }
    let fine = lifecycle::enqueue(&pool, &fine).await?;
    assert_eq!(status(&pool, fine).await?, "queued");
    let seen = notifications_until_marker(&pool, &mut l).await?;
    // One notification per statement: six inserts left a task for admission, one queued.
    let count = |ch: &str| seen.iter().filter(|c| *c == ch).count();
    assert_eq!(
        (count(CHANNEL_PENDING), count(CHANNEL_QUEUED)),
        (6, 1),
        "{seen:?}"
    );

    let r = lifecycle::admit(&pool, 100, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    // The scheduled task is admitted too, but counted nowhere until promote queues it.
    assert_eq!(
        (r.waiting, r.rejected, r.escalated, r.queued),
        (1, 2, 2, 0),
        "{r:?}"
    );
    let [child, later, unknown, other_kind, human, pricey] = ids[..] else {
        unreachable!()
    };
    assert_eq!(status(&pool, child).await?, "pending");
    assert_eq!(deps_remaining(&pool, child).await?, Some(1));
    assert_eq!(status(&pool, later).await?, "pending");
    assert_eq!(deps_remaining(&pool, later).await?, Some(0));
    assert_state(&pool, unknown, "failed", Some("unknown_task_type")).await?;
    // Admission knows the scheduler's types, not the registry: not one of them.
    assert_state(&pool, other_kind, "failed", Some("unknown_task_type")).await?;
    assert_state(&pool, human, "escalated", Some("human_task")).await?;
    assert_state(&pool, pricey, "escalated", Some("over_max_task_cost")).await?;
    Ok(())
}

/// Pins the worker's start-up registration (`task_types::register` in `Worker::run`): a worker
/// registers the handler types its `types` patterns match, as served by `ai` workers, and
/// from then on its tasks are queued on insert and run without any scheduler.
#[sqlx::test(migrations = "../migrations")]
async fn a_worker_registers_the_types_it_serves(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    let config = config_with(&[("worker.types", "[\"other.*\"]")]);
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 0, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.shutdown().await?;
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM task_types")
        .fetch_one(&pool)
        .await?;
    assert_eq!(none, 0, "a worker for other.* registers no ai.* type");

    let config = config_with(&[("worker.types", "[\"ai.*\"]")]);
    let fleet = InProcessFleet::start(&engine, &config, 0, 1);
    wait_for(
        &pool,
        "SELECT EXISTS (SELECT 1 FROM task_types)",
        Duration::from_secs(10),
    )
    .await?;
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT type, worker_kind, registered_by FROM task_types ORDER BY type")
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        rows,
        [(
            "ai.generate".to_string(),
            "ai".to_string(),
            Some("test-worker-0".to_string())
        )]
    );
    // No scheduler runs: the task completes only because its insert queued it.
    let id = lifecycle::enqueue(&pool, &NewTask::generate(ws, "straight through")).await?;
    wait_for(
        &pool,
        "SELECT NOT EXISTS (SELECT 1 FROM tasks WHERE status <> 'completed')",
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(status(&pool, id).await?, "completed");
    fleet.shutdown().await?;
    Ok(())
}

/// Pins the `updated_at` trigger's WHEN clause (migration 0012) from the client's side: an
/// update that leaves `updated_at` alone, in a later transaction, still moves it to now(),
/// and so does one that sets another value; the engine's own writes leave it at their
/// transaction's time (completion: equal to `completed_at`).
#[sqlx::test(migrations = "../migrations")]
async fn updated_at_stays_what_clients_saw(pool: PgPool) -> anyhow::Result<()> {
    let ws = workspace(&pool, 1000).await?;
    task_types::register(&pool, None, "test", false).await?;
    let id = lifecycle::enqueue(&pool, &NewTask::generate(ws, "u")).await?;
    sqlx::query("UPDATE tasks SET updated_at = '2000-01-01' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    let fresh: bool = sqlx::query_scalar(
        "SELECT updated_at > now() - interval '1 hour' FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert!(fresh, "a client's own value is replaced by now()");
    // Backdate without the trigger, then a client update that does not name updated_at.
    sqlx::query("ALTER TABLE tasks DISABLE TRIGGER update_tasks_updated_at")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE tasks SET updated_at = '2000-01-01' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    sqlx::query("ALTER TABLE tasks ENABLE TRIGGER update_tasks_updated_at")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE tasks SET name = 'renamed' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    let fresh: bool = sqlx::query_scalar(
        "SELECT updated_at > now() - interval '1 hour' FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert!(fresh, "an update that leaves updated_at alone moves it");

    let config = config_with(&[]);
    let engine = engine_pool(&pool, &config).await?;
    let fleet = InProcessFleet::start(&engine, &config, 0, 1);
    wait_for(
        &pool,
        "SELECT NOT EXISTS (SELECT 1 FROM tasks WHERE status <> 'completed')",
        Duration::from_secs(20),
    )
    .await?;
    fleet.shutdown().await?;
    let same: bool =
        sqlx::query_scalar("SELECT updated_at = completed_at FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert!(same, "the completion's own now()");
    Ok(())
}
