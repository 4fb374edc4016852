//! [`MySqlOutbox`]: writing events in the caller's transaction, and the store
//! the relay claims from.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proclaim_core::{
    AckMode, BatchOutcome, ClaimedBatch, CompleteReport, DeadLetterEntry, Event, EventParts,
    LeaseToken, MalformedRecord, OutboxAdmin, OutboxRecord, OutboxStats, OutboxStore, StoreError,
};
use sqlx::mysql::{MySqlArguments, MySqlPool, MySqlRow};
use sqlx::{AssertSqlSafe, MySql, MySqlConnection, Row, Transaction};
use uuid::Uuid;

use crate::error::{classify, error_number};
use crate::ident::{Ident, fnv1a};
use crate::migrate_lock::with_migrate_lock;
use crate::options::MySqlOutboxOptions;
use crate::sql::Sql;
use proclaim_core::fanout::Stage;
use proclaim_core::store_support::{clip_error, metadata_json};

/// The newest schema version this crate knows; see [`MySqlOutbox::migrate`].
pub const SCHEMA_VERSION: i32 = 1;

/// Number of subject lock slots (rows of `<table>_subject_locks`). Writers of
/// subjects whose hashes share a slot are serialized too; with this many
/// slots that is rare, and it only costs waiting, never correctness.
pub const SUBJECT_LOCK_SLOTS: u32 = 65_536;

/// Most rows one claim returns, whatever `limit` asks for (it keeps every
/// statement well under MySQL's 65,535 placeholders).
pub const MAX_CLAIM: usize = 5_000;

const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_outbox.sql"))];
/// Rows per statement for `IN (…)` lists and multi-row inserts.
const CHUNK: usize = 1_000;
/// Published rows deleted per statement by `purge_published`.
const PURGE_CHUNK: i64 = 10_000;
/// Longest retry delay or lease stored (longer ones are cut to this), so a
/// time never leaves the range of `DATETIME`.
const MAX_INTERVAL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Claims, outcomes and purges run at READ COMMITTED: no gap locks, so they
/// never hold up writers inserting new events, and each statement sees the
/// latest committed state (in particular the leases of the previous claim).
const BEGIN_READ_COMMITTED: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

type Query = sqlx::query::Query<'static, MySql, MySqlArguments>;

/// A transactional outbox in a MySQL 8.0+ or MariaDB 10.6+ table (InnoDB).
///
/// Writers call [`enqueue`](MySqlOutbox::enqueue) with their own open
/// transaction: the event is stored if and only if that transaction commits.
/// The relay uses the same value as its [`OutboxStore`]; MySQL has no
/// `NOTIFY`, so the relay polls. Cloning is cheap.
///
/// The table lives in the database of the pool's connection URL. All times
/// are UTC from the database's clock (`UTC_TIMESTAMP(6)`), so the session
/// time zone does not matter and the relays' clocks are never compared.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_mysql::MySqlOutbox;
///
/// # async fn demo(pool: sqlx::MySqlPool) -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = MySqlOutbox::new(pool.clone());
/// outbox.migrate().await?;
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO campaign_donors (id, name) VALUES (?, ?)")
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
pub struct MySqlOutbox {
    pool: MySqlPool,
    table: Ident,
    database: Option<String>,
    sql: Arc<Sql>,
}

impl std::fmt::Debug for MySqlOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlOutbox")
            .field("database", &self.database)
            .field("table", &self.table.as_str())
            .finish_non_exhaustive()
    }
}

impl MySqlOutbox {
    /// An outbox in the table `proclaim_outbox` of the pool's database.
    pub fn new(pool: MySqlPool) -> Self {
        let table = Ident::known(&MySqlOutboxOptions::default().table);
        Self::build(pool, table)
    }

    /// An outbox with the given options. The table name must be 1-63
    /// characters of `a-z`, `0-9` and `_`, not starting with a digit;
    /// anything else is a [`StoreError::Config`], so it can never inject SQL.
    pub fn with_options(pool: MySqlPool, options: MySqlOutboxOptions) -> Result<Self, StoreError> {
        let table = Ident::parse("table", &options.table)?;
        Ok(Self::build(pool, table))
    }

