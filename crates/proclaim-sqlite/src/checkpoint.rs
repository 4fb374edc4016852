//! [`SqliteCheckpoints`]: projector checkpoints in a SQLite table, written
//! in the same transaction as the read model.
//!
//! One row per projection, `(projection, position, token, updated_at)`. A
//! batch opens its transaction with `BEGIN IMMEDIATE` — it takes the
//! database's write lock up front — and marks its projection's row with a
//! fresh token (creating the row at 0 the first time). **SQLite has one
//! writer at a time:** batches of every projection, and every other writer
//! of the database (the outbox's too), take turns, each waiting up to the
//! pool's busy timeout; a batch that waits longer fails with `SQLITE_BUSY`,
//! which is transient, and the projector retries it. Two runners of one
//! projection therefore never overlap, and the second reads the position
//! the first committed. Keep batches short (the projector's `batch_size`)
//! when other writers share the file.
//!
//! The token guards against a transaction SQLite rolled back by itself (a
//! full disk, an I/O error): the position advances only where the batch's
//! token still is, so such a batch fails instead of committing as applied.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use proclaim_core::StoreError;
use proclaim_core::projector::{Checkpoint, CheckpointStore, CheckpointTx, ProjectionError};
use proclaim_core::store_support::{position_from_stored, position_to_stored, tx_wrapper};
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::ident::Ident;
use crate::migrate::{BEGIN_IMMEDIATE, migrate_immediate};

/// The default checkpoint table.
pub const DEFAULT_CHECKPOINT_TABLE: &str = "proclaim_projector_checkpoints";

/// Options of [`SqliteCheckpoints`]. SQLite has no schemas: the table lives
/// in the database the pool opens.
///
/// ```
/// use proclaim_sqlite::SqliteCheckpointOptions;
///
/// let options = SqliteCheckpointOptions::default();
/// assert_eq!(options.table, "proclaim_projector_checkpoints");
/// assert!(options.with_table("reporting_checkpoints").validate().is_ok());
/// assert!(SqliteCheckpointOptions::default().with_table("x\"; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteCheckpointOptions {
    /// Name of the checkpoint table (default
    /// `proclaim_projector_checkpoints`, next to `proclaim_outbox` and
    /// `proclaim_inbox`).
    pub table: String,
}

impl Default for SqliteCheckpointOptions {
    fn default() -> Self {
        SqliteCheckpointOptions {
            table: DEFAULT_CHECKPOINT_TABLE.into(),
        }
    }
}

