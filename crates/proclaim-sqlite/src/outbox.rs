//! [`SqliteOutbox`]: writing events in the caller's transaction, and the
//! store the relay claims from.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proclaim_core::{
    AckMode, BatchOutcome, ClaimedBatch, CompleteReport, DeadLetterEntry, Event, EventError,
    EventParts, LeaseToken, MalformedRecord, OutboxAdmin, OutboxRecord, OutboxStats, OutboxStore,
    StoreError, Wakeups,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::ident::Ident;
use crate::migrate::BEGIN_IMMEDIATE;
use crate::options::SqliteOutboxOptions;
use crate::sql::Sql;
use crate::wake::Signal;
use proclaim_core::fanout::Stage;
use proclaim_core::store_support::{clip_error, metadata_json};

/// The newest schema version this crate knows; see [`SqliteOutbox::migrate`].
pub const SCHEMA_VERSION: i64 = 1;
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/0001_outbox.sql"))];
/// How long a statement waits for another connection's write lock before it
/// fails with `SQLITE_BUSY` (reported as [`StoreError::Unavailable`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A transactional outbox in a SQLite table: the embedded, zero-set-up store.
///
/// Writers call [`enqueue`](SqliteOutbox::enqueue) with their own open
/// transaction: the event is stored if and only if that transaction commits.
/// The relay uses the same value as its [`OutboxStore`]. Cloning is cheap;
/// clones share the connection pool and the wake-up signal.
///
/// **Ordering.** SQLite lets one transaction write at a time: a writer holds
/// the database's write lock from its first write until it commits. Sequence
/// numbers are therefore handed out in commit order, and events of a subject
/// are delivered in commit order without any lock of proclaim's own.
///
/// **Wake-ups.** SQLite has no `NOTIFY`. With
/// [`notify`](SqliteOutboxOptions::notify) on (the default), `enqueue`
/// installs a commit hook on the writer's connection that wakes the relays
/// built from this outbox (or its clones) in this process when the
/// transaction commits — never when it rolls back. Relays in other processes,
/// or on another `SqliteOutbox` value of the same file, are not woken: they
/// find the events on their next poll. (The hook replaces any commit or
/// rollback hook the application set on that connection itself, and only the
/// last outbox enqueued to in a transaction is woken by it.)
///
/// **Transactions.** Start business transactions that *read before they
/// write* with `pool.begin_with("BEGIN IMMEDIATE")`: a deferred transaction
/// that must upgrade its read lock while another connection writes fails at
/// once with `SQLITE_BUSY` instead of waiting.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_sqlite::SqliteOutbox;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = SqliteOutbox::connect("sqlite://data/app.db?mode=rwc").await?;
/// outbox.migrate().await?;
///
/// let mut tx = outbox.pool().begin().await?;
/// sqlx::query("INSERT INTO campaign_donors (id, name) VALUES (?1, ?2)")
///     .bind(42_i64)
///     .bind("Ada")
///     .execute(&mut *tx)
///     .await?;
/// let event = Event::builder("DonorSecured")
///     .subject("donor-42")
///     .data(&serde_json::json!({ "donor_id": 42 }))
///     .build()?;
/// outbox.enqueue(&mut tx, &event).await?;
/// tx.commit().await?; // the donor and the event, or neither
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    table: Ident,
    notify: bool,
    sql: Arc<Sql>,
    signal: Signal,
}

impl std::fmt::Debug for SqliteOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOutbox")
            .field("table", &self.sql.quoted)
            .field("database", &self.pool.connect_options().get_filename())
            .field("notify", &self.notify)
            .finish_non_exhaustive()
    }
}

impl SqliteOutbox {
    /// An outbox in the table `proclaim_outbox` with in-process wake-ups.
    ///
    /// The pool should be opened as [`SqliteOutbox::connect_options`]
    /// describes (WAL journal, a busy timeout); [`SqliteOutbox::connect`]
    /// does it for you.
    pub fn new(pool: SqlitePool) -> Self {
        let defaults = SqliteOutboxOptions::default();
        Self::build(pool, Ident::known(&defaults.table), defaults.notify)
    }

