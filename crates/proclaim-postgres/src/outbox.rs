//! [`PgOutbox`]: writing events in the caller's transaction, and the store
//! the relay claims from.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use proclaim_core::fanout::Stage;
use proclaim_core::{
    AckMode, BatchOutcome, ClaimedBatch, CompleteReport, DeadLetterEntry, Event, EventParts,
    LeaseToken, MalformedRecord, OutboxAdmin, OutboxRecord, OutboxStats, OutboxStore, StoreError,
    Wakeups,
};
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::floor::{ClaimFloor, Observation};
use crate::ident::{Ident, fnv1a, parse_names};
use crate::options::PgOutboxOptions;
use crate::sql::Sql;
use proclaim_core::store_support::{clip_error, metadata_json};

/// The schema version this crate needs (`verify_schema` accepts it or
/// newer); see [`PgOutbox::migrate`]. Later migrations only tune storage.
pub const SCHEMA_VERSION: i32 = 1;
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_outbox.sql")),
    (2, include_str!("../migrations/0002_fillfactor.sql")),
];

/// A transactional outbox in a PostgreSQL table.
///
/// Writers call [`enqueue`](PgOutbox::enqueue) with their own open
/// transaction: the event is stored if and only if that transaction commits.
/// The relay uses the same value as its [`OutboxStore`]. Cloning is cheap.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_postgres::PgOutbox;
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = PgOutbox::new(pool.clone());
/// outbox.migrate().await?;
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO campaign_donors (id, name) VALUES ($1, $2)")
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
pub struct PgOutbox {
    pool: PgPool,
    schema: Ident,
    table: Ident,
    notify: bool,
    debounce: Arc<NotifyDebounce>,
    floor: Arc<ClaimFloor>,
    claim_window: u64,
    sql: Arc<Sql>,
}

/// At most one `NOTIFY` per window from this process's writers.
#[derive(Debug)]
struct NotifyDebounce {
    window_us: u64,
    /// Microseconds since `base` of the last `NOTIFY` sent.
    last_us: std::sync::atomic::AtomicU64,
    base: std::time::Instant,
}

impl NotifyDebounce {
    fn new(window: std::time::Duration) -> Self {
        NotifyDebounce {
            window_us: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
            last_us: std::sync::atomic::AtomicU64::new(0),
            base: std::time::Instant::now(),
        }
    }

    /// Whether this transaction should notify.
    fn should_notify(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.window_us == 0 {
            return true;
        }
        // +window so the first call always notifies.
        let now = u64::try_from(self.base.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(self.window_us);
        let last = self.last_us.load(Relaxed);
        now.saturating_sub(last) >= self.window_us
            && self
                .last_us
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

impl std::fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutbox")
            .field("table", &self.sql.qualified)
            .finish_non_exhaustive()
    }
}

impl PgOutbox {
    /// An outbox in `proclaim.outbox` with `NOTIFY` wake-ups.
    pub fn new(pool: PgPool) -> Self {
        let defaults = PgOutboxOptions::default();
        let schema = Ident::known(&defaults.schema);
        let table = Ident::known(&defaults.table);
        Self::build(pool, schema, table, &defaults)
    }

    /// An outbox with the given options. Schema and table names must be 1-63
    /// characters of `a-z`, `0-9` and `_`, not starting with a digit;
    /// anything else is a [`StoreError::Config`], so names can never inject SQL.
    pub fn with_options(pool: PgPool, options: PgOutboxOptions) -> Result<Self, StoreError> {
        let (schema, table) = parse_names(&options.schema, &options.table)?;
        Ok(Self::build(pool, schema, table, &options))
    }