    fn build(pool: MySqlPool, table: Ident) -> Self {
        let database = pool.connect_options().get_database().map(str::to_owned);
        let sql = Arc::new(Sql::new(&table));
        MySqlOutbox {
            pool,
            table,
            database,
            sql,
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The backquoted table name, as the statements use it (in the
    /// database of the connection URL).
    pub fn table_name(&self) -> &str {
        &self.sql.quoted
    }

    /// Creates the outbox table, its indexes and its helper tables
    /// (`<table>_migrations`, `<table>_claim_lock`, `<table>_subject_locks`),
    /// or brings them up to date. Safe to run repeatedly and concurrently:
    /// MySQL commits every DDL statement at once, so migrations are
    /// serialized with a named lock (`GET_LOCK`) instead of a transaction,
    /// and each step is idempotent should a migration be interrupted.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        with_migrate_lock(
            &self.pool,
            "proclaim-migrate",
            &self.table,
            self.describe_table(),
            async |conn| self.migrate_locked(conn).await,
        )
        .await?;
        Ok(())
    }

    async fn migrate_locked(&self, conn: &mut MySqlConnection) -> Result<(), StoreError> {
        let sql = &self.sql;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS `{}` ( \
                 version INT NOT NULL PRIMARY KEY, \
                 applied_at DATETIME(6) NOT NULL \
             ) ENGINE = InnoDB",
            sql.migrations
        )))
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
        let current: Option<i32> = sqlx::query_scalar(AssertSqlSafe(sql.schema_version.clone()))
            .fetch_one(&mut *conn)
            .await
            .map_err(classify)?;
        let current = current.unwrap_or(0);
        for (version, script) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            for statement in statements(script) {
                let statement = statement
                    .replace("{table}", self.table.as_str())
                    .replace("{claim_lock}", &sql.claim_lock)
                    .replace("{subject_locks}", &sql.subject_locks);
                sqlx::raw_sql(AssertSqlSafe(statement))
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO `{}` (version, applied_at) VALUES (?, UTC_TIMESTAMP(6))",
                sql.migrations
            )))
            .bind(version)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
            tracing::info!(table = %self.describe_table(), version, "applied outbox migration");
        }
        // Claims need this row; put it back should someone have deleted it.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "INSERT IGNORE INTO `{}` (id) VALUES (1)",
            sql.claim_lock
        )))
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
        Ok(())
    }

    /// Checks that [`migrate`](MySqlOutbox::migrate) has run, with a clear
    /// error (and the hint to run `proclaim migrate`) when it has not.
    pub async fn verify_schema(&self) -> Result<(), StoreError> {
        let version: Result<Option<i32>, sqlx::Error> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&self.pool)
                .await;
        match version {
            Ok(Some(v)) if v >= SCHEMA_VERSION => Ok(()),
            Ok(v) => Err(StoreError::Config(format!(
                "outbox table {} is at schema version {} but {SCHEMA_VERSION} is needed; run `proclaim migrate`",
                self.describe_table(),
                v.unwrap_or(0)
            ))),
            // 1146: table does not exist.
            Err(e) if error_number(&e) == Some(1146) => Err(StoreError::Config(format!(
                "outbox table {} does not exist; run `proclaim migrate`",
                self.describe_table()
            ))),
            // 1046: no database selected.
            Err(e) if error_number(&e) == Some(1046) => Err(StoreError::Config(
                "the MySQL connection URL names no database (mysql://host/<database>)".into(),
            )),
            Err(e) => Err(classify(e)),
        }
    }

    /// Writes `event` in the caller's transaction. It is published only if
    /// the transaction commits, and never if it rolls back.
    ///
    /// Per-subject order: the call first locks the row of the subject's hash
    /// in `<table>_subject_locks` (an `INSERT … ON DUPLICATE KEY UPDATE`), and
    /// InnoDB keeps that lock until the transaction ends. Concurrent
    /// transactions writing the same subject are therefore serialized, and
    /// their events are sequenced in commit order. (MySQL's `GET_LOCK` would
    /// outlive the transaction: it belongs to the session.)
    ///
    /// The cost: a second writer of a subject waits for the first one's
    /// commit, so keep transactions that write events short. A transaction
    /// that writes several subjects with several calls can deadlock with one
    /// that writes the same subjects in another order (MySQL then aborts one
    /// of them with error 1213, reported as [`StoreError::Unavailable`]):
    /// write subjects in a consistent order, or use
    /// [`enqueue_batch`](MySqlOutbox::enqueue_batch), which takes its locks
    /// in a fixed order.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, MySql>,
        event: &Event,
    ) -> Result<(), StoreError> {
        self.insert_one(tx, &self.sql.insert_one, event).await
    }

    async fn insert_one(
        &self,
        conn: &mut MySqlConnection,
        sql: &Arc<str>,
        event: &Event,
    ) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(self.sql.lock_subject.clone()))
            .bind(subject_slot(event.subject()))
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        bind_event(sqlx::query(AssertSqlSafe(sql.clone())), event)
            .execute(conn)
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Writes several events in the caller's transaction, in the order
    /// given, with one multi-row `INSERT` per thousand events. The subjects'
    /// locks are taken first, all at once and in ascending slot order, so
    /// batch writers never deadlock with each other.
    pub async fn enqueue_batch(
        &self,
        tx: &mut Transaction<'_, MySql>,
        events: &[Event],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let conn: &mut MySqlConnection = tx;
        let mut slots: Vec<i32> = events.iter().map(|e| subject_slot(e.subject())).collect();
        slots.sort_unstable();
        slots.dedup();
        for chunk in slots.chunks(CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.sql.lock_subjects(chunk.len())));
            for slot in chunk {
                query = query.bind(slot);
            }
            query
                .persistent(false)
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
        }
        for chunk in events.chunks(CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.sql.insert_many(chunk.len())));
            for event in chunk {
                query = bind_event(query, event);
            }
            query
                .persistent(false)
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
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
                let sequence: i64 = r.try_get(0).map_err(classify)?;
                let id: String = r.try_get(1).map_err(classify)?;
                let id = Uuid::parse_str(&id).map_err(|e| {
                    StoreError::Database(
                        format!("dead letter {sequence} has an invalid id {id:?}: {e}").into(),
                    )
                })?;
                Ok(DeadLetterEntry {
                    sequence,
                    id,
                    event_type: r.try_get(2).map_err(classify)?,
                    subject: r.try_get(3).map_err(classify)?,
                    attempts: r.try_get(4).map_err(classify)?,
                    last_error: r.try_get(5).map_err(classify)?,
                    dead_lettered_at: r.try_get(6).map_err(classify)?,
                })
            })
            .collect()
    }

    /// Puts dead-lettered events back in line with fresh attempts: the given
    /// ids, or all of them when `ids` is `None`. Returns how many.
    pub async fn replay_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        let Some(ids) = ids else {
            let done = sqlx::query(AssertSqlSafe(self.sql.replay_all.clone()))
                .execute(&self.pool)
                .await
                .map_err(classify)?;
            return Ok(done.rows_affected());
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut replayed = 0;
        for chunk in ids.chunks(CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(self.sql.replay_ids(chunk.len())));
            for id in chunk {
                query = query.bind(id.hyphenated().to_string());
            }
            let done = query
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            replayed += done.rows_affected();
        }
        tx.commit().await.map_err(classify)?;
        Ok(replayed)
    }

    /// `database`.`table`, for messages.
    fn describe_table(&self) -> String {
        match &self.database {
            Some(db) => format!("`{db}`.{}", self.sql.quoted),
            None => self.sql.quoted.clone(),
        }
    }

    async fn begin_read_committed(&self) -> Result<Transaction<'static, MySql>, StoreError> {
        self.pool
            .begin_with(BEGIN_READ_COMMITTED)
            .await
            .map_err(classify)
    }

    /// Applies an outcome in the caller's transaction; returns the rows applied.
    async fn apply(
        &self,
        conn: &mut MySqlConnection,
        token: LeaseToken,
        outcome: &BatchOutcome,
        mode: AckMode,
    ) -> Result<u64, StoreError> {
        let token = token.0.hyphenated().to_string();
        let sql = &self.sql;
        let mut applied = 0u64;
        for chunk in outcome.published.chunks(CHUNK) {
            let text = match mode {
                AckMode::Delete => sql.delete_published(chunk.len()),
                AckMode::Retain => sql.mark_published(chunk.len()),
            };
            let query = bind_all(sqlx::query(AssertSqlSafe(text)), chunk);
            applied += run(conn, query.bind(&token)).await?;
        }
        for chunk in outcome.retry.chunks(CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(sql.retry(chunk.len())));
            for r in chunk {
                query = query.bind(r.sequence).bind(micros(r.delay));
            }
            for r in chunk {
                query = query.bind(r.sequence).bind(clip_error(&r.error));
            }
            for r in chunk {
                query = query.bind(r.sequence);
            }
            applied += run(conn, query.bind(&token)).await?;
        }
        for chunk in outcome.dead.chunks(CHUNK) {
            let mut query = sqlx::query(AssertSqlSafe(sql.dead(chunk.len())));
            for d in chunk {
                query = query.bind(d.sequence).bind(clip_error(&d.error));
            }
            for d in chunk {
                query = query.bind(d.sequence);
            }
            applied += run(conn, query.bind(&token)).await?;
        }
        for chunk in outcome.released.chunks(CHUNK) {
            let query = bind_all(sqlx::query(AssertSqlSafe(sql.release(chunk.len()))), chunk);
            applied += run(conn, query.bind(&token)).await?;
        }
        Ok(applied)
    }
}