impl SqliteCheckpointOptions {
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

/// The statements of one checkpoint table, built once with its checked
/// name.
struct CheckpointSql {
    quoted: String,
    migrate: String,
    lock: Arc<str>,
    update: Arc<str>,
    position: Arc<str>,
    list: Arc<str>,
}

impl CheckpointSql {
    fn new(table: &Ident) -> Self {
        let q = format!(r#""{}""#, table.as_str());
        let a = |sql: String| -> Arc<str> { sql.into() };
        CheckpointSql {
            // Times are INTEGER microseconds since the Unix epoch (UTC), from
            // the application's clock, as the outbox and the inbox keep them.
            migrate: format!(
                r#"CREATE TABLE IF NOT EXISTS {q} (
                       projection TEXT    NOT NULL PRIMARY KEY,
                       position   INTEGER NOT NULL DEFAULT 0 CHECK (position >= 0),
                       token      TEXT,
                       updated_at INTEGER NOT NULL
                   ) STRICT, WITHOUT ROWID"#
            ),
            lock: a(format!(
                "INSERT INTO {q} (projection, position, token, updated_at) VALUES (?1, 0, ?2, ?3) \
                 ON CONFLICT (projection) DO UPDATE SET token = excluded.token \
                 RETURNING position"
            )),
            update: a(format!(
                "UPDATE {q} SET position = ?1, updated_at = ?2 WHERE projection = ?3 AND token = ?4"
            )),
            position: a(format!("SELECT position FROM {q} WHERE projection = ?1")),
            list: a(format!(
                "SELECT projection, position, updated_at FROM {q} ORDER BY projection"
            )),
            quoted: q,
        }
    }
}

/// Projector checkpoints in SQLite ([`CheckpointStore`]): one row per
/// projection, advanced in each batch's own `BEGIN IMMEDIATE` transaction,
/// in which the projection writes its read model (see the module docs: one
/// writer at a time). Cloning is cheap.
///
/// Table (created by [`migrate`](SqliteCheckpoints::migrate)):
/// `proclaim_projector_checkpoints (projection, position, token,
/// updated_at)`, unless [`SqliteCheckpointOptions`] say otherwise, in the
/// read model's database file.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::projector::{MemoryLog, Projection, ProjectionError, Projector};
/// use proclaim_sqlite::{SqliteCheckpointTx, SqliteCheckpoints, SqliteOutbox, projection_error};
///
/// /// The last event seen per subject.
/// struct LastSeen;
///
/// impl Projection<SqliteCheckpointTx> for LastSeen {
///     fn name(&self) -> &str {
///         "last-seen"
///     }
///
///     async fn apply(&self, tx: &mut SqliteCheckpointTx, event: &Event) -> Result<(), ProjectionError> {
///         sqlx::query("INSERT OR REPLACE INTO last_seen (subject, event_type) VALUES (?1, ?2)")
///             .bind(event.subject())
///             .bind(event.event_type())
///             .execute(&mut **tx) // the batch's transaction
///             .await
///             .map_err(projection_error)?;
///         Ok(())
///     }
///
///     async fn reset(&self, tx: &mut SqliteCheckpointTx) -> Result<(), ProjectionError> {
///         sqlx::query("DELETE FROM last_seen")
///             .execute(&mut **tx)
///             .await
///             .map_err(projection_error)?;
///         Ok(())
///     }
/// }
///
/// # async fn demo(log: MemoryLog) -> Result<(), Box<dyn std::error::Error>> {
/// // WAL and a busy timeout, as the outbox sets them.
/// let options = SqliteOutbox::connect_options("sqlite://reporting.db?mode=rwc")?;
/// let pool = sqlx::SqlitePool::connect_with(options).await?;
/// let checkpoints = SqliteCheckpoints::new(pool);
/// checkpoints.migrate().await?;
/// Projector::new(LastSeen, checkpoints, log).batch_size(100).catch_up().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteCheckpoints {
    pool: SqlitePool,
    sql: Arc<CheckpointSql>,
}

impl std::fmt::Debug for SqliteCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCheckpoints")
            .field("table", &self.sql.quoted)
            .finish_non_exhaustive()
    }
}

