//! The [`OutboxStore`] trait: what the relay needs from a database.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

use crate::{ClaimedBatch, LeaseToken};

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached or the connection broke; retrying
    /// later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The database refused a statement (permissions, missing table, …).
    #[error("database error: {0}")]
    Database(#[source] BoxError),
    /// The store was configured wrongly (bad table name, …).
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The event could not be written (it failed validation).
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] crate::EventError),
}

impl StoreError {
    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One event whose publish failed but that will be tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The row.
    pub sequence: i64,
    /// How long to wait before the next attempt.
    pub delay: Duration,
    /// The publisher's error, kept as the row's last error.
    pub error: String,
}

/// One event that will not be tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The row.
    pub sequence: i64,
    /// The last error, kept with the row.
    pub error: String,
}

/// What happened to a claimed batch; a store applies it atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Published and acknowledged by the broker.
    pub published: Vec<i64>,
    /// To be retried after a delay.
    pub retry: Vec<Retry>,
    /// Given up on.
    pub dead: Vec<DeadLetter>,
    /// Not attempted (the relay stopped, or an earlier event of the same key
    /// failed): handed back without counting an attempt.
    pub released: Vec<i64>,
}

impl BatchOutcome {
    /// Number of rows the outcome covers.
    pub fn len(&self) -> usize {
        self.published.len() + self.retry.len() + self.dead.len() + self.released.len()
    }
    /// True when the outcome covers no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What happens to a row once its event is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Delete the row (the default: the table stays small).
    #[default]
    Delete,
    /// Mark it published and keep it, to be purged after the retention period.
    Retain,
}

/// How many rows of an outcome a store applied. Fewer than were sent means
/// the lease was lost (another relay reclaimed the rows after it expired).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompleteReport {
    /// Rows updated or deleted.
    pub applied: u64,
    /// Rows no longer held under the token.
    pub lost: u64,
}

/// Counts of the outbox, for `proclaim status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    /// Undelivered events not currently claimed by a relay.
    pub pending: u64,
    /// Undelivered events claimed under a live lease.
    pub in_flight: u64,
    /// Events given up on.
    pub dead_lettered: u64,
    /// Published events kept for the retention period.
    pub published_retained: u64,
    /// Age of the oldest undelivered event, in milliseconds (0 when none).
    pub oldest_pending_age_ms: u64,
}

/// A stream of "new events were committed" hints. Hints may be lost or
/// spurious; the relay keeps polling as the fallback.
pub type Wakeups = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// What the relay needs from a database. Implemented by each store crate.
///
/// Contract:
/// - `claim` returns only committed, undelivered events whose retry time has
///   come, that no live lease holds, and whose every earlier event of the same
///   subject is delivered, dead-lettered, or in the same claim (per-key
///   order). It leases them to `token` for `lease` and counts an attempt.
///   Concurrent claimers never receive the same row while its lease lives.
///   A transaction that commits late is never skipped (no offset cursor).
/// - `complete` applies an outcome atomically, only to rows still held under
///   `token`.
pub trait OutboxStore: Send + Sync + 'static {
    /// Claims up to `limit` events for `lease`.
    fn claim(
        &self,
        token: LeaseToken,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimedBatch, StoreError>> + Send;

    /// Records what happened to a claimed batch.
    fn complete(
        &self,
        token: LeaseToken,
        outcome: &BatchOutcome,
        mode: AckMode,
    ) -> impl Future<Output = Result<CompleteReport, StoreError>> + Send;

    /// Deletes published rows kept longer than `older_than`; returns how many.
    fn purge_published(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Current counts.
    fn stats(&self) -> impl Future<Output = Result<OutboxStats, StoreError>> + Send;

    /// Hints that new events were committed, if the store can give them.
    /// The default is `None`: the relay then only polls.
    fn wakeups(&self) -> impl Future<Output = Result<Option<Wakeups>, StoreError>> + Send {
        async { Ok(None) }
    }
}
