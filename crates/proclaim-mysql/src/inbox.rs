//! [`MySqlInbox`]: the consumer side's exactly-once effect in a MySQL or
//! MariaDB table, and the events consumers park next to it.
//!
//! The inbox table's primary key is (consumer, event id). A handling inserts
//! its pair with `INSERT IGNORE` in the handler's own transaction: a pair
//! already committed makes the insert a no-op (a duplicate), and a pair
//! another transaction has inserted but not yet committed makes InnoDB wait
//! on the key's lock until that transaction ends — then it is a duplicate
//! (the other committed) or it goes ahead (the other rolled back).

use std::sync::Arc;
use std::time::Duration;

use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
use proclaim_core::store_support::{ParkedRow, clip_error, inbox_pair_gone, park_key, tx_wrapper};
use proclaim_core::{Event, StoreError};
use sqlx::mysql::{MySqlPool, MySqlRow};
use sqlx::{AssertSqlSafe, MySql, MySqlConnection, Row, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::ident::{Ident, check_name_len, with_suffix};
use crate::migrate_lock::{execute_all, with_migrate_lock};

/// Longest consumer name, in characters (the key column is `VARCHAR(255)`;
/// `INSERT IGNORE` would cut a longer one silently, so it is refused).
pub const MAX_CONSUMER_LEN: usize = 255;
/// Ids per statement for `IN (…)` lists.
const CHUNK: usize = 1_000;
/// Pairs deleted per statement by `purge`.
const PURGE_CHUNK: i64 = 10_000;
/// The oldest cut-off `purge` computes, so it stays in the range of
/// `DATETIME` (a longer `older_than` purges nothing).
const MAX_AGE: Duration = Duration::from_secs(1000 * 366 * 24 * 3600);
/// Purges run at READ COMMITTED: no gap locks, so they never hold up
/// handlings inserting new pairs.
const BEGIN_READ_COMMITTED: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";
/// Columns of a parked event, in the order `decode_parked` reads them.
const PARKED_COLUMNS: &str = "id, consumer, event, raw, reason, attempts, parked_at";

/// Options of a [`MySqlInbox`]. The database is the one of the connection
/// URL; only the table is chosen here.
///
/// ```
/// use proclaim_mysql::MySqlInboxOptions;
///
/// let options = MySqlInboxOptions::default().with_table("billing_inbox");
/// assert!(options.validate().is_ok());
/// assert!(MySqlInboxOptions::default().with_table("inbox`; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MySqlInboxOptions {
    /// Name of the inbox table (default `proclaim_inbox`). Parked events
    /// live in `<table>_parked` next to it.
    pub table: String,
}

impl Default for MySqlInboxOptions {
    fn default() -> Self {
        MySqlInboxOptions {
            table: "proclaim_inbox".into(),
        }
    }
}

impl MySqlInboxOptions {
    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Checks the table name: 1-63 characters of `a-z`, `0-9` and `_`, not
    /// starting with a digit; anything else is a [`StoreError::Config`].
    pub fn validate(&self) -> Result<(), StoreError> {
        Ident::parse("table", &self.table)?;
        Ok(())
    }
}

/// The statements of one inbox, built once with its checked names.
struct InboxSql {
    quoted: String,
    parked_quoted: String,
    create: [String; 2],
    insert: Arc<str>,
    contains: Arc<str>,
    purge: Arc<str>,
    park: Arc<str>,
    parked_all: Arc<str>,
    parked_of: Arc<str>,
}

