//! Where a projection's checkpoint lives: [`CheckpointStore`], one per
//! database, and the transaction a batch runs in ([`CheckpointTx`]).

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::StoreError;

/// A projection's stored position, as listed by
/// [`CheckpointStore::checkpoints`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The projection's name.
    pub projection: String,
    /// The position of the last entry applied (0: none).
    pub position: u64,
    /// When it was last written.
    pub updated_at: DateTime<Utc>,
}

/// Keeps each projection's checkpoint in a table of the read model's own
/// database, so the read model's writes and the checkpoint commit in one
/// transaction. Implemented by each store (`PgCheckpoints`,
/// `MySqlCheckpoints`, `SqliteCheckpoints`).
///
/// Contract:
/// - [`begin`](CheckpointStore::begin) opens a transaction and locks the
///   projection's checkpoint for it (creating it at 0 the first time): a
///   second `begin` for the same projection — from this process or another
///   — waits until the first transaction ends, and then reads the position
///   it committed. This is what keeps two runners of one projection from
///   applying an entry twice.
/// - [`CheckpointTx::set_position`] writes the new position in that
///   transaction; [`CheckpointTx::commit`] commits it with everything else
///   written through the transaction, and dropping the transaction rolls
///   back all of it.
/// - Positions are kept as signed 64-bit integers: a position above
///   `i64::MAX` is a [`StoreError::Config`].
///
/// ```no_run
/// use proclaim_core::projector::{CheckpointStore, CheckpointTx};
///
/// /// Moves `projection` past an entry deliberately (e.g. one that can never
/// /// be applied), as an operator decision.
/// async fn skip_to(
///     store: &impl CheckpointStore,
///     projection: &str,
///     position: u64,
/// ) -> Result<(), proclaim_core::StoreError> {
///     let mut tx = store.begin(projection).await?; // waits for a running batch
///     tracing::warn!(projection, from = tx.position(), to = position, "moving the checkpoint by hand");
///     tx.set_position(position).await?;
///     tx.commit().await
/// }
/// ```
pub trait CheckpointStore: Send + Sync + 'static {
    /// The open transaction of one batch: the read model's writes go
    /// through it (each store's type gives access to its database
    /// connection), then [`CheckpointTx::commit`]. Dropping it rolls back.
    type Tx: CheckpointTx;

    /// Opens a transaction holding `projection`'s checkpoint (see the
    /// contract above). Waits while another transaction holds it.
    fn begin(&self, projection: &str) -> impl Future<Output = Result<Self::Tx, StoreError>> + Send;

    /// `projection`'s committed position (0 when it has none), without
    /// locking anything.
    fn position(&self, projection: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Every stored checkpoint, by projection name.
    fn checkpoints(&self) -> impl Future<Output = Result<Vec<Checkpoint>, StoreError>> + Send;
}

/// The transaction of one batch ([`CheckpointStore::begin`]).
pub trait CheckpointTx: Send + 'static {
    /// The projection whose checkpoint the transaction holds.
    fn projection(&self) -> &str;

    /// The position: as committed when the transaction began, or as last
    /// set in it.
    fn position(&self) -> u64;

    /// Writes `position` as the checkpoint, in this transaction (forward, or
    /// back to 0 for a rebuild).
    fn set_position(
        &mut self,
        position: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Commits the read model's writes and the checkpoint together.
    fn commit(self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Rolls both back (dropping the transaction does too).
    fn rollback(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