async fn run(conn: &mut MySqlConnection, query: Query) -> Result<u64, StoreError> {
    let done = query
        .persistent(false)
        .execute(conn)
        .await
        .map_err(classify)?;
    Ok(done.rows_affected())
}

fn bind_all(mut query: Query, sequences: &[i64]) -> Query {
    for sequence in sequences {
        query = query.bind(sequence);
    }
    query
}

fn bind_event(query: Query, event: &Event) -> Query {
    query
        .bind(event.id().hyphenated().to_string())
        .bind(event.event_type())
        .bind(event.source())
        .bind(event.subject())
        .bind(event.time())
        .bind(event.datacontenttype())
        .bind(event.dataschema())
        .bind(event.data().get())
        .bind(metadata_json(event))
}

/// The subject's row in `<table>_subject_locks`: a stable hash, so every
/// process writing the outbox locks the same row for the same subject.
fn subject_slot(subject: &str) -> i32 {
    (fnv1a(&[subject]) as u32 % SUBJECT_LOCK_SLOTS) as i32
}

/// Splits a migration script into statements: each ends with `;` at the end
/// of a line; lines starting with `--` are comments.
fn statements(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in script.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let statement = current.trim().trim_end_matches(';').trim().to_owned();
            if !statement.is_empty() {
                out.push(statement);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_INTERVAL).as_micros()).unwrap_or(i64::MAX)
}

