//! `schema/current.sql` is the schema the migrations produce, and it does not drift with the
//! calendar. Regenerate it with `scripts/schema-dump.sh` after adding a migration.

use std::path::{Path, PathBuf};
use std::process::Command;

use bizq_tests::engine::url_of;
use sqlx::PgPool;

const REGENERATE: &str = "scripts/schema-dump.sh";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The normalised dump of the database at `url`, by the same script that writes the file.
fn dump(url: &str) -> anyhow::Result<String> {
    let out = Command::new(repo().join("scripts/schema-dump.sh"))
        .arg("--dump")
        .arg(url)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/schema-dump.sh --dump failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A short unified diff of `expected` against `actual` (`diff -u`, first 60 lines), else the
/// first line that differs. `names` label the two sides.
fn short_diff(names: [&str; 2], expected: &str, actual: &str) -> String {
    let dir = std::env::temp_dir().join(format!("bizq-schema-{}", uuid::Uuid::new_v4().simple()));
    let diff = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(names[0]), expected))
        .and_then(|()| std::fs::write(dir.join(names[1]), actual))
        .and_then(|()| {
            Command::new("diff")
                .arg("-u")
                .arg(names[0])
                .arg(names[1])
                .current_dir(&dir)
                .output()
        });
    let _ = std::fs::remove_dir_all(&dir);
    match diff {
        Ok(out) if !out.stdout.is_empty() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .take(60)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => {
            let (n, (e, a)) = expected
                .lines()
                .chain(std::iter::repeat("<end of file>"))
                .zip(actual.lines().chain(std::iter::repeat("<end of file>")))
                .enumerate()
                .find(|(_, (e, a))| e != a)
                .unwrap_or((0, ("", "")));
            format!("first difference at line {}:\n- {e}\n+ {a}", n + 1)
        }
    }
}

/// What `bizq migrate` runs (the same embedded migrator), on a fresh database.
async fn migrated(pool: &PgPool) -> anyhow::Result<String> {
    bizq::db::migrate(pool).await?;
    dump(&url_of(pool))
}

#[sqlx::test(migrations = false)]
async fn the_committed_schema_is_what_the_migrations_produce(pool: PgPool) -> anyhow::Result<()> {
    let actual = migrated(&pool).await?;
    let path = repo().join("schema/current.sql");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == actual,
        "schema/current.sql is not the schema the migrations produce.\n\
         Regenerate it with `{REGENERATE}` (needs PostgreSQL 15's pg_dump), review the diff \
         and commit it with the migration.\n\
         {}",
        short_diff(["current.sql", "migrated.sql"], &committed, &actual)
    );
    Ok(())
}

/// A database migrated in another month (here November 2031, so its three monthly partitions
/// cross a year) dumps to the same text: the file names no month, so it does not change on
/// the first of each month.
#[sqlx::test(migrations = false)]
async fn the_dump_does_not_change_with_the_month_of_migration(pool: PgPool) -> anyhow::Result<()> {
    let this_month = migrated(&pool).await?;

    // Move each monthly partition to the month it would have had: detach it, rename it and
    // its indexes, attach it with the other bounds. The partitions are empty.
    sqlx::raw_sql(
        r#"
        DO $$
        DECLARE
          p record;
          idx record;
          i integer := 0;
          new_name text;
          start_at timestamptz;
        BEGIN
          FOR p IN
            SELECT c.oid, c.relname
              FROM pg_inherits h
              JOIN pg_class c ON c.oid = h.inhrelid
             WHERE h.inhparent = 'analytics_events'::regclass
               AND c.relname ~ '^analytics_events_y\d{4}m\d\d$'
             ORDER BY c.relname
          LOOP
            start_at := timestamptz '2031-11-01 00:00:00+00' + make_interval(months => i);
            new_name := 'analytics_events_' || to_char(start_at AT TIME ZONE 'UTC', '"y"YYYY"m"MM');
            EXECUTE format('ALTER TABLE analytics_events DETACH PARTITION %I', p.relname);
            FOR idx IN
              SELECT ic.relname
                FROM pg_index x
                JOIN pg_class ic ON ic.oid = x.indexrelid
               WHERE x.indrelid = p.oid
            LOOP
              EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname,
                             replace(idx.relname, p.relname, new_name));
            END LOOP;
            EXECUTE format('ALTER TABLE %I RENAME TO %I', p.relname, new_name);
            EXECUTE format('ALTER TABLE analytics_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           new_name, start_at, start_at + interval '1 month');
            i := i + 1;
          END LOOP;
        END $$;
        "#,
    )
    .execute(&pool)
    .await?;
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text
           FROM pg_inherits h
           JOIN pg_class c ON c.oid = h.inhrelid
          WHERE h.inhparent = 'analytics_events'::regclass
          ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        partitions,
        [
            "analytics_events_default",
            "analytics_events_y2031m11",
            "analytics_events_y2031m12",
            "analytics_events_y2032m01"
        ],
        "the database should now look migrated in November 2031"
    );

    let that_month = dump(&url_of(&pool))?;
    assert!(
        this_month == that_month,
        "the dump changed with the month of migration:\n{}",
        short_diff(
            ["migrated-this-month.sql", "migrated-in-2031-11.sql"],
            &this_month,
            &that_month
        )
    );
    for (i, line) in that_month.lines().enumerate() {
        assert!(
            !line.contains("2031") && !line.contains("2032"),
            "line {} names a month: {line}",
            i + 1
        );
    }
    assert!(
        that_month.contains("analytics_events_month2 FOR VALUES FROM ('<month2>') TO ('<month3>')"),
        "the partitions are written as analytics_events_month0..2"
    );
    Ok(())
}
