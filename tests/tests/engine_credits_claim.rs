//! The claim's and unpark's credit and standing checks beyond the balance: the monthly
//! credit limit, an expired trial and a soft-deleted workspace, each against a real
//! PostgreSQL with a healthy workspace claimed in the same statement as a positive control.

use std::time::Duration;

use bizq::config::DependencyFailurePolicy;
use bizq::handlers::KNOWN_TYPES;
use bizq::lifecycle::{self, ClaimRequest, NewTask};
use bizq_tests::engine::*;
use sqlx::PgPool;
use uuid::Uuid;

fn claim_all() -> ClaimRequest<'static> {
    ClaimRequest {
        worker_id: "credits-test",
        limit: 100,
        type_patterns: None,
        lease: Duration::from_secs(30),
    }
}

/// Enqueues `n` `ai.generate` tasks of estimated cost 1, oldest first.
async fn tasks(pool: &PgPool, ws: Uuid, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let mut t = NewTask::generate(ws, &format!("task {i}"));
        t.estimated_cost = Some(1);
        ids.push(lifecycle::enqueue(pool, &t).await?);
    }
    Ok(ids)
}

/// Admits everything enqueued so far and checks it all became `queued`.
async fn admit_all(pool: &PgPool, expected: u64) -> anyhow::Result<()> {
    let r = lifecycle::admit(pool, 1000, KNOWN_TYPES, DependencyFailurePolicy::Cancel).await?;
    assert_eq!(r.queued, expected, "all tasks admitted as queued: {r:?}");
    Ok(())
}

/// `(status, wait_reason)` of each task, in the order given.
async fn states(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(
            sqlx::query_as("SELECT status, wait_reason FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?,
        );
    }
    Ok(out)
}

fn parked(reason: &str, n: usize) -> Vec<(String, Option<String>)> {
    vec![("pending".to_string(), Some(reason.to_string())); n]
}

fn claimed_of(claimed: &[lifecycle::ClaimedTask], ws: Uuid) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = claimed
        .iter()
        .filter(|c| c.workspace_id == ws)
        .map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

fn sorted(ids: &[Uuid]) -> Vec<Uuid> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// Pins the monthly-limit term of CLAIM_SQL's `available` and of unpark's affordability
/// check: a workspace with a large balance but `monthly_credit_limit = 10` and 8 credits used
/// this month gets exactly 2 of its 5 cost-1 tasks, the other 3 are parked as
/// `insufficient_credits`; unpark leaves them parked while the limit still leaves no room (the
/// balance alone would pay), and releases them once the limit is raised.
#[sqlx::test(migrations = "../migrations")]
async fn the_monthly_limit_caps_the_claim_and_holds_parked_tasks(
    pool: PgPool,
) -> anyhow::Result<()> {
    let limited = workspace(&pool, 1_000_000).await?;
    sqlx::query(
        "UPDATE workspaces
            SET monthly_credit_limit = 10,
                credits_used_this_month = 8
          WHERE id = $1",
    )
    .bind(limited)
    .execute(&pool)
    .await?;
    let healthy = workspace(&pool, 1000).await?;
    let limited_tasks = tasks(&pool, limited, 5).await?;
    let healthy_tasks = tasks(&pool, healthy, 3).await?;
    admit_all(&pool, 8).await?;

    let claimed = lifecycle::claim(&pool, &claim_all()).await?;
    assert_eq!(
        claimed_of(&claimed, healthy),
        sorted(&healthy_tasks),
        "positive control: the healthy workspace's tasks are claimed in the same statement"
    );
    assert_eq!(
        claimed_of(&claimed, limited),
        sorted(&limited_tasks[..2]),
        "limit 10 with 8 used pays for exactly the two oldest tasks"
    );
    assert_eq!(
        states(&pool, &limited_tasks[2..]).await?,
        parked("insufficient_credits", 3),
        "the rest are parked for credits"
    );
    let c = credits(&pool, limited).await?;
    assert_eq!((c.reserved, c.used), (2, 8), "{c:?}");

    // The balance (1,000,000) would pay, the month's limit does not: nothing is released.
    assert_eq!(
        lifecycle::unpark(&pool).await?,
        0,
        "unpark while unaffordable"
    );
    assert_eq!(
        states(&pool, &limited_tasks[2..]).await?,
        parked("insufficient_credits", 3)
    );
    assert_eq!(lifecycle::promote(&pool, 100).await?, 0);
    assert!(lifecycle::claim(&pool, &claim_all()).await?.is_empty());

    // Raising the limit makes room: unpark releases exactly the three, and they are claimed.
    sqlx::query("UPDATE workspaces SET monthly_credit_limit = 13 WHERE id = $1")
        .bind(limited)
        .execute(&pool)
        .await?;
    assert_eq!(lifecycle::unpark(&pool).await?, 3, "unpark once affordable");
    assert_eq!(lifecycle::promote(&pool, 100).await?, 3);
    let claimed = lifecycle::claim(&pool, &claim_all()).await?;
    assert_eq!(claimed_of(&claimed, limited), sorted(&limited_tasks[2..]));
    assert_eq!(claimed.len(), 3);
    Ok(())
}

