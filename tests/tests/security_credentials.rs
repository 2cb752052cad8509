//! Store credentials stay secret (issue 8, attack 7). Pinned by migration 0009's credentials
//! section: the key lives in `bizq_credentials_keyring` (engine and service_role only), a
//! tenant's `bizq.credentials_key` is ignored, pgcrypto is not executable by tenants, the v2
//! envelope binds the store id and the key's fingerprint, a wrong key fails the write, and
//! `bizq credentials rotate` re-encrypts every store in one transaction.

use bizq_tests::engine::{binary, url_of};
use bizq_tests::schema_support::{
    CREDENTIALS_KEY, act_as, act_as_service, connect, create_store, create_tenant,
    create_workspace, exec, expect_sqlstate,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

const INSUFFICIENT_PRIVILEGE: &str = "42501";
const INVALID_PARAMETER: &str = "22023";
const STORED_KEY: &str = "stored-key-0123456789abcdef";

async fn set_key(conn: &mut PgConnection, key: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT set_config('bizq.credentials_key', $1, false)")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

async fn decrypt(conn: &mut PgConnection, store: Uuid) -> Result<serde_json::Value, sqlx::Error> {
    sqlx::query_scalar("SELECT store_credentials($1)")
        .bind(store)
        .fetch_one(conn)
        .await
}

async fn insert_store(
    conn: &mut PgConnection,
    ws: Uuid,
    secret: &str,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO stores (workspace_id, name, platform, store_url, credentials)
         VALUES ($1, 's', 'shopify', 'https://' || gen_random_uuid() || '.example.com', $2)
         RETURNING id",
    )
    .bind(ws)
    .bind(serde_json::json!({ "access_token": secret }))
    .fetch_one(conn)
    .await
}

/// An owner with the key in their session used to decrypt every store with pgcrypto. Now the
/// key is stored where tenants cannot read it: the owner writes credentials without knowing
/// it (the key in their own session is ignored, even a wrong one), and can neither read the
/// keyring, nor call the key function, nor run pgcrypto, with or without a key.
#[sqlx::test(migrations = "../migrations")]
async fn the_key_never_reaches_a_tenant(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "keyless").await?;
    let existing = create_store(&pool, a.id, serde_json::json!({"token": "t-0001"})).await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.owner.auth_id).await?;
    // The attack: decrypt with pgcrypto and the key from the session.
    let r = exec(
        &mut conn,
        "SELECT pgp_sym_decrypt(decode(credentials ->> 'data', 'base64'), current_setting('bizq.credentials_key')) FROM stores",
    )
    .await;
    expect_sqlstate(r, INSUFFICIENT_PRIVILEGE, "owner runs pgp_sym_decrypt");
    sqlx::query("SELECT bizq_set_credentials_key($1)")
        .bind(CREDENTIALS_KEY)
        .execute(&pool)
        .await?;
    for sql in [
        "SELECT key FROM bizq_credentials_keyring",
        "SELECT bizq_credentials_key()",
        "SELECT bizq_open_credentials(id, credentials, 'x') FROM stores",
        "SELECT store_credentials(id) FROM stores",
    ] {
        expect_sqlstate(exec(&mut conn, sql).await, INSUFFICIENT_PRIVILEGE, sql);
    }
    // The owner writes plaintext with a wrong key in the session: ignored, the stored key wins.
    set_key(&mut conn, "owner-guess-000000000").await?;
    let store = insert_store(&mut conn, a.id, "shpat_owner_secret").await?;
    let raw: String = sqlx::query_scalar("SELECT credentials::text FROM stores WHERE id = $1")
        .bind(store)
        .fetch_one(&mut conn)
        .await?;
    assert!(!raw.contains("shpat_owner_secret"));
    // A member cannot write credentials at all.
    act_as(&mut conn, a.member.auth_id).await?;
    expect_sqlstate(
        insert_store(&mut conn, a.id, "x").await,
        INSUFFICIENT_PRIVILEGE,
        "member writes a store",
    );

    // The service reads both, with no key in its session.
    act_as_service(&mut conn).await?;
    set_key(&mut conn, "").await?;
    assert_eq!(
        decrypt(&mut conn, store).await?,
        serde_json::json!({"access_token": "shpat_owner_secret"})
    );
    assert_eq!(
        decrypt(&mut conn, existing).await?,
        serde_json::json!({"token": "t-0001"})
    );
    Ok(())
}

/// A plaintext written under a wrong key used to be accepted and then unreadable. The key's
/// fingerprint is recorded by its first use; a session with another key fails the write
/// (and the read), without echoing either key.
#[sqlx::test(migrations = "../migrations")]
async fn a_wrong_key_fails_the_write(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "wrong-key").await?;
    create_store(&pool, ws, serde_json::json!({"token": "first"})).await?;
    let mut conn = connect(&pool).await?;
    act_as_service(&mut conn).await?;
    set_key(&mut conn, "some-other-key-000000").await?;
    let r = insert_store(&mut conn, ws, "second").await;
    let msg = expect_sqlstate(r, INVALID_PARAMETER, "write with a wrong key");
    assert!(!msg.contains("some-other-key"), "{msg}");
    assert!(!msg.contains(CREDENTIALS_KEY), "{msg}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stores")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 1);
    Ok(())
}

