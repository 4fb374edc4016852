//! [`SqliteInbox`]: the consumer side's exactly-once effect in a SQLite
//! table, and the events consumers park next to it.
//!
//! The inbox table's primary key is (consumer, event id). A handling opens
//! its transaction with `BEGIN IMMEDIATE` — it takes the database's write
//! lock up front, so handlings run one at a time and a second delivery of
//! the same event waits (up to the pool's busy timeout) until the first
//! commits or rolls back — and inserts its pair with
//! `ON CONFLICT DO NOTHING`: a pair already there makes it a duplicate.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
use proclaim_core::store_support::{ParkedRow, clip_error, inbox_pair_gone, park_key, tx_wrapper};
use proclaim_core::{Event, StoreError};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::ident::Ident;
use crate::migrate::{BEGIN_IMMEDIATE, migrate_immediate};

/// The default inbox table.
pub const DEFAULT_INBOX_TABLE: &str = "proclaim_inbox";
/// Columns of a parked event, in the order `decode_parked` reads them.
const PARKED_COLUMNS: &str = "id, consumer, event, raw, reason, attempts, parked_at";

/// Options of a [`SqliteInbox`]. SQLite has no schemas: the tables live in
/// the database the pool opens.
///
/// ```
/// use proclaim_sqlite::SqliteInboxOptions;
///
/// let options = SqliteInboxOptions::default().with_table("billing_inbox");
/// assert!(options.validate().is_ok());
/// assert!(SqliteInboxOptions::default().with_table("inbox; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteInboxOptions {
    /// Name of the inbox table (default `proclaim_inbox`). Parked events
    /// live in `<table>_parked` next to it.
    pub table: String,
}

impl Default for SqliteInboxOptions {
    fn default() -> Self {
        SqliteInboxOptions {
            table: DEFAULT_INBOX_TABLE.into(),
        }
    }
}

impl SqliteInboxOptions {
    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Checks the table name: 1-63 characters of `a-z`, `0-9` and `_`, not
    /// starting with a digit; anything else is a [`StoreError::Config`].
    pub fn validate(&self) -> Result<(), StoreError> {
        Ident::parse("table", &self.table).map(|_| ())
    }
}

/// The statements of one inbox, built once with its checked name.
struct InboxSql {
    quoted: String,
    parked_quoted: String,
    migrate: String,
    insert: Arc<str>,
    contains: Arc<str>,
    purge: Arc<str>,
    park: Arc<str>,
    parked_all: Arc<str>,
    parked_of: Arc<str>,
    take: Arc<str>,
}

