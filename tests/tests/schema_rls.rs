//! Row-level security: tenant isolation and role permissions, as a matrix over every
//! workspace-scoped table.

use bizq_tests::schema_support::{
    TABLES, act_as, act_as_service, connect, count, create_tenant, exec, expect_move_refused,
    expect_permission_denied, expect_sqlstate, fresh_row, insert_sql, move_all_sql, move_sql,
    seed_rows, touch_sql, workspace_column,
};

const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Rows of `table` in workspace `ws`, counted by the superuser (the truth RLS filters).
async fn rows_in(pool: &sqlx::PgPool, table: &str, ws: uuid::Uuid) -> anyhow::Result<i64> {
    let col = workspace_column(table);
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE {col} = '{ws}'"
    )))
    .fetch_one(pool)
    .await?)
}

/// Moves row `mover` of `table` (a row of `from`) into `to` with no WHERE clause, in a
/// transaction on `conn` (which acts as a user of `from`) where the superuser first removed
/// every other row of `from` in `table` except `keep` (the acting user's own row, for
/// `users`), and then rolls everything back. Without a WHERE, PostgreSQL checks the new row
/// against the UPDATE policy's WITH CHECK alone, so this result depends on that clause only.
async fn move_alone(
    conn: &mut sqlx::PgConnection,
    table: &str,
    mover: uuid::Uuid,
    keep: uuid::Uuid,
    from: uuid::Uuid,
    to: uuid::Uuid,
    to_rows: &std::collections::BTreeMap<&'static str, uuid::Uuid>,
) -> anyhow::Result<Result<u64, sqlx::Error>> {
    exec(conn, "BEGIN").await?;
    exec(conn, "RESET ROLE").await?;
    let removed = exec(
        conn,
        &format!(
            "DELETE FROM {table} WHERE workspace_id = '{from}' AND id NOT IN ('{mover}', '{keep}')"
        ),
    )
    .await;
    exec(conn, "SET ROLE authenticated").await?;
    let result = match removed {
        Ok(_) => exec(conn, &move_all_sql(table, to, to_rows)).await,
        Err(e) => Err(e),
    };
    exec(conn, "ROLLBACK").await?;
    Ok(result)
}