    fn build(pool: PgPool, schema: Ident, table: Ident, options: &PgOutboxOptions) -> Self {
        let sql = Arc::new(Sql::new(&schema, &table));
        PgOutbox {
            pool,
            schema,
            table,
            notify: options.notify,
            debounce: Arc::new(NotifyDebounce::new(options.notify_debounce)),
            floor: Arc::new(ClaimFloor::new()),
            claim_window: options.claim_window,
            sql,
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The quoted, schema-qualified table name.
    pub fn table_name(&self) -> &str {
        &self.sql.qualified
    }

    /// The `LISTEN` channel writers notify.
    pub fn channel(&self) -> &str {
        &self.sql.channel
    }

    /// The claim floor: this value's claims only look at sequences at or
    /// above it, because no event below it is pending or can become pending
    /// (a diagnostic; 0 until the first probes settle). It is what keeps a
    /// claim's cost independent of the dead rows a drain leaves behind when
    /// vacuum does not run; the design is in the README under "How the relay
    /// works".
    pub fn claim_floor(&self) -> i64 {
        self.floor.current()
    }

    /// Creates the schema, the outbox table and its indexes, or brings them
    /// up to date. Safe to run concurrently and repeatedly.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let (s, t) = (self.schema.as_str(), self.table.as_str());
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(i64::from(fnv1a(&["proclaim-migrate", s, t])))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let setup = format!(
            r#"SET LOCAL client_min_messages = warning;
               CREATE SCHEMA IF NOT EXISTS "{s}";
               CREATE TABLE IF NOT EXISTS "{s}"."{t}_migrations" (
                   version INTEGER PRIMARY KEY,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"#
        );
        sqlx::raw_sql(AssertSqlSafe(setup))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let current: Option<i32> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        let current = current.unwrap_or(0);
        for (version, script) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let script = script.replace("{schema}", s).replace("{table}", t);
            sqlx::raw_sql(AssertSqlSafe(script))
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            sqlx::query(AssertSqlSafe(format!(
                r#"INSERT INTO "{s}"."{t}_migrations" (version) VALUES ($1)"#
            )))
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            tracing::info!(table = %self.sql.qualified, version, "applied outbox migration");
        }
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    /// Checks that [`migrate`](PgOutbox::migrate) has run, with a clear error
    /// (and the hint to run `proclaim migrate`) when it has not.
    pub async fn verify_schema(&self) -> Result<(), StoreError> {
        let version: Result<Option<i32>, sqlx::Error> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&self.pool)
                .await;
        match version {
            Ok(Some(v)) if v >= SCHEMA_VERSION => Ok(()),
            Ok(v) => Err(StoreError::Config(format!(
                "outbox table {} is at schema version {} but {SCHEMA_VERSION} is needed; run `proclaim migrate`",
                self.sql.qualified,
                v.unwrap_or(0)
            ))),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
                Err(StoreError::Config(format!(
                    "outbox table {} does not exist; run `proclaim migrate`",
                    self.sql.qualified
                )))
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// Writes `event` in the caller's transaction. It is published only if
    /// the transaction commits, and never if it rolls back.
    ///
    /// Do not commit after one of your own statements in the transaction
    /// failed: PostgreSQL has then aborted the transaction, turns `COMMIT`
    /// into a rollback, and sqlx still reports success — neither your change
    /// nor the event is stored. Propagate the error and let the transaction
    /// drop (roll back) instead.
    ///
    /// Per-subject order: the call takes a transaction-scoped advisory lock
    /// on the event's subject, so concurrent transactions writing the same
    /// subject are serialized and their events are sequenced in commit order.
    /// (Write several subjects in one transaction in a consistent order, or
    /// use [`enqueue_batch`](PgOutbox::enqueue_batch), which sorts its locks.)
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &Event,
    ) -> Result<(), StoreError> {
        let sql = if self.notify && self.debounce.should_notify() {
            &self.sql.insert_one
        } else {
            &self.sql.insert_one_quiet
        };
        self.insert_one(tx, sql, event).await
    }

    async fn insert_one(
        &self,
        conn: &mut PgConnection,
        sql: &Arc<str>,
        event: &Event,
    ) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(event.id())
            .bind(event.event_type())
            .bind(event.source())
            .bind(event.subject())
            .bind(event.time())
            .bind(event.datacontenttype())
            .bind(event.dataschema())
            .bind(event.data().get())
            .bind(metadata_json(event))
            .bind(self.key_lock(event.subject()))
            .execute(conn)
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Writes several events in the caller's transaction with one statement,
    /// in the order given.
    pub async fn enqueue_batch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[Event],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let conn: &mut PgConnection = tx;
        let mut keys: Vec<i32> = events.iter().map(|e| self.key_lock(e.subject())).collect();
        keys.sort_unstable();
        keys.dedup();
        self.lock_keys(&mut *conn, keys).await?;
        let col = |f: fn(&Event) -> String| events.iter().map(f).collect::<Vec<_>>();
        sqlx::query(AssertSqlSafe(self.sql.insert_many.clone()))
            .bind(events.iter().map(Event::id).collect::<Vec<_>>())
            .bind(col(|e| e.event_type().to_owned()))
            .bind(col(|e| e.source().to_owned()))
            .bind(col(|e| e.subject().to_owned()))
            .bind(events.iter().map(Event::time).collect::<Vec<_>>())
            .bind(col(|e| e.datacontenttype().to_owned()))
            .bind(
                events
                    .iter()
                    .map(|e| e.dataschema().map(str::to_owned))
                    .collect::<Vec<_>>(),
            )
            .bind(col(|e| e.data().get().to_owned()))
            .bind(col(metadata_json))
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        if self.notify && self.debounce.should_notify() {
            sqlx::query(AssertSqlSafe(self.sql.notify.clone()))
                .execute(conn)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Takes the subject's write lock in the caller's transaction, as
    /// [`enqueue`](PgOutbox::enqueue) does; it is held until the transaction
    /// ends. Needed only for rows written into the outbox table by hand
    /// (your own `INSERT` or `COPY`): take it before the insert, so such rows
    /// keep per-subject order and the relay's claim floor sees the writer.
    pub async fn lock_subject(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        subject: &str,
    ) -> Result<(), StoreError> {
        self.lock_keys(tx, vec![self.key_lock(subject)]).await
    }

    /// Takes the subject locks `keys` (sorted, so that writers never
    /// deadlock) until the transaction ends.
    async fn lock_keys(&self, conn: &mut PgConnection, keys: Vec<i32>) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(self.sql.lock_keys.clone()))
            .bind(keys)
            .execute(conn)
            .await
            .map_err(classify)?;
        Ok(())
    }

    fn key_lock(&self, subject: &str) -> i32 {
        fnv1a(&[subject])
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
                Ok(DeadLetterEntry {
                    sequence: r.try_get(0)?,
                    id: r.try_get(1)?,
                    event_type: r.try_get(2)?,
                    subject: r.try_get(3)?,
                    attempts: r.try_get(4)?,
                    last_error: r.try_get(5)?,
                    dead_lettered_at: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(classify)
    }

    /// Puts dead-lettered events back in line with fresh attempts: the given
    /// ids, or all of them when `ids` is `None`. Returns how many.
    pub async fn replay_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.replay.clone()))
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected())
    }
}

