//! MariaDB / MySQL: a database `bench_<unique>` on the server of
//! `--mysql-url`, dropped at the end.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use proclaim::Event;
use proclaim::mysql::{MySqlOutbox, MySqlOutboxOptions};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Row as _};
use tokio::time::{Instant, MissedTickBehavior};

use super::{BenchDb, SCHEMA_PREFIX, within};

/// How long [`BenchDb::settle`] waits for InnoDB to purge deleted rows.
const PURGE_WAIT: Duration = Duration::from_secs(60);
/// InnoDB's history list is taken as purged at or below this length.
const PURGED_HISTORY: i64 = 16;

/// The scenario's database, a pool on the server (for creating and dropping
/// it), and the writer's outbox (whose pool also serves the baselines and
/// checks; not used by the relay).
pub(crate) struct MySqlDb {
    /// The server's pool, not bound to the scenario's database.
    server: MySqlPool,
    /// Connection options of the scenario's database.
    options: MySqlConnectOptions,
    database: String,
    /// The server is MariaDB (which has `DELETE … RETURNING`), not MySQL.
    mariadb: bool,
    writer: MySqlOutbox,
}

impl MySqlDb {
    /// Connects to the server and creates the database `bench_<suffix>`.
    pub(crate) async fn create(url: &str, suffix: &str) -> anyhow::Result<Self> {
        let base = MySqlConnectOptions::from_str(url)
            .with_context(|| format!("invalid MySQL URL {url}"))?;
        let server = MySqlPoolOptions::new()
            .max_connections(2)
            .connect_with(base.clone())
            .await
            .with_context(|| format!("cannot connect to MariaDB / MySQL at {url}"))?;
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&server)
            .await?;
        let database = format!("{SCHEMA_PREFIX}{suffix}");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE `{database}`")))
            .execute(&server)
            .await
            .with_context(|| format!("cannot create database {database}"))?;
        let options = base.database(&database);
        let writer = async {
            let pool = MySqlPoolOptions::new()
                .max_connections(16)
                .connect_with(options.clone())
                .await
                .with_context(|| format!("cannot connect to database {database}"))?;
            anyhow::Ok(MySqlOutbox::with_options(
                pool,
                MySqlOutboxOptions::default(),
            )?)
        }
        .await;
        let writer = match writer {
            Ok(writer) => writer,
            Err(e) => {
                let drop = format!("DROP DATABASE IF EXISTS `{database}`");
                let _ = sqlx::raw_sql(AssertSqlSafe(drop)).execute(&server).await;
                server.close().await;
                return Err(e);
            }
        };
        Ok(MySqlDb {
            mariadb: version.to_ascii_lowercase().contains("mariadb"),
            server,
            options,
            database,
            writer,
        })
    }

    /// Drops the database and closes the pools.
    pub(crate) async fn cleanup(&self) -> Result<(), String> {
        self.writer.pool().close().await;
        let drop = format!("DROP DATABASE IF EXISTS `{}`", self.database);
        let dropped = within(
            &format!("database {}", self.database),
            Duration::from_secs(60),
            sqlx::raw_sql(AssertSqlSafe(drop)).execute(&self.server),
        )
        .await;
        self.server.close().await;
        dropped.map(|_| ())
    }

    fn table(&self) -> &str {
        self.writer.table_name()
    }

    /// InnoDB's history list length: undo logs not yet purged.
    async fn history_length(&self) -> anyhow::Result<i64> {
        let row = sqlx::query("SHOW GLOBAL STATUS LIKE 'Innodb_history_list_length'")
            .fetch_optional(&self.server)
            .await?;
        Ok(match row {
            Some(row) => row.try_get::<String, _>(1)?.parse()?,
            None => 0, // MySQL: not a status variable; skip the wait
        })
    }
}

impl BenchDb for MySqlDb {
    type Outbox = MySqlOutbox;
    const NAME: &'static str = "mysql";

    fn describe(&self) -> String {
        format!(
            "database {} ({})",
            self.database,
            if self.mariadb { "MariaDB" } else { "MySQL" }
        )
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        self.writer
            .migrate()
            .await
            .context("migrating the outbox")?;
        Ok(())
    }

