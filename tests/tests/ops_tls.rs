//! TLS to PostgreSQL: a throwaway cluster (scripts/db.sh) with `ssl = on` and a certificate
//! signed by a test CA (made with `openssl`). `sslmode=require` URLs work for the engine's
//! pool and the `bizq` binary, and the session really is encrypted; `verify-full` refuses the
//! server's certificate unless `sslrootcert` names the CA that signed it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bizq::config::DependencyFailurePolicy;
use bizq::db::PoolSettings;
use bizq_tests::engine::binary;
use uuid::Uuid;

/// Runs `scripts/db.sh <cmd>` for a throwaway cluster in `dir`: its stdout, or an error.
fn db_sh(dir: &Path, cmd: &str) -> anyhow::Result<String> {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/db.sh"))
        .arg(cmd)
        .env_remove("DATABASE_URL")
        .env("BIZQ_PG_DIR", dir)
        .env("BIZQ_DB_NAME", "bizq_tls")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "db.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The cluster, destroyed when dropped (also when an assertion panics).
struct Cluster(PathBuf);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = db_sh(&self.0, "destroy");
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("openssl missing ({e}): apt-get install openssl"))?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1 (P-256 keys, quick
/// to make), in `dir`: `ca.crt`, `server.crt`, `server.key`.
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=bizq test CA",
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    )?;
    Ok(())
}

fn settings() -> PoolSettings {
    PoolSettings {
        application_name: "bizq-tls-test".into(),
        max_connections: 2,
        dependency_failure: DependencyFailurePolicy::Cancel,
    }
}

/// `bizq args…` with `url` as DATABASE_URL: exit code and stderr.
fn bizq(url: &str, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = Command::new(binary("bizq"))
        .args(args)
        .env_remove("BIZQ_CONFIG")
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Pins TLS to PostgreSQL (sqlx built with rustls): with `sslmode=require` the engine's pool
/// connects over TLS (`pg_stat_ssl` says so for its session) and `bizq migrate` / `bizq stats`
/// run; `sslmode=verify-full` refuses the certificate of a CA it does not trust, the pool with
/// a certificate error and `bizq` with exit 1; with `sslrootcert` naming that CA it connects.
#[tokio::test]
async fn sslmode_require_connects_and_verify_full_checks_the_certificate() -> anyhow::Result<()> {
    let cluster =
        Cluster(std::env::temp_dir().join(format!("bizq-tls-{}", Uuid::new_v4().simple())));
    let plain = db_sh(&cluster.0, "url")?;
    let data = cluster.0.join("data");
    anyhow::ensure!(
        data.join("PG_VERSION").exists(),
        "no cluster in {}",
        data.display()
    );
    let certs = cluster.0.join("certs");
    std::fs::create_dir_all(&certs)?;
    make_certificates(&certs)?;
    // The server reads its certificate and key from the data directory, as the cluster's
    // owner; the key must be private to it.
    for f in ["server.crt", "server.key"] {
        std::fs::copy(certs.join(f), data.join(f))?;
    }
    let owner = std::fs::metadata(&data)?;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        for f in ["server.crt", "server.key"] {
            std::os::unix::fs::chown(data.join(f), Some(owner.uid()), Some(owner.gid()))?;
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
    }
    {
        let pool = sqlx::PgPool::connect(&plain).await?;
        sqlx::query("ALTER SYSTEM SET ssl = on")
            .execute(&pool)
            .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&pool)
            .await?;
        pool.close().await;
    }

    // The reload is asynchronous: wait until a TLS session is accepted.
    let require = format!("{plain}?sslmode=require");
    let deadline = Instant::now() + Duration::from_secs(20);
    let pool = loop {
        match bizq::db::connect(&require, &settings()).await {
            Ok(pool) => break pool,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("sslmode=require never connected: {e}"),
        }
    };
    let (ssl, version): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await?;
    assert!(ssl, "the pool's session is not encrypted");
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLS")),
        "{version:?}"
    );
    pool.close().await;

    // The binaries read the same URL.
    let (code, _, err) = bizq(&require, &["migrate"])?;
    assert_eq!(code, Some(0), "bizq migrate over TLS: {err}");
    let (code, out, err) = bizq(&require, &["stats"])?;
    assert_eq!(code, Some(0), "bizq stats over TLS: {err}");
    assert!(out.contains("pending"), "{out}");

    // verify-full against a CA nobody trusts: refused, naming the certificate.
    let verify = plain.replace("@127.0.0.1:", "@localhost:");
    let untrusted = format!("{verify}?sslmode=verify-full");
    let e = bizq::db::connect(&untrusted, &settings())
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("verify-full accepted an untrusted certificate"))?
        .to_string();
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    let (code, _, err) = bizq(&untrusted, &["stats"])?;
    assert_eq!(
        code,
        Some(1),
        "bizq stats with an untrusted certificate: {err}"
    );
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");

    // The same with the CA named: the certificate and the host name check out.
    let trusted = format!(
        "{verify}?sslmode=verify-full&sslrootcert={}",
        certs.join("ca.crt").display()
    );
    let pool = bizq::db::connect(&trusted, &settings()).await?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    assert!(ssl);
    pool.close().await;
    let (code, _, err) = bizq(&trusted, &["stats"])?;
    assert_eq!(code, Some(0), "bizq stats with the CA named: {err}");
    Ok(())
}
