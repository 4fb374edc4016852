//! [`MySqlCheckpoints`]: projector checkpoints in a MySQL or MariaDB table,
//! written in the same transaction as the read model.
//!
//! One row per projection, `(projection, position, token, updated_at)`. A
//! batch begins (under `READ COMMITTED`, as the inbox's handlings do) with
//! `INSERT … ON DUPLICATE KEY UPDATE token = ?`: it creates the row the
//! first time, and takes InnoDB's exclusive lock on it every time, so two
//! runners of one projection take turns and the second reads the position
//! the first committed. Projections with different names lock different
//! rows and run side by side.
//!
//! **The token.** InnoDB rolls a whole transaction back by itself on a
//! deadlock, and the connection then goes on in autocommit mode: had a
//! projection ignored that error, its later writes would commit one by one
//! and the checkpoint would follow. Each batch writes a fresh token into
//! its row when it begins, and advances the position only where its token
//! still is: after such a rollback the token is gone, the advance fails,
//! and the batch is reported as failed instead of committed as applied.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use proclaim_core::StoreError;
use proclaim_core::projector::{Checkpoint, CheckpointStore, CheckpointTx, ProjectionError};
use proclaim_core::store_support::{position_from_stored, position_to_stored, tx_wrapper};
use sqlx::mysql::MySqlPool;
use sqlx::{AssertSqlSafe, MySql, MySqlConnection, Transaction};
use uuid::Uuid;

use crate::error::classify;
use crate::ident::{Ident, check_name_len};
use crate::migrate_lock::{execute_all, with_migrate_lock};

/// Longest projection name the table keeps (characters).
const MAX_PROJECTION_LEN: usize = 255;
const BEGIN_READ_COMMITTED: &str =
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// Options of [`MySqlCheckpoints`]. The table lives in the database of the
/// connection URL.
///
/// ```
/// use proclaim_mysql::MySqlCheckpointOptions;
///
/// let options = MySqlCheckpointOptions::default();
/// assert_eq!(options.table, "proclaim_projector_checkpoints");
/// assert!(options.with_table("reporting_checkpoints").validate().is_ok());
/// assert!(MySqlCheckpointOptions::default().with_table("x`; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MySqlCheckpointOptions {
    /// Name of the checkpoint table (default `proclaim_projector_checkpoints`,
    /// next to `proclaim_outbox` and `proclaim_inbox`).
    pub table: String,
}

impl Default for MySqlCheckpointOptions {
    fn default() -> Self {
        MySqlCheckpointOptions {
            table: "proclaim_projector_checkpoints".into(),
        }
    }
}

impl MySqlCheckpointOptions {
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
    create: String,
    lock: Arc<str>,
    read: Arc<str>,
    update: Arc<str>,
    position: Arc<str>,
    list: Arc<str>,
}

impl CheckpointSql {
    fn new(table: &Ident) -> Self {
        let q = format!("`{}`", table.as_str());
        let a = |sql: String| -> Arc<str> { sql.into() };
        CheckpointSql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {q} ( \
                   projection VARCHAR({MAX_PROJECTION_LEN}) NOT NULL, \
                   position   BIGINT      NOT NULL DEFAULT 0, \
                   token      CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL, \
                   updated_at DATETIME(6) NOT NULL, \
                   PRIMARY KEY (projection), \
                   CONSTRAINT position_not_negative CHECK (position >= 0) \
                 ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin"
            ),
            lock: a(format!(
                "INSERT INTO {q} (projection, position, token, updated_at) \
                 VALUES (?, 0, ?, UTC_TIMESTAMP(6)) ON DUPLICATE KEY UPDATE token = ?"
            )),
            read: a(format!(
                "SELECT position FROM {q} WHERE projection = ? AND token = ?"
            )),
            update: a(format!(
                "UPDATE {q} SET position = ?, updated_at = UTC_TIMESTAMP(6) \
                 WHERE projection = ? AND token = ?"
            )),
            position: a(format!("SELECT position FROM {q} WHERE projection = ?")),
            list: a(format!(
                "SELECT projection, position, updated_at FROM {q} ORDER BY projection"
            )),
            quoted: q,
        }
    }
}

