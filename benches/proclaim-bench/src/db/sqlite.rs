//! SQLite: a fresh database file `outbox.db` in a directory
//! `proclaim_bench_<unique>` of its own under `--sqlite-dir`, removed at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use proclaim::Event;
use proclaim::sqlite::SqliteOutbox;
use sqlx::{AssertSqlSafe, Connection as _};
use tokio::time::Instant;

use super::BenchDb;

/// Prefix of every directory the benchmarks create for SQLite databases.
pub(crate) const SQLITE_DIR_PREFIX: &str = "proclaim_bench_";

/// The scenario's directory and database file, and the writer's outbox
/// (whose pool also serves the baselines and checks; not used by the relay).
pub(crate) struct SqliteDb {
    dir: PathBuf,
    url: String,
    writer: SqliteOutbox,
}

impl SqliteDb {
    /// Creates the directory `proclaim_bench_<suffix>` under `root` and opens
    /// (creates) `outbox.db` in it the way `SqliteOutbox::connect` does: WAL
    /// journal, `synchronous = NORMAL`, a busy timeout.
    pub(crate) async fn create(root: &Path, suffix: &str) -> anyhow::Result<Self> {
        let dir = root.join(format!("{SQLITE_DIR_PREFIX}{suffix}"));
        std::fs::create_dir(&dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
        let file = dir.join("outbox.db");
        let url = format!("sqlite://{}?mode=rwc", file.display());
        match SqliteOutbox::connect(&url).await {
            Ok(writer) => Ok(SqliteDb { dir, url, writer }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e).with_context(|| format!("cannot open SQLite database {url}"))
            }
        }
    }

    /// Closes the writer's pool and removes the directory.
    pub(crate) async fn cleanup(&self) -> Result<(), String> {
        self.writer.pool().close().await;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("directory {}: {e}", self.dir.display())),
        }
    }

    fn table(&self) -> &str {
        self.writer.table_name()
    }
}

impl BenchDb for SqliteDb {
    type Outbox = SqliteOutbox;
    const NAME: &'static str = "sqlite";

    fn describe(&self) -> String {
        format!("file {}", self.dir.join("outbox.db").display())
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        self.writer
            .migrate()
            .await
            .context("migrating the outbox")?;
        Ok(())
    }

    /// Under `BEGIN IMMEDIATE`, as a writer that must not fail on a lock
    /// upgrade would.
    async fn write_batch(&self, events: &[Event]) -> anyhow::Result<()> {
        let mut tx = self.writer.pool().begin_with("BEGIN IMMEDIATE").await?;
        self.writer.enqueue_batch(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Folds the WAL back into the database file and truncates it, so every
    /// timed phase starts with an empty WAL.
    async fn settle(&self) -> anyhow::Result<()> {
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(self.writer.pool())
            .await?;
        anyhow::ensure!(busy == 0, "the WAL checkpoint could not complete");
        Ok(())
    }

    async fn rows(&self) -> anyhow::Result<i64> {
        let sql = format!("SELECT count(*) FROM {}", self.table());
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(self.writer.pool())
            .await?)
    }

    async fn is_empty(&self) -> anyhow::Result<bool> {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", self.table());
        let any: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(self.writer.pool())
            .await?;
        Ok(any == 0)
    }

    /// One transaction per batch: `BEGIN IMMEDIATE`,
    /// `DELETE … WHERE sequence IN (SELECT … LIMIT ?1) RETURNING *`, `COMMIT`.
    async fn claim_delete_all(&self, batch: usize, n: usize) -> anyhow::Result<Duration> {
        let t = self.table();
        let sql = format!(
            "DELETE FROM {t} WHERE sequence IN (SELECT sequence FROM {t} WHERE status = 0 \
             ORDER BY sequence LIMIT ?1) RETURNING *"
        );
        let limit = i64::try_from(batch)?;
        let mut conn = self.writer.pool().acquire().await?;
        let start = Instant::now();
        let mut deleted = 0;
        while deleted < n {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let rows = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            if rows.is_empty() {
                break;
            }
            deleted += rows.len();
        }
        let elapsed = start.elapsed();
        anyhow::ensure!(deleted == n, "claimed and deleted {deleted} rows, not {n}");
        Ok(elapsed)
    }

    async fn relay_outbox(&self) -> anyhow::Result<SqliteOutbox> {
        let outbox = SqliteOutbox::connect(&self.url)
            .await
            .context("cannot open the relay's pool")?;
        outbox.migrate().await.context("migrating the outbox")?;
        Ok(outbox)
    }

    async fn close_relay_outbox(outbox: SqliteOutbox) {
        outbox.pool().close().await;
    }
}
