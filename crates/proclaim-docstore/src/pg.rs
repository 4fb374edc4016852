//! The document store on PostgreSQL: [`PgDocStore`] and [`PgDocTransaction`].

use std::sync::Arc;

use chrono::{DateTime, Utc};
use proclaim_postgres::PgOutbox;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row, Transaction};

use crate::sql::{Sql, table_for_prefix};
use crate::{DocStoreError, Document};

/// The default table-name prefix on PostgreSQL: none, the table is
/// `documents` in the outbox's schema (`"proclaim"."documents"` next to
/// `"proclaim"."outbox"` by default).
const DEFAULT_PREFIX: &str = "";

/// JSON documents in a PostgreSQL table next to a [`PgOutbox`], written in
/// the same transactions as the outbox's events.
///
/// The table `<prefix>documents` lives in the outbox's schema; create it
/// with [`migrate`](PgDocStore::migrate). Cloning is cheap.
///
/// Writes use `READ COMMITTED` (PostgreSQL's default): a write with
/// [`Expect::Version`](crate::Expect::Version) that races another writer of
/// the same document waits for it and then re-checks the version on the row
/// it wrote, so exactly one of them succeeds and the other gets a
/// [`DocStoreError::Conflict`].
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_docstore::{Expect, PgDocStore};
/// use proclaim_postgres::PgOutbox;
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let docs = PgDocStore::new(PgOutbox::new(pool));
/// docs.migrate().await?; // the outbox table and the documents table
///
/// let done = Event::builder("CommitmentVerified").subject("commitment-7").build()?;
/// let mut tx = docs.begin().await?;
/// tx.put("commitments", "commitment-7", &serde_json::json!({ "status": "verified" }), Expect::Version(3))
///     .await?;
/// tx.emit(&done).await?;
/// tx.commit().await?; // the new status and its event, or neither
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgDocStore {
    outbox: PgOutbox,
    sql: Arc<Sql>,
}

/// An open PostgreSQL transaction of a [`PgDocStore`]: document writes and
/// events that commit together. Dropping it without
/// [`commit`](PgDocTransaction::commit) rolls back.
pub struct PgDocTransaction {
    tx: Transaction<'static, Postgres>,
    outbox: PgOutbox,
    sql: Arc<Sql>,
    poison: Option<DocStoreError>,
    raw: bool,
}

impl std::fmt::Debug for PgDocStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDocStore")
            .field("table", &self.sql.table)
            .field("outbox", &self.outbox)
            .finish()
    }
}

impl PgDocStore {
    /// A document store in the table `documents` of the outbox's schema.
    pub fn new(outbox: PgOutbox) -> Self {
        let table = qualified(&outbox, &format!("{DEFAULT_PREFIX}documents"));
        PgDocStore {
            outbox,
            sql: Arc::new(Sql::postgres(table)),
        }
    }

    /// The same store with the table `<prefix>documents` (in the outbox's
    /// schema). The prefix is `a-z`, `0-9` and `_`, not starting with a
    /// digit, at most 54 characters; anything else is a
    /// [`StoreError::Config`](proclaim_core::StoreError::Config).
    pub fn with_prefix(self, prefix: &str) -> Result<Self, DocStoreError> {
        let table = qualified(&self.outbox, &table_for_prefix(prefix)?);
        Ok(PgDocStore {
            outbox: self.outbox,
            sql: Arc::new(Sql::postgres(table)),
        })
    }

    /// The outbox the events go to (the relay reads it).
    pub fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    /// The quoted, schema-qualified documents table, e.g.
    /// `"proclaim"."documents"`.
    pub fn table_name(&self) -> &str {
        &self.sql.table
    }

    /// Creates the outbox (with its own migration) and the documents table.
    /// Safe to run repeatedly and concurrently.
    pub async fn migrate(&self) -> Result<(), DocStoreError> {
        self.outbox.migrate().await?;
        let mut tx = self.outbox.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("proclaim-docstore-migrate {}", self.sql.table))
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL client_min_messages = warning")
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(self.sql.create.clone()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(table = %self.sql.table, "documents table ready");
        Ok(())
    }
}

doc_store_impl!(
    store: PgDocStore,
    transaction: PgDocTransaction,
    database: Postgres,
);

/// `"schema"."name"`, in the schema of the outbox's table. The outbox only
/// exposes its quoted, qualified name, `"schema"."table"`; its parts are
/// checked identifiers (no quotes, no dots), so the schema is what comes
/// before the dot.
fn qualified(outbox: &PgOutbox, name: &str) -> String {
    match outbox.table_name().rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.\"{name}\""),
        None => format!("\"{name}\""),
    }
}

async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin().await
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn decode(row: &PgRow) -> Result<Document, DocStoreError> {
    let body: String = row.try_get(3)?;
    Document::from_row(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        &body,
        row.try_get(4)?,
    )
}

/// A statement that failed in the caller's own SQL aborts a PostgreSQL
/// transaction, and `COMMIT` of an aborted transaction quietly rolls back
/// (sqlx reports success). Refuse to call that a commit.
async fn verify_open(conn: &mut PgConnection) -> Result<(), DocStoreError> {
    match sqlx::query("SELECT 1").execute(conn).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("25P02") => {
            Err(DocStoreError::Aborted(
                "a statement of the transaction failed and PostgreSQL aborted it".into(),
            ))
        }
        Err(e) => Err(e.into()),
    }
}
