//! [`PgInbox`]: the consumer side's exactly-once effect in a PostgreSQL
//! table, and the events consumers park next to it.
//!
//! The inbox table's primary key is (consumer, event id). A handling inserts
//! its pair with `ON CONFLICT DO NOTHING` in the handler's own transaction:
//! a pair already committed makes the insert a no-op (a duplicate), and a
//! pair another transaction has inserted but not yet committed makes it wait
//! on the unique index until that transaction ends — then it is a duplicate
//! (the other committed) or it goes ahead (the other rolled back).

use std::sync::Arc;
use std::time::Duration;

use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
use proclaim_core::store_support::{ParkedRow, clip_error, inbox_pair_gone, park_key, tx_wrapper};
use proclaim_core::{Event, StoreError};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::ident::{Ident, fnv1a, parse_names, with_suffix};
use crate::migrate::migrate_locked;

/// The oldest cut-off `purge` computes (a longer `older_than` purges nothing).
const MAX_AGE: Duration = Duration::from_secs(1000 * 366 * 24 * 3600);

/// Options of a [`PgInbox`].
///
/// ```
/// use proclaim_postgres::PgInboxOptions;
///
/// let options = PgInboxOptions::default().with_schema("billing").with_table("inbox");
/// assert!(options.validate().is_ok());
/// assert!(PgInboxOptions::default().with_table("inbox; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgInboxOptions {
    /// Schema of the inbox tables (default `proclaim`).
    pub schema: String,
    /// Name of the inbox table (default `inbox`). Parked events live in
    /// `<table>_parked` next to it.
    pub table: String,
}

impl Default for PgInboxOptions {
    fn default() -> Self {
        PgInboxOptions {
            schema: "proclaim".into(),
            table: "inbox".into(),
        }
    }
}

impl PgInboxOptions {
    /// Sets the schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }
    /// Checks schema and table names: 1-63 characters of `a-z`, `0-9` and
    /// `_`, not starting with a digit; anything else is a
    /// [`StoreError::Config`].
    pub fn validate(&self) -> Result<(), StoreError> {
        parse_names(&self.schema, &self.table).map(|_| ())
    }
}

/// The statements of one inbox, built once with its checked names.
struct InboxSql {
    qualified: String,
    parked_qualified: String,
    migrate: String,
    migrate_lock: i64,
    insert: Arc<str>,
    contains: Arc<str>,
    purge: Arc<str>,
    park: Arc<str>,
    parked_all: Arc<str>,
    parked_of: Arc<str>,
    take: Arc<str>,
}

/// Columns of a parked event, in the order `decode_parked` reads them.
const PARKED_COLUMNS: &str = "id, consumer, event::text, raw, reason, attempts, parked_at";

