//! `bizq credentials`: keep the store-credentials key in the database's engine-only keyring,
//! and rotate it (every store re-encrypted in one transaction). Keys are read from environment
//! variables, never from flags, so they never show in `ps` or shell history.

use anyhow::{Context, bail};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum CredentialsCommand {
    /// Store the key in the database (table bizq_credentials_keyring, readable by the engine
    /// and service_role only). Afterwards no session needs bizq.credentials_key, and owners
    /// and admins can write credentials without ever seeing the key. If credentials were
    /// already written with a session key, this must be that key.
    SetKey {
        /// Environment variable holding the key (at least 16 characters).
        #[arg(long, default_value = "BIZQ_CREDENTIALS_KEY")]
        key_env: String,
    },
    /// Re-encrypt every store's credentials under a new key, in one transaction: all stores
    /// or none.
    Rotate {
        /// Environment variable holding the new key (at least 16 characters).
        #[arg(long, default_value = "BIZQ_NEW_CREDENTIALS_KEY")]
        new_key_env: String,
        /// Environment variable holding the current key, used only when the database does
        /// not store it.
        #[arg(long, default_value = "BIZQ_CREDENTIALS_KEY")]
        old_key_env: String,
        /// Do not keep the new key in the database; engine and service sessions then set
        /// bizq.credentials_key themselves.
        #[arg(long)]
        key_out_of_database: bool,
    },
}

pub async fn run(pool: &sqlx::PgPool, command: CredentialsCommand) -> anyhow::Result<()> {
    match command {
        CredentialsCommand::SetKey { key_env } => {
            let key = key_from_env(&key_env)?;
            sqlx::query("SELECT bizq_set_credentials_key($1)")
                .bind(key)
                .execute(pool)
                .await
                .context("storing the credentials key")?;
            println!("credentials key stored in the database (fingerprint recorded)");
        }
        CredentialsCommand::Rotate {
            new_key_env,
            old_key_env,
            key_out_of_database,
        } => {
            let new_key = key_from_env(&new_key_env)?;
            let mut tx = pool.begin().await?;
            if let Ok(old_key) = std::env::var(&old_key_env) {
                sqlx::query("SELECT set_config('bizq.credentials_key', $1, true)")
                    .bind(old_key)
                    .execute(&mut *tx)
                    .await?;
            }
            let n: i32 = sqlx::query_scalar("SELECT bizq_rotate_credentials_key($1, $2)")
                .bind(new_key)
                .bind(!key_out_of_database)
                .fetch_one(&mut *tx)
                .await
                .context("re-encrypting the stores' credentials (nothing was changed)")?;
            tx.commit().await?;
            println!(
                "{n} store(s) re-encrypted under the new key{}",
                if key_out_of_database {
                    "; set bizq.credentials_key to it in engine and service sessions"
                } else {
                    " (stored in the database)"
                }
            );
        }
    }
    Ok(())
}

fn key_from_env(name: &str) -> anyhow::Result<String> {
    let key = std::env::var(name).with_context(|| format!("${name} is not set"))?;
    if key.chars().count() < 16 {
        bail!("${name} must hold at least 16 characters");
    }
    Ok(key)
}
