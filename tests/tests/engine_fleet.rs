//! The fleet as ops run it: real `bizq-scheduler` and `bizq-worker` processes against one
//! PostgreSQL — many of each, a worker killed with SIGKILL, the database restarted.

use std::time::Duration;

use bizq_tests::engine::*;
use sqlx::PgPool;
use uuid::Uuid;

/// Logs every status change of every task (`transition_log`, stamped with `clock_timestamp()`
/// inside the changing transaction), so "completed exactly once" is counted, not assumed, and
/// the order of claims and completions can be checked after the run.
async fn audit_transitions(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE transition_log (
             task_id    uuid NOT NULL,
             old_status text NOT NULL,
             new_status text NOT NULL,
             at         timestamptz NOT NULL DEFAULT clock_timestamp()
         );
         CREATE FUNCTION log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO transition_log (task_id, old_status, new_status)
           VALUES (NEW.id, OLD.status, NEW.status);
           RETURN NULL;
         END $$;
         CREATE TRIGGER zz_log_transition AFTER UPDATE OF status ON tasks FOR EACH ROW
           WHEN (NEW.status IS DISTINCT FROM OLD.status)
           EXECUTE FUNCTION log_transition();",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Every completed task was completed once, and each workspace was charged exactly the sum of
/// its completed tasks' actual_cost (balance and credits_used_this_month alike).
async fn assert_charged_once(pool: &PgPool, start_balance: i32) -> anyhow::Result<i64> {
    let (log, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT task_id) FROM transition_log WHERE new_status = 'completed'",
    )
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

/// `config/test.toml`'s `permanent_failure_marker`: the mock answers HTTP 400 to such a prompt.
const REJECT: &str = "[reject]";

/// The retry budget of every task that is, or may become, a parent in the fleet test. At its
/// 30% transient failure rate, a task with the default 3 attempts gives up 2.7% of the time
/// (so about ten of the 400 bulk tasks left at 3 do, every run); one with 10 attempts, 6e-6
/// of the time, so the dependency structure is practically never cut short.
const PARENT_ATTEMPTS: i32 = 10;

/// A prompt the mock charges `cost` credits for (1 credit + 1 per 1000 tokens, tokens being
/// about chars/4 for the prompt plus at most 256 for the answer): 3,200 characters come to
/// 1,056 tokens (2 credits), 7,200 to 2,056 (3 credits).
fn priced_prompt(label: &str, cost: i32) -> String {
    let len = match cost {
        1 => return label.to_string(),
        2 => 3200,
        3 => 7200,
        _ => unreachable!("costs 1..=3"),
    };
    format!("{label} {}", "x".repeat(len - label.len() - 1))
}

/// Enqueues one `ai.generate` task named `cost <n>` after what the mock will charge for it,
/// with [`PARENT_ATTEMPTS`] attempts and a reservation (`estimated_cost`) that is
/// deliberately not that cost: 4 or none (a reservation of 1), alternating every four `i`, so
/// each workspace (`i % 4`) gets both. Charging the reservation instead of `actual_cost`
/// would bill every workspace a different total.
async fn priced_task(
    pool: &PgPool,
    ws: Uuid,
    i: usize,
    label: &str,
    deps: &[Uuid],
) -> anyhow::Result<Uuid> {
    let cost = (i % 3) as i32 + 1;
    let mut t = bizq::lifecycle::NewTask::generate(ws, &priced_prompt(label, cost));
    t.name = format!("cost {cost}");
    t.priority = (i % 10) as i32 + 1;
    t.estimated_cost = (i / 4).is_multiple_of(2).then_some(4);
    t.depends_on = deps.to_vec();
    t.max_attempts = Some(PARENT_ATTEMPTS);
    Ok(bizq::lifecycle::enqueue(pool, &t).await?)
}

/// The fleet as ops run it, on 2,000 tasks across four workspaces. Pins, in one run of real
/// processes: dependency readiness (admit + the completion trigger + promote) — no task is
/// ever claimed before every task it depends on completed, including dependents enqueued
/// while the fleet runs onto parents that are then pending, queued, running or done;
/// exactly-once completion (audit trigger); charging `actual_cost`, not the reservation
/// (costs 1–3 by prompt length, reservations 4 or 1); and that every task that did not
/// complete has a reason the test can name: a `[reject]` prompt (HTTP 400, `bad_request`,
/// attempt 1), mock 503s on every attempt it had (`provider_error`; 30% of calls fail
/// transiently, so retries are everywhere and some bulk tasks run out), or the cancellation
/// of its dependents (`dependency_failed` / `dependency_cancelled`, pointing at
/// that dependency).
#[sqlx::test(migrations = "../migrations")]
async fn two_schedulers_and_four_workers_complete_2000_tasks_exactly_once(
    pool: PgPool,
) -> anyhow::Result<()> {
    audit_transitions(&pool).await?;
    let mut workspaces = Vec::new();
    for _ in 0..4 {
        workspaces.push(workspace(&pool, 1_000_000).await?);
    }
    // 804 tasks before the fleet starts, one by one, with PARENT_ATTEMPTS attempts (like every
    // task enqueued by priced_task): priorities 1..10, 4 in every 50 waiting
    // for the workspace's previous task. Four are rejected by the mock for good, and each of
    // them already has a dependent, which in turn has one.
    let mut all: Vec<Vec<Uuid>> = vec![Vec::new(); 4];
    let mut rejected = Vec::new();
    // Dependents (transitively) of the rejected tasks, with the code they must be cancelled with.
    let mut doomed: Vec<(Uuid, &str)> = Vec::new();
    for i in 0..804usize {
        let w = i % 4;
        let deps: Vec<Uuid> = if i % 50 >= 46 {
            all[w].last().copied().into_iter().collect()
        } else {
            Vec::new()
        };
        let label = if i % 200 == 100 + i / 200 {
            format!("task {i} {REJECT}")
        } else {
            format!("task {i}")
        };
        let id = priced_task(&pool, workspaces[w], i, &label, &deps).await?;
        if label.contains(REJECT) {
            rejected.push((w, id));
            let child = priced_task(&pool, workspaces[w], i, "child of a reject", &[id]).await?;
            let grandchild =
                priced_task(&pool, workspaces[w], i, "grandchild of a reject", &[child]).await?;
            doomed.push((child, "dependency_failed"));
            doomed.push((grandchild, "dependency_cancelled"));
        } else {
            all[w].push(id);
        }
    }
    let url = url_of(&pool);
    let config = config_toml(&[
        ("providers.mock.failure_rate", "0.3"),
        ("providers.mock.latency_ms", "20"),
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
    // 1,188 more while the fleet runs, in 8 rounds of 148. Each round: 100 independent tasks
    // as product code would insert them, one multi-row INSERT spanning all four workspaces
    // (its foreign-key checks lock the workspace rows that claims and completions lock too),
    // half of them with PARENT_ATTEMPTS attempts, half with the default 3; then, per workspace, 12 more links of a chain of dependents (each on the previous one),
    // every third a fan-in on three parents — the chain's tail, a task of the INSERT just made,
    // an older task — and, in the first round, a late dependent of each rejected task (failed
    // by then or not).
    let mut tail: Vec<Option<Uuid>> = vec![None; 4];
    let mut seq = 804usize;
    for round in 0..8usize {
        if round == 4 {
            // Half way, make sure some parents are done, so that later dependents meet them so.
            wait_for(
                &pool,
                "SELECT count(*) >= 200 FROM tasks WHERE status = 'completed'",
                Duration::from_secs(60),
            )
            .await?;
        }
        let bulk: Vec<(Uuid, Uuid, Option<i32>)> = sqlx::query_as(
            "INSERT INTO tasks (workspace_id, type, category, name, input, priority, estimated_cost,
                                max_attempts)
             SELECT ($1::uuid[])[1 + g % 4], 'ai.generate', 'content', 'cost ' || (1 + g % 3),
                    jsonb_build_object('prompt',
                        CASE g % 3 WHEN 0 THEN 'bulk ' || g
                                   WHEN 1 THEN rpad('bulk ' || g, 3200, 'x')
                                   ELSE rpad('bulk ' || g, 7200, 'x') END),
                    1 + g % 10,
                    CASE WHEN (g / 4) % 2 = 0 THEN 4 END,
                    CASE WHEN (g / 8) % 2 = 0 THEN $3 END
               FROM generate_series($2::int, $2::int + 99) g
             RETURNING id, workspace_id, max_attempts",
        )
        .bind(workspaces.clone())
        .bind(seq as i32)
        .bind(PARENT_ATTEMPTS)
        .fetch_all(&pool)
        .await?;
        seq += 100;
        // Only tasks with the larger retry budget become parents (see PARENT_ATTEMPTS).
        for (id, ws, _) in bulk.into_iter().filter(|b| b.2.is_some()) {
            let w = workspaces.iter().position(|x| *x == ws).expect("ours");
            all[w].push(id);
        }
        for w in 0..4 {
            let fresh = all[w][all[w].len() - 1 - round];
            for k in 0..12usize {
                let mut deps: Vec<Uuid> = tail[w].into_iter().collect();
                if k % 3 == 2 {
                    deps.push(fresh);
                    deps.push(all[w][(round * 97 + k * 31) % 200]);
                }
                let id = priced_task(&pool, workspaces[w], seq, "dependent", &deps).await?;
                seq += 1;
                tail[w] = Some(id);
                all[w].push(id);
            }
            if round == 0 {
                for &(rw, r) in rejected.iter().filter(|(rw, _)| *rw == w) {
                    let late =
                        priced_task(&pool, workspaces[rw], seq, "late child of a reject", &[r])
                            .await?;
                    seq += 1;
                    doomed.push((late, "dependency_failed"));
                }
            }
        }
    }
    let total = 804 + rejected.len() * 2 + 8 * (100 + 4 * 12) + rejected.len();
    let enqueued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await?;
    assert_eq!((enqueued as usize, total), (2000, 2000));
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

    // Exactly once, and charged what the mock charged: each completed task's actual_cost is
    // the cost its prompt was built for, and the reservations would have billed otherwise.
    let completed = assert_charged_once(&pool, 1_000_000).await?;
    let mispriced: Vec<(Uuid, String, Option<i32>)> = sqlx::query_as(
        "SELECT id, name, actual_cost FROM tasks
          WHERE status = 'completed' AND actual_cost IS DISTINCT FROM substr(name, 6)::int",
    )
    .fetch_all(&pool)
    .await?;
    assert!(
        mispriced.is_empty(),
        "charged the wrong cost: {mispriced:?}"
    );
    let same_as_reservation: Vec<Uuid> = sqlx::query_scalar(
        "SELECT workspace_id FROM tasks WHERE status = 'completed' GROUP BY workspace_id
         HAVING sum(actual_cost) = sum(GREATEST(COALESCE(estimated_cost, 0), 1))",
    )
    .fetch_all(&pool)
    .await?;
    assert!(
        same_as_reservation.is_empty(),
        "the costs must differ from the reservations for this test to tell them apart"
    );

    // Dependency order: no task was ever claimed (any attempt) before each task it depends on
    // completed. Compared by the audit log's clock_timestamp(), taken inside the claiming and
    // the completing statements: `started_at` is the claim's now(), its transaction's start,
    // which on a starved machine can precede a parent's completion that committed before the
    // claim's snapshot was taken (seen once in a dozen parallel runs), so it cannot order them.
    let early: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT c.id, d.dep
           FROM tasks c
          CROSS JOIN LATERAL unnest(c.depends_on) AS d(dep)
           JOIN transition_log claim ON claim.task_id = c.id AND claim.new_status = 'processing'
           LEFT JOIN transition_log done ON done.task_id = d.dep AND done.new_status = 'completed'
          WHERE done.at IS NULL OR claim.at < done.at",
    )
    .fetch_all(&pool)
    .await?;
    assert!(
        early.is_empty(),
        "{} claims (child, parent) before the parent completed, e.g. {:?}",
        early.len(),
        &early[..early.len().min(5)]
    );
    let (edges, parent_unfinished): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE p.status <> 'completed')
           FROM tasks c
          CROSS JOIN LATERAL unnest(c.depends_on) AS d(dep)
           JOIN tasks p ON p.id = d.dep
          WHERE c.status = 'completed'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        parent_unfinished, 0,
        "a completed task has an unfinished parent"
    );
    assert!(edges >= 200, "{edges} dependency edges checked");
    // The dependents met their parents in every state: what each parent was doing when its
    // child was inserted, from the log.
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE((SELECT l.new_status FROM transition_log l
                           WHERE l.task_id = d.dep AND l.at <= c.created_at
                           ORDER BY l.at DESC LIMIT 1), 'pending') AS parent_state,
                count(*)
           FROM tasks c
          CROSS JOIN LATERAL unnest(c.depends_on) AS d(dep)
          GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let count_of = |s: &str| states.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
    assert!(
        count_of("completed") > 0 && count_of("pending") + count_of("queued") > 0,
        "dependents were enqueued onto finished and unfinished parents alike: {states:?}"
    );
    eprintln!("parents' states when their dependents were enqueued: {states:?}");

    // Every failure has a reason this test can name.
    let unexplained: Vec<(Uuid, String, i32, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT t.id, t.status, t.attempt, t.error_details
           FROM tasks t
          WHERE t.status <> 'completed'
            AND NOT (t.status = 'failed'
                     AND t.input ->> 'prompt' LIKE '%' || $1 || '%'
                     AND t.error_details ->> 'code' = 'bad_request'
                     AND t.attempt = 1)
            AND NOT (t.status = 'failed'
                     AND t.input ->> 'prompt' NOT LIKE '%' || $1 || '%'
                     AND t.error_details ->> 'code' = 'provider_error'
                     AND t.attempt = COALESCE(t.max_attempts, 3)
                     AND (t.error_details ->> 'max_attempts')::int = t.attempt)
            AND NOT (t.status = 'cancelled'
                     AND EXISTS (SELECT 1 FROM tasks d
                                  WHERE d.id::text = t.error_details ->> 'dependency'
                                    AND d.id = ANY (t.depends_on)
                                    AND d.status IN ('failed', 'cancelled')
                                    AND t.error_details ->> 'code' = 'dependency_' || d.status))",
    )
    .bind(REJECT)
    .fetch_all(&pool)
    .await?;
    assert!(
        unexplained.is_empty(),
        "tasks ended without a reason: {unexplained:?}"
    );
    let (rejects_failed, given_up, cancelled): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'failed' AND error_details ->> 'code' = 'bad_request'),
                count(*) FILTER (WHERE status = 'failed' AND error_details ->> 'code' = 'provider_error'),
                count(*) FILTER (WHERE status = 'cancelled')
           FROM tasks",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        rejects_failed as usize,
        rejected.len(),
        "each [reject] failed"
    );
    // The rejected tasks' dependents are cancelled, naming the dependency that failed or was
    // cancelled. Some bulk tasks ran out of attempts (0.3³ of 400, about 11; none with
    // probability 2e-5), so that path was taken too.
    assert!(
        given_up > 0,
        "some tasks gave up after 503s on every attempt"
    );
    for (id, code) in &doomed {
        assert_state(&pool, *id, "cancelled", Some(code)).await?;
    }
    assert!(cancelled as usize >= doomed.len());
    eprintln!(
        "completed {completed}, rejected {rejects_failed}, gave up {given_up}, cancelled {cancelled}"
    );
    assert_eq!(
        completed + rejects_failed + given_up + cancelled,
        total as i64,
        "completed {completed}, rejected {rejects_failed}, gave up {given_up}, cancelled {cancelled}"
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
    audit_transitions(&pool).await?;
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

/// Runs `scripts/db.sh <cmd>` for a throwaway cluster in `dir`: its exit code and stdout.
fn run_db_sh(dir: &std::path::Path, cmd: &str) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/db.sh"))
        .arg(cmd)
        .env_remove("DATABASE_URL")
        .env("BIZQ_PG_DIR", dir)
        .env("BIZQ_DB_NAME", "bizq_restart")
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8(out.stdout)?.trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// [`run_db_sh`], which must exit 0.
fn db_sh(dir: &std::path::Path, cmd: &str) -> anyhow::Result<String> {
    let (code, stdout, stderr) = run_db_sh(dir, cmd)?;
    anyhow::ensure!(code == Some(0), "db.sh {cmd} exited {code:?}: {stderr}");
    Ok(stdout)
}

/// A throwaway cluster made by `scripts/db.sh`, destroyed when dropped — also when an
/// assertion panics, so a failing test leaves no server behind.
struct ThrowawayCluster(std::path::PathBuf);

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let _ = run_db_sh(&self.0, "destroy");
    }
}