/// An envelope copied from store A to store B used to decrypt as A's secret. The v2
/// envelope names its store: the copy is rejected on write, and a copy smuggled in past the
/// trigger is refused on read.
#[sqlx::test(migrations = "../migrations")]
async fn envelopes_are_bound_to_their_store(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "envelopes").await?;
    let store_a = create_store(&pool, a.id, serde_json::json!({"token": "secret-of-a"})).await?;
    let store_b = create_store(&pool, a.id, serde_json::json!({"token": "secret-of-b"})).await?;
    let copy = format!(
        "UPDATE stores SET credentials = (SELECT credentials FROM stores WHERE id = '{store_a}') WHERE id = '{store_b}'"
    );
    let mut conn = connect(&pool).await?;
    act_as_service(&mut conn).await?;
    set_key(&mut conn, CREDENTIALS_KEY).await?;
    let msg = expect_sqlstate(
        exec(&mut conn, &copy).await,
        INVALID_PARAMETER,
        "copying A's envelope to B",
    );
    assert!(msg.contains("another store"), "{msg}");
    // Past the trigger (as the table owner could): the read refuses it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE stores DISABLE TRIGGER encrypt_store_credentials_trigger; {copy};
         ALTER TABLE stores ENABLE TRIGGER encrypt_store_credentials_trigger;"
    )))
    .execute(&pool)
    .await?;
    let r = decrypt(&mut conn, store_b).await;
    let msg = expect_sqlstate(r, INVALID_PARAMETER, "reading a copied envelope");
    assert!(!msg.contains("secret-of-a"), "{msg}");
    assert_eq!(
        decrypt(&mut conn, store_a).await?,
        serde_json::json!({"token": "secret-of-a"})
    );
    Ok(())
}

/// `bizq credentials rotate` (the real binary; keys in environment variables) re-encrypts
/// every store under the new key in one transaction; the old key no longer reads; and when
/// one store cannot be decrypted, nothing is changed at all.
#[sqlx::test(migrations = "../migrations")]
async fn rotate_reencrypts_every_store_at_once(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "rotate").await?;
    let mut stores = Vec::new();
    for i in 0..3 {
        stores
            .push(create_store(&pool, ws, serde_json::json!({ "token": format!("t-{i}") })).await?);
    }
    let kids = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT credentials ->> 'kid' FROM stores ORDER BY id")
            .fetch_all(&pool)
            .await
    };
    let before = kids(pool.clone()).await?;

    let rotate = |new_key: &'static str| {
        std::process::Command::new(binary("bizq"))
            .args(["credentials", "rotate"])
            .env("DATABASE_URL", url_of(&pool))
            .env("BIZQ_CREDENTIALS_KEY", CREDENTIALS_KEY)
            .env("BIZQ_NEW_CREDENTIALS_KEY", new_key)
            .output()
    };

    // A corrupt envelope in one store: the rotation fails and changes nothing.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE stores DISABLE TRIGGER encrypt_store_credentials_trigger;
         UPDATE stores SET credentials = jsonb_set(credentials, '{{data}}', '\"AAAA\"') WHERE id = '{}';
         ALTER TABLE stores ENABLE TRIGGER encrypt_store_credentials_trigger;",
        stores[2]
    )))
    .execute(&pool)
    .await?;
    let out = rotate(STORED_KEY)?;
    assert!(
        !out.status.success(),
        "rotation over a corrupt store succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(STORED_KEY) && !stderr.contains(CREDENTIALS_KEY),
        "{stderr}"
    );
    assert_eq!(
        kids(pool.clone()).await?,
        before,
        "a failed rotation changed stores"
    );
    sqlx::query("DELETE FROM stores WHERE id = $1")
        .bind(stores[2])
        .execute(&pool)
        .await?;
    stores.pop();

    let out = rotate(STORED_KEY)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 store(s) re-encrypted"));
    let after = kids(pool.clone()).await?;
    assert!(after.iter().all(|k| !before.contains(k)), "{after:?}");
    // The new key is stored: the service reads without a key; the old key now fails.
    let mut conn = connect(&pool).await?;
    act_as_service(&mut conn).await?;
    for (i, store) in stores.iter().enumerate() {
        assert_eq!(
            decrypt(&mut conn, *store).await?,
            serde_json::json!({ "token": format!("t-{i}") })
        );
    }
    set_key(&mut conn, CREDENTIALS_KEY).await?;
    expect_sqlstate(
        decrypt(&mut conn, stores[0]).await,
        INVALID_PARAMETER,
        "reading with the old key",
    );
    Ok(())
}
