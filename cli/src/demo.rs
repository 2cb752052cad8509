//! `bizq demo`: the whole fleet on one machine — migrate, seed the demo workspace, enqueue a
//! batch with priorities, dependencies and a few tasks built to fail, run one scheduler and
//! two workers as real processes, and print what happened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bizq::TaskStatus;
use bizq::lifecycle::{self, NewTask};
use clap::Args;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::admin;
use bizq::fleet;

const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// `bizq demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Independent product-description tasks to enqueue besides the pipelines.
    #[arg(long, default_value_t = 40)]
    tasks: usize,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

struct Planned {
    ids: Vec<Uuid>,
    labels: BTreeMap<Uuid, String>,
}

async fn seed_workspace(pool: &PgPool) -> anyhow::Result<Uuid> {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO workspaces (name, slug, plan, credits_balance, monthly_credit_limit)
         VALUES ('Demo Workspace', 'demo-workspace', 'growth', 5000, 100000)
         ON CONFLICT (slug) DO UPDATE
            SET credits_balance = GREATEST(workspaces.credits_balance, 5000),
                monthly_credit_limit = GREATEST(workspaces.monthly_credit_limit, 100000)
         RETURNING id",
    )
    .fetch_one(pool)
    .await?;
    sqlx::query(
        "INSERT INTO users (workspace_id, email, full_name, role)
         VALUES ($1, 'demo@bizq.com', 'Demo User', 'owner')
         ON CONFLICT (workspace_id, email) DO NOTHING",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(id)
}

async fn plan(pool: &PgPool, ws: Uuid, n: usize) -> anyhow::Result<Planned> {
    let mut p = Planned {
        ids: Vec::new(),
        labels: BTreeMap::new(),
    };
    let add = |id: Uuid, label: String, p: &mut Planned| {
        p.ids.push(id);
        p.labels.insert(id, label);
    };
    let task = |name: &str, prompt: &str, priority: i32, deps: Vec<Uuid>| {
        let mut t = NewTask::generate(ws, prompt);
        t.name = name.into();
        t.priority = priority;
        t.depends_on = deps;
        t
    };
    // A blog pipeline: outline -> three sections (fan-out) -> assembly (fan-in).
    let outline = lifecycle::enqueue(
        pool,
        &task(
            "blog outline",
            "Outline a post on sustainable sneakers",
            2,
            vec![],
        ),
    )
    .await?;
    add(outline, "blog: outline".into(), &mut p);
    let mut sections = Vec::new();
    for s in 1..=3 {
        let id = lifecycle::enqueue(
            pool,
            &task(
                &format!("blog section {s}"),
                &format!("Write section {s} of the sneakers post"),
                3,
                vec![outline],
            ),
        )
        .await?;
        add(id, format!("blog: section {s} (after outline)"), &mut p);
        sections.push(id);
    }
    let assemble = lifecycle::enqueue(
        pool,
        &task(
            "blog assembly",
            "Assemble the sneakers post",
            3,
            sections.clone(),
        ),
    )
    .await?;
    add(assemble, "blog: assembly (after 3 sections)".into(), &mut p);
    // A pipeline whose first step is rejected by the provider: its dependents are cancelled.
    let research = lifecycle::enqueue(
        pool,
        &task("research", "[reject] Research competitors", 4, vec![]),
    )
    .await?;
    add(
        research,
        "doomed: research (provider rejects it)".into(),
        &mut p,
    );
    let draft = lifecycle::enqueue(
        pool,
        &task("draft", "Draft from the research", 4, vec![research]),
    )
    .await?;
    add(draft, "doomed: draft (after research)".into(), &mut p);
    let publish =
        lifecycle::enqueue(pool, &task("publish", "Publish the draft", 4, vec![draft])).await?;
    add(publish, "doomed: publish (after draft)".into(), &mut p);
    // Product descriptions with priorities 1..10.
    for i in 0..n {
        let prio = (i % 10) as i32 + 1;
        let id = lifecycle::enqueue(
            pool,
            &task(
                &format!("product {i}"),
                &format!("Describe product #{i}, a handmade ceramic mug"),
                prio,
                vec![],
            ),
        )
        .await?;
        add(
            id,
            format!("product description {i} (priority {prio})"),
            &mut p,
        );
    }
    // Tasks that can never run as they are.
    let mut bad = NewTask::generate(ws, "unused");
    bad.input = json!({ "text": "no prompt here" });
    bad.name = "bad input".into();
    add(
        lifecycle::enqueue(pool, &bad).await?,
        "bad input (no prompt)".into(),
        &mut p,
    );
    let mut unknown = NewTask::generate(ws, "render");
    unknown.task_type = "video.render".into();
    unknown.name = "unknown type".into();
    add(
        lifecycle::enqueue(pool, &unknown).await?,
        "unknown type video.render".into(),
        &mut p,
    );
    let mut human = NewTask::generate(ws, "Call the supplier");
    human.worker_type = Some("human".into());
    human.name = "human task".into();
    add(
        lifecycle::enqueue(pool, &human).await?,
        "human task".into(),
        &mut p,
    );
    let mut later = NewTask::generate(ws, "Weekly newsletter");
    later.scheduled_for = Some(chrono::Utc::now() + chrono::Duration::seconds(3));
    later.name = "scheduled".into();
    add(
        lifecycle::enqueue(pool, &later).await?,
        "scheduled 3 s ahead".into(),
        &mut p,
    );
    Ok(p)
}