impl InboxSql {
    fn new(table: &Ident) -> Self {
        let q = format!("`{}`", table.as_str());
        let p = format!("`{}`", with_suffix(table, "parked"));
        let a = |sql: String| -> Arc<str> { sql.into() };
        InboxSql {
            create: [
                // The event id is kept as its hyphenated text, as the outbox
                // keeps it. All times are UTC from the database's clock.
                format!(
                    "CREATE TABLE IF NOT EXISTS {q} ( \
                       consumer   VARCHAR({MAX_CONSUMER_LEN}) NOT NULL, \
                       event_id   CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
                       handled_at DATETIME(6) NOT NULL, \
                       PRIMARY KEY (consumer, event_id), \
                       KEY handled_idx (handled_at) \
                     ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin"
                ),
                // `event` is the CloudEvents JSON as text: MySQL's JSON type
                // would re-format the payload.
                format!(
                    "CREATE TABLE IF NOT EXISTS {p} ( \
                       id        BIGINT      NOT NULL AUTO_INCREMENT, \
                       consumer  VARCHAR({MAX_CONSUMER_LEN}) NOT NULL, \
                       event     LONGTEXT    NULL, \
                       raw       LONGBLOB    NOT NULL, \
                       reason    TEXT        NOT NULL, \
                       attempts  INT         NOT NULL DEFAULT 0, \
                       parked_at DATETIME(6) NOT NULL, \
                       park_key  VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NULL, \
                       PRIMARY KEY (id), \
                       KEY consumer_idx (consumer, id), \
                       UNIQUE KEY park_key_idx (consumer, park_key) \
                     ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin"
                ),
            ],
            insert: a(format!(
                "INSERT IGNORE INTO {q} (consumer, event_id, handled_at) \
                 VALUES (?, ?, UTC_TIMESTAMP(6))"
            )),
            contains: a(format!(
                "SELECT COUNT(*) FROM {q} WHERE consumer = ? AND event_id = ?"
            )),
            purge: a(format!(
                "DELETE FROM {q} WHERE handled_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
                 ORDER BY handled_at LIMIT ?"
            )),
            park: a(format!(
                "INSERT INTO {p} (consumer, event, raw, reason, attempts, parked_at, park_key) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE id = id"
            )),
            parked_all: a(format!(
                "SELECT {PARKED_COLUMNS} FROM {p} ORDER BY id LIMIT ?"
            )),
            parked_of: a(format!(
                "SELECT {PARKED_COLUMNS} FROM {p} WHERE consumer = ? ORDER BY id LIMIT ?"
            )),
            quoted: q,
            parked_quoted: p,
        }
    }

    /// Locks the parked events with these ids (`n` placeholders).
    fn lock_parked(&self, n: usize) -> String {
        format!(
            "SELECT {PARKED_COLUMNS} FROM {} WHERE id IN ({}) ORDER BY id FOR UPDATE",
            self.parked_quoted,
            placeholders(n)
        )
    }

    /// Deletes the parked events with these ids (`n` placeholders).
    fn delete_parked(&self, n: usize) -> String {
        format!(
            "DELETE FROM {} WHERE id IN ({})",
            self.parked_quoted,
            placeholders(n)
        )
    }
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The consumer inbox in MySQL 8.0+ or MariaDB 10.6+ (InnoDB): which events
/// each consumer has handled, recorded in the handler's own transaction, and
/// the events consumers parked ([`ParkedEvents`]). Cloning is cheap.
///
/// [`begin`](Inbox::begin) opens a transaction on the pool and records the
/// pair (consumer, event id); run the handler's statements through the
/// returned [`MySqlInboxTx`] and commit it: the effect and the pair are
/// stored together or not at all, so a redelivered duplicate finds the pair
/// and is skipped, and a handler that fails (or a process that dies) leaves
/// nothing behind for the redelivery to trip over. Two deliveries of one
/// event at the same moment serialize on the pair's primary key.
///
/// Consumer names are at most [`MAX_CONSUMER_LEN`] characters. The tables
/// live in the database of the pool's connection URL: `proclaim_inbox
/// (consumer, event_id, handled_at)` and `proclaim_inbox_parked (id,
/// consumer, event, raw, reason, attempts, parked_at, park_key)` unless
/// [`MySqlInboxOptions`] name them otherwise.
///
/// When a handling rolls back while other deliveries of the same event wait
/// for it, InnoDB may pick one of the waiters as a deadlock victim (error
/// 1213, reported as [`StoreError::Unavailable`]): its message is
/// redelivered and handled then.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::inbox::{Inbox, InboxTx, ParkedEvent, ParkedEvents};
/// use proclaim_mysql::{MySqlInbox, MySqlInboxOptions};
///
/// # async fn demo(event: Event) -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::MySqlPool::connect("mysql://app@127.0.0.1:3306/campaign").await?;
/// let inbox = MySqlInbox::with_options(pool, MySqlInboxOptions::default())?;
/// inbox.migrate().await?;
///
/// // For each message the broker delivers:
/// match inbox.begin("thank-you-notes", &event).await? {
///     None => {} // handled before: nothing to do
///     Some(mut tx) => {
///         let donor: serde_json::Value = event.data_as()?;
///         let handled = sqlx::query("INSERT INTO thank_you_notes (donor) VALUES (?)")
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
pub struct MySqlInbox {
    pool: MySqlPool,
    table: Ident,
    sql: Arc<InboxSql>,
}

impl std::fmt::Debug for MySqlInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlInbox")
            .field("database", &self.pool.connect_options().get_database())
            .field("table", &self.table.as_str())
            .finish_non_exhaustive()
    }
}

