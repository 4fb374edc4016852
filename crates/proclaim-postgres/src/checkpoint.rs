//! [`PgCheckpoints`]: projector checkpoints in a PostgreSQL table, written
//! in the same transaction as the read model.
//!
//! One row per projection, `(projection, position, updated_at)`. A batch
//! locks its projection's row with `SELECT … FOR UPDATE` when it begins
//! (inserting it at 0 the first time), so two runners of one projection
//! take turns and the second reads the position the first committed.
//! Projections with different names lock different rows and run side by
//! side.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use proclaim_core::StoreError;
use proclaim_core::projector::{Checkpoint, CheckpointStore, CheckpointTx, ProjectionError};
use proclaim_core::store_support::{position_from_stored, position_to_stored, tx_wrapper};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};

use crate::error::classify;
use crate::ident::{Ident, fnv1a, parse_names};
use crate::migrate::migrate_locked;

/// Options of [`PgCheckpoints`].
///
/// ```
/// use proclaim_postgres::PgCheckpointOptions;
///
/// let options = PgCheckpointOptions::default().with_schema("reporting");
/// assert_eq!(options.table, "projector_checkpoints");
/// assert!(options.validate().is_ok());
/// assert!(PgCheckpointOptions::default().with_table("x; drop").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgCheckpointOptions {
    /// Schema of the checkpoint table (default `proclaim`).
    pub schema: String,
    /// Name of the checkpoint table (default `projector_checkpoints`).
    pub table: String,
}

impl Default for PgCheckpointOptions {
    fn default() -> Self {
        PgCheckpointOptions {
            schema: "proclaim".into(),
            table: "projector_checkpoints".into(),
        }
    }
}

impl PgCheckpointOptions {
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

/// The statements of one checkpoint table, built once with its checked
/// names.
struct CheckpointSql {
    qualified: String,
    migrate: String,
    migrate_lock: i64,
    lock: Arc<str>,
    create: Arc<str>,
    update: Arc<str>,
    position: Arc<str>,
    list: Arc<str>,
}

impl CheckpointSql {
    fn new(schema: &Ident, table: &Ident) -> Self {
        let s = schema.as_str();
        let t = table.as_str();
        let q = format!(r#""{s}"."{t}""#);
        let a = |sql: String| -> Arc<str> { sql.into() };
        CheckpointSql {
            migrate: format!(
                r#"SET LOCAL client_min_messages = warning;
                   CREATE SCHEMA IF NOT EXISTS "{s}";
                   CREATE TABLE IF NOT EXISTS {q} (
                       projection TEXT        PRIMARY KEY,
                       position   BIGINT      NOT NULL DEFAULT 0 CHECK (position >= 0),
                       updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"#
            ),
            migrate_lock: i64::from(fnv1a(&["proclaim-checkpoints-migrate", s, t])),
            lock: a(format!(
                "SELECT position FROM {q} WHERE projection = $1 FOR UPDATE"
            )),
            create: a(format!(
                "INSERT INTO {q} (projection) VALUES ($1) ON CONFLICT (projection) DO NOTHING"
            )),
            update: a(format!(
                "UPDATE {q} SET position = $2, updated_at = now() WHERE projection = $1"
            )),
            position: a(format!("SELECT position FROM {q} WHERE projection = $1")),
            list: a(format!(
                "SELECT projection, position, updated_at FROM {q} ORDER BY projection"
            )),
            qualified: q,
        }
    }
}

/// Projector checkpoints in PostgreSQL ([`CheckpointStore`]): one row per
/// projection, locked by each batch and advanced in the batch's own
/// transaction, in which the projection writes its read model. Cloning is
/// cheap.
///
/// Table (created by [`migrate`](PgCheckpoints::migrate), in schema
/// `proclaim` unless [`PgCheckpointOptions`] say otherwise):
/// `projector_checkpoints (projection, position, updated_at)`. Put it in
/// the read model's database: the point is one transaction for both.
///
/// ```no_run
/// use proclaim_core::Event;
/// use proclaim_core::projector::{Projection, ProjectionError, Projector};
/// use proclaim_postgres::{PgCheckpointTx, PgCheckpoints, projection_error};
///
/// /// Total donated per donor, in `reporting.donor_totals`.
/// struct DonorTotals;
///
/// #[derive(serde::Deserialize)]
/// struct DonorSecured { donor_id: i64, amount_cents: i64 }
///
/// impl Projection<PgCheckpointTx> for DonorTotals {
///     fn name(&self) -> &str {
///         "donor-totals"
///     }
///
///     fn wants(&self, event: &Event) -> bool {
///         event.event_type() == "DonorSecured"
///     }
///
///     async fn apply(&self, tx: &mut PgCheckpointTx, event: &Event) -> Result<(), ProjectionError> {
///         let d: DonorSecured = event
///             .data_as()
///             .map_err(|e| ProjectionError::permanent("not a DonorSecured").with_source(e))?;
///         sqlx::query(
///             "INSERT INTO reporting.donor_totals (donor_id, cents) VALUES ($1, $2)
///              ON CONFLICT (donor_id) DO UPDATE SET cents = donor_totals.cents + EXCLUDED.cents",
///         )
///         .bind(d.donor_id)
///         .bind(d.amount_cents)
///         .execute(&mut **tx) // the batch's transaction: commits with the checkpoint
///         .await
///         .map_err(projection_error)?;
///         Ok(())
///     }
///
///     async fn reset(&self, tx: &mut PgCheckpointTx) -> Result<(), ProjectionError> {
///         sqlx::query("DELETE FROM reporting.donor_totals")
///             .execute(&mut **tx)
///             .await
///             .map_err(projection_error)?;
///         Ok(())
///     }
/// }
///
/// # async fn demo(pool: sqlx::PgPool, log: proclaim_core::projector::MemoryLog) -> Result<(), Box<dyn std::error::Error>> {
/// let checkpoints = PgCheckpoints::new(pool); // proclaim.projector_checkpoints
/// checkpoints.migrate().await?;
/// let handle = Projector::new(DonorTotals, checkpoints, log).spawn()?;
/// # let _ = handle;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgCheckpoints {
    pool: PgPool,
    sql: Arc<CheckpointSql>,
}

impl std::fmt::Debug for PgCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCheckpoints")
            .field("table", &self.sql.qualified)
            .finish_non_exhaustive()
    }
}