/// The tenant matrix: for every workspace-scoped table and every role of tenant A (owner,
/// admin, member, viewer), what it reads, inserts, updates, deletes and moves, in A and in B,
/// with exact row counts. Pins the USING and WITH CHECK clauses of every policy of 0002 and
/// the table privileges. Moving a row into B is set up so that every foreign key is satisfied
/// (see `move_sql`) and the test expects exactly the RLS rejection ("new row violates
/// row-level security policy", 42501). A move `WHERE id = …` is also checked against the
/// SELECT policy (PostgreSQL applies it to the new row when the statement reads the table),
/// so each move is repeated without a WHERE, alone in A's table (`move_alone`), where only
/// the UPDATE policy's WITH CHECK can stop it. Workspaces are not moved: their tenant column
/// is their primary key, which no role may update (no column privilege).
#[sqlx::test(migrations = "../migrations")]
async fn tenants_are_isolated_on_every_table(pool: sqlx::PgPool) -> anyhow::Result<()> {
    // Tenants write store credentials only once the engine keeps the key (migration 0009:
    // `bizq credentials set-key`); a tenant session's own key is ignored.
    sqlx::query("SELECT bizq_set_credentials_key($1)")
        .bind(bizq_tests::schema_support::CREDENTIALS_KEY)
        .execute(&pool)
        .await?;
    let a = create_tenant(&pool, "tenant-a").await?;
    let b = create_tenant(&pool, "tenant-b").await?;
    let rows_a = seed_rows(&pool, &a).await?;
    let rows_b = seed_rows(&pool, &b).await?;
    let mut conn = connect(&pool).await?;
    let mut b_before = Vec::new();
    for table in TABLES {
        b_before.push(rows_in(&pool, table, b.id).await?);
    }

    for table in TABLES {
        let col = workspace_column(table);
        let (row_a, row_b) = (rows_a[table], rows_b[table]);
        let is_workspaces = table == "workspaces";

        // Owners and admins: everything of A (stores included), nothing of B.
        for (who, auth) in [("owner", a.owner.auth_id), ("admin", a.admin.auth_id)] {
            act_as(&mut conn, auth).await?;
            let own = count(
                &mut conn,
                &format!("SELECT count(*) FROM {table} WHERE {col} = '{}'", a.id),
            )
            .await?;
            assert_eq!(
                own,
                rows_in(&pool, table, a.id).await?,
                "{table}: {who} of A sees all of A's rows"
            );
            let foreign = count(
                &mut conn,
                &format!("SELECT count(*) FROM {table} WHERE {col} = '{}'", b.id),
            )
            .await?;
            assert_eq!(foreign, 0, "{table}: {who} of A sees B's rows");
            let total = count(&mut conn, &format!("SELECT count(*) FROM {table}")).await?;
            assert_eq!(
                total, own,
                "{table}: {who}'s unfiltered read shows rows outside A"
            );

            // Inserts: never into B; into A everything but a workspace (a service operation).
            let r = exec(&mut conn, &insert_sql(table, b.id, rows_b["products"])).await;
            expect_sqlstate(
                r,
                INSUFFICIENT_PRIVILEGE,
                &format!("{table}: {who} of A inserts into B"),
            );
            let r = exec(&mut conn, &insert_sql(table, a.id, rows_a["products"])).await;
            if is_workspaces {
                expect_permission_denied(r, &format!("{who} creates a workspace"));
            } else {
                assert_eq!(r?, 1, "{table}: {who} inserts into A");
            }

            // Updates: A's row, not B's (invisible: 0 rows).
            assert_eq!(
                exec(&mut conn, &touch_sql(table, row_b)).await?,
                0,
                "{table}: {who} of A updated B's row"
            );
            assert_eq!(
                exec(&mut conn, &touch_sql(table, row_a)).await?,
                1,
                "{table}: {who} of A cannot update A's row"
            );

            if is_workspaces {
                // Deleting a workspace is a service operation: no DELETE privilege at all.
                for ws in [a.id, b.id] {
                    let r = exec(
                        &mut conn,
                        &format!("DELETE FROM workspaces WHERE id = '{ws}'"),
                    )
                    .await;
                    expect_permission_denied(r, &format!("{who} deletes workspace {ws}"));
                }
                continue;
            }
            // Deletes: a row of A, never B's.
            assert_eq!(
                exec(
                    &mut conn,
                    &format!("DELETE FROM {table} WHERE id = '{row_b}'")
                )
                .await?,
                0,
                "{table}: {who} of A deleted B's row"
            );
            let doomed = fresh_row(&pool, table, a.id, rows_a["products"]).await?;
            assert_eq!(
                exec(
                    &mut conn,
                    &format!("DELETE FROM {table} WHERE id = '{doomed}'")
                )
                .await?,
                1,
                "{table}: {who} deletes a row of A"
            );
            // Moving a row of A into B (foreign keys satisfied) is an RLS violation: by id
            // (WITH CHECK and the SELECT policy both apply), then alone (WITH CHECK only).
            let mover = fresh_row(&pool, table, a.id, rows_a["products"]).await?;
            let r = exec(&mut conn, &move_sql(table, mover, b.id, &rows_b)).await;
            expect_move_refused(table, r, &format!("{table}: {who} of A moves a row into B"));
            let actor = if who == "owner" {
                a.owner.user_id
            } else {
                a.admin.user_id
            };
            let r = move_alone(&mut conn, table, mover, actor, a.id, b.id, &rows_b).await?;
            expect_move_refused(
                table,
                r,
                &format!("{table}: {who} of A moves a row into B (WITH CHECK alone)"),
            );
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
        if !is_workspaces {
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
        // Member updates: A's data, and its own profile (the seeded users row is the
        // member's own); not A's settings or stores; nothing of B.
        let expected_touch = match table {
            "workspaces" | "stores" => 0,
            _ => 1,
        };
        assert_eq!(
            exec(&mut conn, &touch_sql(table, row_a)).await?,
            expected_touch,
            "{table}: member updates A's row"
        );
        assert_eq!(
            exec(&mut conn, &touch_sql(table, row_b)).await?,
            0,
            "{table}: member of A updated B's row"
        );
        if is_workspaces {
            for ws in [a.id, b.id] {
                let r = exec(
                    &mut conn,
                    &format!("DELETE FROM workspaces WHERE id = '{ws}'"),
                )
                .await;
                expect_permission_denied(r, &format!("member deletes workspace {ws}"));
            }
            continue;
        }
        // Member deletes: A's data, not users (another user's row) or stores; nothing of B.
        let other = fresh_row(&pool, table, a.id, rows_a["products"]).await?;
        assert_eq!(
            exec(&mut conn, &touch_sql(table, other)).await?,
            match table {
                "users" | "stores" => 0, // another user's profile; stores are invisible
                _ => 1,
            },
            "{table}: member updates another row of A"
        );
        let expected_delete = match table {
            "users" | "stores" => 0,
            _ => 1,
        };
        assert_eq!(
            exec(
                &mut conn,
                &format!("DELETE FROM {table} WHERE id = '{other}'")
            )
            .await?,
            expected_delete,
            "{table}: member deletes a row of A"
        );
        assert_eq!(
            exec(
                &mut conn,
                &format!("DELETE FROM {table} WHERE id = '{row_b}'")
            )
            .await?,
            0,
            "{table}: member of A deleted B's row"
        );
        // Member moves: rejected by WITH CHECK where the member may update at all; users and
        // stores rows of others are not even visible to its UPDATE (0 rows).
        let mover = fresh_row(&pool, table, a.id, rows_a["products"]).await?;
        let r = exec(&mut conn, &move_sql(table, mover, b.id, &rows_b)).await;
        match table {
            "users" | "stores" => {
                assert_eq!(r?, 0, "{table}: member moved a row it cannot update")
            }
            _ => {
                expect_move_refused(
                    table,
                    r,
                    &format!("{table}: member of A moves a row into B"),
                );
                let r = move_alone(
                    &mut conn,
                    table,
                    mover,
                    a.member.user_id,
                    a.id,
                    b.id,
                    &rows_b,
                )
                .await?;
                expect_move_refused(
                    table,
                    r,
                    &format!("{table}: member of A moves a row into B (WITH CHECK alone)"),
                );
            }
        }
    }

    // Nothing of B changed hands: B's seeded rows are all still B's, and B holds exactly the
    // rows it was seeded with (every move into B was rejected).
    for (table, before) in TABLES.into_iter().zip(b_before) {
        assert_eq!(
            rows_in(&pool, table, b.id).await?,
            before,
            "{table}: rows were added to or removed from B"
        );
        let col = workspace_column(table);
        let still: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE id = '{}' AND {col} = '{}'",
            rows_b[table], b.id
        )))
        .fetch_one(&pool)
        .await?;
        assert_eq!(still, 1, "{table}: B's row is intact");
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