impl MySqlInbox {
    /// An inbox in the table `proclaim_inbox` of the pool's database.
    pub fn new(pool: MySqlPool) -> Self {
        let table = Ident::known(&MySqlInboxOptions::default().table);
        Self::build(pool, table)
    }

    /// An inbox with the given options. The table name must be 1-63
    /// characters of `a-z`, `0-9` and `_`, not starting with a digit;
    /// anything else is a [`StoreError::Config`], so it can never inject SQL.
    pub fn with_options(pool: MySqlPool, options: MySqlInboxOptions) -> Result<Self, StoreError> {
        let table = Ident::parse("table", &options.table)?;
        Ok(Self::build(pool, table))
    }

    fn build(pool: MySqlPool, table: Ident) -> Self {
        let sql = Arc::new(InboxSql::new(&table));
        MySqlInbox { pool, table, sql }
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The backquoted inbox table name (in the database of the URL).
    pub fn table_name(&self) -> &str {
        &self.sql.quoted
    }

    /// The backquoted table of parked events.
    pub fn parked_table_name(&self) -> &str {
        &self.sql.parked_quoted
    }

    /// Creates the inbox table and the table of parked events with their
    /// indexes. Safe to run repeatedly and concurrently: MySQL commits every
    /// DDL statement at once, so runs are serialized with a named lock
    /// (`GET_LOCK`), and each statement is idempotent.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let database = with_migrate_lock(
            &self.pool,
            "proclaim-inbox-migrate",
            &self.table,
            format!("inbox {}", self.sql.quoted),
            async |conn| {
                execute_all(conn, &self.sql.create).await?;
                self.add_park_key(conn).await
            },
        )
        .await?;
        tracing::debug!(database, table = %self.sql.quoted, "inbox tables ready");
        Ok(())
    }
}

impl MySqlInbox {
    /// Gives a parked table created before parkings had keys its
    /// `park_key` column and unique key (MySQL has no `ADD COLUMN IF NOT
    /// EXISTS`, so the column is looked up first).
    async fn add_park_key(&self, conn: &mut sqlx::MySqlConnection) -> Result<(), StoreError> {
        let found: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? AND column_name = 'park_key'",
        )
        .bind(self.sql.parked_quoted.trim_matches('`'))
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
        if found == 0 {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE {} \
                   ADD COLUMN park_key VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin NULL, \
                   ADD UNIQUE KEY park_key_idx (consumer, park_key)",
                self.sql.parked_quoted
            )))
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
            tracing::info!(table = %self.sql.parked_quoted, "added park_key to the parked table");
        }
        Ok(())
    }
}

fn check_consumer(consumer: &str) -> Result<(), StoreError> {
    check_name_len("consumer", consumer, MAX_CONSUMER_LEN)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_AGE).as_micros()).unwrap_or(i64::MAX)
}

impl Inbox for MySqlInbox {
    type Tx = MySqlInboxTx;

