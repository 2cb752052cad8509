//! No tenant lock stalls a claim (issue 8, attack 5): a tenant holding its workspace row
//! locked in an open transaction used to make every claim touching that workspace wait, for
//! every tenant in the batch. Pinned by `FOR NO KEY UPDATE SKIP LOCKED` in the claim's
//! `funds` step, its short retries and the `workspace_busy` parking (`lifecycle::CLAIM_SQL`,
//! `lifecycle::claim`), and `unpark` bringing the parked tasks back.

use std::time::{Duration, Instant};

use bizq::config::DependencyFailurePolicy;
use bizq::lifecycle::{self, ClaimRequest};
use bizq_tests::schema_support::{act_as, connect, create_tenant, exec};
use sqlx::PgPool;
use uuid::Uuid;

async fn queued(pool: &PgPool, ws: Uuid, n: usize, priority: i32) -> anyhow::Result<()> {
    for _ in 0..n {
        sqlx::query(
            "INSERT INTO tasks (workspace_id, type, category, name, input, priority, estimated_cost)
             VALUES ($1, 'ai.generate', 'content', 'n', '{\"prompt\": \"p\"}', $2, 1)",
        )
        .bind(ws)
        .bind(priority)
        .execute(pool)
        .await?;
    }
    lifecycle::admit(pool, 100, &["ai.generate"], DependencyFailurePolicy::Cancel).await?;
    Ok(())
}

async fn claim(pool: &PgPool) -> anyhow::Result<Vec<lifecycle::ClaimedTask>> {
    let req = ClaimRequest {
        worker_id: "stall-test",
        limit: 20,
        type_patterns: None,
        lease: Duration::from_secs(60),
    };
    Ok(
        tokio::time::timeout(Duration::from_secs(10), lifecycle::claim(pool, &req))
            .await
            .map_err(|_| anyhow::anyhow!("the claim waited for the tenant's lock"))??,
    )
}

/// An owner's open `UPDATE workspaces` and a member's open `UPDATE tasks` of a completed task
/// (whose billing trigger locks the workspace row) both hold workspace A's row. Claims still
/// return B's tasks at once; A's tasks (higher priority, first in line) are parked as
/// `workspace_busy` instead of blocking the head of the queue, and are claimed after the
/// tenant lets go.
#[sqlx::test(migrations = "../migrations")]
async fn a_tenants_open_transaction_does_not_stall_claims(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "locker").await?;
    let b = create_tenant(&pool, "bystander").await?;
    let done: Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (workspace_id, type, category, name, input, status, completed_at)
         VALUES ($1, 'ai.generate', 'content', 'done', '{}', 'completed', now()) RETURNING id",
    )
    .bind(a.id)
    .fetch_one(&pool)
    .await?;

    let locks = [
        (
            a.owner.auth_id,
            format!("UPDATE workspaces SET name = 'busy' WHERE id = '{}'", a.id),
        ),
        (
            a.member.auth_id,
            format!("UPDATE tasks SET name = 'touched' WHERE id = '{done}'"),
        ),
    ];
    for (who, lock_sql) in locks {
        queued(&pool, a.id, 5, 1).await?;
        queued(&pool, b.id, 3, 5).await?;
        let mut tenant = connect(&pool).await?;
        act_as(&mut tenant, who).await?;
        exec(&mut tenant, "BEGIN").await?;
        assert_eq!(exec(&mut tenant, &lock_sql).await?, 1);

        let started = Instant::now();
        let got = claim(&pool).await?;
        println!("claim with A's row locked: {:?}", started.elapsed());
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.iter().all(|t| t.workspace_id == b.id));
        let parked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE workspace_id = $1 AND wait_reason = 'workspace_busy'",
        )
        .bind(a.id)
        .fetch_one(&pool)
        .await?;
        assert_eq!(parked, 5);

        exec(&mut tenant, "COMMIT").await?;
        assert_eq!(lifecycle::unpark(&pool).await?, 5);
        assert_eq!(lifecycle::promote(&pool, 100).await?, 5);
        let got = claim(&pool).await?;
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|t| t.workspace_id == a.id));
        sqlx::query("UPDATE tasks SET status = 'completed', completed_at = now() WHERE status = 'processing'")
            .execute(&pool)
            .await?;
    }
    Ok(())
}