impl InboxSql {
    fn new(table: &Ident) -> Self {
        let t = table.as_str();
        let q = format!(r#""{t}""#);
        let p = format!(r#""{t}_parked""#);
        let a = |sql: String| -> Arc<str> { sql.into() };
        InboxSql {
            // Times are INTEGER microseconds since the Unix epoch (UTC), from
            // the application's clock, as the outbox keeps them. The event id
            // is its hyphenated text. AUTOINCREMENT: the id of a parked event
            // that was taken is never handed out again.
            migrate: format!(
                r#"CREATE TABLE IF NOT EXISTS {q} (
                       consumer   TEXT    NOT NULL,
                       event_id   TEXT    NOT NULL,
                       handled_at INTEGER NOT NULL,
                       PRIMARY KEY (consumer, event_id)
                   ) STRICT, WITHOUT ROWID;
                   CREATE INDEX IF NOT EXISTS "{t}_handled_idx" ON {q} (handled_at);
                   CREATE TABLE IF NOT EXISTS {p} (
                       id        INTEGER PRIMARY KEY AUTOINCREMENT,
                       consumer  TEXT    NOT NULL,
                       event     TEXT,
                       raw       BLOB    NOT NULL,
                       reason    TEXT    NOT NULL,
                       attempts  INTEGER NOT NULL DEFAULT 0,
                       parked_at INTEGER NOT NULL,
                       park_key  TEXT
                   ) STRICT;
                   CREATE INDEX IF NOT EXISTS "{t}_parked_consumer_idx" ON {p} (consumer, id);"#
            ),
            insert: a(format!(
                "INSERT INTO {q} (consumer, event_id, handled_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (consumer, event_id) DO NOTHING"
            )),
            contains: a(format!(
                "SELECT count(*) FROM {q} WHERE consumer = ?1 AND event_id = ?2"
            )),
            purge: a(format!("DELETE FROM {q} WHERE handled_at < ?1")),
            park: a(format!(
                // OR IGNORE, not ON CONFLICT (consumer, park_key): SQLite
                // checks an ON CONFLICT target when it prepares, against the
                // connection's cached schema, which may predate the unique
                // index (a pooled connection opened before `migrate`). The
                // table's only other constraints are NOT NULL columns, all
                // bound from values that are never NULL.
                "INSERT OR IGNORE INTO {p} \
                   (consumer, event, raw, reason, attempts, parked_at, park_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            )),
            parked_all: a(format!(
                "SELECT {PARKED_COLUMNS} FROM {p} ORDER BY id LIMIT ?1"
            )),
            parked_of: a(format!(
                "SELECT {PARKED_COLUMNS} FROM {p} WHERE consumer = ?1 ORDER BY id LIMIT ?2"
            )),
            // ?1 ids as a JSON array.
            take: a(format!(
                "DELETE FROM {p} WHERE id IN (SELECT value FROM json_each(?1)) \
                 RETURNING {PARKED_COLUMNS}"
            )),
            quoted: q,
            parked_quoted: p,
        }
    }
}

/// The consumer inbox in SQLite: which events each consumer has handled,
/// recorded in the handler's own transaction, and the events consumers
/// parked ([`ParkedEvents`]). Cloning is cheap.
///
/// [`begin`](Inbox::begin) opens a `BEGIN IMMEDIATE` transaction on the pool
/// and records the pair (consumer, event id); run the handler's statements
/// through the returned [`SqliteInboxTx`] and commit it: the effect and the
/// pair are stored together or not at all, so a redelivered duplicate finds
/// the pair and is skipped, and a handler that fails (or a process that
/// dies) leaves nothing behind for the redelivery to trip over.
///
/// **One handling at a time.** SQLite has one writer at a time, and a
/// handling holds the write lock from `begin` to its commit: handlings (and
/// every other writer of the database, the outbox's too) take turns, and
/// one that waits longer than the pool's busy timeout fails with
/// `SQLITE_BUSY` ([`StoreError::Unavailable`]). Keep handlers short. Open
/// the pool as [`SqliteOutbox::connect_options`](crate::SqliteOutbox::connect_options)
/// describes (WAL journal, so that [`contains`](Inbox::contains) and
/// readers are not blocked; a busy timeout), or share the outbox's pool. On
/// an in-memory database (a pool of one connection) do not call the inbox
/// while a handling's transaction is open: the call would wait for it.
///
/// Tables (created by [`migrate`](SqliteInbox::migrate)): `proclaim_inbox
/// (consumer, event_id, handled_at)` and `proclaim_inbox_parked (id,
/// consumer, event, raw, reason, attempts, parked_at, park_key)` unless
/// [`SqliteInboxOptions`] name them otherwise.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
/// use proclaim_sqlite::{SqliteInbox, SqliteOutbox};
///
/// # async fn demo(event: Event) -> Result<(), Box<dyn std::error::Error>> {
/// // The outbox's pool: WAL journal and a busy timeout.
/// let outbox = SqliteOutbox::connect("sqlite://data/app.db?mode=rwc").await?;
/// let inbox = SqliteInbox::new(outbox.pool().clone());
/// inbox.migrate().await?;
///
/// // For each message the broker delivers:
/// match inbox.begin("thank-you-notes", &event).await? {
///     None => {} // handled before: nothing to do
///     Some(mut tx) => {
///         let donor: serde_json::Value = event.data_as()?;
///         let handled = sqlx::query("INSERT INTO thank_you_notes (donor) VALUES (?1)")
///             .bind(donor["donor_id"].as_i64())
///             .execute(&mut *tx) // the handler's work, in the inbox's transaction
///             .await;
///         match handled {
///             Ok(_) => tx.commit().await?, // the note and the inbox pair, together
///             Err(e) => {
///                 tx.rollback().await?; // neither: the redelivery tries again
///                 // …or, after too many attempts, park it:
///                 inbox
///                     .park(&ParkedEvent {
///                         id: 0,
///                         consumer: "thank-you-notes".into(),
///                         event: Some(event.clone()),
///                         raw: Vec::new(),
///                         reason: e.to_string(),
///                         attempts: 5,
///                         parked_at: chrono::Utc::now(),
///                     })
///                     .await?;
///             }
///         }
///     }
/// }
/// // …then ack the message.
///
/// // Later: list what was parked, and take it back to replay it.
/// let parked = inbox.parked(Some("thank-you-notes"), 100).await?;
/// let ids: Vec<i64> = parked.iter().map(|p| p.id).collect();
/// let to_replay = inbox.take(&ids).await?;
/// # let _ = to_replay;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteInbox {
    pool: SqlitePool,
    sql: Arc<InboxSql>,
}

impl std::fmt::Debug for SqliteInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInbox")
            .field("table", &self.sql.quoted)
            .field("database", &self.pool.connect_options().get_filename())
            .finish_non_exhaustive()
    }
}

