//! stores.credentials is encrypted at rest; store_credentials() decrypts for service_role only.

use bizq_tests::schema_support::{
    CREDENTIALS_KEY, act_as, act_as_service, connect, create_store, create_tenant,
    create_workspace, exec, expect_sqlstate,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

const SECRET: &str = "shpat_SUPER_SECRET_TOKEN_42";

fn plaintext() -> serde_json::Value {
    serde_json::json!({"access_token": SECRET, "api_key": "key-123", "shop": "demo"})
}

async fn raw_credentials(pool: &PgPool, store: Uuid) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT credentials::text FROM stores WHERE id = $1")
            .bind(store)
            .fetch_one(pool)
            .await?,
    )
}

async fn decrypt(
    conn: &mut PgConnection,
    store: Uuid,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar("SELECT store_credentials($1)")
        .bind(store)
        .fetch_one(conn)
        .await
}

async fn set_key(conn: &mut PgConnection, key: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT set_config('bizq.credentials_key', $1, false)")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn credentials_are_stored_encrypted_and_decrypt_for_service_role(
    pool: PgPool,
) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "stores").await?;
    let store = create_store(&pool, ws, plaintext()).await?;

    let raw = raw_credentials(&pool, store).await?;
    assert!(!raw.contains(SECRET), "plaintext secret stored: {raw}");
    assert!(!raw.contains("key-123"), "plaintext secret stored: {raw}");
    let envelope: serde_json::Value = serde_json::from_str(&raw)?;
    assert_eq!(envelope["enc"], "pgp_sym");
    // v2 since migration 0009: bound to the store and the key's fingerprint.
    assert_eq!(envelope["v"], 2);
    assert!(envelope["kid"].as_str().is_some_and(|k| k.len() == 16));
    assert!(envelope["data"].as_str().is_some_and(|d| d.len() > 40));

    let mut conn = connect(&pool).await?;
    act_as_service(&mut conn).await?;
    set_key(&mut conn, CREDENTIALS_KEY).await?;
    assert_eq!(decrypt(&mut conn, store).await?, Some(plaintext()));
    assert_eq!(
        decrypt(&mut conn, Uuid::new_v4()).await?,
        None,
        "unknown store"
    );

    // Updating other columns keeps the envelope; updating credentials re-encrypts.
    exec(
        &mut conn,
        &format!("UPDATE stores SET name = 'Renamed' WHERE id = '{store}'"),
    )
    .await?;
    assert_eq!(raw_credentials(&pool, store).await?, raw);
    exec(&mut conn, &format!("UPDATE stores SET credentials = '{{\"access_token\": \"rotated\"}}' WHERE id = '{store}'")).await?;
    assert!(!raw_credentials(&pool, store).await?.contains("rotated"));
    assert_eq!(
        decrypt(&mut conn, store).await?,
        Some(serde_json::json!({"access_token": "rotated"}))
    );

    // Wrong key: an error that does not echo the key.
    set_key(&mut conn, "not-the-key").await?;
    let err = decrypt(&mut conn, store)
        .await
        .expect_err("wrong key must fail");
    assert!(!err.to_string().contains("not-the-key"), "{err}");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn missing_key_is_an_error_never_plaintext(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "no-key").await?;
    let r = sqlx::query(
        "INSERT INTO stores (workspace_id, name, platform, store_url, credentials)
         VALUES ($1, 's', 'shopify', 'https://no-key.example.com', $2)",
    )
    .bind(ws)
    .bind(plaintext())
    .execute(&pool)
    .await;
    let msg = expect_sqlstate(r, "55000", "insert without key");
    assert!(msg.contains("encryption key"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stores")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 0);

    // Reading without a key fails as well.
    let store = create_store(&pool, ws, plaintext()).await?;
    let mut conn = connect(&pool).await?;
    act_as_service(&mut conn).await?;
    expect_sqlstate(
        decrypt(&mut conn, store).await,
        "55000",
        "decrypt without key",
    );
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn forged_envelopes_are_rejected(pool: PgPool) -> anyhow::Result<()> {
    let ws = create_workspace(&pool, "forged").await?;
    let forged = serde_json::json!({"enc": "pgp_sym", "v": 1, "data": SECRET});
    let mut conn = connect(&pool).await?;
    set_key(&mut conn, CREDENTIALS_KEY).await?;
    let r = sqlx::query(
        "INSERT INTO stores (workspace_id, name, platform, store_url, credentials)
         VALUES ($1, 's', 'shopify', 'https://forged.example.com', $2)",
    )
    .bind(ws)
    .bind(forged)
    .execute(&mut conn)
    .await;
    // A fake envelope must not smuggle plaintext in.
    let msg = expect_sqlstate(r, "22023", "forged envelope");
    assert!(!msg.contains(SECRET), "{msg}");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn authenticated_users_cannot_decrypt(pool: PgPool) -> anyhow::Result<()> {
    let a = create_tenant(&pool, "decrypt").await?;
    let store = create_store(&pool, a.id, plaintext()).await?;
    let mut conn = connect(&pool).await?;
    act_as(&mut conn, a.owner.auth_id).await?; // even the owner, with the key set
    expect_sqlstate(
        decrypt(&mut conn, store).await,
        "42501",
        "authenticated calls store_credentials",
    );
    // The owner can read the row, but only sees the envelope.
    let raw: String = sqlx::query_scalar("SELECT credentials::text FROM stores WHERE id = $1")
        .bind(store)
        .fetch_one(&mut conn)
        .await?;
    assert!(!raw.contains(SECRET));
    Ok(())
}