    /// An outbox with the given options. The table name must be 1-63
    /// characters of `a-z`, `0-9` and `_`, not starting with a digit;
    /// anything else is a [`StoreError::Config`], so a name can never
    /// inject SQL.
    pub fn with_options(
        pool: SqlitePool,
        options: SqliteOutboxOptions,
    ) -> Result<Self, StoreError> {
        let table = Ident::parse("table", &options.table)?;
        Ok(Self::build(pool, table, options.notify))
    }

    fn build(pool: SqlitePool, table: Ident, notify: bool) -> Self {
        let sql = Arc::new(Sql::new(&table));
        SqliteOutbox {
            pool,
            table,
            notify,
            sql,
            signal: Signal::new(),
        }
    }

    /// Opens the database at `url` the way an outbox needs it and returns an
    /// outbox with the default options.
    ///
    /// - a file, e.g. `sqlite://data/app.db?mode=rwc` or `sqlite:app.db`:
    ///   created if missing, WAL journal (readers never block the writer),
    ///   `synchronous = NORMAL` (durable across application crashes; a power
    ///   loss may lose the last commits), a 5 s busy timeout, foreign keys on;
    /// - `sqlite::memory:`: a private in-memory database behind a pool of
    ///   exactly one connection that is never closed (closing it would drop
    ///   the data), for tests and demos. Everything shares that connection:
    ///   do not call the outbox's own methods while holding a transaction of
    ///   that pool, or they wait for it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, SqliteOutboxOptions::default()).await
    }

    /// [`SqliteOutbox::connect`] with options.
    pub async fn connect_with(url: &str, options: SqliteOutboxOptions) -> Result<Self, StoreError> {
        options.validate()?;
        let connect = Self::connect_options(url)?;
        let pool = if is_memory(url) {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(connect)
                .await
        } else {
            SqlitePoolOptions::new().connect_with(connect).await
        }
        .map_err(classify)?;
        tracing::debug!(url, table = %options.table, "opened SQLite outbox database");
        Self::with_options(pool, options)
    }

    /// The connection options [`SqliteOutbox::connect`] uses for `url`, for
    /// building a pool of your own: create if missing, WAL journal and
    /// `synchronous = NORMAL` for files, a 5 s busy timeout, foreign keys on.
    pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
        if !url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("sqlite:"))
        {
            return Err(StoreError::Config(format!(
                "{url:?} is not a SQLite URL (sqlite://path/to/file.db?mode=rwc or sqlite::memory:)"
            )));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        Ok(if is_memory(url) {
            options
        } else {
            options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The quoted table name, e.g. `"proclaim_outbox"`.
    pub fn table_name(&self) -> &str {
        &self.sql.quoted
    }

    /// Creates the outbox table and its indexes, or brings them up to date.
    /// Versions are recorded in `<table>_migrations`. Safe to run repeatedly
    /// and concurrently: it runs under `BEGIN IMMEDIATE`, so SQLite applies
    /// one migration run at a time and the next one finds nothing to do.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let t = self.table.as_str();
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        sqlx::raw_sql(AssertSqlSafe(self.sql.create_migrations.clone()))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let current: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        let current = current.unwrap_or(0);
        for (version, script) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let script = script.replace("{table}", t);
            sqlx::raw_sql(AssertSqlSafe(script))
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            sqlx::query(AssertSqlSafe(self.sql.record_migration.clone()))
                .bind(version)
                .bind(now_micros())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            tracing::info!(table = %self.sql.quoted, version, "applied outbox migration");
        }
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    /// Checks that [`migrate`](SqliteOutbox::migrate) has run, with a clear
    /// error (and the hint to run `proclaim migrate`) when it has not.
    pub async fn verify_schema(&self) -> Result<(), StoreError> {
        let t = self.table.as_str();
        let migrations = format!("{t}_migrations");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name IN (?1, ?2)",
        )
        .bind(t)
        .bind(&migrations)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        for name in [t, migrations.as_str()] {
            if !tables.iter().any(|found| found == name) {
                return Err(StoreError::Config(format!(
                    "outbox table \"{name}\" does not exist in {}; run `proclaim migrate`",
                    self.database()
                )));
            }
        }
        let version: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        match version {
            Some(v) if v >= SCHEMA_VERSION => Ok(()),
            v => Err(StoreError::Config(format!(
                "outbox table {} is at schema version {} but {SCHEMA_VERSION} is needed; run `proclaim migrate`",
                self.sql.quoted,
                v.unwrap_or(0)
            ))),
        }
    }

    /// Writes `event` in the caller's transaction. It is published only if
    /// the transaction commits, and never if it rolls back.
    ///
    /// Per-subject order needs no lock here: SQLite serializes writers, so
    /// events get their sequence numbers in commit order.
    ///
    /// The payload is stored as the exact JSON text of the event, the
    /// metadata as a JSON object, and the event time to the microsecond.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        event: &Event,
    ) -> Result<(), StoreError> {
        self.insert_one(tx, &self.sql.insert_one, event).await
    }

    async fn insert_one(
        &self,
        conn: &mut SqliteConnection,
        sql: &Arc<str>,
        event: &Event,
    ) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(event.id().hyphenated().to_string())
            .bind(event.event_type())
            .bind(event.source())
            .bind(event.subject())
            .bind(event.time().timestamp_micros())
            .bind(event.datacontenttype())
            .bind(event.dataschema())
            .bind(event.data().get())
            .bind(metadata_json(event))
            .bind(now_micros())
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        self.arm(conn).await
    }

    /// Writes several events in the caller's transaction with one statement,
    /// in the order given.
    pub async fn enqueue_batch(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        events: &[Event],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let conn: &mut SqliteConnection = tx;
        let now = now_micros();
        let rows: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.id().hyphenated().to_string(),
                    e.event_type(),
                    e.source(),
                    e.subject(),
                    e.time().timestamp_micros(),
                    e.datacontenttype(),
                    e.dataschema(),
                    // The payload travels as a JSON string, so SQLite stores
                    // the exact text that was written.
                    e.data().get(),
                    metadata_json(e),
                    now,
                )
            })
            .collect();
        let rows = serde_json::to_string(&rows)
            .map_err(|e| StoreError::InvalidEvent(EventError::Data(e.to_string())))?;
        sqlx::query(AssertSqlSafe(self.sql.insert_many.clone()))
            .bind(rows)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        self.arm(conn).await
    }

    async fn arm(&self, conn: &mut SqliteConnection) -> Result<(), StoreError> {
        if self.notify {
            self.signal.arm(conn).await?;
        }
        Ok(())
    }

    /// Dead-lettered events, oldest first.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetterEntry>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.dead_letters.clone()))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter()
            .map(|r| {
                let sequence: i64 = r.try_get(0)?;
                let id: String = r.try_get(1)?;
                // A row dead-lettered because it was malformed may have an
                // unreadable id; list it anyway rather than fail the listing.
                let id = Uuid::parse_str(&id).unwrap_or_else(|e| {
                    tracing::warn!(sequence, id, error = %e, "dead letter has an invalid id");
                    Uuid::nil()
                });
                let attempts: i64 = r.try_get(4)?;
                let at: Option<i64> = r.try_get(6)?;
                Ok(DeadLetterEntry {
                    sequence,
                    id,
                    event_type: r.try_get(2)?,
                    subject: r.try_get(3)?,
                    attempts: i32::try_from(attempts.max(0)).unwrap_or(i32::MAX),
                    last_error: r.try_get(5)?,
                    dead_lettered_at: at.and_then(from_micros),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(classify)
    }

    /// Puts dead-lettered events back in line with fresh attempts: the given
    /// ids, or all of them when `ids` is `None`. Returns how many.
    pub async fn replay_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        let ids = ids.map(|ids| {
            let ids: Vec<String> = ids.iter().map(|id| id.hyphenated().to_string()).collect();
            serde_json::Value::from(ids).to_string()
        });
        let done = sqlx::query(AssertSqlSafe(self.sql.replay.clone()))
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected())
    }

    fn database(&self) -> String {
        self.pool
            .connect_options()
            .get_filename()
            .display()
            .to_string()
    }

    async fn apply(
        &self,
        conn: &mut SqliteConnection,
        token: LeaseToken,
        outcome: &BatchOutcome,
        mode: AckMode,
    ) -> Result<u64, StoreError> {
        let token = token.0.hyphenated().to_string();
        let now = now_micros();
        let mut applied = 0u64;
        let mut run = async |sql: &Arc<str>, list: String, with_now: bool| {
            let mut query = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(list)
                .bind(token.clone());
            if with_now {
                query = query.bind(now);
            }
            let done = query.execute(&mut *conn).await.map_err(classify)?;
            Ok::<u64, StoreError>(done.rows_affected())
        };
        if !outcome.published.is_empty() {
            let list = json_list(&outcome.published);
            applied += match mode {
                AckMode::Delete => run(&self.sql.delete_published, list, false).await?,
                AckMode::Retain => run(&self.sql.mark_published, list, true).await?,
            };
        }
        if !outcome.retry.is_empty() {
            let list: Vec<(i64, i64, String)> = outcome
                .retry
                .iter()
                .map(|r| {
                    let next = now.saturating_add(micros(r.delay));
                    (r.sequence, next, clip_error(&r.error))
                })
                .collect();
            applied += run(&self.sql.retry, json_list(&list), false).await?;
        }
        if !outcome.dead.is_empty() {
            let list: Vec<(i64, String)> = outcome
                .dead
                .iter()
                .map(|d| (d.sequence, clip_error(&d.error)))
                .collect();
            applied += run(&self.sql.dead, json_list(&list), true).await?;
        }
        if !outcome.released.is_empty() {
            applied += run(&self.sql.release, json_list(&outcome.released), false).await?;
        }
        Ok(applied)
    }
}