impl SqliteInbox {
    /// An inbox in the table `proclaim_inbox`.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(pool, &Ident::known(DEFAULT_INBOX_TABLE))
    }

    /// An inbox with the given options. The table name must be 1-63
    /// characters of `a-z`, `0-9` and `_`, not starting with a digit;
    /// anything else is a [`StoreError::Config`], so a name can never
    /// inject SQL.
    pub fn with_options(pool: SqlitePool, options: SqliteInboxOptions) -> Result<Self, StoreError> {
        let table = Ident::parse("table", &options.table)?;
        Ok(Self::build(pool, &table))
    }

    fn build(pool: SqlitePool, table: &Ident) -> Self {
        SqliteInbox {
            pool,
            sql: Arc::new(InboxSql::new(table)),
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The quoted inbox table name, e.g. `"proclaim_inbox"`.
    pub fn table_name(&self) -> &str {
        &self.sql.quoted
    }

    /// The quoted table of parked events.
    pub fn parked_table_name(&self) -> &str {
        &self.sql.parked_quoted
    }

    /// Creates the inbox table and the table of parked events with their
    /// indexes. Safe to run repeatedly and concurrently: it runs under
    /// `BEGIN IMMEDIATE`, one run at a time.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate_immediate(&self.pool, &self.sql.migrate).await?;
        self.add_park_key().await?;
        tracing::debug!(table = %self.sql.quoted, "inbox tables ready");
        Ok(())
    }
}

impl SqliteInbox {
    /// Gives a parked table created before parkings had keys its
    /// `park_key` column (SQLite has no `ADD COLUMN IF NOT EXISTS`, so the
    /// column is looked up first), and the unique index on it.
    async fn add_park_key(&self) -> Result<(), StoreError> {
        let p = &self.sql.parked_quoted;
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'park_key'",
        )
        .bind(p.trim_matches('"'))
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        if found == 0 {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE {p} ADD COLUMN park_key TEXT"
            )))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tracing::info!(table = %p, "added park_key to the parked table");
        }
        let index = format!(r#""{}_key_idx""#, p.trim_matches('"'));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {p} (consumer, park_key)"
        )))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Inbox for SqliteInbox {
    type Tx = SqliteInboxTx;

    async fn begin(
        &self,
        consumer: &str,
        event: &Event,
    ) -> Result<Option<SqliteInboxTx>, StoreError> {
        let event_id = event.id();
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        let done = sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(consumer)
            .bind(event_id.hyphenated().to_string())
            .bind(now_micros())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        if done.rows_affected() == 0 {
            tracing::debug!(consumer, %event_id, "duplicate delivery: already handled");
            if let Err(e) = tx.rollback().await {
                // The pair is committed either way; the connection is
                // closed instead of reused.
                tracing::debug!(error = %e, "rollback of a duplicate's transaction failed");
            }
            return Ok(None);
        }
        Ok(Some(SqliteInboxTx {
            tx,
            consumer: consumer.to_owned(),
            event_id,
            contains: self.sql.contains.clone(),
        }))
    }

    async fn contains(&self, consumer: &str, event_id: Uuid) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.contains.clone()))
            .bind(consumer)
            .bind(event_id.hyphenated().to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(n > 0)
    }

    async fn purge(&self, older_than: Duration) -> Result<u64, StoreError> {
        let cut_off = now_micros().saturating_sub(micros(older_than));
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
            .bind(cut_off)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        if done.rows_affected() > 0 {
            tracing::debug!(table = %self.sql.quoted, purged = done.rows_affected(), "purged inbox pairs");
        }
        Ok(done.rows_affected())
    }
}