impl PgOutbox {
    async fn apply(
        &self,
        conn: &mut PgConnection,
        token: LeaseToken,
        outcome: &BatchOutcome,
        mode: AckMode,
    ) -> Result<u64, StoreError> {
        type Query<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;
        async fn run<'q>(
            conn: &mut PgConnection,
            sql: &Arc<str>,
            token: LeaseToken,
            bind: impl FnOnce(Query<'q>) -> Query<'q>,
        ) -> Result<u64, StoreError> {
            let query = bind(sqlx::query(AssertSqlSafe(sql.clone())));
            let done = query.bind(token.0).execute(conn).await.map_err(classify)?;
            Ok(done.rows_affected())
        }
        let mut applied = 0u64;
        if !outcome.published.is_empty() {
            let sql = match mode {
                AckMode::Delete => &self.sql.delete_published,
                AckMode::Retain => &self.sql.mark_published,
            };
            applied += run(conn, sql, token, |q| q.bind(&outcome.published)).await?;
        }
        if !outcome.retry.is_empty() {
            let retry = &outcome.retry;
            applied += run(conn, &self.sql.retry, token, |q| {
                q.bind(retry.iter().map(|r| r.sequence).collect::<Vec<_>>())
                    .bind(
                        retry
                            .iter()
                            .map(|r| r.delay.as_secs_f64())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        retry
                            .iter()
                            .map(|r| clip_error(&r.error))
                            .collect::<Vec<_>>(),
                    )
            })
            .await?;
        }
        if !outcome.dead.is_empty() {
            let dead = &outcome.dead;
            applied += run(conn, &self.sql.dead, token, |q| {
                q.bind(dead.iter().map(|d| d.sequence).collect::<Vec<_>>())
                    .bind(
                        dead.iter()
                            .map(|d| clip_error(&d.error))
                            .collect::<Vec<_>>(),
                    )
            })
            .await?;
        }
        if !outcome.released.is_empty() {
            applied += run(conn, &self.sql.release, token, |q| {
                q.bind(&outcome.released)
            })
            .await?;
        }
        Ok(applied)
    }
}

/// A fan-out lane in this outbox table (see [`proclaim_core::fanout`]):
/// each event is inserted in a transaction of its own, unless an event with
/// the same id is already in the table.
impl Stage for PgOutbox {
    async fn stage(&self, event: &Event) -> Result<(), StoreError> {
        let sql = if self.notify {
            &self.sql.stage_one
        } else {
            &self.sql.stage_one_quiet
        };
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.insert_one(&mut tx, sql, event).await?;
        tx.commit().await.map_err(classify)
    }
}

impl PgOutbox {
    /// One floor probe, in the claim's transaction before it takes any row:
    /// the sequence's last value, then the writers holding a subject lock,
    /// then (a new statement, so a new snapshot) the lowest pending row.
    async fn probe_floor(
        &self,
        conn: &mut PgConnection,
        now: std::time::Instant,
    ) -> Result<(), StoreError> {
        let last_sequence: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.last_sequence.clone()))
            .fetch_one(&mut *conn)
            .await
            .map_err(classify)?;
        let writers: Vec<String> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.floor_writers.clone()))
                .fetch_one(&mut *conn)
                .await
                .map_err(classify)?;
        let min_pending: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.floor_probe.clone()))
                .bind(self.floor.current())
                .fetch_one(&mut *conn)
                .await
                .map_err(classify)?;
        self.floor.record(
            Observation {
                last_sequence,
                writers,
                min_pending,
            },
            now,
        );
        Ok(())
    }
}