/// Projector checkpoints in MySQL or MariaDB ([`CheckpointStore`]): one row
/// per projection, locked by each batch and advanced in the batch's own
/// transaction, in which the projection writes its read model (see the
/// module docs for the locking and the token). Cloning is cheap.
///
/// Table (created by [`migrate`](MySqlCheckpoints::migrate)):
/// `proclaim_projector_checkpoints (projection, position, token,
/// updated_at)`, unless [`MySqlCheckpointOptions`] say otherwise, in the
/// read model's database.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::projector::{Projection, ProjectionError, Projector};
/// use proclaim_mysql::{MySqlCheckpointTx, MySqlCheckpoints, projection_error};
///
/// /// How many donations each campaign received.
/// struct CampaignCounts;
///
/// impl Projection<MySqlCheckpointTx> for CampaignCounts {
///     fn name(&self) -> &str {
///         "campaign-counts"
///     }
///
///     async fn apply(&self, tx: &mut MySqlCheckpointTx, event: &Event) -> Result<(), ProjectionError> {
///         sqlx::query(
///             "INSERT INTO campaign_counts (campaign, n) VALUES (?, 1) \
///              ON DUPLICATE KEY UPDATE n = n + 1",
///         )
///         .bind(event.source())
///         .execute(&mut **tx) // the batch's transaction
///         .await
///         .map_err(projection_error)?;
///         Ok(())
///     }
///
///     async fn reset(&self, tx: &mut MySqlCheckpointTx) -> Result<(), ProjectionError> {
///         sqlx::query("DELETE FROM campaign_counts")
///             .execute(&mut **tx)
///             .await
///             .map_err(projection_error)?;
///         Ok(())
///     }
/// }
///
/// # async fn demo(pool: sqlx::MySqlPool, log: proclaim_core::projector::MemoryLog) -> Result<(), Box<dyn std::error::Error>> {
/// let checkpoints = MySqlCheckpoints::new(pool);
/// checkpoints.migrate().await?;
/// Projector::new(CampaignCounts, checkpoints, log).catch_up().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MySqlCheckpoints {
    pool: MySqlPool,
    table: Ident,
    sql: Arc<CheckpointSql>,
}

impl std::fmt::Debug for MySqlCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlCheckpoints")
            .field("database", &self.pool.connect_options().get_database())
            .field("table", &self.table.as_str())
            .finish_non_exhaustive()
    }
}

impl MySqlCheckpoints {
    /// Checkpoints in `proclaim_projector_checkpoints`.
    pub fn new(pool: MySqlPool) -> Self {
        let table = Ident::known(&MySqlCheckpointOptions::default().table);
        Self::build(pool, table)
    }

    /// Checkpoints with the given options; a table name that is not a plain
    /// identifier is a [`StoreError::Config`], so it can never inject SQL.
    pub fn with_options(
        pool: MySqlPool,
        options: MySqlCheckpointOptions,
    ) -> Result<Self, StoreError> {
        let table = Ident::parse("table", &options.table)?;
        Ok(Self::build(pool, table))
    }

    fn build(pool: MySqlPool, table: Ident) -> Self {
        let sql = Arc::new(CheckpointSql::new(&table));
        MySqlCheckpoints { pool, table, sql }
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The quoted table name.
    pub fn table_name(&self) -> &str {
        &self.sql.quoted
    }

    /// Creates the checkpoint table. Safe to run repeatedly and
    /// concurrently: runs are serialized by a named lock (`GET_LOCK`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let database = with_migrate_lock(
            &self.pool,
            "proclaim-checkpoints-migrate",
            &self.table,
            format!("checkpoint table {}", self.sql.quoted),
            async |conn| execute_all(conn, std::slice::from_ref(&self.sql.create)).await,
        )
        .await?;
        tracing::debug!(database, table = %self.sql.quoted, "checkpoint table ready");
        Ok(())
    }
}