/// PostgreSQL restarted (`scripts/db.sh restart`, fast shutdown) while a scheduler and two
/// workers hold tasks in flight (1 s of mock latency each). Pins reconnection of every
/// process and the lease fence across it: the restart is proven (`db.sh restart` exits 0,
/// `pg_postmaster_start_time()` moved, and `db.sh restart` with no cluster exits non-zero),
/// tasks were processing when it happened (seen before, and tasks claimed before the new
/// start completed after it), and afterwards every task completed exactly once and each was
/// charged exactly once.
#[tokio::test]
async fn the_fleet_reconnects_after_postgres_restarts() -> anyhow::Result<()> {
    let nothing = std::env::temp_dir().join(format!("bizq-none-{}", Uuid::new_v4().simple()));
    let (code, _, stderr) = run_db_sh(&nothing, "restart")?;
    assert_eq!(code, Some(1), "db.sh restart of no cluster fails: {stderr}");

    let cluster = ThrowawayCluster(
        std::env::temp_dir().join(format!("bizq-restart-{}", Uuid::new_v4().simple())),
    );
    let dir = cluster.0.clone();
    let url = db_sh(&dir, "url")?;
    // The pool and the fleet go before the cluster does.
    {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        bizq::db::migrate(&pool).await?;
        audit_transitions(&pool).await?;
        let ws = workspace(&pool, 1_000_000).await?;
        for i in 0..120 {
            generate(&pool, ws, &format!("before {i}"), 5, &[]).await?;
        }
        let config = config_toml(&[("providers.mock.latency_ms", "1000")]);
        let fleet = vec![
            Process::start("scheduler", &url, &config, &[])?,
            Process::start("worker", &url, &config, &["--id", "restart-a"])?,
            Process::start("worker", &url, &config, &["--id", "restart-b"])?,
        ];
        wait_for(
            &pool,
            "SELECT count(*) FILTER (WHERE status = 'completed') >= 16
                AND count(*) FILTER (WHERE status = 'processing') > 0
               FROM tasks",
            Duration::from_secs(60),
        )
        .await?;
        let (started_before, in_flight): (chrono::DateTime<chrono::Utc>, i64) = sqlx::query_as(
            "SELECT pg_postmaster_start_time(), count(*) FILTER (WHERE status = 'processing')
               FROM tasks",
        )
        .fetch_one(&pool)
        .await?;
        assert!(in_flight > 0, "tasks are in flight at the restart");
        db_sh(&dir, "restart")?;
        // The test's own pool reconnects too (its first attempts may meet dead connections).
        let mut started_after = None;
        for _ in 0..100 {
            match sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT pg_postmaster_start_time()",
            )
            .fetch_one(&pool)
            .await
            {
                Ok(t) => {
                    started_after = Some(t);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let started_after = started_after.expect("the database answers after the restart");
        assert!(
            started_after > started_before,
            "PostgreSQL restarted: started {started_before}, then {started_after}"
        );
        // Then more work arrives.
        let mut enqueued = 0;
        while enqueued < 120 {
            match generate(&pool, ws, &format!("after {enqueued}"), 5, &[]).await {
                Ok(_) => enqueued += 1,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        wait_for(
            &pool,
            "SELECT count(*) = 240 FROM tasks WHERE status = 'completed'",
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
        assert_eq!(assert_charged_once(&pool, 1_000_000).await?, 240);
        // Work that straddled the restart: claimed before PostgreSQL came back, completed after.
        let straddled: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT c.task_id)
               FROM transition_log c
               JOIN transition_log d ON d.task_id = c.task_id AND d.new_status = 'completed'
              WHERE c.new_status = 'processing'
                AND c.at < $1
                AND d.at > $1",
        )
        .bind(started_after)
        .fetch_one(&pool)
        .await?;
        assert!(
            straddled > 0,
            "some tasks were in flight across the restart"
        );
        let retaken: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE attempt > 1")
            .fetch_one(&pool)
            .await?;
        eprintln!(
            "in flight at the restart: {in_flight}; across it: {straddled}; retaken: {retaken}"
        );
    }
    drop(cluster);
    Ok(())
}