/// Runs the standing scenario: `bad` is a workspace with plenty of credits put out of good
/// standing by `break_sql`; `healthy` is fine. Claim gets only the healthy tasks and parks the
/// bad ones as `subscription_inactive`; unpark keeps them parked (while it releases a parked
/// task of the healthy workspace, the control for unpark itself), and releases them once
/// `repair_sql` restores the standing.
async fn standing_scenario(
    pool: &PgPool,
    break_sql: &'static str,
    repair_sql: &'static str,
) -> anyhow::Result<()> {
    let bad = workspace(pool, 1000).await?;
    sqlx::query(break_sql).bind(bad).execute(pool).await?;
    let healthy = workspace(pool, 1000).await?;
    let bad_tasks = tasks(pool, bad, 3).await?;
    let healthy_tasks = tasks(pool, healthy, 2).await?;
    admit_all(pool, 5).await?;

    let claimed = lifecycle::claim(pool, &claim_all()).await?;
    assert_eq!(
        claimed_of(&claimed, healthy),
        sorted(&healthy_tasks),
        "positive control: the healthy workspace's tasks are claimed in the same statement"
    );
    assert_eq!(
        claimed_of(&claimed, bad),
        Vec::<Uuid>::new(),
        "nothing is claimed for a workspace out of good standing"
    );
    assert_eq!(
        states(pool, &bad_tasks).await?,
        parked("subscription_inactive", 3)
    );
    assert_eq!(credits(pool, bad).await?.reserved, 0);

    // Control for unpark: a healthy task parked for credits is released in the same pass.
    let control = tasks(pool, healthy, 1).await?[0];
    sqlx::query(
        "UPDATE tasks
            SET deps_remaining = 0,
                wait_reason = 'insufficient_credits'
          WHERE id = $1",
    )
    .bind(control)
    .execute(pool)
    .await?;
    assert_eq!(
        lifecycle::unpark(pool).await?,
        1,
        "unpark releases only the healthy workspace's task"
    );
    assert_eq!(
        states(pool, &[control]).await?,
        vec![("pending".to_string(), None)]
    );
    assert_eq!(
        states(pool, &bad_tasks).await?,
        parked("subscription_inactive", 3),
        "unpark keeps the tasks of a workspace out of good standing parked"
    );

    sqlx::query(repair_sql).bind(bad).execute(pool).await?;
    assert_eq!(lifecycle::unpark(pool).await?, 3, "unpark once in standing");
    assert_eq!(lifecycle::promote(pool, 100).await?, 4);
    let claimed = lifecycle::claim(pool, &claim_all()).await?;
    assert_eq!(claimed_of(&claimed, bad), sorted(&bad_tasks));
    Ok(())
}

/// Pins the trial term of CLAIM_SQL's `in_good_standing` and of unpark
/// (`subscription_status = 'trial'` with `trial_ends_at` in the past is not in good standing).
#[sqlx::test(migrations = "../migrations")]
async fn an_expired_trial_claims_nothing_and_stays_parked(pool: PgPool) -> anyhow::Result<()> {
    standing_scenario(
        &pool,
        "UPDATE workspaces
            SET subscription_status = 'trial',
                trial_ends_at = now() - interval '1 day'
          WHERE id = $1",
        "UPDATE workspaces
            SET trial_ends_at = now() + interval '30 days'
          WHERE id = $1",
    )
    .await
}

/// Pins the `deleted_at IS NULL` term of CLAIM_SQL's `in_good_standing` and of unpark: a
/// soft-deleted workspace's tasks are never claimed nor released.
#[sqlx::test(migrations = "../migrations")]
async fn a_deleted_workspace_claims_nothing_and_stays_parked(pool: PgPool) -> anyhow::Result<()> {
    standing_scenario(
        &pool,
        "UPDATE workspaces SET deleted_at = now() WHERE id = $1",
        "UPDATE workspaces SET deleted_at = NULL WHERE id = $1",
    )
    .await
}