fn is_memory(url: &str) -> bool {
    let url = url.to_ascii_lowercase();
    url.contains(":memory:") || url.contains("mode=memory")
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn from_micros(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// A list as a JSON array, for `json_each`. Serializing numbers, strings and
/// tuples of them cannot fail.
fn json_list<T: serde::Serialize>(list: &[T]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn decode_row(row: &SqliteRow) -> Result<OutboxRecord, (i64, String)> {
    let sequence: i64 = row.try_get(0).map_err(|e| (0, e.to_string()))?;
    let bad = |e: String| (sequence, e);
    let text = |i: usize, what: &str| -> Result<String, (i64, String)> {
        row.try_get(i).map_err(|e| bad(format!("{what}: {e}")))
    };
    let time = |i: usize, what: &str| -> Result<DateTime<Utc>, (i64, String)> {
        let micros: i64 = row.try_get(i).map_err(|e| bad(format!("{what}: {e}")))?;
        from_micros(micros).ok_or_else(|| bad(format!("{what}: {micros} is out of range")))
    };
    let id = text(1, "id")?;
    let id = Uuid::parse_str(&id).map_err(|e| bad(format!("id: {e}")))?;
    let metadata = text(9, "metadata")?;
    let metadata: BTreeMap<String, String> =
        serde_json::from_str(&metadata).map_err(|e| bad(format!("metadata: {e}")))?;
    let parts = EventParts {
        id,
        event_type: text(2, "event_type")?,
        source: text(3, "source")?,
        subject: text(4, "subject")?,
        time: time(5, "event_time")?,
        datacontenttype: text(6, "datacontenttype")?,
        dataschema: row
            .try_get(7)
            .map_err(|e| bad(format!("dataschema: {e}")))?,
        data: text(8, "data")?,
        metadata,
    };
    let event = Event::from_parts(parts).map_err(|e| bad(e.to_string()))?;
    let attempts: i64 = row.try_get(10).map_err(|e| bad(format!("attempts: {e}")))?;
    Ok(OutboxRecord {
        sequence,
        event,
        attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
        created_at: time(11, "created_at")?,
    })
}

/// A fan-out lane in this outbox table (see [`proclaim_core::fanout`]):
/// each event is inserted in a transaction of its own, unless an event with
/// the same id is already in the table.
impl Stage for SqliteOutbox {
    async fn stage(&self, event: &Event) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.insert_one(&mut tx, &self.sql.stage_one, event).await?;
        tx.commit().await.map_err(classify)
    }
}

impl OutboxStore for SqliteOutbox {
    async fn claim(
        &self,
        token: LeaseToken,
        limit: usize,
        lease: Duration,
    ) -> Result<ClaimedBatch, StoreError> {
        // One claimer at a time (the write lock), so each claim sees the
        // leases of the previous one and per-subject order holds across
        // relays and processes.
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        let now = now_micros();
        let rows = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(token.0.hyphenated().to_string())
            .bind(now)
            .bind(now.saturating_add(micros(lease)))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        let batch = rows
            .iter()
            .map(|row| {
                decode_row(row).map_err(|(sequence, error)| MalformedRecord { sequence, error })
            })
            .collect();
        Ok(batch)
    }

    async fn complete(
        &self,
        token: LeaseToken,
        outcome: &BatchOutcome,
        mode: AckMode,
    ) -> Result<CompleteReport, StoreError> {
        if outcome.is_empty() {
            return Ok(CompleteReport::default());
        }
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        let applied = self.apply(&mut tx, token, outcome, mode).await?;
        tx.commit().await.map_err(classify)?;
        Ok(CompleteReport {
            applied,
            lost: (outcome.len() as u64).saturating_sub(applied),
        })
    }

    async fn purge_published(&self, older_than: Duration) -> Result<u64, StoreError> {
        let cut_off = now_micros().saturating_sub(micros(older_than));
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
            .bind(cut_off)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.stats.clone()))
            .bind(now_micros())
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        let get = |i: usize| -> Result<u64, StoreError> {
            let v: i64 = row.try_get(i).map_err(classify)?;
            Ok(v.max(0) as u64)
        };
        Ok(OutboxStats {
            pending: get(0)?,
            in_flight: get(1)?,
            dead_lettered: get(2)?,
            published_retained: get(3)?,
            oldest_pending_age_ms: get(4)? / 1000,
        })
    }

    async fn wakeups(&self) -> Result<Option<Wakeups>, StoreError> {
        Ok(self.notify.then(|| self.signal.subscribe()))
    }
}

impl OutboxAdmin for SqliteOutbox {
    async fn migrate(&self) -> Result<(), StoreError> {
        SqliteOutbox::migrate(self).await
    }

    async fn verify_schema(&self) -> Result<(), StoreError> {
        SqliteOutbox::verify_schema(self).await
    }

    async fn enqueue_standalone(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        self.enqueue_batch(&mut tx, events).await?;
        tx.commit().await.map_err(classify)
    }

    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetterEntry>, StoreError> {
        SqliteOutbox::dead_letters(self, limit).await
    }

    async fn replay_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        SqliteOutbox::replay_dead_letters(self, ids).await
    }

    fn describe(&self) -> String {
        format!("{} in {}", self.sql.quoted, self.database())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_urls_are_recognized() {
        assert!(is_memory("sqlite::memory:"));
        assert!(is_memory("sqlite://?mode=memory"));
        assert!(!is_memory("sqlite://data/app.db?mode=rwc"));
    }

    #[test]
    fn durations_saturate() {
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert_eq!(micros(Duration::MAX), i64::MAX);
    }
}