impl ParkedEvents for SqliteInbox {
    /// Stores the event as CloudEvents JSON (its payload's exact text), the
    /// reason without NUL characters and cut to 4,000 bytes, and `parked_at`
    /// to the microsecond.
    async fn park(&self, parked: &ParkedEvent) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(self.sql.park.clone()))
            .bind(&parked.consumer)
            .bind(parked.event.as_ref().map(Event::to_cloudevent_json))
            .bind(&parked.raw)
            .bind(clip_error(&parked.reason))
            .bind(i64::from(parked.attempts))
            .bind(parked.parked_at.timestamp_micros())
            .bind(park_key(parked))
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        tracing::debug!(consumer = %parked.consumer, "parked an event");
        Ok(())
    }

    async fn parked(
        &self,
        consumer: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ParkedEvent>, StoreError> {
        let rows = match consumer {
            Some(consumer) => {
                sqlx::query(AssertSqlSafe(self.sql.parked_of.clone()))
                    .bind(consumer)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query(AssertSqlSafe(self.sql.parked_all.clone()))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(classify)?;
        rows.iter()
            .map(decode_parked)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn take(&self, ids: &[i64]) -> Result<Vec<ParkedEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Serializing integers cannot fail.
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
        let rows = sqlx::query(AssertSqlSafe(self.sql.take.clone()))
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut taken = rows
            .iter()
            .map(decode_parked)
            .collect::<Result<Vec<_>, _>>()
            .map_err(classify)?;
        taken.sort_by_key(|p| p.id);
        Ok(taken)
    }
}

fn decode_parked(row: &SqliteRow) -> Result<ParkedEvent, sqlx::Error> {
    let id: i64 = row.try_get(0)?;
    let parked_at: i64 = row.try_get(6)?;
    let parked_at = DateTime::from_timestamp_micros(parked_at).unwrap_or_else(|| {
        tracing::warn!(id, parked_at, "a parked event's time is out of range");
        DateTime::UNIX_EPOCH
    });
    Ok(ParkedRow {
        id,
        consumer: row.try_get(1)?,
        event_json: row.try_get(2)?,
        raw: row.try_get(3)?,
        reason: row.try_get(4)?,
        attempts: row.try_get(5)?,
        parked_at,
    }
    .into_parked_event())
}

/// The transaction of one handling by a [`SqliteInbox`]: the inbox pair is
/// already written in it, and it holds the database's write lock. Run the
/// handler's statements through it — `query.execute(&mut *tx)` (it
/// dereferences to the [`SqliteConnection`]), or
/// [`transaction`](SqliteInboxTx::transaction) for APIs that take a
/// `sqlx::Transaction`, such as `SqliteOutbox::enqueue` for the events the
/// handler emits — then [`commit`](InboxTx::commit). Dropping it rolls back.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::inbox::{Inbox, InboxTx};
/// use proclaim_sqlite::{SqliteInbox, SqliteOutbox};
///
/// # async fn demo(inbox: SqliteInbox, outbox: SqliteOutbox, event: Event) -> Result<(), Box<dyn std::error::Error>> {
/// if let Some(mut tx) = inbox.begin("receipts", &event).await? {
///     sqlx::query("UPDATE pledges SET receipted = 1 WHERE id = ?1")
///         .bind(event.subject())
///         .execute(&mut *tx)
///         .await?;
///     let receipt = Event::builder("ReceiptSent")
///         .subject(event.subject())
///         .caused_by(&event)
///         .build()?;
///     outbox.enqueue(tx.transaction(), &receipt).await?;
///     tx.commit().await?; // the update, the new event and the inbox pair
/// }
/// # Ok(()) }
/// ```
pub struct SqliteInboxTx {
    tx: Transaction<'static, Sqlite>,
    consumer: String,
    event_id: Uuid,
    contains: Arc<str>,
}

impl std::fmt::Debug for SqliteInboxTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInboxTx")
            .field("consumer", &self.consumer)
            .field("event_id", &self.event_id)
            .finish_non_exhaustive()
    }
}

impl SqliteInboxTx {
    /// The consumer handling the event.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The id of the event being handled.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }

    /// The open transaction itself; committing it yourself commits the
    /// inbox pair too.
    pub fn into_transaction(self) -> Transaction<'static, Sqlite> {
        self.tx
    }
}

// `Deref`/`DerefMut` to the connection, and `transaction()`.
tx_wrapper!(SqliteInboxTx: Transaction<'static, Sqlite> => SqliteConnection);

impl InboxTx for SqliteInboxTx {
    /// Checks that the pair is still there, then commits. SQLite rolls the
    /// whole transaction back on some errors (a full disk, an I/O error, out
    /// of memory); a handler that went on after one would otherwise
    /// "commit" nothing and have its message acked. The check reports that
    /// as an error instead.
    async fn commit(mut self) -> Result<(), StoreError> {
        let present: i64 = sqlx::query_scalar(AssertSqlSafe(self.contains.clone()))
            .bind(&self.consumer)
            .bind(self.event_id.hyphenated().to_string())
            .fetch_one(&mut *self.tx)
            .await
            .map_err(classify)?;
        if present == 0 {
            return Err(inbox_pair_gone(&self.consumer, self.event_id));
        }
        self.tx.commit().await.map_err(classify)
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(classify)
    }
}
