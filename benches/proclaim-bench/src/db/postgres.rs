//! PostgreSQL: a schema `bench_<unique>` in the database of `--database-url`.

use std::time::Duration;

use anyhow::Context as _;
use proclaim::Event;
use proclaim::postgres::{PgOutbox, PgOutboxOptions};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::time::Instant;

use super::{BenchDb, SCHEMA_PREFIX, within};

/// The scenario's schema, and a pool for writers, baselines and checks (not
/// used by the relay). Clones share the pool.
#[derive(Clone)]
pub(crate) struct PgDb {
    pub(crate) database_url: String,
    pub(crate) pool: PgPool,
    /// The scenario's schema.
    pub(crate) schema: String,
    /// The drain scenario's writer, on [`PgDb::pool`].
    writer: PgOutbox,
}

impl PgDb {
    /// Connects and creates the schema `bench_<suffix>`.
    pub(crate) async fn create(database_url: &str, suffix: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(database_url)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {database_url}"))?;
        let schema = format!("{SCHEMA_PREFIX}{suffix}");
        let writer = PgOutbox::with_options(
            pool.clone(),
            PgOutboxOptions::default().with_schema(&schema),
        )?;
        sqlx::raw_sql(AssertSqlSafe(format!(r#"CREATE SCHEMA "{schema}""#)))
            .execute(&pool)
            .await
            .with_context(|| format!("cannot create schema {schema}"))?;
        Ok(PgDb {
            database_url: database_url.to_owned(),
            pool,
            schema,
            writer,
        })
    }

    /// A `PgOutbox` on the scenario's schema with a pool of its own (as a
    /// relay process would have), migrated.
    pub(crate) async fn outbox(&self, notify: bool) -> anyhow::Result<PgOutbox> {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&self.database_url)
            .await
            .context("cannot connect the relay's pool")?;
        let options = PgOutboxOptions::default()
            .with_schema(&self.schema)
            .with_notify(notify);
        let outbox = PgOutbox::with_options(pool, options)?;
        outbox.migrate().await.context("migrating the outbox")?;
        Ok(outbox)
    }

    /// The outbox table, quoted and schema-qualified.
    pub(crate) fn table(&self) -> String {
        format!(r#""{}".outbox"#, self.schema)
    }

    /// Number of rows in the outbox table.
    pub(crate) async fn outbox_rows(&self) -> anyhow::Result<i64> {
        let sql = format!("SELECT count(*) FROM {}", self.table());
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Whether the outbox table holds no row.
    pub(crate) async fn outbox_is_empty(&self) -> anyhow::Result<bool> {
        let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {})", self.table());
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }

    /// `VACUUM ANALYZE` of the outbox, so every timed phase starts on a table
    /// without dead rows and with fresh statistics.
    pub(crate) async fn vacuum(&self) -> anyhow::Result<()> {
        sqlx::raw_sql(AssertSqlSafe(format!("VACUUM ANALYZE {}", self.table())))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The outbox's dead tuples (as the statistics last counted them) and
    /// its size on disk with indexes, in bytes.
    pub(crate) async fn dead_tuples(&self) -> anyhow::Result<(i64, i64)> {
        let sql = format!(
            "SELECT coalesce(n_dead_tup, 0), pg_total_relation_size(relid) \
             FROM pg_stat_user_tables WHERE relid = '{}'::regclass",
            self.table()
        );
        Ok(sqlx::query_as(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Drops the schema and closes the pool.
    pub(crate) async fn cleanup(&self) -> Result<(), String> {
        let drop = format!(r#"DROP SCHEMA IF EXISTS "{}" CASCADE"#, self.schema);
        let dropped = within(
            &format!("schema {}", self.schema),
            Duration::from_secs(60),
            sqlx::raw_sql(AssertSqlSafe(drop)).execute(&self.pool),
        )
        .await;
        self.pool.close().await;
        dropped.map(|_| ())
    }
}

impl BenchDb for PgDb {
    type Outbox = PgOutbox;
    const NAME: &'static str = "postgres";

    fn describe(&self) -> String {
        format!("schema {}", self.schema)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        self.writer
            .migrate()
            .await
            .context("migrating the outbox")?;
        Ok(())
    }

    async fn write_batch(&self, events: &[Event]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        self.writer.enqueue_batch(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn settle(&self) -> anyhow::Result<()> {
        self.vacuum().await
    }

    async fn rows(&self) -> anyhow::Result<i64> {
        self.outbox_rows().await
    }

    async fn is_empty(&self) -> anyhow::Result<bool> {
        self.outbox_is_empty().await
    }

    /// One statement per batch (autocommit):
    /// `DELETE … WHERE sequence IN (SELECT … LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *`.
    async fn claim_delete_all(&self, batch: usize, n: usize) -> anyhow::Result<Duration> {
        let t = self.table();
        let sql = format!(
            "DELETE FROM {t} WHERE sequence IN (SELECT sequence FROM {t} WHERE status = 0 \
             ORDER BY sequence LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *"
        );
        let limit = i64::try_from(batch)?;
        let mut conn = self.pool.acquire().await?;
        let start = Instant::now();
        let mut deleted = 0;
        while deleted < n {
            let rows = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?;
            if rows.is_empty() {
                break;
            }
            deleted += rows.len();
        }
        let elapsed = start.elapsed();
        anyhow::ensure!(deleted == n, "claimed and deleted {deleted} rows, not {n}");
        Ok(elapsed)
    }

    async fn relay_outbox(&self) -> anyhow::Result<PgOutbox> {
        self.outbox(true).await
    }

    async fn close_relay_outbox(outbox: PgOutbox) {
        outbox.pool().close().await;
    }
}
