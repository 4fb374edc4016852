//! The database of one scenario, for each store: a PostgreSQL schema, a
//! SQLite file in a directory of its own, or a MariaDB / MySQL database;
//! created at the start and removed at the end.

mod mysql;
mod postgres;
mod sqlite;

use std::time::Duration;

use proclaim::{Event, OutboxStore};

use crate::Common;

pub(crate) use mysql::MySqlDb;
pub(crate) use postgres::PgDb;
pub(crate) use sqlite::{SQLITE_DIR_PREFIX, SqliteDb};

/// Prefix of every schema (PostgreSQL) and database (MariaDB / MySQL) the
/// benchmarks create.
pub(crate) const SCHEMA_PREFIX: &str = "bench_";

/// The outbox store a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    /// PostgreSQL (`--database-url`): a schema `bench_<unique>`.
    Postgres,
    /// SQLite: a file in a directory `proclaim_bench_<unique>` under `--sqlite-dir`.
    Sqlite,
    /// MariaDB / MySQL (`--mysql-url`): a database `bench_<unique>`.
    Mysql,
}

/// The database of one scenario.
pub(crate) enum Db {
    Postgres(PgDb),
    Sqlite(SqliteDb),
    /// Boxed: its connect options make it much larger than the others.
    MySql(Box<MySqlDb>),
}

impl Db {
    /// Creates the scenario's schema, file or database, named after `suffix`.
    pub(crate) async fn create(
        kind: StoreKind,
        common: &Common,
        suffix: &str,
    ) -> anyhow::Result<Self> {
        Ok(match kind {
            StoreKind::Postgres => Db::Postgres(PgDb::create(&common.database_url, suffix).await?),
            StoreKind::Sqlite => Db::Sqlite(SqliteDb::create(&common.sqlite_dir(), suffix).await?),
            StoreKind::Mysql => {
                Db::MySql(Box::new(MySqlDb::create(&common.mysql_url, suffix).await?))
            }
        })
    }

    /// Removes the schema, file or database; `Err` says what could not be removed.
    pub(crate) async fn cleanup(&self) -> Result<(), String> {
        match self {
            Db::Postgres(db) => db.cleanup().await,
            Db::Sqlite(db) => db.cleanup().await,
            Db::MySql(db) => db.cleanup().await,
        }
    }
}

/// What the `drain` scenario needs of a store: writing the events, the
/// relay's outbox, the bare claim-and-delete baseline, and checks.
pub(crate) trait BenchDb: Send + Sync {
    /// The store the relay claims from.
    type Outbox: OutboxStore + Clone;

    /// The store's name in the output (`"store"` in JSON).
    const NAME: &'static str;

    /// Where the outbox table is, for the header line.
    fn describe(&self) -> String;

    /// Creates the outbox table.
    async fn migrate(&self) -> anyhow::Result<()>;

    /// Writes `events` with `enqueue_batch` in one transaction.
    async fn write_batch(&self, events: &[Event]) -> anyhow::Result<()>;

    /// Brings the table to the same clean state before every timed phase
    /// (PostgreSQL: `VACUUM ANALYZE`; SQLite: a WAL checkpoint; InnoDB:
    /// `ANALYZE TABLE` and waiting for the purge of deleted rows).
    async fn settle(&self) -> anyhow::Result<()>;

    /// Number of rows in the outbox table.
    async fn rows(&self) -> anyhow::Result<i64>;

    /// Whether the outbox table holds no row.
    async fn is_empty(&self) -> anyhow::Result<bool>;

    /// Baseline (b): claims and deletes every row, `batch` per transaction,
    /// on one connection; returns the time taken. Fails unless exactly `n`
    /// rows were deleted.
    async fn claim_delete_all(&self, batch: usize, n: usize) -> anyhow::Result<Duration>;

    /// An outbox for one relay, with a pool of its own (as a relay process
    /// would have).
    async fn relay_outbox(&self) -> anyhow::Result<Self::Outbox>;

    /// Closes the pool of an outbox from [`BenchDb::relay_outbox`].
    async fn close_relay_outbox(outbox: Self::Outbox);
}

/// Runs `f` for at most `limit`; a timeout becomes an error message.
pub(crate) async fn within<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}