fn decode_row(row: &MySqlRow) -> Result<OutboxRecord, (i64, String)> {
    let sequence: i64 = row.try_get(0).map_err(|e| (0, e.to_string()))?;
    let bad = |e: String| (sequence, e);
    let id: String = row.try_get(1).map_err(|e| bad(e.to_string()))?;
    let id = Uuid::parse_str(&id).map_err(|e| bad(format!("id: {e}")))?;
    let metadata: String = row.try_get(9).map_err(|e| bad(e.to_string()))?;
    let metadata: BTreeMap<String, String> =
        serde_json::from_str(&metadata).map_err(|e| bad(format!("metadata: {e}")))?;
    let parts = EventParts {
        id,
        event_type: row.try_get(2).map_err(|e| bad(e.to_string()))?,
        source: row.try_get(3).map_err(|e| bad(e.to_string()))?,
        subject: row.try_get(4).map_err(|e| bad(e.to_string()))?,
        time: row.try_get(5).map_err(|e| bad(e.to_string()))?,
        datacontenttype: row.try_get(6).map_err(|e| bad(e.to_string()))?,
        dataschema: row.try_get(7).map_err(|e| bad(e.to_string()))?,
        data: row.try_get(8).map_err(|e| bad(e.to_string()))?,
        metadata,
    };
    let event = Event::from_parts(parts).map_err(|e| bad(e.to_string()))?;
    let attempts: i32 = row.try_get(10).map_err(|e| bad(e.to_string()))?;
    Ok(OutboxRecord {
        sequence,
        event,
        attempts: attempts.max(0) as u32,
        created_at: row.try_get(11).map_err(|e| bad(e.to_string()))?,
    })
}

/// A fan-out lane in this outbox table (see [`proclaim_core::fanout`]):
/// each event is inserted in a transaction of its own, unless an event with
/// the same id is already in the table.
impl Stage for MySqlOutbox {
    async fn stage(&self, event: &Event) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.insert_one(&mut tx, &self.sql.stage_one, event).await?;
        tx.commit().await.map_err(classify)
    }
}