impl InboxSql {
    fn new(schema: &Ident, table: &Ident) -> Self {
        let s = schema.as_str();
        let t = table.as_str();
        let parked = with_suffix(table, "parked");
        let handled_idx = with_suffix(table, "handled_idx");
        let parked_idx = with_suffix(table, "parked_consumer_idx");
        let parked_key_idx = with_suffix(table, "parked_key_idx");
        let q = format!(r#""{s}"."{t}""#);
        let p = format!(r#""{s}"."{parked}""#);
        let a = |sql: String| -> Arc<str> { sql.into() };
        InboxSql {
            migrate: format!(
                r#"SET LOCAL client_min_messages = warning;
                   CREATE SCHEMA IF NOT EXISTS "{s}";
                   CREATE TABLE IF NOT EXISTS {q} (
                       consumer   TEXT        NOT NULL,
                       event_id   UUID        NOT NULL,
                       handled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                       PRIMARY KEY (consumer, event_id));
                   CREATE INDEX IF NOT EXISTS "{handled_idx}" ON {q} (handled_at);
                   CREATE TABLE IF NOT EXISTS {p} (
                       id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                       consumer  TEXT        NOT NULL,
                       event     JSON,
                       raw       BYTEA       NOT NULL,
                       reason    TEXT        NOT NULL,
                       attempts  INTEGER     NOT NULL DEFAULT 0,
                       parked_at TIMESTAMPTZ NOT NULL DEFAULT now());
                   CREATE INDEX IF NOT EXISTS "{parked_idx}" ON {p} (consumer, id);
                   ALTER TABLE {p} ADD COLUMN IF NOT EXISTS park_key TEXT;
                   CREATE UNIQUE INDEX IF NOT EXISTS "{parked_key_idx}" ON {p} (consumer, park_key)"#
            ),
            migrate_lock: i64::from(fnv1a(&["proclaim-inbox-migrate", s, t])),
            insert: a(format!(
                "INSERT INTO {q} (consumer, event_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer, event_id) DO NOTHING"
            )),
            contains: a(format!(
                "SELECT EXISTS (SELECT 1 FROM {q} WHERE consumer = $1 AND event_id = $2)"
            )),
            purge: a(format!(
                "DELETE FROM {q} WHERE handled_at < now() - make_interval(secs => $1::float8)"
            )),
            park: a(format!(
                "INSERT INTO {p} (consumer, event, raw, reason, attempts, parked_at, park_key) \
                 VALUES ($1, $2::json, $3, $4, $5, $6, $7) \
                 ON CONFLICT (consumer, park_key) DO NOTHING"
            )),
            parked_all: a(format!(
                "SELECT {PARKED_COLUMNS} FROM {p} ORDER BY id LIMIT $1"
            )),
            parked_of: a(format!(
                "SELECT {PARKED_COLUMNS} FROM {p} WHERE consumer = $1 ORDER BY id LIMIT $2"
            )),
            take: a(format!(
                "DELETE FROM {p} WHERE id = ANY($1) RETURNING {PARKED_COLUMNS}"
            )),
            qualified: q,
            parked_qualified: p,
        }
    }
}

/// The consumer inbox in PostgreSQL: which events each consumer has handled,
/// recorded in the handler's own transaction, and the events consumers
/// parked ([`ParkedEvents`]). Cloning is cheap.
///
/// [`begin`](Inbox::begin) opens a transaction on the pool and records the
/// pair (consumer, event id); run the handler's statements through the
/// returned [`PgInboxTx`] and commit it: the effect and the pair are stored
/// together or not at all, so a redelivered duplicate finds the pair and is
/// skipped, and a handler that fails (or a process that dies) leaves nothing
/// behind for the redelivery to trip over. Two deliveries of one event at
/// the same moment serialize on the pair's primary key.
///
/// Tables (created by [`migrate`](PgInbox::migrate), in schema `proclaim`
/// unless [`PgInboxOptions`] say otherwise): `inbox (consumer, event_id,
/// handled_at)` and `inbox_parked (id, consumer, event, raw, reason,
/// attempts, parked_at, park_key)`.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
/// use proclaim_postgres::{PgInbox, PgInboxOptions};
///
/// # async fn demo(pool: sqlx::PgPool, event: Event) -> Result<(), Box<dyn std::error::Error>> {
/// let inbox = PgInbox::with_options(pool, PgInboxOptions::default().with_schema("campaign"))?;
/// inbox.migrate().await?;
///
/// // For each message the broker delivers:
/// match inbox.begin("thank-you-notes", &event).await? {
///     None => {} // handled before: nothing to do
///     Some(mut tx) => {
///         let donor: serde_json::Value = event.data_as()?;
///         let handled = sqlx::query("INSERT INTO campaign.thank_you_notes (donor) VALUES ($1)")
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
pub struct PgInbox {
    pool: PgPool,
    sql: Arc<InboxSql>,
}

impl std::fmt::Debug for PgInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInbox")
            .field("table", &self.sql.qualified)
            .finish_non_exhaustive()
    }
}

impl PgInbox {
    /// An inbox in `proclaim.inbox` (parked events in `proclaim.inbox_parked`).
    pub fn new(pool: PgPool) -> Self {
        let defaults = PgInboxOptions::default();
        Self::build(
            pool,
            &Ident::known(&defaults.schema),
            &Ident::known(&defaults.table),
        )
    }

    /// An inbox with the given options. Schema and table names must be 1-63
    /// characters of `a-z`, `0-9` and `_`, not starting with a digit;
    /// anything else is a [`StoreError::Config`], so names can never inject SQL.
    pub fn with_options(pool: PgPool, options: PgInboxOptions) -> Result<Self, StoreError> {
        let (schema, table) = parse_names(&options.schema, &options.table)?;
        Ok(Self::build(pool, &schema, &table))
    }

    fn build(pool: PgPool, schema: &Ident, table: &Ident) -> Self {
        PgInbox {
            pool,
            sql: Arc::new(InboxSql::new(schema, table)),
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The quoted, schema-qualified inbox table name.
    pub fn table_name(&self) -> &str {
        &self.sql.qualified
    }

    /// The quoted, schema-qualified table of parked events.
    pub fn parked_table_name(&self) -> &str {
        &self.sql.parked_qualified
    }

    /// Creates the schema, the inbox table and the table of parked events
    /// with their indexes. Safe to run repeatedly and concurrently (runs
    /// are serialized by an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate_locked(&self.pool, self.sql.migrate_lock, &self.sql.migrate).await?;
        tracing::debug!(table = %self.sql.qualified, "inbox tables ready");
        Ok(())
    }
}

impl Inbox for PgInbox {
    type Tx = PgInboxTx;