impl CheckpointStore for MySqlCheckpoints {
    type Tx = MySqlCheckpointTx;

    async fn begin(&self, projection: &str) -> Result<MySqlCheckpointTx, StoreError> {
        check_name_len("projection", projection, MAX_PROJECTION_LEN)?;
        let token = Uuid::new_v4().simple().to_string();
        let mut tx = self
            .pool
            .begin_with(BEGIN_READ_COMMITTED)
            .await
            .map_err(classify)?;
        sqlx::query(AssertSqlSafe(self.sql.lock.clone()))
            .bind(projection)
            .bind(&token)
            .bind(&token)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let position: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.read.clone()))
            .bind(projection)
            .bind(&token)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let position = position.ok_or_else(|| {
            StoreError::Database(
                format!(
                    "the checkpoint row of projection {projection:?} lost its lock right after it \
                     was taken (the transaction was rolled back by the database)"
                )
                .into(),
            )
        })?;
        Ok(MySqlCheckpointTx {
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
        let rows: Vec<(String, i64, DateTime<Utc>)> =
            sqlx::query_as(AssertSqlSafe(self.sql.list.clone()))
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        rows.into_iter()
            .map(|(projection, position, updated_at)| {
                Ok(Checkpoint {
                    position: position_from_stored(&projection, position)?,
                    projection,
                    updated_at,
                })
            })
            .collect()
    }
}

/// The transaction of one projector batch on [`MySqlCheckpoints`]: it holds
/// the projection's checkpoint row. Write the read model through it —
/// `query.execute(&mut **tx)` from a `&mut MySqlCheckpointTx` (it
/// dereferences to the [`MySqlConnection`]), or
/// [`transaction`](MySqlCheckpointTx::transaction) for APIs that take a
/// `sqlx::Transaction`, such as `MySqlOutbox::enqueue`. The projector
/// commits it; dropping it rolls back.
pub struct MySqlCheckpointTx {
    tx: Transaction<'static, MySql>,
    projection: String,
    position: u64,
    token: String,
    update: Arc<str>,
}

impl std::fmt::Debug for MySqlCheckpointTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlCheckpointTx")
            .field("projection", &self.projection)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

// `Deref`/`DerefMut` to the connection, and `transaction()`.
tx_wrapper!(MySqlCheckpointTx: Transaction<'static, MySql> => MySqlConnection);

impl CheckpointTx for MySqlCheckpointTx {
    fn projection(&self) -> &str {
        &self.projection
    }

    fn position(&self) -> u64 {
        self.position
    }

    /// Advances the row only where this batch's token still is; a
    /// transaction InnoDB rolled back by itself is reported, not advanced
    /// (see the module docs).
    async fn set_position(&mut self, position: u64) -> Result<(), StoreError> {
        let stored = position_to_stored(position)?;
        let done = sqlx::query(AssertSqlSafe(self.update.clone()))
            .bind(stored)
            .bind(&self.projection)
            .bind(&self.token)
            .execute(&mut *self.tx)
            .await
            .map_err(classify)?;
        // sqlx connects with CLIENT_FOUND_ROWS: matched rows count, also
        // those the update leaves as they were.
        if done.rows_affected() == 0 {
            return Err(StoreError::Database(
                format!(
                    "the checkpoint of projection {:?} is no longer held by its batch: the database \
                     rolled the transaction back (a deadlock or a timeout the projection did not \
                     report); writes made after that may have been committed on their own — \
                     return every database error from Projection::apply",
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
/// when a retry can succeed (the connection broke, a deadlock, a lock wait
/// timeout), permanent otherwise — the same split as the store's own
/// errors.
///
/// ```
/// let err = proclaim_mysql::projection_error(sqlx::Error::PoolTimedOut);
/// assert!(err.is_transient());
/// assert!(!proclaim_mysql::projection_error(sqlx::Error::RowNotFound).is_transient());
/// ```
pub fn projection_error(err: sqlx::Error) -> ProjectionError {
    ProjectionError::from(classify(err))
}