impl OutboxStore for MySqlOutbox {
    /// One transaction: lock `<table>_claim_lock` (claims on one outbox run
    /// one at a time, so each sees the leases of the one before), pick the
    /// candidates with `FOR UPDATE SKIP LOCKED`, drop any whose subject has
    /// an earlier pending event that was not picked, lease the rest, read
    /// them back, commit. (MySQL cannot update a table from a subquery on
    /// the same table, error 1093, so picking and leasing are separate
    /// statements.) At most [`MAX_CLAIM`] rows per claim.
    async fn claim(
        &self,
        token: LeaseToken,
        limit: usize,
        lease: Duration,
    ) -> Result<ClaimedBatch, StoreError> {
        let limit = limit.min(MAX_CLAIM);
        if limit == 0 {
            return Ok(ClaimedBatch::default());
        }
        let mut tx = self.begin_read_committed().await?;
        let locked: Option<i8> = sqlx::query_scalar(AssertSqlSafe(self.sql.lock_claims.clone()))
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        if locked.is_none() {
            return Err(StoreError::Config(format!(
                "the claim lock row of outbox {} is missing; run `proclaim migrate`",
                self.describe_table()
            )));
        }
        let picked: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.pick.clone()))
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        if picked.is_empty() {
            tx.commit().await.map_err(classify)?;
            return Ok(ClaimedBatch::default());
        }
        // SKIP LOCKED also skips a committed earlier event of a subject while
        // another transaction holds its row (e.g. a relay whose lease ran out
        // recording a retry for it): then the later events of that subject
        // must wait too. A plain read sees such a row as still pending.
        let n = picked.len();
        let mut query = sqlx::query_scalar(AssertSqlSafe(self.sql.held_back(n)));
        for sequence in picked.iter().chain(&picked) {
            query = query.bind(sequence);
        }
        let held: HashSet<i64> = query
            .persistent(false)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?
            .into_iter()
            .collect();
        let picked: Vec<i64> = if held.is_empty() {
            picked
        } else {
            tracing::debug!(
                held_back = held.len(),
                "skipping events whose subject has an earlier event held by another transaction"
            );
            picked.into_iter().filter(|s| !held.contains(s)).collect()
        };
        if picked.is_empty() {
            tx.commit().await.map_err(classify)?;
            return Ok(ClaimedBatch::default());
        }
        let n = picked.len();
        let query = sqlx::query(AssertSqlSafe(self.sql.lease(n)))
            .bind(token.0.hyphenated().to_string())
            .bind(micros(lease));
        run(&mut tx, bind_all(query, &picked)).await?;
        let rows = bind_all(sqlx::query(AssertSqlSafe(self.sql.fetch(n))), &picked)
            .persistent(false)
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
        let mut tx = self.begin_read_committed().await?;
        let applied = self.apply(&mut tx, token, outcome, mode).await?;
        tx.commit().await.map_err(classify)?;
        Ok(CompleteReport {
            applied,
            lost: (outcome.len() as u64).saturating_sub(applied),
        })
    }

    /// Deletes in rounds of 10,000 rows, each its own transaction, so a large
    /// backlog of retained rows does not become one huge transaction.
    async fn purge_published(&self, older_than: Duration) -> Result<u64, StoreError> {
        let mut purged = 0u64;
        loop {
            let mut tx = self.begin_read_committed().await?;
            let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
                .bind(micros(older_than))
                .bind(PURGE_CHUNK)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            purged += done.rows_affected();
            if done.rows_affected() < PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.stats.clone()))
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
            oldest_pending_age_ms: get(4)?,
        })
    }
}

impl OutboxAdmin for MySqlOutbox {
    async fn migrate(&self) -> Result<(), StoreError> {
        MySqlOutbox::migrate(self).await
    }

    async fn verify_schema(&self) -> Result<(), StoreError> {
        MySqlOutbox::verify_schema(self).await
    }

    async fn enqueue_standalone(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.enqueue_batch(&mut tx, events).await?;
        tx.commit().await.map_err(classify)
    }

    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetterEntry>, StoreError> {
        MySqlOutbox::dead_letters(self, limit).await
    }

    async fn replay_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        MySqlOutbox::replay_dead_letters(self, ids).await
    }

    /// `` `database`.`table` `` (the database of the connection URL).
    fn describe(&self) -> String {
        self.describe_table()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_splits_into_statements() {
        let parts = statements(MIGRATIONS[0].1);
        assert_eq!(parts.len(), 5, "{parts:#?}");
        assert!(parts[0].starts_with("CREATE TABLE IF NOT EXISTS `{table}`"));
        assert!(parts.iter().all(|s| !s.ends_with(';') && !s.contains("--")));
    }

    #[test]
    fn subject_slots_are_stable_and_in_range() {
        assert_eq!(
            subject_slot("a"),
            (0xe40c292c_u32 % SUBJECT_LOCK_SLOTS) as i32
        );
        for s in ["", "donor-42", "ünïcode", &"x".repeat(1024)] {
            let slot = subject_slot(s);
            assert!((0..SUBJECT_LOCK_SLOTS as i32).contains(&slot));
        }
    }

    #[test]
    fn intervals_are_bounded() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), micros(MAX_INTERVAL));
    }
}
