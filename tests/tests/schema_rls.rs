//! Row-level security: tenant isolation and role permissions, as a matrix over every
//! workspace-scoped table.

use bizq_tests::schema_support::{
    TABLES, act_as, act_as_service, connect, count, create_tenant, exec, expect_sqlstate,
    insert_sql, seed_rows, touch_sql, workspace_column,
};

const INSUFFICIENT_PRIVILEGE: &str = "42501";

#[sqlx::test(migrations = "../migrations")]
async fn tenants_are_isolated_on_every_table(pool: sqlx::PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "tenant-a").await?;
    let b = create_tenant(&pool, "tenant-b").await?;
    let rows_a = seed_rows(&pool, &a).await?;
    let rows_b = seed_rows(&pool, &b).await?;
    let mut conn = connect(&pool).await?;

    for table in TABLES {
        let col = workspace_column(table);
        let (row_a, row_b) = (rows_a[table], rows_b[table]);

        // The owner of A can see everything of A (including stores) ...
        act_as(&mut conn, a.owner.auth_id).await?;
        let own = count(
            &mut conn,
            &format!("SELECT count(*) FROM {table} WHERE {col} = '{}'", a.id),
        )
        .await?;
        assert!(own >= 1, "{table}: owner of A sees none of A's rows");
        // ... and none of B's, even when asking for them by id.
        let foreign = count(
            &mut conn,
            &format!("SELECT count(*) FROM {table} WHERE {col} = '{}'", b.id),
        )
        .await?;
        assert_eq!(foreign, 0, "{table}: owner of A sees B's rows");
        let total = count(&mut conn, &format!("SELECT count(*) FROM {table}")).await?;
        assert_eq!(total, own, "{table}: unfiltered read shows rows outside A");

        // Cannot insert into B.
        let r = exec(&mut conn, &insert_sql(table, b.id, rows_b["products"])).await;
        expect_sqlstate(
            r,
            INSUFFICIENT_PRIVILEGE,
            &format!("{table}: owner of A inserts into B"),
        );

        // Cannot update or delete B's row (invisible: 0 rows), but can touch A's own row.
        assert_eq!(
            exec(&mut conn, &touch_sql(table, row_b)).await?,
            0,
            "{table}: A updated B's row"
        );
        assert_eq!(
            exec(&mut conn, &touch_sql(table, row_a)).await?,
            1,
            "{table}: owner of A cannot update A's row"
        );
        if table != "workspaces" {
            assert_eq!(
                exec(
                    &mut conn,
                    &format!("DELETE FROM {table} WHERE id = '{row_b}'")
                )
                .await?,
                0,
                "{table}: A deleted B's row"
            );
            // Moving A's row into B is rejected by WITH CHECK.
            let r = exec(
                &mut conn,
                &format!(
                    "UPDATE {table} SET workspace_id = '{}' WHERE id = '{row_a}'",
                    b.id
                ),
            )
            .await;
            assert!(r.is_err(), "{table}: A moved a row into B");
        }

        // A viewer of A reads A's data (except stores) but cannot change anything.
        act_as(&mut conn, a.viewer.auth_id).await?;
        let seen = count(
            &mut conn,
            &format!("SELECT count(*) FROM {table} WHERE id = '{row_a}'"),
        )
        .await?;
        assert_eq!(
            seen,
            if table == "stores" { 0 } else { 1 },
            "{table}: viewer visibility"
        );
        let r = exec(&mut conn, &insert_sql(table, a.id, rows_a["products"])).await;
        expect_sqlstate(
            r,
            INSUFFICIENT_PRIVILEGE,
            &format!("{table}: viewer inserts"),
        );
        assert_eq!(
            exec(&mut conn, &touch_sql(table, row_a)).await?,
            0,
            "{table}: viewer updated a row"
        );
        if table != "workspaces" {
            assert_eq!(
                exec(
                    &mut conn,
                    &format!("DELETE FROM {table} WHERE id = '{row_a}'")
                )
                .await?,
                0,
                "{table}: viewer deleted a row"
            );
        }

        // A member writes workspace data, but not users, stores or workspace settings.
        act_as(&mut conn, a.member.auth_id).await?;
        let r = exec(&mut conn, &insert_sql(table, a.id, rows_a["products"])).await;
        match table {
            "workspaces" | "users" | "stores" => {
                expect_sqlstate(
                    r,
                    INSUFFICIENT_PRIVILEGE,
                    &format!("{table}: member inserts"),
                );
            }
            _ => assert_eq!(r?, 1, "{table}: member cannot insert workspace data"),
        }
    }

    // service_role (BYPASSRLS) sees the rows of both tenants in every table.
    act_as_service(&mut conn).await?;
    for table in TABLES {
        let col = workspace_column(table);
        let sql = format!(
            "SELECT count(DISTINCT {col}) FROM {table} WHERE {col} IN ('{}', '{}')",
            a.id, b.id
        );
        assert_eq!(
            count(&mut conn, &sql).await?,
            2,
            "{table}: service_role does not see both tenants"
        );
    }
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn members_cannot_see_or_touch_stores(pool: sqlx::PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "tenant-a").await?;
    let rows = seed_rows(&pool, &a).await?;
    let mut conn = connect(&pool).await?;

    for (who, auth, visible) in [
        ("owner", a.owner.auth_id, 1),
        ("admin", a.admin.auth_id, 1),
        ("member", a.member.auth_id, 0),
        ("viewer", a.viewer.auth_id, 0),
    ] {
        act_as(&mut conn, auth).await?;
        assert_eq!(
            count(&mut conn, "SELECT count(*) FROM stores").await?,
            visible,
            "{who} store visibility"
        );
        let touched = exec(&mut conn, &touch_sql("stores", rows["stores"])).await?;
        assert_eq!(touched, visible as u64, "{who} store update");
    }
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn nobody_authenticated_changes_billing_fields(pool: sqlx::PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "tenant-a").await?;
    let mut conn = connect(&pool).await?;
    let billing = [
        "credits_balance = 1000000",
        "credits_used_this_month = 0",
        "credits_overdrawn = 0",
        "monthly_credit_limit = 999999",
        "plan = 'enterprise'",
        "subscription_status = 'trial'",
    ];
    for (who, auth) in [
        ("owner", a.owner.auth_id),
        ("admin", a.admin.auth_id),
        ("member", a.member.auth_id),
        ("viewer", a.viewer.auth_id),
    ] {
        act_as(&mut conn, auth).await?;
        for set in billing {
            let r = exec(
                &mut conn,
                &format!("UPDATE workspaces SET {set} WHERE id = '{}'", a.id),
            )
            .await;
            expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, &format!("{who}: {set}"));
        }
    }
    // Owners and admins may change settings; members and viewers may not (0 rows).
    for (who, auth, expected) in [
        ("owner", a.owner.auth_id, 1),
        ("admin", a.admin.auth_id, 1),
        ("member", a.member.auth_id, 0),
        ("viewer", a.viewer.auth_id, 0),
    ] {
        act_as(&mut conn, auth).await?;
        let n = exec(
            &mut conn,
            &format!(
                "UPDATE workspaces SET name = 'Renamed by {who}' WHERE id = '{}'",
                a.id
            ),
        )
        .await?;
        assert_eq!(n, expected, "{who} renaming the workspace");
    }
    let balance: i32 = sqlx::query_scalar("SELECT credits_balance FROM workspaces WHERE id = $1")
        .bind(a.id)
        .fetch_one(&pool)
        .await?;
    assert_eq!(balance, 100);

    // The billing service can.
    act_as_service(&mut conn).await?;
    let n = exec(
        &mut conn,
        &format!(
            "UPDATE workspaces SET credits_balance = 500 WHERE id = '{}'",
            a.id
        ),
    )
    .await?;
    assert_eq!(n, 1);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn users_edit_own_profile_but_only_admins_manage_roles(
    pool: sqlx::PgPool,
) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "tenant-a").await?;
    let mut conn = connect(&pool).await?;

    act_as(&mut conn, a.member.auth_id).await?;
    let me = a.member.user_id;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE users SET full_name = 'Me' WHERE id = '{me}'")
        )
        .await?,
        1
    );
    let r = exec(
        &mut conn,
        &format!("UPDATE users SET role = 'owner' WHERE id = '{me}'"),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "member promotes self");
    let r = exec(
        &mut conn,
        &format!("UPDATE users SET permissions = '[\"all\"]' WHERE id = '{me}'"),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "member grants self permissions");
    let other = a.viewer.user_id;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE users SET full_name = 'X' WHERE id = '{other}'")
        )
        .await?,
        0
    );
    assert_eq!(
        exec(
            &mut conn,
            &format!("DELETE FROM users WHERE id = '{other}'")
        )
        .await?,
        0
    );

    // Admins manage members and viewers, but not owners.
    act_as(&mut conn, a.admin.auth_id).await?;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE users SET role = 'viewer' WHERE id = '{me}'")
        )
        .await?,
        1
    );
    let r = exec(
        &mut conn,
        &format!("UPDATE users SET role = 'owner' WHERE id = '{me}'"),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "admin creates an owner");
    let r = exec(
        &mut conn,
        &format!("DELETE FROM users WHERE id = '{}'", a.owner.user_id),
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "admin deletes the owner");

    // Owners can do both.
    act_as(&mut conn, a.owner.auth_id).await?;
    assert_eq!(
        exec(
            &mut conn,
            &format!("UPDATE users SET role = 'admin' WHERE id = '{me}'")
        )
        .await?,
        1
    );
    let role: String = sqlx::query_scalar("SELECT role FROM users WHERE id = $1")
        .bind(me)
        .fetch_one(&pool)
        .await?;
    assert_eq!(role, "admin");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn partitions_are_not_a_side_door(pool: sqlx::PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "tenant-a").await?;
    let b = create_tenant(&pool, "tenant-b").await?;
    seed_rows(&pool, &b).await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.owner.auth_id).await?;
    let parts: Vec<String> = sqlx::query_scalar(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'analytics_events'::regclass",
    )
    .fetch_all(&pool)
    .await?;
    assert!(parts.len() >= 4);
    for part in parts {
        let r = exec(&mut conn, &format!("SELECT count(*) FROM {part}")).await;
        expect_sqlstate(
            r,
            INSUFFICIENT_PRIVILEGE,
            &format!("direct read of partition {part}"),
        );
    }
    // Unauthenticated sessions see nothing at all.
    let _ = exec(&mut conn, "RESET ROLE").await?;
    let _ = exec(&mut conn, "SET ROLE anon").await?;
    let r = exec(&mut conn, "SELECT count(*) FROM tasks").await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "anon reads tasks");
    Ok(())
}