fn decode_row(row: &PgRow) -> Result<OutboxRecord, (i64, String)> {
    let sequence: i64 = row.try_get(0).map_err(|e| (0, e.to_string()))?;
    let bad = |e: String| (sequence, e);
    let metadata: String = row.try_get(9).map_err(|e| bad(e.to_string()))?;
    let metadata: BTreeMap<String, String> =
        serde_json::from_str(&metadata).map_err(|e| bad(format!("metadata: {e}")))?;
    let parts = EventParts {
        id: row.try_get(1).map_err(|e| bad(e.to_string()))?,
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

impl OutboxStore for PgOutbox {
    async fn claim(
        &self,
        token: LeaseToken,
        limit: usize,
        lease: Duration,
    ) -> Result<ClaimedBatch, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // Claims on one table run one at a time, so each claim sees the
        // leases of the previous one and per-subject order holds across relays.
        sqlx::query(AssertSqlSafe(self.sql.claim_setup.clone()))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let now = std::time::Instant::now();
        if self.floor.probe_due(now) {
            self.probe_floor(&mut tx, now).await?;
        }
        let floor = self.floor.current();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let window = i64::try_from(self.claim_window)
            .unwrap_or(i64::MAX)
            .max(limit.saturating_mul(2));
        let mut rows = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(token.0)
            .bind(limit)
            .bind(lease.as_secs_f64())
            .bind(floor)
            .bind(window)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        // Every row carries the window's `more` and `hi` after the record's
        // columns; a lone row with no sequence means nothing was claimed.
        let (more, hi) = match rows.first() {
            Some(row) => (
                row.try_get::<bool, _>(12).map_err(classify)?,
                row.try_get::<i64, _>(13).map_err(classify)?,
            ),
            None => (false, 0),
        };
        rows.retain(|row| matches!(row.try_get::<Option<i64>, _>(0), Ok(Some(_))));
        let claimed = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        if more && claimed < limit {
            sqlx::query(AssertSqlSafe(self.sql.sort_on.clone()))
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            let heads = sqlx::query(AssertSqlSafe(self.sql.claim_heads.clone()))
                .bind(token.0)
                .bind(limit - claimed)
                .bind(lease.as_secs_f64())
                .bind(floor)
                .bind(hi)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            rows.extend(heads);
        }
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
        let kinds = [
            !outcome.published.is_empty(),
            !outcome.retry.is_empty(),
            !outcome.dead.is_empty(),
            !outcome.released.is_empty(),
        ];
        // One kind (the usual case: all published) is one statement; more
        // are applied together in one transaction.
        let applied = if kinds.iter().filter(|k| **k).count() <= 1 {
            let mut conn = self.pool.acquire().await.map_err(classify)?;
            self.apply(&mut conn, token, outcome, mode).await?
        } else {
            let mut tx = self.pool.begin().await.map_err(classify)?;
            let applied = self.apply(&mut tx, token, outcome, mode).await?;
            tx.commit().await.map_err(classify)?;
            applied
        };
        Ok(CompleteReport {
            applied,
            lost: (outcome.len() as u64).saturating_sub(applied),
        })
    }

    async fn purge_published(&self, older_than: Duration) -> Result<u64, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
            .bind(older_than.as_secs_f64())
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query(AssertSqlSafe(self.sql.stats_setup.clone()))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let row = sqlx::query(AssertSqlSafe(self.sql.stats.clone()))
            .bind(self.floor.current())
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
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

    async fn wakeups(&self) -> Result<Option<Wakeups>, StoreError> {
        if !self.notify {
            return Ok(None);
        }
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(classify)?;
        listener.listen(&self.sql.channel).await.map_err(classify)?;
        let stream = futures::stream::unfold(listener, |mut listener| async move {
            if let Err(e) = listener.recv().await {
                // recv reconnects on its next call; pause so a database that
                // stays down does not turn this into a busy loop.
                tracing::debug!(error = %e, "LISTEN connection lost; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(((), listener))
        });
        Ok(Some(stream.boxed()))
    }
}

impl OutboxAdmin for PgOutbox {
    async fn migrate(&self) -> Result<(), StoreError> {
        PgOutbox::migrate(self).await
    }

    async fn verify_schema(&self) -> Result<(), StoreError> {
        PgOutbox::verify_schema(self).await
    }

    async fn enqueue_standalone(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.enqueue_batch(&mut tx, events).await?;
        tx.commit().await.map_err(classify)
    }

    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetterEntry>, StoreError> {
        PgOutbox::dead_letters(self, limit).await
    }

    async fn replay_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        PgOutbox::replay_dead_letters(self, ids).await
    }

    fn describe(&self) -> String {
        self.sql.qualified.clone()
    }
}