impl PgCheckpoints {
    /// Checkpoints in `proclaim.projector_checkpoints`.
    pub fn new(pool: PgPool) -> Self {
        let defaults = PgCheckpointOptions::default();
        Self::build(
            pool,
            &Ident::known(&defaults.schema),
            &Ident::known(&defaults.table),
        )
    }

    /// Checkpoints with the given options; names that are not plain
    /// identifiers are a [`StoreError::Config`], so they can never inject
    /// SQL.
    pub fn with_options(pool: PgPool, options: PgCheckpointOptions) -> Result<Self, StoreError> {
        let (schema, table) = parse_names(&options.schema, &options.table)?;
        Ok(Self::build(pool, &schema, &table))
    }

    fn build(pool: PgPool, schema: &Ident, table: &Ident) -> Self {
        PgCheckpoints {
            pool,
            sql: Arc::new(CheckpointSql::new(schema, table)),
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

    /// Creates the schema and the checkpoint table. Safe to run repeatedly
    /// and concurrently (runs are serialized by an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate_locked(&self.pool, self.sql.migrate_lock, &self.sql.migrate).await?;
        tracing::debug!(table = %self.sql.qualified, "checkpoint table ready");
        Ok(())
    }
}

impl CheckpointStore for PgCheckpoints {
    type Tx = PgCheckpointTx;

    async fn begin(&self, projection: &str) -> Result<PgCheckpointTx, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let lock = || sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.sql.lock.clone()));
        let locked = lock()
            .bind(projection)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let position = match locked {
            Some(position) => position,
            None => {
                sqlx::query(AssertSqlSafe(self.sql.create.clone()))
                    .bind(projection)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                lock()
                    .bind(projection)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(classify)?
            }
        };
        Ok(PgCheckpointTx {
            tx,
            projection: projection.to_owned(),
            position: position_from_stored(projection, position)?,
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

/// The transaction of one projector batch on [`PgCheckpoints`]: it holds the
/// projection's checkpoint row. Write the read model through it —
/// `query.execute(&mut **tx)` from a `&mut PgCheckpointTx` (it dereferences
/// to the [`PgConnection`]), or [`transaction`](PgCheckpointTx::transaction)
/// for APIs that take a `sqlx::Transaction`, such as `PgOutbox::enqueue`
/// for events a projection emits. The projector commits it; dropping it
/// rolls back.
pub struct PgCheckpointTx {
    tx: Transaction<'static, Postgres>,
    projection: String,
    position: u64,
    update: Arc<str>,
}

impl std::fmt::Debug for PgCheckpointTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCheckpointTx")
            .field("projection", &self.projection)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

// `Deref`/`DerefMut` to the connection, and `transaction()`.
tx_wrapper!(PgCheckpointTx: Transaction<'static, Postgres> => PgConnection);

impl CheckpointTx for PgCheckpointTx {
    fn projection(&self) -> &str {
        &self.projection
    }

    fn position(&self) -> u64 {
        self.position
    }

    /// After a failed statement PostgreSQL has aborted the transaction: the
    /// update then fails too, so a batch whose writes were lost is never
    /// committed as applied.
    async fn set_position(&mut self, position: u64) -> Result<(), StoreError> {
        let stored = position_to_stored(position)?;
        let done = sqlx::query(AssertSqlSafe(self.update.clone()))
            .bind(&self.projection)
            .bind(stored)
            .execute(&mut *self.tx)
            .await
            .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Database(
                format!(
                    "the checkpoint row of projection {:?} is gone from its transaction",
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
/// when a retry can succeed (the connection broke, a deadlock, a
/// serialization failure), permanent otherwise — the same split as the
/// store's own errors.
///
/// ```
/// let err = proclaim_postgres::projection_error(sqlx::Error::PoolTimedOut);
/// assert!(err.is_transient());
/// assert!(!proclaim_postgres::projection_error(sqlx::Error::RowNotFound).is_transient());
/// ```
pub fn projection_error(err: sqlx::Error) -> ProjectionError {
    ProjectionError::from(classify(err))
}