    async fn write_batch(&self, events: &[Event]) -> anyhow::Result<()> {
        let mut tx = self.writer.pool().begin().await?;
        self.writer.enqueue_batch(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// `ANALYZE TABLE`, then waits (up to a minute) until InnoDB has purged
    /// the rows deleted by the previous phase, so no timed phase steps over
    /// delete-marked index entries of the one before.
    async fn settle(&self) -> anyhow::Result<()> {
        sqlx::raw_sql(AssertSqlSafe(format!("ANALYZE TABLE {}", self.table())))
            .execute(self.writer.pool())
            .await?;
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let history = self.history_length().await?;
            if history <= PURGED_HISTORY {
                tracing::debug!(history, waited = ?start.elapsed(), "InnoDB purge caught up");
                return Ok(());
            }
            if start.elapsed() > PURGE_WAIT {
                tracing::warn!(
                    history,
                    "InnoDB has not purged the deleted rows after {PURGE_WAIT:?}; going on"
                );
                return Ok(());
            }
        }
    }

    async fn rows(&self) -> anyhow::Result<i64> {
        let sql = format!("SELECT COUNT(*) FROM {}", self.table());
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(self.writer.pool())
            .await?)
    }

    async fn is_empty(&self) -> anyhow::Result<bool> {
        let sql = format!(
            "SELECT CAST(EXISTS (SELECT 1 FROM {}) AS SIGNED)",
            self.table()
        );
        let any: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(self.writer.pool())
            .await?;
        Ok(any == 0)
    }

    /// One transaction per batch, at READ COMMITTED like the store's claims:
    /// `SELECT sequence … ORDER BY sequence LIMIT ? FOR UPDATE SKIP LOCKED`,
    /// then `DELETE … WHERE sequence IN (…) RETURNING *` (MariaDB), then
    /// `COMMIT`. MySQL has no `DELETE … RETURNING`: there the `SELECT`
    /// reads the whole rows and the `DELETE` returns nothing.
    async fn claim_delete_all(&self, batch: usize, n: usize) -> anyhow::Result<Duration> {
        let t = self.table();
        let columns = if self.mariadb { "sequence" } else { "*" };
        let pick = format!(
            "SELECT {columns} FROM {t} WHERE status = 0 ORDER BY sequence LIMIT ? \
             FOR UPDATE SKIP LOCKED"
        );
        let returning = if self.mariadb { " RETURNING *" } else { "" };
        let delete = |k: usize| {
            format!(
                "DELETE FROM {t} WHERE sequence IN ({}){returning}",
                vec!["?"; k].join(", ")
            )
        };
        let limit = i64::try_from(batch)?;
        // A connection of its own, so its session isolation level goes with it.
        let mut conn = MySqlConnection::connect_with(&self.options).await?;
        sqlx::raw_sql("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut conn)
            .await?;
        let start = Instant::now();
        let mut deleted = 0;
        while deleted < n {
            let mut tx = conn.begin().await?;
            let picked = sqlx::query(AssertSqlSafe(pick.clone()))
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            if picked.is_empty() {
                tx.commit().await?;
                break;
            }
            let mut query = sqlx::query(AssertSqlSafe(delete(picked.len())));
            for row in &picked {
                query = query.bind(row.try_get::<i64, _>("sequence")?);
            }
            let gone = if self.mariadb {
                query.fetch_all(&mut *tx).await?.len()
            } else {
                usize::try_from(query.execute(&mut *tx).await?.rows_affected())?
            };
            tx.commit().await?;
            anyhow::ensure!(
                gone == picked.len(),
                "picked {} rows but deleted {gone}",
                picked.len()
            );
            deleted += gone;
        }
        let elapsed = start.elapsed();
        conn.close().await?;
        anyhow::ensure!(deleted == n, "claimed and deleted {deleted} rows, not {n}");
        Ok(elapsed)
    }

    async fn relay_outbox(&self) -> anyhow::Result<MySqlOutbox> {
        let pool = MySqlPoolOptions::new()
            .max_connections(10)
            .connect_with(self.options.clone())
            .await
            .context("cannot connect the relay's pool")?;
        let outbox = MySqlOutbox::with_options(pool, MySqlOutboxOptions::default())?;
        outbox.migrate().await.context("migrating the outbox")?;
        Ok(outbox)
    }

    async fn close_relay_outbox(outbox: MySqlOutbox) {
        outbox.pool().close().await;
    }
}