/// Pending tasks of the demo that wait, directly or through other pending tasks, on an
/// escalated one: under `dependency_failure = "escalate"` they wait for a person, so the demo
/// counts them as settled instead of waiting for its timeout.
async fn behind_escalated(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<i64> {
    let n = sqlx::query_scalar(
        "WITH RECURSIVE stuck AS (
             SELECT id
               FROM tasks
              WHERE id = ANY($1)
                AND status = 'escalated'
             UNION
             SELECT t.id
               FROM tasks t
               JOIN stuck s ON s.id = ANY(t.depends_on)
              WHERE t.id = ANY($1)
                AND t.status = 'pending'
         )
         SELECT count(*)
           FROM stuck s
           JOIN tasks t ON t.id = s.id
          WHERE t.status = 'pending'",
    )
    .bind(ids.to_vec())
    .fetch_one(pool)
    .await?;
    Ok(n)
}

async fn counts(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<BTreeMap<TaskStatus, i64>> {
    let rows =
        sqlx::query("SELECT status, count(*) AS n FROM tasks WHERE id = ANY($1) GROUP BY status")
            .bind(ids.to_vec())
            .fetch_all(pool)
            .await?;
    let mut m = BTreeMap::new();
    for r in rows {
        m.insert(
            r.try_get::<TaskStatus, _>("status")?,
            r.try_get::<i64, _>("n")?,
        );
    }
    Ok(m)
}

fn line(m: &BTreeMap<TaskStatus, i64>) -> String {
    TaskStatus::ALL
        .iter()
        .map(|s| format!("{s} {}", m.get(s).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Runs the demo. Its scheduler and workers use `fleet_config` (bizq's global `--config`) if
/// given, else the built-in demo config: the mock provider with 150 ms latency and 10%
/// transient failures.
pub async fn run(
    url: &str,
    fleet_config: Option<&std::path::Path>,
    args: DemoArgs,
) -> anyhow::Result<()> {
    let config = match fleet_config {
        Some(p) => bizq::Config::from_file(p)?,
        None => bizq::Config::from_toml(DEMO_CONFIG)?,
    };
    admin::migrate(url, &config).await?;
    let pool = admin::pool(url, &config).await?;
    let ws = seed_workspace(&pool).await?;
    let balance_before: i32 =
        sqlx::query_scalar("SELECT credits_balance FROM workspaces WHERE id = $1")
            .bind(ws)
            .fetch_one(&pool)
            .await?;
    let planned = plan(&pool, ws, args.tasks).await?;
    println!(
        "enqueued {} tasks in workspace demo-workspace (balance {balance_before} credits)",
        planned.ids.len()
    );

    let dir = std::env::temp_dir().join(format!("bizq-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = match fleet_config {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.join("demo.toml");
            std::fs::write(&p, DEMO_CONFIG)?;
            p
        }
    };
    let members = vec![
        fleet::spawn(
            "scheduler",
            "scheduler",
            url,
            &config_path,
            &[],
            &[],
            Some(&dir.join("scheduler.log")),
        )?,
        fleet::spawn(
            "worker",
            "worker-1",
            url,
            &config_path,
            &["--id", "demo-worker-1"],
            &[],
            Some(&dir.join("worker-1.log")),
        )?,
        fleet::spawn(
            "worker",
            "worker-2",
            url,
            &config_path,
            &["--id", "demo-worker-2"],
            &[],
            Some(&dir.join("worker-2.log")),
        )?,
    ];
    println!(
        "started 1 scheduler and 2 workers (logs in {})",
        dir.display()
    );

    let started = Instant::now();
    // Done for the demo: final, or escalated (waiting for a person).
    let terminal = [
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::Escalated,
    ];
    let mut last = String::new();
    let finished = loop {
        let m = counts(&pool, &planned.ids).await?;
        let l = line(&m);
        if l != last {
            println!("[{:>5.1}s] {l}", started.elapsed().as_secs_f64());
            last = l;
        }
        let done: i64 = terminal
            .iter()
            .map(|s| m.get(s).copied().unwrap_or(0))
            .sum::<i64>()
            + behind_escalated(&pool, &planned.ids).await?;
        if done as usize == planned.ids.len() {
            break true;
        }
        if started.elapsed() > Duration::from_secs(args.timeout) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let exits = fleet::stop(members).await;
    for (name, code) in &exits {
        println!(
            "{name} exited with {}",
            code.map_or("a signal".to_string(), |c| c.to_string())
        );
    }

    println!("\nsummary after {:.1} s", started.elapsed().as_secs_f64());
    let rows = sqlx::query(
        "SELECT id, status, attempt, locked_by, actual_cost, error_details
           FROM tasks WHERE id = ANY($1)",
    )
    .bind(planned.ids.clone())
    .fetch_all(&pool)
    .await?;
    let mut by_worker: BTreeMap<String, i64> = BTreeMap::new();
    let mut charged = 0i64;
    let mut retried = 0;
    let mut notes = Vec::new();
    for r in &rows {
        let id: Uuid = r.try_get("id")?;
        let status: TaskStatus = r.try_get("status")?;
        let attempt: i32 = r.try_get("attempt")?;
        if status == TaskStatus::Completed {
            *by_worker
                .entry(
                    r.try_get::<Option<String>, _>("locked_by")?
                        .unwrap_or_default(),
                )
                .or_default() += 1;
            charged += i64::from(r.try_get::<Option<i32>, _>("actual_cost")?.unwrap_or(0));
            if attempt > 1 {
                retried += 1;
            }
        } else {
            let err: Option<Value> = r.try_get("error_details")?;
            let msg = err
                .as_ref()
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or(if status == "pending" {
                    "waits behind an escalated task: a person decides (bizq retry / cancel)"
                } else {
                    "-"
                })
                .to_string();
            notes.push(format!(
                "  {:<10} {:<40} {msg}",
                status,
                planned.labels.get(&id).cloned().unwrap_or_default()
            ));
        }
    }
    println!("{}", line(&counts(&pool, &planned.ids).await?));
    for (w, n) in &by_worker {
        println!("  {w} completed {n}");
    }
    let (noun, verb) = if retried == 1 {
        ("task", "was")
    } else {
        ("tasks", "were")
    };
    println!("  {retried} {noun} {verb} completed after a transient failure and a retry");
    let balance_after: i32 =
        sqlx::query_scalar("SELECT credits_balance FROM workspaces WHERE id = $1")
            .bind(ws)
            .fetch_one(&pool)
            .await?;
    println!(
        "credits: {balance_before} -> {balance_after} (charged {}; sum of completed tasks' actual_cost {charged})",
        balance_before - balance_after
    );
    notes.sort();
    println!("tasks that did not complete, and why:");
    for n in notes {
        println!("{n}");
    }
    if !finished {
        bail!(
            "not every demo task reached a terminal state within {} s",
            args.timeout
        );
    }
    if exits.iter().any(|(_, c)| *c != Some(0)) {
        bail!("a fleet process did not exit cleanly");
    }
    let _ = std::fs::remove_dir_all(&dir).context("removing the demo's temp dir");
    Ok(())
}