    async fn begin(&self, consumer: &str, event: &Event) -> Result<Option<PgInboxTx>, StoreError> {
        let event_id = event.id();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let done = sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(consumer)
            .bind(event_id)
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
        Ok(Some(PgInboxTx {
            tx,
            consumer: consumer.to_owned(),
            event_id,
            contains: self.sql.contains.clone(),
        }))
    }

    async fn contains(&self, consumer: &str, event_id: Uuid) -> Result<bool, StoreError> {
        sqlx::query_scalar(AssertSqlSafe(self.sql.contains.clone()))
            .bind(consumer)
            .bind(event_id)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)
    }

    async fn purge(&self, older_than: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
            .bind(older_than.min(MAX_AGE).as_secs_f64())
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        if done.rows_affected() > 0 {
            tracing::debug!(table = %self.sql.qualified, purged = done.rows_affected(), "purged inbox pairs");
        }
        Ok(done.rows_affected())
    }
}

impl ParkedEvents for PgInbox {
    /// Stores the event as CloudEvents JSON (its payload's exact text), the
    /// reason without NUL characters and cut to 4,000 bytes, and `parked_at`
    /// to the microsecond. Parking the same parking again (a retry whose
    /// first insert committed) stores nothing more ([`park_key`]).
    async fn park(&self, parked: &ParkedEvent) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(self.sql.park.clone()))
            .bind(&parked.consumer)
            .bind(parked.event.as_ref().map(Event::to_cloudevent_json))
            .bind(&parked.raw)
            .bind(clip_error(&parked.reason))
            .bind(i32::try_from(parked.attempts).unwrap_or(i32::MAX))
            .bind(parked.parked_at)
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

fn decode_parked(row: &PgRow) -> Result<ParkedEvent, sqlx::Error> {
    let attempts: i32 = row.try_get(5)?;
    Ok(ParkedRow {
        id: row.try_get(0)?,
        consumer: row.try_get(1)?,
        event_json: row.try_get(2)?,
        raw: row.try_get(3)?,
        reason: row.try_get(4)?,
        attempts: attempts.into(),
        parked_at: row.try_get(6)?,
    }
    .into_parked_event())
}

/// The transaction of one handling by a [`PgInbox`]: the inbox pair is
/// already written in it. Run the handler's statements through it —
/// `query.execute(&mut *tx)` (it dereferences to the [`PgConnection`]), or
/// [`transaction`](PgInboxTx::transaction) for APIs that take a
/// `sqlx::Transaction`, such as `PgOutbox::enqueue` for the events the
/// handler emits — then [`commit`](InboxTx::commit). Dropping it rolls back.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::inbox::{Inbox, InboxTx};
/// use proclaim_postgres::{PgInbox, PgOutbox};
///
/// # async fn demo(inbox: PgInbox, outbox: PgOutbox, event: Event) -> Result<(), Box<dyn std::error::Error>> {
/// if let Some(mut tx) = inbox.begin("receipts", &event).await? {
///     sqlx::query("UPDATE pledges SET receipted = true WHERE id = $1")
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
pub struct PgInboxTx {
    tx: Transaction<'static, Postgres>,
    consumer: String,
    event_id: Uuid,
    contains: Arc<str>,
}

impl std::fmt::Debug for PgInboxTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInboxTx")
            .field("consumer", &self.consumer)
            .field("event_id", &self.event_id)
            .finish_non_exhaustive()
    }
}

impl PgInboxTx {
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
    pub fn into_transaction(self) -> Transaction<'static, Postgres> {
        self.tx
    }
}

// `Deref`/`DerefMut` to the connection, and `transaction()`.
tx_wrapper!(PgInboxTx: Transaction<'static, Postgres> => PgConnection);

impl InboxTx for PgInboxTx {
    /// Checks that the pair is still there, then commits. After a failed
    /// statement PostgreSQL has aborted the transaction and would turn the
    /// `COMMIT` into a silent rollback; the check reports that as an error
    /// (nothing is stored), so the message is not acked as handled.
    async fn commit(mut self) -> Result<(), StoreError> {
        let present: bool = sqlx::query_scalar(AssertSqlSafe(self.contains.clone()))
            .bind(&self.consumer)
            .bind(self.event_id)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(classify)?;
        if !present {
            return Err(inbox_pair_gone(&self.consumer, self.event_id));
        }
        self.tx.commit().await.map_err(classify)
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(classify)
    }
}
