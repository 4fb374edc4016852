//! The document store on SQLite: [`SqliteDocStore`] and
//! [`SqliteDocTransaction`].

use std::sync::Arc;

use chrono::DateTime;
use proclaim_sqlite::SqliteOutbox;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqliteConnection, Transaction};

use crate::sql::{Sql, table_for_prefix};
use crate::{DocStoreError, Document};

/// The default table-name prefix on SQLite, where every table shares one
/// namespace: `proclaim_documents`, next to `proclaim_outbox`.
const DEFAULT_PREFIX: &str = "proclaim_";

/// Document transactions read before they write (the version check), so
/// they take SQLite's write lock up front: a deferred transaction that had to
/// upgrade its read lock while another connection writes would fail at once
/// with `SQLITE_BUSY` instead of waiting.
const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";

/// JSON documents in a SQLite table next to a [`SqliteOutbox`], in the same
/// database file, written in the same transactions as the outbox's events.
///
/// The table is `<prefix>documents`, by default `proclaim_documents`; create
/// it with [`migrate`](SqliteDocStore::migrate). Cloning is cheap.
///
/// SQLite lets one transaction write at a time, and
/// [`begin`](SqliteDocStore::begin) takes the write lock at once
/// (`BEGIN IMMEDIATE`): concurrent document transactions run one after the
/// other (each waits up to the pool's busy timeout, 5 s with
/// [`SqliteOutbox::connect`]), and the version check still rejects a writer
/// whose [`Expect::Version`](crate::Expect::Version) went stale while it
/// waited. Keep transactions short. With a `sqlite::memory:` outbox (one
/// connection) do not read through the store while holding a transaction.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_docstore::{Expect, SqliteDocStore};
/// use proclaim_sqlite::SqliteOutbox;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let docs = SqliteDocStore::new(SqliteOutbox::connect("sqlite://tavern.db?mode=rwc").await?);
/// docs.migrate().await?;
///
/// let retired = Event::builder("AgentRetired").subject("agent-1").build()?;
/// docs.delete_with_events("agents", "agent-1", Expect::Any, &[retired]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteDocStore {
    outbox: SqliteOutbox,
    sql: Arc<Sql>,
}

/// An open SQLite transaction of a [`SqliteDocStore`]: document writes and
/// events that commit together. It holds the database's write lock until it
/// ends; dropping it without [`commit`](SqliteDocTransaction::commit) rolls
/// back.
pub struct SqliteDocTransaction {
    tx: Transaction<'static, Sqlite>,
    outbox: SqliteOutbox,
    sql: Arc<Sql>,
    poison: Option<DocStoreError>,
    raw: bool,
}

impl std::fmt::Debug for SqliteDocStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDocStore")
            .field("table", &self.sql.table)
            .field("outbox", &self.outbox)
            .finish()
    }
}

impl SqliteDocStore {
    /// A document store in the table `proclaim_documents` of the outbox's
    /// database.
    pub fn new(outbox: SqliteOutbox) -> Self {
        let table = format!("\"{DEFAULT_PREFIX}documents\"");
        SqliteDocStore {
            outbox,
            sql: Arc::new(Sql::sqlite(table)),
        }
    }

    /// The same store with the table `<prefix>documents`. The prefix is
    /// `a-z`, `0-9` and `_`, not starting with a digit, at most 54
    /// characters; anything else is a
    /// [`StoreError::Config`](proclaim_core::StoreError::Config).
    pub fn with_prefix(self, prefix: &str) -> Result<Self, DocStoreError> {
        let table = format!("\"{}\"", table_for_prefix(prefix)?);
        Ok(SqliteDocStore {
            outbox: self.outbox,
            sql: Arc::new(Sql::sqlite(table)),
        })
    }

    /// The outbox the events go to (the relay reads it).
    pub fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }

    /// The quoted documents table, e.g. `"proclaim_documents"`.
    pub fn table_name(&self) -> &str {
        &self.sql.table
    }

    /// Creates the outbox (with its own migration) and the documents table.
    /// Safe to run repeatedly and concurrently.
    pub async fn migrate(&self) -> Result<(), DocStoreError> {
        self.outbox.migrate().await?;
        let mut tx = begin(self.outbox.pool()).await?;
        sqlx::query(AssertSqlSafe(self.sql.create.clone()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(table = %self.sql.table, "documents table ready");
        Ok(())
    }
}

doc_store_impl!(
    store: SqliteDocStore,
    transaction: SqliteDocTransaction,
    database: Sqlite,
);

async fn begin(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    pool.begin_with(BEGIN_IMMEDIATE).await
}

/// Microseconds since the Unix epoch, as the SQLite outbox keeps times.
fn now() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn decode(row: &SqliteRow) -> Result<Document, DocStoreError> {
    let body: String = row.try_get(3)?;
    let micros: i64 = row.try_get(4)?;
    let updated_at = DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        sqlx::Error::Decode(format!("updated_at {micros} is out of range").into())
    })?;
    Document::from_row(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        &body,
        updated_at,
    )
}

/// SQLite undoes only the failed statement (or, after a few errors such as
/// a full disk, the whole transaction, and then `COMMIT` fails loudly), so
/// there is nothing to check before committing.
async fn verify_open(_conn: &mut SqliteConnection) -> Result<(), DocStoreError> {
    Ok(())
}
