//! Projectors: read models built from an ordered event log, with a stored
//! checkpoint, rebuildable from the start (seed 004's *Projectors*).
//!
//! A [`Projection`] turns events into rows of a read model (a per-donor
//! total, a campaign dashboard, a search index table). A [`Projector`] feeds
//! it from a [`ReplaySource`] — an ordered log whose entries have `u64`
//! positions and that can be read again from any position, such as a NATS
//! JetStream stream (`proclaim_nats::JetStreamReplay`) or the in-memory
//! [`MemoryLog`] — and keeps the position of the last applied entry, the
//! *checkpoint*, in a [`CheckpointStore`] in the read model's own database
//! (`PgCheckpoints`, `MySqlCheckpoints`, `SqliteCheckpoints`).
//!
//! **Exactly once, by construction.** Each batch runs in one database
//! transaction: the store locks the projection's checkpoint row, the
//! projection writes its read model through that transaction
//! ([`Projection::apply`]), the new position is written into the same row,
//! and everything commits together. A crash, a kill or a failed commit
//! leaves either the whole batch with its checkpoint or neither, so after a
//! restart the projector continues at the first entry not applied: no entry
//! is applied twice and none is skipped — also when the commit's outcome
//! was unknown (the next batch reads the checkpoint under the lock and
//! starts after whatever did commit). Several runners of one projection (two
//! instances of a service) take turns on the checkpoint row; the second
//! sees how far the first got and applies only what follows.
//!
//! **Failures.** A transient failure — the database or the log unreachable,
//! a deadlock, [`ProjectionError::transient`] — rolls the batch back and
//! retries it with [`Backoff`](crate::Backoff), forever by default. A
//! permanent failure of [`Projection::apply`] or an entry that does not
//! decode *stops* the projector with a [`ProjectorError`] naming the
//! position, after committing the entries before it: a read model that
//! silently skipped an event would be wrong without anyone knowing. Fix the
//! projection (or the log) and start it again; it resumes at that entry. To
//! move past an entry on purpose, set the checkpoint yourself
//! ([`CheckpointStore::begin`], [`CheckpointTx::set_position`], commit) —
//! a visible, deliberate act.
//!
//! **Rebuild.** [`Projector::rebuild`] resets the read model
//! ([`Projection::reset`]) and sets the checkpoint back to 0 in one
//! transaction, then replays the log from the start. Readers see the read
//! model empty and then growing back; to switch over at once, build the new
//! version under another projection name into other tables and switch
//! readers when it has caught up.
//!
//! Metrics (label `projection`): the gauges `proclaim_projector_position`
//! (the checkpoint) and `proclaim_projector_lag` (positions between the
//! checkpoint and the log's end, when the source knows its end), the
//! counters `proclaim_projector_events_applied_total`,
//! `_events_skipped_total` (entries the projection does not want),
//! `_batches_total`, `_retries_total`, `_checkpoint_moved_total` (another
//! runner, or a rebuild elsewhere, moved the checkpoint), `_rebuilds_total`,
//! `_failures_total` (stops), and the histogram
//! `proclaim_projector_batch_seconds`. Each run is in a `projector` span
//! with the projection's name, each batch in a `projector_batch` span.
//!
//! ```
//! use proclaim_core::Event;
//! use proclaim_core::projector::{
//!     CheckpointTx, MemoryLog, Projection, ProjectionError, Projector,
//! };
//! # use proclaim_core::projector::{Checkpoint, CheckpointStore};
//! # use proclaim_core::StoreError;
//! # use std::sync::{Arc, Mutex};
//! # /// A toy checkpoint store keeping the read model in memory.
//! # #[derive(Clone, Default)]
//! # struct Memory(Arc<Mutex<(u64, i64)>>);
//! # struct MemoryTx { store: Memory, position: u64, total: i64 }
//! # impl CheckpointTx for MemoryTx {
//! #     fn projection(&self) -> &str { "totals" }
//! #     fn position(&self) -> u64 { self.position }
//! #     async fn set_position(&mut self, position: u64) -> Result<(), StoreError> {
//! #         self.position = position; Ok(())
//! #     }
//! #     async fn commit(self) -> Result<(), StoreError> {
//! #         *self.store.0.lock().unwrap() = (self.position, self.total); Ok(())
//! #     }
//! #     async fn rollback(self) -> Result<(), StoreError> { Ok(()) }
//! # }
//! # impl CheckpointStore for Memory {
//! #     type Tx = MemoryTx;
//! #     async fn begin(&self, _: &str) -> Result<MemoryTx, StoreError> {
//! #         let (position, total) = *self.0.lock().unwrap();
//! #         Ok(MemoryTx { store: self.clone(), position, total })
//! #     }
//! #     async fn position(&self, _: &str) -> Result<u64, StoreError> { Ok(self.0.lock().unwrap().0) }
//! #     async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> { Ok(Vec::new()) }
//! # }
//!
//! /// The total of every donation: one number, kept in `MemoryTx::total`.
//! struct Totals;
//!
//! impl Projection<MemoryTx> for Totals {
//!     fn name(&self) -> &str {
//!         "totals"
//!     }
//!
//!     fn wants(&self, event: &Event) -> bool {
//!         event.event_type() == "DonorSecured"
//!     }
//!
//!     async fn apply(&self, tx: &mut MemoryTx, event: &Event) -> Result<(), ProjectionError> {
//!         let cents: i64 = event
//!             .data_as()
//!             .map_err(|e| ProjectionError::permanent("bad donation").with_source(e))?;
//!         tx.total += cents; // with a database: an UPDATE through the transaction
//!         Ok(())
//!     }
//!
//!     async fn reset(&self, tx: &mut MemoryTx) -> Result<(), ProjectionError> {
//!         tx.total = 0;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let log = MemoryLog::new();
//! for cents in [250_000, 5_000] {
//!     log.append(Event::builder("DonorSecured").subject("donor-42").data(&cents).build()?);
//! }
//! log.append(Event::builder("PledgeMade").subject("donor-42").build()?); // not wanted: skipped
//!
//! let store = Memory::default();
//! let mut projector = Projector::new(Totals, store.clone(), log.clone()).batch_size(100);
//! let report = projector.catch_up().await?;
//! assert_eq!((report.position, report.applied, report.skipped), (3, 2, 1));
//! assert_eq!(*store.0.lock().unwrap(), (3, 255_000));
//!
//! // From scratch: the read model and the checkpoint reset together, then a replay.
//! projector.rebuild().await?;
//! assert_eq!(*store.0.lock().unwrap(), (3, 255_000));
//! # Ok(()) }
//! ```