    async fn begin(
        &self,
        consumer: &str,
        event: &Event,
    ) -> Result<Option<MySqlInboxTx>, StoreError> {
        check_consumer(consumer)?;
        let event_id = event.id();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let done = sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(consumer)
            .bind(event_id.hyphenated().to_string())
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
        Ok(Some(MySqlInboxTx {
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

    /// Deletes in rounds of 10,000 pairs, each its own transaction, so a
    /// large backlog does not become one huge transaction.
    async fn purge(&self, older_than: Duration) -> Result<u64, StoreError> {
        let mut purged = 0u64;
        loop {
            let mut tx = self
                .pool
                .begin_with(BEGIN_READ_COMMITTED)
                .await
                .map_err(classify)?;
            let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
                .bind(micros(older_than))
                .bind(PURGE_CHUNK)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            purged += done.rows_affected();
            if done.rows_affected() < PURGE_CHUNK as u64 {
                if purged > 0 {
                    tracing::debug!(table = %self.sql.quoted, purged, "purged inbox pairs");
                }
                return Ok(purged);
            }
        }
    }
}

impl ParkedEvents for MySqlInbox {
    /// Stores the event as CloudEvents JSON (its payload's exact text), the
    /// reason without NUL characters and cut to 4,000 bytes, and `parked_at`
    /// to the microsecond.
    async fn park(&self, parked: &ParkedEvent) -> Result<(), StoreError> {
        check_consumer(&parked.consumer)?;
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

    /// Locks the rows (`FOR UPDATE`), reads and deletes them in one
    /// transaction, so concurrent takes of the same ids hand each event to
    /// one of them only.
    async fn take(&self, ids: &[i64]) -> Result<Vec<ParkedEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut taken = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.sql.lock_parked(chunk.len())));
            for id in chunk {
                query = query.bind(id);
            }
            let rows = query
                .persistent(false)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            if rows.is_empty() {
                continue;
            }
            let found = rows
                .iter()
                .map(decode_parked)
                .collect::<Result<Vec<_>, _>>()
                .map_err(classify)?;
            let mut query = sqlx::query(AssertSqlSafe(self.sql.delete_parked(found.len())));
            for p in &found {
                query = query.bind(p.id);
            }
            query
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            taken.extend(found);
        }
        tx.commit().await.map_err(classify)?;
        taken.sort_by_key(|p| p.id);
        taken.dedup_by_key(|p| p.id);
        Ok(taken)
    }
}

fn decode_parked(row: &MySqlRow) -> Result<ParkedEvent, sqlx::Error> {
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

/// The transaction of one handling by a [`MySqlInbox`]: the inbox pair is
/// already written in it. Run the handler's statements through it —
/// `query.execute(&mut *tx)` (it dereferences to the [`MySqlConnection`]),
/// or [`transaction`](MySqlInboxTx::transaction) for APIs that take a
/// `sqlx::Transaction`, such as `MySqlOutbox::enqueue` for the events the
/// handler emits — then [`commit`](InboxTx::commit). Dropping it rolls back.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::inbox::{Inbox, InboxTx};
/// use proclaim_mysql::{MySqlInbox, MySqlOutbox};
///
/// # async fn demo(inbox: MySqlInbox, outbox: MySqlOutbox, event: Event) -> Result<(), Box<dyn std::error::Error>> {
/// if let Some(mut tx) = inbox.begin("receipts", &event).await? {
///     sqlx::query("UPDATE pledges SET receipted = true WHERE id = ?")
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
pub struct MySqlInboxTx {
    tx: Transaction<'static, MySql>,
    consumer: String,
    event_id: Uuid,
    contains: Arc<str>,
}

impl std::fmt::Debug for MySqlInboxTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlInboxTx")
            .field("consumer", &self.consumer)
            .field("event_id", &self.event_id)
            .finish_non_exhaustive()
    }
}

impl MySqlInboxTx {
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
    pub fn into_transaction(self) -> Transaction<'static, MySql> {
        self.tx
    }
}

// `Deref`/`DerefMut` to the connection, and `transaction()`.
tx_wrapper!(MySqlInboxTx: Transaction<'static, MySql> => MySqlConnection);

impl InboxTx for MySqlInboxTx {
    /// Checks that the pair is still there, then commits. InnoDB rolls the
    /// whole transaction back on a deadlock or a lock wait timeout (with
    /// `innodb_rollback_on_timeout`); a handler that went on after such an
    /// error would otherwise "commit" nothing and have its message acked.
    /// The check reports that as an error instead.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_consumer_names_are_refused() {
        assert!(check_consumer(&"é".repeat(MAX_CONSUMER_LEN)).is_ok());
        assert!(matches!(
            check_consumer(&"c".repeat(MAX_CONSUMER_LEN + 1)),
            Err(StoreError::Config(_))
        ));
    }

    #[test]
    fn ages_are_bounded() {
        assert_eq!(micros(Duration::from_millis(2)), 2000);
        assert_eq!(micros(Duration::MAX), micros(MAX_AGE));
    }

    #[test]
    fn id_lists_have_one_placeholder_per_id() {
        let sql = InboxSql::new(&Ident::known("inbox"));
        assert!(sql.delete_parked(3).ends_with("IN (?, ?, ?)"));
        assert!(
            sql.lock_parked(1)
                .contains("`inbox_parked` WHERE id IN (?) ")
        );
    }
}