impl SqliteCheckpoints {
    /// Checkpoints in `proclaim_projector_checkpoints`.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(pool, &Ident::known(DEFAULT_CHECKPOINT_TABLE))
    }

    /// Checkpoints with the given options; a table name that is not a plain
    /// identifier is a [`StoreError::Config`], so it can never inject SQL.
    pub fn with_options(
        pool: SqlitePool,
        options: SqliteCheckpointOptions,
    ) -> Result<Self, StoreError> {
        let table = Ident::parse("table", &options.table)?;
        Ok(Self::build(pool, &table))
    }

    fn build(pool: SqlitePool, table: &Ident) -> Self {
        SqliteCheckpoints {
            pool,
            sql: Arc::new(CheckpointSql::new(table)),
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The quoted table name, e.g. `"proclaim_projector_checkpoints"`.
    pub fn table_name(&self) -> &str {
        &self.sql.quoted
    }

    /// Creates the checkpoint table. Safe to run repeatedly and
    /// concurrently: it runs under `BEGIN IMMEDIATE`, one run at a time.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate_immediate(&self.pool, &self.sql.migrate).await?;
        tracing::debug!(table = %self.sql.quoted, "checkpoint table ready");
        Ok(())
    }
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

impl CheckpointStore for SqliteCheckpoints {
    type Tx = SqliteCheckpointTx;

    async fn begin(&self, projection: &str) -> Result<SqliteCheckpointTx, StoreError> {
        let token = Uuid::new_v4().simple().to_string();
        let mut tx = self
            .pool
            .begin_with(BEGIN_IMMEDIATE)
            .await
            .map_err(classify)?;
        let position: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.lock.clone()))
            .bind(projection)
            .bind(&token)
            .bind(now_micros())
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        Ok(SqliteCheckpointTx {
            tx,
            projection: projection.to_owned(),
            position: position_from_stored(projection, position)?,
            token,
            update: self.sql.update.clone(),
        })
    }

    async fn position(&self, projection: &str) -> Result<u64, StoreError> {
        let position: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.position.clone()))
            .bind(projection)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        position.map_or(Ok(0), |p| position_from_stored(projection, p))
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.list.clone()))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.into_iter()
            .map(|(projection, position, updated_at)| {
                let updated_at = DateTime::from_timestamp_micros(updated_at).ok_or_else(|| {
                    StoreError::Database(
                        format!(
                            "projection {projection:?} has an invalid updated_at ({updated_at})"
                        )
                        .into(),
                    )
                })?;
                Ok(Checkpoint {
                    position: position_from_stored(&projection, position)?,
                    projection,
                    updated_at,
                })
            })
            .collect()
    }
}

/// The transaction of one projector batch on [`SqliteCheckpoints`]: it
/// holds the database's write lock and its projection's checkpoint row.
/// Write the read model through it — `query.execute(&mut **tx)` from a
/// `&mut SqliteCheckpointTx` (it dereferences to the [`SqliteConnection`]),
/// or [`transaction`](SqliteCheckpointTx::transaction) for APIs that take a
/// `sqlx::Transaction`, such as `SqliteOutbox::enqueue`. The projector
/// commits it; dropping it rolls back.
pub struct SqliteCheckpointTx {
    tx: Transaction<'static, Sqlite>,
    projection: String,
    position: u64,
    token: String,
    update: Arc<str>,
}

impl std::fmt::Debug for SqliteCheckpointTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteCheckpointTx")
            .field("projection", &self.projection)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

// `Deref`/`DerefMut` to the connection, and `transaction()`.
tx_wrapper!(SqliteCheckpointTx: Transaction<'static, Sqlite> => SqliteConnection);

impl CheckpointTx for SqliteCheckpointTx {
    fn projection(&self) -> &str {
        &self.projection
    }

    fn position(&self) -> u64 {
        self.position
    }

    /// Advances the row only where this batch's token still is; a
    /// transaction SQLite rolled back by itself is reported, not advanced.
    async fn set_position(&mut self, position: u64) -> Result<(), StoreError> {
        let stored = position_to_stored(position)?;
        let done = sqlx::query(AssertSqlSafe(self.update.clone()))
            .bind(stored)
            .bind(now_micros())
            .bind(&self.projection)
            .bind(&self.token)
            .execute(&mut *self.tx)
            .await
            .map_err(classify)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Database(
                format!(
                    "the checkpoint of projection {:?} is no longer held by its batch: the database \
                     rolled the transaction back; writes made after that may have been committed \
                     on their own — return every database error from Projection::apply",
                    self.projection
                )
                .into(),
            ));
        }
        self.position = position;
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(classify)
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.map_err(classify)
    }
}

/// A [`ProjectionError`] for a failed statement of a projection: transient
/// when a retry can succeed (a busy or locked database, I/O trouble),
/// permanent otherwise — the same split as the store's own errors.
///
/// ```
/// let err = proclaim_sqlite::projection_error(sqlx::Error::PoolTimedOut);
/// assert!(err.is_transient());
/// assert!(!proclaim_sqlite::projection_error(sqlx::Error::RowNotFound).is_transient());
/// ```
pub fn projection_error(err: sqlx::Error) -> ProjectionError {
    ProjectionError::from(classify(err))
}