mod checkpoint;
mod runner;
mod source;

#[cfg(test)]
mod tests;

use std::future::Future;

use crate::store::BoxError;
use crate::{Event, StoreError};

pub use checkpoint::{Checkpoint, CheckpointStore, CheckpointTx};
pub use runner::{Projector, ProjectorError, ProjectorHandle, ProjectorReport};
pub use source::{MemoryLog, ReplayEntry, ReplayError, ReplaySource, Undecodable};

/// Longest projection name, in bytes: the stores keep it in a
/// `VARCHAR(255)` (MySQL) or `TEXT` column.
pub const MAX_PROJECTION_NAME_LEN: usize = 255;

/// A read model built from events: how one event changes it, and how to
/// clear it for a rebuild. `Tx` is the checkpoint store's transaction
/// ([`CheckpointStore::Tx`]), e.g. `proclaim_postgres::PgCheckpointTx`,
/// which gives access to its database connection: write the read model
/// through it, so the writes commit with the checkpoint.
///
/// Contract:
/// - [`apply`](Projection::apply) is called once per entry, in log order,
///   inside the batch's transaction; return every database error (a
///   transaction that failed half-way is rolled back and the batch is
///   retried — a swallowed error could leave writes behind). It must not
///   commit or roll back the transaction itself.
/// - Do not read anything outside the log and the read model that can
///   change between a run and a rebuild, or a rebuild gives another result.
/// - [`reset`](Projection::reset) must clear everything `apply` wrote.
///
/// ```
/// use proclaim_core::Event;
/// use proclaim_core::projector::{Projection, ProjectionError};
///
/// /// Counts events by type (the transaction here is a plain map).
/// struct TypeCounts;
///
/// impl Projection<std::collections::BTreeMap<String, u64>> for TypeCounts {
///     fn name(&self) -> &str {
///         "type-counts"
///     }
///
///     async fn apply(
///         &self,
///         tx: &mut std::collections::BTreeMap<String, u64>,
///         event: &Event,
///     ) -> Result<(), ProjectionError> {
///         *tx.entry(event.event_type().to_owned()).or_default() += 1;
///         Ok(())
///     }
///
///     async fn reset(
///         &self,
///         tx: &mut std::collections::BTreeMap<String, u64>,
///     ) -> Result<(), ProjectionError> {
///         tx.clear();
///         Ok(())
///     }
/// }
/// ```
pub trait Projection<Tx>: Send + Sync + 'static {
    /// The projection's name: the key of its checkpoint and the
    /// `projection` label of its metrics (1-255 bytes). A new name starts
    /// from position 0.
    fn name(&self) -> &str;

    /// Whether the projection takes `event` (default: every event). An event
    /// it does not take is not applied, but the checkpoint moves past it.
    fn wants(&self, event: &Event) -> bool {
        let _ = event;
        true
    }

    /// Applies one event to the read model, through `tx`.
    fn apply(
        &self,
        tx: &mut Tx,
        event: &Event,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Clears the read model, through `tx`, for a rebuild from position 0.
    fn reset(&self, tx: &mut Tx) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// Whether a projection failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionErrorKind {
    /// The database was unavailable, a transaction deadlocked, …: the batch
    /// is rolled back and retried with backoff.
    Transient,
    /// The event cannot be applied (its data does not fit, it breaks an
    /// invariant of the read model): the projector stops before it.
    Permanent,
}

/// A failed [`Projection::apply`] or [`Projection::reset`].
///
/// `?` on a [`StoreError`] gives a transient error when the database was
/// unavailable and a permanent one otherwise; each store crate has a
/// `projection_error` function that classifies its `sqlx::Error`s the same
/// way.
///
/// ```
/// use proclaim_core::projector::ProjectionError;
///
/// let busy = ProjectionError::transient("deadlock");
/// assert!(busy.is_transient());
/// let bad = ProjectionError::permanent("amount is negative")
///     .with_source(std::io::Error::other("-5"));
/// assert!(!bad.is_transient());
/// assert_eq!(bad.full_message(), "amount is negative: -5");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProjectionError {
    kind: ProjectionErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl ProjectionError {
    /// A failure that may go away when the batch is tried again.
    pub fn transient(message: impl Into<String>) -> Self {
        ProjectionError {
            kind: ProjectionErrorKind::Transient,
            message: message.into(),
            source: None,
        }
    }

    /// A failure that will happen again for this event.
    pub fn permanent(message: impl Into<String>) -> Self {
        ProjectionError {
            kind: ProjectionErrorKind::Permanent,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The classification.
    pub fn kind(&self) -> ProjectionErrorKind {
        self.kind
    }

    /// True for [`ProjectionErrorKind::Transient`].
    pub fn is_transient(&self) -> bool {
        self.kind == ProjectionErrorKind::Transient
    }

    /// The message with every source in the chain.
    pub fn full_message(&self) -> String {
        full_message(&self.message, self.source.as_deref())
    }
}

impl From<StoreError> for ProjectionError {
    fn from(e: StoreError) -> Self {
        let error = if e.is_transient() {
            ProjectionError::transient("database unavailable")
        } else {
            ProjectionError::permanent("database error")
        };
        error.with_source(e)
    }
}

/// `message` followed by each error of the chain not already in the text.
pub(crate) fn full_message(
    message: &str,
    source: Option<&(dyn std::error::Error + Send + Sync + 'static)>,
) -> String {
    let mut out = message.to_owned();
    let mut next = source.map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(err) = next {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = err.source();
    }
    out
}
